"""An offline instruction set with exact answers, generated deterministically from a data seed.

Eight families of short string and number manipulations. Every prompt has one correct answer, a
string that ``Family.solve`` recomputes from the prompt text alone, so a CPU run can score exact match
as well as loss. Each family draws from a space of many thousands of distinct prompts, and
``synthetic_rows`` never repeats a prompt, so a test split of 32+ prompts per family never repeats one.

How hard each family is comes from one table, ``DIFFICULTY`` (list lengths, number sizes). The aim at
the default settings (smollm2-135m, 60 steps of 8 rows) is a control that is neither near 0% nor near
100% exact match on most families. Calibrate the table on the control only, then freeze it before any
GRIT run of a sweep: every run summary records the table (``describe()``), and any edit changes the
data fingerprints, so runs made with different tables can never be compared by mistake.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

# Bumped whenever what a family writes for a given seed and table changes.
SYNTHETIC_VERSION = 2

# Concrete nouns that are one token each (with their leading space) in SmolLM2's tokenizer, so a
# list's length in words and in tokens agree and no family is hard merely by tokenization.
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket",
    "garden", "silver", "bottle", "window", "planet", "dragon", "pencil", "orange", "mirror", "castle",
    "butter", "coffee", "button", "jacket", "ticket", "monkey", "table", "chair", "house", "horse",
    "bread", "water", "paper", "glass", "music", "money", "snake", "robot", "train", "plane",
    "truck", "ocean", "beach", "tower", "bridge", "island", "desert", "valley", "hammer", "basket",
    "pillow", "blanket", "carpet", "wallet", "camera", "laptop", "phone", "guitar", "violin", "drum",
    "doctor", "farmer", "artist", "singer", "banana", "cherry", "grape", "peach", "onion", "carrot",
    "potato", "tomato", "pepper", "cookie", "cheese", "honey", "sugar", "flower", "grass", "rabbit",
    "turtle", "eagle", "shark", "whale", "zebra", "lion", "bear", "wolf", "mouse", "kitten",
    "spoon", "knife", "plate", "shirt", "glove", "watch", "clock", "lamp", "door", "road",
    "city", "village", "market", "school", "office", "farm", "lake", "storm", "snow", "moon",
    "book", "letter", "coin", "bell", "boat", "ship", "bike", "map", "flag", "gift",
    "kitchen", "engine", "wheel", "mountain", "park", "hotel", "church", "library", "museum", "station",
)
COLORS = ("red", "green", "blue", "black", "white", "pink", "brown", "gray", "orange", "purple", "yellow", "silver")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
JSON_KEYS = ("item", "color", "count")
JSON_COUNTS = (2, 99)  # the "count" fact's range

# The difficulty knobs of every family, in one table. Ranges are inclusive (lo, hi) and drawn
# uniformly per row. Calibrate on the control, then freeze (see the module docstring).
DIFFICULTY: dict[str, dict[str, Any]] = {
    # Calibrated on the control only (smollm2-135m, 60 steps, lr 2e-4, the val split; both rounds in
    # benchmarks/results/synthetic_calibration.json). Round 1 (lists of 3-10) left it at 14% val exact
    # match, five families at 0-6%. Round 2, this table: 28% overall; add 25%, count 44%, json 62%,
    # reverse 31%, sort 38%, nth_word 12%, uppercase 12%, first_letters 0% (16 prompts each).
    # FROZEN on 2026-12-01 before any GRIT run of the sweep: changing it invalidates every sweep run.
    "reverse_words": {"words": (2, 3)},                   # list length
    "sort_numbers": {"numbers": (2, 4), "max_value": 99},  # list length; distinct integers 1..max_value
    "count_words": {"words": (2, 5)},                     # list length (words may repeat)
    "uppercase": {"words": (1, 2)},                       # list length
    "first_letters": {"words": (2, 4)},                   # list length
    "json_record": {"keys": (2, 3)},                      # keys asked for, in a random order, of 3 facts
    "add_numbers": {"digits": (2, 2)},                    # digits of each operand
    "nth_word": {"words": (3, 5)},                        # list length; the position is uniform in it
}

# Rows a family may reject as repeats before it is declared exhausted.
MAX_TRIES = 1000


def _rng_range(rng: random.Random, knob: tuple[int, int]) -> int:
    return rng.randint(knob[0], knob[1])


def _permutations(n: int, ks: tuple[int, int]) -> int:
    return sum(math.perm(n, k) for k in range(ks[0], ks[1] + 1))


def _input_words(text: str) -> list[str]:
    return text.split()


# ----------------------------------------------------------------------------- the families

def _reverse_words(rng, knobs):
    ws = rng.sample(WORDS, _rng_range(rng, knobs["words"]))
    return "Reverse the order of the words.", " ".join(ws), " ".join(reversed(ws))


def _solve_reverse_words(instruction, text):
    return " ".join(reversed(_input_words(text)))


def _sort_numbers(rng, knobs):
    nums = rng.sample(range(1, knobs["max_value"] + 1), _rng_range(rng, knobs["numbers"]))
    return "Sort the numbers in ascending order.", ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def _solve_sort_numbers(instruction, text):
    return ", ".join(str(n) for n in sorted(int(x) for x in text.split(", ")))


def _count_words(rng, knobs):
    ws = [rng.choice(WORDS) for _ in range(_rng_range(rng, knobs["words"]))]
    return "How many words are in the text? Answer with a number.", " ".join(ws), str(len(ws))


def _solve_count_words(instruction, text):
    return str(len(_input_words(text)))


def _uppercase(rng, knobs):
    ws = rng.sample(WORDS, _rng_range(rng, knobs["words"]))
    return "Rewrite the text in uppercase.", " ".join(ws), " ".join(ws).upper()


def _solve_uppercase(instruction, text):
    return text.upper()


def _first_letters(rng, knobs):
    ws = rng.sample(WORDS, _rng_range(rng, knobs["words"]))
    return ("Write the first letter of each word, separated by hyphens.", " ".join(ws), "-".join(w[0] for w in ws))


def _solve_first_letters(instruction, text):
    return "-".join(w[0] for w in _input_words(text))


def _json_record(rng, knobs):
    facts = {"item": rng.choice(WORDS), "color": rng.choice(COLORS), "count": rng.randint(*JSON_COUNTS)}
    keys = rng.sample(JSON_KEYS, _rng_range(rng, knobs["keys"]))
    quoted = [f'"{k}"' for k in keys]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    instruction = f"Write a JSON object with the key{'s' if len(keys) > 1 else ''} {listed}, in that order."
    text = f"The {facts['item']} is {facts['color']} and there are {facts['count']} of them."
    return instruction, text, json.dumps({k: facts[k] for k in keys})


def _solve_json_record(instruction, text):
    item, color, count = re.fullmatch(r"The (\w+) is (\w+) and there are (\d+) of them\.", text).groups()
    facts = {"item": item, "color": color, "count": int(count)}
    return json.dumps({k: facts[k] for k in re.findall(r'"(\w+)"', instruction)})


def _add_numbers(rng, knobs):
    def operand():
        d = _rng_range(rng, knobs["digits"])
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    a, b = operand(), operand()
    return "Add the two numbers. Answer with a number.", f"{a} + {b}", str(a + b)


def _solve_add_numbers(instruction, text):
    a, b = text.split(" + ")
    return str(int(a) + int(b))


def _nth_word(rng, knobs):
    ws = rng.sample(WORDS, _rng_range(rng, knobs["words"]))
    k = rng.randrange(len(ws))
    return f"What is the {ORDINALS[k]} word of the text? Answer with the word.", " ".join(ws), ws[k]


def _solve_nth_word(instruction, text):
    ordinal = re.match(r"What is the (\w+) word", instruction).group(1)
    return _input_words(text)[ORDINALS.index(ordinal)]


@dataclass(frozen=True)
class Family:
    """One task family: ``make(rng, knobs) -> (instruction, input, output)``; ``solve(instruction, input)``
    recomputes the one correct output from the prompt text; ``space(knobs)`` counts its distinct prompts."""

    name: str
    make: Callable[[random.Random, dict], tuple[str, str, str]]
    solve: Callable[[str, str], str]
    space: Callable[[dict], int]
    limits: dict[str, tuple[int, int]]  # the range each knob may take at all


W = len(WORDS)
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("reverse_words", _reverse_words, _solve_reverse_words,
           lambda k: _permutations(W, k["words"]), {"words": (2, 12)}),
    Family("sort_numbers", _sort_numbers, _solve_sort_numbers,
           lambda k: _permutations(k["max_value"], k["numbers"]), {"numbers": (2, 12), "max_value": (9, 999)}),
    Family("count_words", _count_words, _solve_count_words,
           lambda k: sum(W ** n for n in range(k["words"][0], k["words"][1] + 1)), {"words": (1, 20)}),
    Family("uppercase", _uppercase, _solve_uppercase,
           lambda k: _permutations(W, k["words"]), {"words": (1, 8)}),
    Family("first_letters", _first_letters, _solve_first_letters,
           lambda k: _permutations(W, k["words"]), {"words": (2, 12)}),
    Family("json_record", _json_record, _solve_json_record,
           lambda k: (W * len(COLORS) * (JSON_COUNTS[1] - JSON_COUNTS[0] + 1)
                      * _permutations(len(JSON_KEYS), k["keys"])), {"keys": (1, len(JSON_KEYS))}),
    Family("add_numbers", _add_numbers, _solve_add_numbers,
           lambda k: sum(10 ** d - (10 ** (d - 1) if d > 1 else 0)
                         for d in range(k["digits"][0], k["digits"][1] + 1)) ** 2, {"digits": (1, 9)}),
    Family("nth_word", _nth_word, _solve_nth_word,
           lambda k: sum(math.perm(W, n) * n for n in range(k["words"][0], k["words"][1] + 1)),
           {"words": (2, len(ORDINALS))}),
)}


# ----------------------------------------------------------------------------- the table, the rows

def resolve_difficulty(overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``DIFFICULTY`` with ``overrides`` (``{family: {knob: value}}``) applied, checked knob by knob."""
    table = copy.deepcopy(DIFFICULTY)
    for name, knobs in (overrides or {}).items():
        if name not in table:
            raise ValueError(f"unknown synthetic family {name!r}; families: {sorted(table)}")
        unknown = set(knobs) - set(table[name])
        if unknown:
            raise ValueError(f"{name}: unknown difficulty knob(s) {sorted(unknown)}; knobs: {sorted(table[name])}")
        table[name].update(knobs)
    if set(table) != set(FAMILIES):
        raise ValueError(f"DIFFICULTY must name every family {sorted(FAMILIES)}, names {sorted(table)}")
    for name, knobs in table.items():
        for knob, (lo, hi) in FAMILIES[name].limits.items():
            value = knobs[knob]
            if isinstance(DIFFICULTY[name][knob], tuple):
                shape = "a range (lo, hi) with lo <= hi"
                ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)
                      and lo <= value[0] <= value[1] <= hi)
                if ok:
                    knobs[knob] = tuple(value)
            else:
                shape, ok = "an int", isinstance(value, int) and lo <= value <= hi
            if not ok:
                raise ValueError(f"{name}.{knob}={value!r}: expected {shape} within [{lo}, {hi}]")
        if name == "sort_numbers" and knobs["numbers"][1] > knobs["max_value"]:
            raise ValueError(f"sort_numbers: numbers={knobs['numbers']} cannot be distinct within "
                             f"1..{knobs['max_value']}")
    return table


