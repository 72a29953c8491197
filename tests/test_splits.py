"""Train / val / test: disjoint by prompt, stratified by family, decided by the data seed alone.

Disjointness is checked twice, independently of the split's own bookkeeping: on the rendered prompt
text of the rows (written out here from the literal template) and on the prompt tokens of the
tokenized examples that training actually receives.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from grit_study.data import IGNORE_INDEX, DataError, build_study_data, split_by_prompt
from grit_study.models import load_tokenizer
from grit_study.synthetic import FAMILIES

HEADER = ("Below are some instructions that describe some tasks. Write responses that appropriately "
          "complete each request.")


def rendered(row):
    instruction = row["instruction"] + (f"\nYour input is:\n{row['input']}" if row.get("input") else "")
    return f"{HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def prompt_tokens(example):
    n = 0
    while example["labels"][n] == IGNORE_INDEX:
        n += 1
    return tuple(example["input_ids"][:n])


def assert_disjoint(data):
    texts = {name: [rendered(r) for r in getattr(data, f"{name}_rows")] for name in ("train", "val", "test")}
    tokens = {name: {prompt_tokens(e) for e in getattr(data, name)} for name in ("train", "val", "test")}
    for held in ("val", "test"):
        assert len(set(texts[held])) == len(texts[held]), f"a {held} prompt repeats within {held}"
        assert not set(texts[held]) & set(texts["train"]), f"{held} prompts occur in train"
        assert not tokens[held] & tokens["train"], f"{held} prompt tokens occur in train examples"
    assert not set(texts["val"]) & set(texts["test"])
    assert not tokens["val"] & tokens["test"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def synthetic(tok):
    # The smollm2-135m CPU study's sizes: 2000 rows, seq 128.
    return build_study_data(tok, source="synthetic", num_examples=2000, val_size=128, test_size=256,
                            max_seq_length=128, data_seed=3407)


def test_synthetic_splits_disjoint_by_prompt(synthetic):
    assert_disjoint(synthetic)
    assert (len(synthetic.val), len(synthetic.test)) == (128, 256)
    # Nothing is lost on the way: every row is in exactly one split or counted as removed/dropped.
    assert (len(synthetic.train) + len(synthetic.val) + len(synthetic.test) + synthetic.removed_overlap_val
            + synthetic.removed_overlap_test + synthetic.dropped_no_response) == 2000


def test_synthetic_test_split_is_stratified_by_family(synthetic, tok):
    families = list(FAMILIES)
    assert Counter(r["family"] for r in synthetic.test_rows) == {f: 256 // len(families) for f in families}
    assert Counter(r["family"] for r in synthetic.val_rows) == {f: 128 // len(families) for f in families}
    assert synthetic.summary()["test_families"] == {f: 32 for f in sorted(families)}
    # An uneven size: the remainder goes one each to the first families in sorted order.
    uneven = build_study_data(tok, source="synthetic", num_examples=800, val_size=0, test_size=8 * 32 + 3,
                              max_seq_length=128, data_seed=3407)
    assert Counter(r["family"] for r in uneven.test_rows) == {f: 32 + (f in sorted(families)[:3]) for f in families}


def test_file_source_with_duplicates_is_split_disjoint(tok, tmp_path):
    rows = []
    for i in range(40):
        rows.append({"instruction": f"Say the number {i}.", "input": "", "output": str(i)})
    for i in range(0, 40, 2):  # every other prompt again, half of them with another answer
        rows.append({"instruction": f"Say the number {i}.", "input": "", "output": str(i) if i % 4 else f"{i}!"})
    for i in range(0, 40, 5):  # and some a third time, with the input merged differently but the same text
        rows.append({"instruction": f"Say the number {i}.", "input": "", "output": str(i)})
    # Different fields, one rendered prompt: "instruction + input" equals a merged instruction.
    rows.append({"instruction": "Repeat", "input": "hello", "output": "hello"})
    rows.append({"instruction": "Repeat\nYour input is:\nhello", "input": "", "output": "hello"})
    path = tmp_path / "dupes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    data = build_study_data(tok, source=str(path), max_seq_length=128, val_size=8, test_size=8, data_seed=11)
    assert_disjoint(data)
    assert (len(data.val), len(data.test)) == (8, 8)
    copies = Counter(rendered(r) for r in rows)
    # Independent count of what had to leave train: every other copy of a held-out prompt.
    assert data.removed_overlap_val == sum(copies[rendered(r)] - 1 for r in data.val_rows)
    assert data.removed_overlap_test == sum(copies[rendered(r)] - 1 for r in data.test_rows)
    assert data.removed_overlap_val + data.removed_overlap_test > 0  # the duplicates were actually hit
    assert len(data.train) + 16 + data.removed_overlap_val + data.removed_overlap_test == len(rows)
    assert data.distinct_prompts == len(copies)
    assert all(r["family"] is None for r in data.test_rows) and len({r["id"] for r in data.test_rows}) == 8


SCRIPT = """
import json, sys
from grit_study.data import build_study_data
from grit_study.models import load_tokenizer
d = build_study_data(load_tokenizer("builtin:tiny"), source=sys.argv[1], num_examples=400, val_size=24,
                     test_size=40, max_seq_length=128, data_seed=int(sys.argv[2]))
