"""One data pipeline for every arm: load rows, format, tokenize with response-only labels, split,
fingerprint, and collate.

Every arm of the study (Unsloth baseline, GRIT, control) gets its examples from ``build_study_data``
and its batches from ``PadCollator``, so the tokens, masks and validation rows are the same by
construction, and the fingerprints prove it afterwards.

Label convention: ``labels[i] = -100`` on prompt tokens and on padding; response tokens and the
appended EOS carry their token id. The prompt and the response are tokenized separately, exactly as
at inference time, when the model sees the tokenized prompt and generates the response after it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .synthetic import synthetic_rows

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Unsloth's Llama-3 Ollama notebook (the seed baseline's data path): `to_sharegpt` merges the optional
# input into the instruction with this text, and the chat template wraps the turn like this.
ALPACA_HEADER = (
    "Below are some instructions that describe some tasks. Write responses that appropriately complete each request."
)
ALPACA_PROMPT = ALPACA_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
INPUT_MERGE = "\nYour input is:\n"


class DataError(ValueError):
    """A source row or file the pipeline refuses to guess about."""


# ----------------------------------------------------------------------------- loading rows

def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output', got {type(row).__name__}")
    for key in ("instruction", "output"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing required field {key!r}")
    for key in ("instruction", "input", "output"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    if not row["output"].strip():
        raise DataError(f"{where}: field 'output' is empty")
    if not row["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}


def _raw_rows_from_file(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield (location, raw row) pairs; a location names the file and the row for error messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:line {lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"{path}:row {i}", row
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"instruction", "output"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: CSV header lacks required column(s) {sorted(missing)}")
            for i, row in enumerate(reader):
                yield f"{path}:row {i + 1} (line {reader.line_num})", row
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .csv with "
                        "'instruction', 'input', 'output'")


def load_rows(source: str, *, num_examples: int = 0, seed: int = 0, on_bad_rows: str = "error"
              ) -> tuple[list[dict], int]:
    """Load Alpaca-format rows from ``source``; return (rows, number of bad rows skipped).

    ``source``: ``"synthetic"``, ``"hub:<dataset id>"`` (the only network access), or a file path.
    ``on_bad_rows``: ``"error"`` raises ``DataError`` naming the file and row; ``"skip"`` drops the
    row, counts it and logs the count.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if source == "synthetic":
        rows = synthetic_rows(num_examples or 2000, seed=seed)
        return [_check_row(r, f"synthetic:row {i}") for i, r in enumerate(rows)], 0
    if source.startswith("hub:"):
        from datasets import load_dataset

        dataset_id = source[len("hub:"):]
        ds = load_dataset(dataset_id, split="train")
        raw = ((f"{dataset_id}:row {i}", r) for i, r in enumerate(ds))
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist; pass 'synthetic', 'hub:<id>' or an existing "
                            ".json/.jsonl/.csv path")
        raw = _raw_rows_from_file(path)
    rows, skipped = [], 0
    for where, row in raw:
        try:
            if isinstance(row, DataError):
                raise row
            rows.append(_check_row(row, where))
        except DataError as e:
            if on_bad_rows == "error":
                raise
            skipped += 1
            logger.warning("skipping bad row: %s", e)
        if num_examples and len(rows) >= num_examples:
            break
    if skipped:
        logger.warning("skipped %d bad row(s) from %s", skipped, source)
    return rows, skipped


# ----------------------------------------------------------------------------- formatting

def merged_instruction(row: dict) -> str:
    """The instruction with the optional input merged in, as Unsloth's ``to_sharegpt`` does."""
    return row["instruction"] + (INPUT_MERGE + row["input"] if row.get("input") else "")


