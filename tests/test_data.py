"""The shared data pipeline, checked against expectations written out independently in the tests.

The expected token sequences are built here from the literal template text (not from the
package's constants), tokenized piece by piece with the real SmolLM2 tokenizer.
"""

import json

import pytest
import torch

from grit_study.data import (IGNORE_INDEX, DataError, PadCollator, build_study_data, fingerprint, load_rows,
                             response_token_count, tokenize_row)
from grit_study.models import load_tokenizer

ROWS = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Reverse the order of the words.", "input": "apple river stone", "output": "stone river apple"},
    {"instruction": "Translate to French:", "input": "good morning", "output": "Bonjour, le matin."},
]

# The seed baseline's template (Unsloth's Llama-3 Ollama notebook), typed out by hand.
HEADER = ("Below are some instructions that describe some tasks. Write responses that appropriately "
          "complete each request.")


def alpaca_prompt_text(row):
    instruction = row["instruction"] + (f"\nYour input is:\n{row['input']}" if row["input"] else "")
    return f"{HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def chatml_prompt_text(row):
    instruction = row["instruction"] + (f"\nYour input is:\n{row['input']}" if row["input"] else "")
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny")


def test_eos_is_im_end(tok):
    # SmolLM2-Instruct ends a turn with <|im_end|>; a wrong EOS means endless generation after export.
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


@pytest.mark.parametrize("template,prompt_text", [("alpaca", alpaca_prompt_text), ("chat", chatml_prompt_text)])
@pytest.mark.parametrize("row", ROWS, ids=["no-input", "with-input", "punctuation"])
def test_tokens_and_labels_match_template(tok, template, prompt_text, row):
    prompt = tok(prompt_text(row), add_special_tokens=False)["input_ids"]
    if template == "chat":
        # The ChatML text is written with its special tokens inline; they must map to single ids.
        assert prompt[0] == tok.convert_tokens_to_ids("<|im_start|>")
    response = tok(row["output"], add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    ex = tokenize_row(row, tok, template, max_seq_length=512)

    assert ex["input_ids"] == prompt + response + [eos]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response + [eos]
    labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == row["output"] + "<|im_end|>"


def test_truncation_and_dropped_rows(tok):
    row = ROWS[1]
    full = tokenize_row(row, tok, "alpaca", max_seq_length=512)
    n_prompt = sum(lab == IGNORE_INDEX for lab in full["labels"])
    cut = tokenize_row(row, tok, "alpaca", max_seq_length=n_prompt + 1)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 1]
    assert cut["labels"][-1] == full["input_ids"][n_prompt] and cut["labels"].count(IGNORE_INDEX) == n_prompt
    assert tokenize_row(row, tok, "alpaca", max_seq_length=n_prompt) is None


def test_dropped_examples_are_counted(tok, tmp_path):
    long_row = {"instruction": "word " * 200, "input": "", "output": "ok"}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [long_row] + ROWS * 4))
    data = build_study_data(tok, source=str(path), max_seq_length=120, val_size=2, data_seed=1)
    assert data.dropped_no_response == 1
    # ROWS * 4 repeats each prompt 4 times: the copies of the 2 val prompts leave train, counted.
    assert len(data.train) + len(data.val) + data.removed_overlap_val == len(ROWS) * 4


def test_collator_never_labels_padding_or_prompt(tok):
    examples = [tokenize_row(r, tok, "alpaca", 512) for r in ROWS]
    batch = PadCollator(pad_token_id=tok.pad_token_id)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    for i, row in enumerate(ROWS):
        n_response = len(tok(row["output"], add_special_tokens=False)["input_ids"]) + 1
        assert int((batch["labels"][i] != IGNORE_INDEX).sum()) == n_response
        n_prompt = len(tok(alpaca_prompt_text(row), add_special_tokens=False)["input_ids"])
        assert (batch["labels"][i, :n_prompt] == IGNORE_INDEX).all()


def test_loss_on_padding_reproduces_published_artifact(tok):
    examples = [tokenize_row(r, tok, "alpaca", 512) for r in ROWS]
    batch = PadCollator(pad_token_id=tok.eos_token_id, loss_on_padding=True, max_seq_length=160)(examples)
    assert batch["input_ids"].shape == (len(ROWS), 160)
    assert torch.equal(batch["labels"], batch["input_ids"])  # prompt and EOS padding scored, as published
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all()


# ----------------------------------------------------------------------------- sources and bad input

def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_sources_json_jsonl_csv_agree(tmp_path):
    as_json = _write(tmp_path, "a.json", json.dumps(ROWS))
    as_jsonl = _write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    lines = ["instruction,input,output"] + [
        ",".join('"' + r[k].replace('"', '""') + '"' for k in ("instruction", "input", "output")) for r in ROWS]
    as_csv = _write(tmp_path, "a.csv", "\n".join(lines) + "\n")
    ids = set()
    for path in (as_json, as_jsonl, as_csv):
        rows, skipped = load_rows(str(path))
        assert [{k: r[k] for k in ("instruction", "input", "output")} for r in rows] == ROWS and skipped == 0
        assert all(r["family"] is None for r in rows)
        ids.add(tuple(r["id"] for r in rows))
    assert len(ids) == 1 and len(set(next(iter(ids)))) == len(ROWS)  # one id per prompt, whatever the format