print(json.dumps([d.train_fingerprint, d.val_fingerprint, d.test_fingerprint, [r["id"] for r in d.test_rows]]))
"""


def _in_process(tok, source, data_seed):
    d = build_study_data(tok, source=source, num_examples=400, val_size=24, test_size=40, max_seq_length=128,
                         data_seed=data_seed)
    return [d.train_fingerprint, d.val_fingerprint, d.test_fingerprint, [r["id"] for r in d.test_rows]]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["synthetic", "file"])
def test_same_data_seed_same_splits_across_processes(tok, tmp_path, source):
    if source == "file":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps({"instruction": f"Echo {i % 300}.", "input": "", "output": str(i)})
                                  for i in range(400)))
        source = str(path)
    here = _in_process(tok, source, 3407)
    assert here == _in_process(tok, source, 3407)
    out = subprocess.run([sys.executable, "-c", SCRIPT, source, "3407"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == here
    other = _in_process(tok, source, 3408)
    assert other[1] != here[1] and other[2] != here[2] and set(other[3]) != set(here[3])


def test_training_seed_cannot_enter_the_data(tok):
    with pytest.raises(TypeError, match="seed"):
        build_study_data(tok, source="synthetic", num_examples=40, val_size=4, seed=3407)


def test_test_split_does_not_move_with_val_size(tok):
    a = build_study_data(tok, source="synthetic", num_examples=400, val_size=16, test_size=40, max_seq_length=128,
                         data_seed=5)
    b = build_study_data(tok, source="synthetic", num_examples=400, val_size=64, test_size=40, max_seq_length=128,
                         data_seed=5)
    assert [r["id"] for r in a.test_rows] == [r["id"] for r in b.test_rows]
    assert a.test_fingerprint == b.test_fingerprint
    assert {r["id"] for r in a.val_rows} < {r["id"] for r in b.val_rows}


def test_split_by_prompt_quotas_follow_capacity():
    # Family "a" has 3 distinct prompts, "b" and "c" 30 each: "a" gives all it has, the rest spread evenly.
    prompts = [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(30)] + [f"c{i}" for i in range(30)] + ["b0", "c1"]
    families = ["a"] * 3 + ["b"] * 30 + ["c"] * 30 + ["b", "c"]
    s = split_by_prompt(prompts, families, val_size=6, test_size=20, data_seed=0)
    fam = dict(zip(prompts, families))
    assert Counter(fam[prompts[i]] for i in s.test) == {"a": 3, "b": 9, "c": 8}
    assert Counter(fam[prompts[i]] for i in s.val) == {"b": 3, "c": 3}
    held = {prompts[j] for j in s.val + s.test}
    assert s.train == [i for i in range(len(prompts)) if prompts[i] not in held]
    assert max(s.val + s.test) < 63  # a held-out prompt is represented by its first row
    assert len(s.train) + len(s.val) + len(s.test) + s.removed_overlap_val + s.removed_overlap_test == len(prompts)
    with pytest.raises(DataError, match="test split: asked for 64 distinct prompts, only 63"):
        split_by_prompt(prompts, families, val_size=0, test_size=64, data_seed=0)
    with pytest.raises(DataError, match="leave no training rows"):
        split_by_prompt(prompts, families, val_size=3, test_size=60, data_seed=0)