def format_prompt(row: dict, tokenizer, template: str = "alpaca") -> str:
    """The prompt text the model sees before its response, for training and inference alike."""
    if template == "alpaca":
        return ALPACA_PROMPT.format(instruction=merged_instruction(row))
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("template='chat' but the tokenizer has no chat_template; use template='alpaca'")
        messages = [{"role": "user", "content": merged_instruction(row)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ValueError(f"template must be 'alpaca' or 'chat', got {template!r}")


def prompt_ids(prompt: str, tokenizer, template: str) -> list[int]:
    # The chat template writes its own special tokens; the Alpaca text gets the tokenizer's (BOS).
    return tokenizer(prompt, add_special_tokens=(template == "alpaca"))["input_ids"]


def tokenize_row(row: dict, tokenizer, template: str, max_seq_length: int) -> dict | None:
    """``{"input_ids", "labels"}`` for one row, or None when truncation leaves no response token."""
    p_ids = prompt_ids(format_prompt(row, tokenizer, template), tokenizer, template)
    r_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (p_ids + r_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


# ----------------------------------------------------------------------------- split, fingerprint

def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): a seeded permutation, stable across processes."""
    if val_size >= n:
        raise DataError(f"val_size={val_size} leaves no training rows out of {n}")
    order = list(range(n))
    random.Random(f"grit-split-{seed}").shuffle(order)
    val = sorted(order[:val_size])
    held = set(val)
    return [i for i in range(n) if i not in held], val


def fingerprint(examples: Sequence[dict]) -> str:
    """SHA-256 over every example's input_ids and labels in order; one changed token changes it."""
    h = hashlib.sha256()
    for ex in examples:
        ids, labels = array("q", ex["input_ids"]), array("q", ex["labels"])
        h.update(array("q", [len(ids)]).tobytes())
        h.update(ids.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()[:16]


@dataclass
class StudyData:
    """What every arm trains and evaluates on, with the evidence of what it was."""

    train: list[dict]
    val: list[dict]
    val_rows: list[dict] = field(repr=False)
    train_fingerprint: str
    val_fingerprint: str
    template: str
    max_seq_length: int
    skipped_bad_rows: int = 0
    dropped_no_response: int = 0

    def summary(self) -> dict:
        return {
            "train_examples": len(self.train), "val_examples": len(self.val),
            "train_fingerprint": self.train_fingerprint, "val_fingerprint": self.val_fingerprint,
            "template": self.template, "max_seq_length": self.max_seq_length,
            "skipped_bad_rows": self.skipped_bad_rows, "dropped_no_response": self.dropped_no_response,
        }


def build_study_data(tokenizer, *, source: str, template: str = "alpaca", max_seq_length: int = 2048,
                     val_size: int = 200, num_examples: int = 0, seed: int = 3407,
                     on_bad_rows: str = "error") -> StudyData:
    """Load, split, tokenize and fingerprint. The split is drawn on rows, before tokenization, so it
    does not depend on the tokenizer; rows whose response is truncated away are dropped and counted."""
    rows, skipped = load_rows(source, num_examples=num_examples, seed=seed, on_bad_rows=on_bad_rows)
    train_idx, val_idx = split_indices(len(rows), val_size, seed)
    dropped = 0

    def encode(indices: list[int]) -> tuple[list[dict], list[dict]]:
        nonlocal dropped
        examples, kept_rows = [], []
        for i in indices:
            ex = tokenize_row(rows[i], tokenizer, template, max_seq_length)
            if ex is None:
                dropped += 1
                continue
            examples.append(ex)
            kept_rows.append(rows[i])
        return examples, kept_rows

    train, _ = encode(train_idx)
    val, val_rows = encode(val_idx)
    if dropped:
        logger.warning("dropped %d example(s) whose response did not fit in max_seq_length=%d", dropped, max_seq_length)
    if not train:
        raise DataError(f"no training examples left from {source!r}")
    return StudyData(train=train, val=val, val_rows=val_rows, train_fingerprint=fingerprint(train),
                     val_fingerprint=fingerprint(val), template=template, max_seq_length=max_seq_length,
                     skipped_bad_rows=skipped, dropped_no_response=dropped)


def as_hf_dataset(examples: Sequence[dict]):
    """A ``datasets.Dataset`` view for trainers that require one (TRL's SFTTrainer)."""
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


# ----------------------------------------------------------------------------- batching

@dataclass
class PadCollator:
    """Right-pads a list of examples into tensors; padding gets ``labels=-100`` and ``attention_mask=0``.

    ``loss_on_padding=True`` reproduces the published GRIT pipeline on purpose: every sequence is
    padded to ``max_seq_length`` with EOS and ``labels = input_ids``, so prompt and padding tokens
    are scored too. It exists to measure that artifact, never as a default.
    """

    pad_token_id: int
    loss_on_padding: bool = False
    max_seq_length: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if self.loss_on_padding:
            if self.max_seq_length is None:
                raise ValueError("loss_on_padding=True needs max_seq_length (the published code padded to 2048)")
            width = self.max_seq_length
        else:
            width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        if self.loss_on_padding:
            labels = input_ids.clone()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
