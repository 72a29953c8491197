"""An offline instruction set with exact answers, generated deterministically.

Every family has one correct answer per prompt, so a CPU run can score exact-match accuracy as
well as loss. The families are short, template-regular string manipulations: a 135M model learns
their format within a few dozen steps and their content over the CPU study's budget, while the
untuned base model rarely answers them exactly.
"""

from __future__ import annotations

import random

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket",
    "garden", "silver", "bottle", "window", "planet", "dragon", "pencil", "orange", "mirror", "castle",
    "summer", "winter", "yellow", "purple", "butter", "coffee", "button", "jacket", "ticket", "monkey",
)
COLORS = ("red", "green", "blue", "black", "white", "pink", "brown", "gray")


def _words(rng: random.Random, k: int) -> list[str]:
    return rng.sample(WORDS, k)


def _reverse_words(rng: random.Random) -> dict:
    ws = _words(rng, rng.randint(3, 5))
    return {"instruction": "Reverse the order of the words.", "input": " ".join(ws), "output": " ".join(reversed(ws))}


def _sort_numbers(rng: random.Random) -> dict:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    return {"instruction": "Sort the numbers in ascending order.", "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, sorted(nums)))}


def _count_words(rng: random.Random) -> dict:
    ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
    return {"instruction": "How many words are in the text? Answer with a number.", "input": " ".join(ws),
            "output": str(len(ws))}


def _uppercase(rng: random.Random) -> dict:
    ws = _words(rng, rng.randint(2, 4))
    return {"instruction": "Rewrite the text in uppercase.", "input": " ".join(ws), "output": " ".join(ws).upper()}


def _first_letters(rng: random.Random) -> dict:
    ws = _words(rng, rng.randint(3, 5))
    return {"instruction": "Write the first letter of each word, separated by hyphens.", "input": " ".join(ws),
            "output": "-".join(w[0] for w in ws)}


def _json_pair(rng: random.Random) -> dict:
    item, color = rng.choice(WORDS), rng.choice(COLORS)
    return {"instruction": f"Format as JSON with keys \"item\" and \"color\": the {item} is {color}.", "input": "",
            "output": f'{{"item": "{item}", "color": "{color}"}}'}


FAMILIES = {
    "reverse_words": _reverse_words,
    "sort_numbers": _sort_numbers,
    "count_words": _count_words,
    "uppercase": _uppercase,
    "first_letters": _first_letters,
    "json_pair": _json_pair,
}


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` Alpaca-format rows, families interleaved round-robin; the same list for the same (n, seed)
    in every process (``random.Random`` is stable across platforms and Python versions)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"grit-synthetic-{seed}")
    makers = list(FAMILIES.values())
    rows = []
    for i in range(n):
        row = makers[i % len(makers)](rng)
        row["family"] = list(FAMILIES)[i % len(makers)]
        rows.append(row)
    return rows