BAD_CASES = [
    ("missing-file", None, "does not exist"),
    ("malformed-json-line", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2: malformed JSON"),
    ("missing-instruction", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n', "line 2: missing required field 'instruction'"),
    ("missing-output", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "line 2: missing required field 'output'"),
    ("non-string", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n', "line 2: field 'output' must be a string"),
    ("non-string-input", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": ["x"], "output": "b"}\n', "line 2: field 'input' must be a string"),
    ("empty-output", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "  "}\n', "line 2: field 'output' is empty"),
]


@pytest.mark.parametrize("case,text,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_errors_name_file_and_row(tmp_path, case, text, message):
    path = tmp_path / "data.jsonl"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("case,text,message", BAD_CASES[1:], ids=[c[0] for c in BAD_CASES[1:]])
def test_bad_rows_skipped_and_counted_on_request(tmp_path, caplog, case, text, message):
    path = _write(tmp_path, "data.jsonl", text + '{"instruction": "c", "output": "d"}\n')
    rows, skipped = load_rows(str(path), on_bad_rows="skip")
    assert skipped == 1
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in rows] == [
        {"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}]
    assert "skipped 1 bad row(s)" in caplog.text


def test_bad_rows_in_json_array_and_csv_name_the_row(tmp_path):
    path = _write(tmp_path, "a.json", json.dumps([ROWS[0], {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"a\.json:row 1: missing required field 'output'"):
        load_rows(str(path))
    path = _write(tmp_path, "a.csv", "instruction,input,output\nq,,a\nq,,\n")
    with pytest.raises(DataError, match=r"a\.csv:row 2 \(line 3\): field 'output' is empty"):
        load_rows(str(path))
    path = _write(tmp_path, "b.csv", "prompt,answer\nq,a\n")
    with pytest.raises(DataError, match=r"b\.csv: CSV header lacks"):
        load_rows(str(path))
    with pytest.raises(DataError, match="malformed JSON"):
        load_rows(str(_write(tmp_path, "c.json", "[{")))


GOOD_LINE = '{"instruction": "Name a primary color.", "output": "Red."}'
LATIN1 = [  # (name, bytes, line of the first bad byte): a valid row, then latin-1 text (0xff 0xfe, "café", é = 0xe9)
    ("a.jsonl", (GOOD_LINE + "\n").encode() + b'{"instruction": "\xff\xfe caf\xe9", "output": "x"}\n', 2),
    ("a.json", ("[" + GOOD_LINE + ",\n").encode() + b'{"instruction": "\xff\xfe caf\xe9", "output": "x"}]', 2),
    ("a.csv", b"instruction,input,output\nq,,a\n\xff\xfe caf\xe9,,x\n", 3),
]


@pytest.mark.parametrize("name,data,line", LATIN1, ids=[c[0] for c in LATIN1])
@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_a_file_not_in_utf8_is_a_data_error_naming_it(tmp_path, name, data, line, on_bad_rows):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:  # the whole file is unreadable: never skipped as one bad row
        load_rows(str(path), on_bad_rows=on_bad_rows)
    message = str(err.value)
    offset = data.index(b"\xff")  # the first byte UTF-8 cannot decode
    assert str(path) in message and "not UTF-8" in message and "re-save it as UTF-8" in message
    assert f"offset {offset}, line {line}" in message


EMPTY = [("empty-array.json", "[]"), ("empty.jsonl", ""), ("blank-lines.jsonl", "\n  \n"),
         ("header-only.csv", "instruction,input,output\n")]


@pytest.mark.parametrize("name,text", EMPTY, ids=[c[0] for c in EMPTY])
def test_a_file_without_rows_is_a_data_error_naming_it(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(path) in str(err.value) and "holds no rows" in str(err.value) and "'instruction'" in str(err.value)


def test_a_file_whose_rows_are_all_skipped_is_a_data_error(tmp_path):
    path = _write(tmp_path, "bad.jsonl", '{"instruction": "a"}\n{"output": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: every one of its 2 row\(s\) is bad"):
        load_rows(str(path), on_bad_rows="skip")


# ----------------------------------------------------------------------------- split and fingerprints

# Split properties (disjoint by prompt, stratified, seeded across processes) are in tests/test_splits.py.


def test_fingerprint_changes_with_one_token_or_label(tok):
    examples = [tokenize_row(r, tok, "alpaca", 512) for r in ROWS]
    base = fingerprint(examples)
    one_token = [dict(e, input_ids=list(e["input_ids"])) for e in examples]
    one_token[2]["input_ids"][5] += 1
    one_label = [dict(e, labels=list(e["labels"])) for e in examples]
    one_label[0]["labels"][-1] = IGNORE_INDEX
    moved = [dict(e) for e in examples]
    # Same concatenated tokens, split differently between two examples: still a different stream.
    moved[0] = {"input_ids": examples[0]["input_ids"] + examples[1]["input_ids"][:1],
                "labels": examples[0]["labels"] + examples[1]["labels"][:1]}
    moved[1] = {"input_ids": examples[1]["input_ids"][1:], "labels": examples[1]["labels"][1:]}
    assert len({base, fingerprint(one_token), fingerprint(one_label), fingerprint(moved)}) == 4
    assert fingerprint(examples) == base


def test_response_token_count_is_shifted_labels_not_ignored(tok):
    examples = [tokenize_row(r, tok, "alpaca", 512) for r in ROWS]
    batch = PadCollator(pad_token_id=tok.pad_token_id)(examples)
    labels = batch["labels"].tolist()
    # Brute force: a label at position 0 is never predicted (nothing precedes it); -100 is never scored.
    expected = sum(1 for row in labels for j, lab in enumerate(row) if j > 0 and lab != IGNORE_INDEX)
    assert response_token_count(batch["labels"]) == expected
    first_scored = batch["labels"].clone()
    first_scored[:, 0] = 7  # a label at position 0 still does not count
    assert response_token_count(first_scored) == expected
