"""The synthetic families: exact answers (checked here by code written apart from the generator), many
distinct prompts per family, a difficulty table that does what it says, and rows that fit seq 128."""

import json
import re
from collections import Counter

import pytest

from grit_study.data import tokenize_row
from grit_study.models import load_tokenizer
from grit_study.synthetic import (DIFFICULTY, FAMILIES, check_row, describe, prompt_space, resolve_difficulty,
                                  synthetic_rows)

ORDINAL = {w: i for i, w in enumerate(["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                                       "ninth", "tenth"])}


def expected_answer(r):
    """Each family's answer, recomputed from the prompt text without the package's solvers."""
    text, ins = r["input"], r["instruction"]
    words = text.split(" ")
    if r["family"] == "reverse_words":
        return " ".join(words[::-1])
    if r["family"] == "sort_numbers":
        return ", ".join(str(n) for n in sorted(int(x) for x in text.split(", ")))
    if r["family"] == "count_words":
        return str(len(words))
    if r["family"] == "uppercase":
        return "".join(c.upper() for c in text)
    if r["family"] == "first_letters":
        return "-".join(w[:1] for w in words)
    if r["family"] == "json_record":
        m = re.fullmatch(r"The (\w+) is (\w+) and there are (\d+) of them\.", text)
        facts = {"item": m[1], "color": m[2], "count": int(m[3])}
        keys = re.findall(r'"(\w+)"', ins)
        return "{" + ", ".join(f'"{k}": ' + (str(facts[k]) if k == "count" else f'"{facts[k]}"') for k in keys) + "}"
    if r["family"] == "add_numbers":
        a, b = text.split(" + ")
        return str(int(a) + int(b))
    if r["family"] == "nth_word":
        return words[ORDINAL[ins.split()[3]]]
    raise AssertionError(f"unknown family {r['family']}")


def test_rows_are_deterministic_prefix_stable_and_exactly_answered():
    rows = synthetic_rows(1600, seed=5)
    assert rows == synthetic_rows(1600, seed=5) and rows != synthetic_rows(1600, seed=6)
    assert synthetic_rows(800, seed=5) == rows[:800]
    assert [r["family"] for r in rows[:len(FAMILIES)]] == list(FAMILIES)
    assert Counter(r["family"] for r in rows) == {f: 200 for f in FAMILIES}
    for r in rows:
        assert r["output"] == expected_answer(r), r
        assert check_row(r)
        assert check_row({**r, "output": r["output"] + " "}) is False
    json_rows = [r for r in rows if r["family"] == "json_record"]
    assert all(list(json.loads(r["output"])) == re.findall(r'"(\w+)"', r["instruction"]) for r in json_rows)


def test_every_family_has_thousands_of_distinct_prompts():
    rows = synthetic_rows(8 * 2000, seed=0)
    prompts = Counter((r["family"], r["instruction"], r["input"]) for r in rows)
    assert max(prompts.values()) == 1  # no prompt repeats, in any family
    assert Counter(f for f, _, _ in prompts) == {f: 2000 for f in FAMILIES}
    assert min(prompt_space(f) for f in FAMILIES) >= 8000


def test_running_out_of_prompts_is_an_error_not_a_repeat():
    # One-digit sums: 10 x 10 = 100 prompts; asking for 101 of them must fail and say what to do.
    assert prompt_space("add_numbers", {"add_numbers": {"digits": (1, 1)}}) == 100
    rows = synthetic_rows(8 * 100, seed=1, difficulty={"add_numbers": {"digits": (1, 1)}})
    assert len({r["input"] for r in rows if r["family"] == "add_numbers"}) == 100
    with pytest.raises(ValueError, match=r"'add_numbers' ran out of distinct prompts after 100 rows.*widen"):
        synthetic_rows(8 * 101, seed=1, difficulty={"add_numbers": {"digits": (1, 1)}})


def test_difficulty_knobs_set_the_ranges():
    table = {"reverse_words": {"words": (5, 5)}, "sort_numbers": {"numbers": (2, 2), "max_value": 9},
             "count_words": {"words": (12, 14)}, "add_numbers": {"digits": (3, 3)},
             "nth_word": {"words": (9, 9)}, "json_record": {"keys": (1, 1)}, "uppercase": {"words": (4, 4)},
             "first_letters": {"words": (2, 2)}}
    rows = synthetic_rows(8 * 60, seed=2, difficulty=table)
    by = {f: [r for r in rows if r["family"] == f] for f in FAMILIES}
    assert {len(r["input"].split()) for r in by["reverse_words"]} == {5}
    assert all(len(r["input"].split(", ")) == 2 and max(map(int, r["input"].split(", "))) <= 9
               for r in by["sort_numbers"])
    assert {len(r["input"].split()) for r in by["count_words"]} == {12, 13, 14}
    assert all(len(x) == 3 for r in by["add_numbers"] for x in r["input"].split(" + "))
    assert {len(r["input"].split()) for r in by["nth_word"]} == {9}
    assert all(len(json.loads(r["output"])) == 1 for r in by["json_record"])
    assert {len(r["input"].split()) for r in by["uppercase"]} == {4}
    assert {len(r["output"].split("-")) for r in by["first_letters"]} == {2}
    assert describe(table)["difficulty_hash"] != describe()["difficulty_hash"]
    assert describe()["difficulty"] == {f: {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()}
                                        for f, knobs in DIFFICULTY.items()}


@pytest.mark.parametrize("bad,message", [
    ({"reverse_words": {"words": (4, 3)}}, r"reverse_words.words=\(4, 3\): expected a range"),
    ({"reverse_words": {"words": 4}}, r"reverse_words.words=4: expected a range"),
    ({"nth_word": {"words": (2, 11)}}, r"nth_word.words=\(2, 11\).*within \[2, 10\]"),
    ({"sort_numbers": {"numbers": (3, 12), "max_value": 10}}, r"cannot be distinct within 1..10"),
    ({"add_numbers": {"digit": (1, 2)}}, r"add_numbers: unknown difficulty knob"),
    ({"poetry": {}}, r"unknown synthetic family 'poetry'"),
])
def test_bad_difficulty_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve_difficulty(bad)


def test_rows_fit_seq_128_with_the_alpaca_template():
    tok = load_tokenizer("builtin:tiny")
    rows = synthetic_rows(2000, seed=3407)
    lengths = [len(tokenize_row(r, tok, "alpaca", 10_000)["input_ids"]) for r in rows]
    assert max(lengths) <= 128