def prompt_space(name: str, difficulty: dict[str, dict[str, Any]] | None = None) -> int:
    """How many distinct prompts family ``name`` can write under the table (``resolve_difficulty``)."""
    return FAMILIES[name].space(resolve_difficulty(difficulty)[name])


def describe(difficulty: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a run summary records of the synthetic set: version, family order, table, and its hash."""
    table = resolve_difficulty(difficulty)
    plain = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()}
             for name, knobs in table.items()}
    text = json.dumps({"version": SYNTHETIC_VERSION, "families": list(FAMILIES), "difficulty": plain}, sort_keys=True)
    return {"version": SYNTHETIC_VERSION, "families": list(FAMILIES), "difficulty": plain,
            "difficulty_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def check_row(row: dict) -> bool:
    """True when ``row["output"]`` is the one correct answer to its prompt (recomputed by its family)."""
    return FAMILIES[row["family"]].solve(row["instruction"], row.get("input", "")) == row["output"]


def synthetic_rows(n: int, seed: int = 0, difficulty: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """``n`` Alpaca-format rows ``{"instruction", "input", "output", "family"}``, families interleaved
    round-robin, no prompt repeated; the same list for the same (n, seed, table) in every process
    (``random.Random`` with a string seed is stable across platforms and Python versions), and the rows
    for n are a prefix of the rows for any larger n."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    table = resolve_difficulty(difficulty)
    rng = random.Random(f"grit-synthetic-v{SYNTHETIC_VERSION}-{seed}")
    names = list(FAMILIES)
    seen: set[tuple[str, str]] = set()
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        for _ in range(MAX_TRIES):
            instruction, text, output = FAMILIES[name].make(rng, table[name])
            if (instruction, text) not in seen:
                break
        else:
            raise ValueError(f"synthetic family {name!r} ran out of distinct prompts after {i // len(names)} rows "
                             f"(it can write {prompt_space(name, difficulty)} under {table[name]}); widen its "
                             "DIFFICULTY ranges or ask for fewer rows (num_examples)")
        seen.add((instruction, text))
        rows.append({"instruction": instruction, "input": text, "output": output, "family": name})
    return rows
