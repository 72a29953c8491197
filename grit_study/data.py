"""One data pipeline for every arm: load rows, format, split, tokenize with response-only labels,
fingerprint, and collate.

Every arm of the study (Unsloth baseline, GRIT, control) gets its examples from ``build_study_data``
and its batches from ``PadCollator``, so the tokens, masks and evaluation rows are the same by
construction, and the fingerprints prove it afterwards.

Splits: a data seed (``data_seed``, never the training seed) draws the synthetic rows and three splits
once: train, val (for choosing hyperparameters) and test (reported, never used to choose). Val and test
are drawn from distinct rendered prompts, and every row whose rendered prompt equals a val or test
prompt is removed from train (and counted), so no held-out prompt is ever trained on.

Label convention: ``labels[i] = -100`` on prompt tokens and on padding; response tokens and the
appended EOS carry their token id. The prompt and the response are tokenized separately, exactly as
at inference time, when the model sees the tokenized prompt and generates the response after it.

Length: a row longer than ``max_seq_length`` keeps its whole prompt and loses the end of its response
(EOS first); the share of response and EOS tokens kept is recorded per split. A row whose prompt alone
fills ``max_seq_length`` is dropped and counted: cutting the prompt instead would train the model to
answer a question it never saw whole, which inference never shows it. A preset's length is chosen so
that this does not happen on its data (grit_study.presets).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .synthetic import synthetic_rows

logger = logging.getLogger(__name__)

# 'repo:<path>' sources are files shipped in this checkout (the study runs from it), found wherever the
# process was started.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Val and test of a file or hub source are each at most this share of its distinct prompts (the preset's sizes
# are caps), so at least half of the prompts train, whatever the file's size. The synthetic rows are drawn for
# their preset (num_examples) and keep its sizes exactly.
MAX_HELD_OUT_SHARE = 0.25

# A run may draw at most this many passes over its train split. Instruction tuning on a fixed set runs for
# about 3 epochs (Stanford Alpaca: 3); past a few passes a few hundred rows are memorized and the held-out
# loss rises, so optimizers compared there are ranked by how fast they overfit, not by how well they
# optimize. 4 leaves the 200-step tier on the shipped sample (2.3 epochs) room.
MAX_EPOCHS = 4.0

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
    family = row.get("family") or None
    if family is not None and not isinstance(family, str):
        raise DataError(f"{where}: field 'family' must be a string, got {type(family).__name__}")
    out = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
    # The id names the prompt (not the file position), so it survives reordering and re-drawing.
    return {"id": row_id(out, family), "family": family, **out}


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a DataError that names the file and where the first bad byte is."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset {e.start}, line "
                        f"{line}); re-save it as UTF-8, e.g. `iconv -f <its encoding> -t UTF-8 {path.name} > "
                        f"{path.stem}.utf8{path.suffix}`") from None


def _raw_rows_from_file(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield (location, raw row) pairs; a location names the file and the row for error messages."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .csv with "
                        "'instruction', 'input', 'output'")
    # Decoded in one piece so that a bad byte is a file error, raised before any row is used.
    text = _read_text(path)
    if suffix == ".jsonl":
        # newline=None: lines split as open() splits them, so the line numbers in messages stay the same.
        for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"{path}:row {i}", row
    else:
        # newline="": the csv module's own rule, so quoted fields may hold line breaks.
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"instruction", "output"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: CSV header lacks required column(s) {sorted(missing)}")
        for i, row in enumerate(reader):
            yield f"{path}:row {i + 1} (line {reader.line_num})", row


def source_path(source: str) -> Path:
    """The file of a file source: ``repo:<path>`` relative to the repository root, any other path as given."""
    return REPO_ROOT / source[len("repo:"):] if source.startswith("repo:") else Path(source)


def load_rows(source: str, *, num_examples: int = 0, data_seed: int = 0, on_bad_rows: str = "error"
              ) -> tuple[list[dict], int]:
    """Load Alpaca-format rows from ``source``; return (rows, number of bad rows skipped).

    Each row is ``{"id", "family", "instruction", "input", "output"}``: ``id`` is ``row_id`` (stable
    across processes), ``family`` the synthetic family, a file's optional ``family`` field, or None.
    ``source``: ``"synthetic"`` (``num_examples`` rows drawn with ``data_seed``), ``"hub:<dataset id>"``
    (the only network access), a file path, or ``"repo:<path>"`` (a file of this checkout, ``source_path``).
    ``on_bad_rows``: ``"error"`` raises ``DataError`` naming the file and row; ``"skip"`` drops the
    row, counts it and logs the count. A file that is not UTF-8 text, or that gives no usable row (an empty
    file or array, a CSV header alone, every row skipped), raises ``DataError`` naming it either way.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    if source == "synthetic":
        rows = synthetic_rows(num_examples or 2000, seed=data_seed)
        return [_check_row(r, f"synthetic:row {i}") for i, r in enumerate(rows)], 0
    if source.startswith("hub:"):
        from datasets import load_dataset

        dataset_id = source[len("hub:"):]
        ds = load_dataset(dataset_id, split="train")
        raw = ((f"{dataset_id}:row {i}", r) for i, r in enumerate(ds))
    else:
        path = source_path(source)
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
    if not rows:
        # Caught here, where the file is known: with no rows the split fails later without naming it.
        found = f"every one of its {skipped} row(s) is bad" if skipped else "it holds no rows"
        raise DataError(f"{source}: {found}; give it rows with 'instruction', optional 'input' and 'output' "
                        "(a JSON array, one JSON object per line, or a CSV with those columns), or use "
                        "'synthetic'")
    return rows, skipped


# ----------------------------------------------------------------------------- formatting

def merged_instruction(row: dict) -> str:
    """The instruction with the optional input merged in, as Unsloth's ``to_sharegpt`` does."""
    return row["instruction"] + (INPUT_MERGE + row["input"] if row.get("input") else "")


def row_id(row: dict, family: str | None = None) -> str:
    """A stable id for the row's prompt: ``<family>/<12 hex of SHA-256(merged instruction)>``.

    Two rows share an id exactly when they share a prompt (either template renders the prompt from the
    merged instruction alone), so predictions of different runs pair up by id.
    """
    digest = hashlib.sha256(merged_instruction(row).encode("utf-8")).hexdigest()[:12]
    return f"{family or 'row'}/{digest}"


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


def _encode(row: dict, tokenizer, template: str, max_seq_length: int) -> tuple[dict | None, int]:
    """(``tokenize_row``'s result, the row's response tokens before truncation, EOS included)."""
    p_ids = prompt_ids(format_prompt(row, tokenizer, template), tokenizer, template)
    r_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (p_ids + r_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, len(r_ids)
    return {"input_ids": input_ids, "labels": labels}, len(r_ids)


def tokenize_row(row: dict, tokenizer, template: str, max_seq_length: int) -> dict | None:
    """``{"input_ids", "labels"}`` for one row, the response cut at ``max_seq_length``; None when the prompt
    leaves no room for a response token."""
    return _encode(row, tokenizer, template, max_seq_length)[0]


# ----------------------------------------------------------------------------- split, fingerprint

@dataclass
class Split:
    """Row indices of the three splits, and the train rows removed because they repeat a held-out prompt."""

    train: list[int]
    val: list[int]
    test: list[int]
    removed_overlap_val: int
    removed_overlap_test: int
    distinct_prompts: int


def _rank(data_seed: int, prompt: str) -> str:
    # A seeded order that is the same in every process (no PYTHONHASHSEED) and ignores row order.
    return hashlib.sha256(f"grit-split-{data_seed}\0{prompt}".encode("utf-8")).hexdigest()


def _quotas(total: int, capacity: dict[Any, int], what: str) -> dict[Any, int]:
    """``total`` picks spread over strata as evenly as their capacity allows (water-filling); when it
    does not divide evenly, the strata first in sorted order take one more."""
    if total > sum(capacity.values()):
        raise DataError(f"{what}: asked for {total} distinct prompts, only {sum(capacity.values())} are left "
                        f"({', '.join(f'{s}: {c}' for s, c in sorted(capacity.items(), key=str))}); "
                        "lower val_size/test_size or draw more rows (num_examples)")
    quotas = {s: 0 for s in capacity}
    remaining = total
    while remaining:
        open_strata = [s for s in sorted(capacity, key=str) if quotas[s] < capacity[s]]
        share = max(remaining // len(open_strata), 1)
        for s in open_strata:
            take = min(share, capacity[s] - quotas[s], remaining)
            quotas[s] += take
            remaining -= take
            if not remaining:
                break
    return quotas


def held_out_sizes(distinct_prompts: int, val_size: int, test_size: int) -> tuple[int, int]:
    """(val, test) prompts for a file or hub source of ``distinct_prompts``: the preset's sizes, each capped at
    ``MAX_HELD_OUT_SHARE`` of the prompts."""
    cap = int(distinct_prompts * MAX_HELD_OUT_SHARE)
    return min(val_size, cap), min(test_size, cap)


def split_by_prompt(prompts: Sequence[str], families: Sequence[str | None], *, val_size: int, test_size: int,
                    data_seed: int) -> Split:
    """Three splits of rows such that no val or test prompt occurs in train.

    ``prompts[i]`` is row i's rendered prompt (``format_prompt``), ``families[i]`` its family or None.
      1. Rows are grouped by prompt; a distinct prompt is represented by its first row.
      2. Strata: the families when every row has one (test and val are then stratified: each family
         gets ``size // families`` prompts, the first families in sorted order one more), else one.
      3. Each stratum's prompts are ranked by SHA-256 of (data_seed, prompt); test takes the first
         ranked prompts, val the next ones, so the test split does not move when val_size changes.
      4. Train is every row whose prompt is neither a val nor a test prompt; the other rows that
         repeat a held-out prompt are removed from train and counted.
    """
    if len(prompts) != len(families):
        raise ValueError(f"split_by_prompt: {len(prompts)} prompts but {len(families)} families")
    if val_size < 0 or test_size < 0:
        raise ValueError(f"val_size and test_size must be >= 0, got {val_size} and {test_size}")
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    stratified = all(f is not None for f in families)
    strata: dict[Any, list[str]] = {}
    for p, i in first.items():
        strata.setdefault(families[i] if stratified else None, []).append(p)
    for ps in strata.values():
        ps.sort(key=lambda p: _rank(data_seed, p))
    test_q = _quotas(test_size, {s: len(ps) for s, ps in strata.items()}, "test split")
    val_q = _quotas(val_size, {s: len(ps) - test_q[s] for s, ps in strata.items()}, "val split")
    test_p = {p for s, ps in strata.items() for p in ps[:test_q[s]]}
    val_p = {p for s, ps in strata.items() for p in ps[test_q[s]:test_q[s] + val_q[s]]}
    test = sorted(first[p] for p in test_p)
    val = sorted(first[p] for p in val_p)
    train = [i for i, p in enumerate(prompts) if p not in val_p and p not in test_p]
    removed_val = sum(p in val_p for p in prompts) - len(val)
    removed_test = sum(p in test_p for p in prompts) - len(test)
    if not train:
        raise DataError(f"val_size={val_size} and test_size={test_size} leave no training rows out of "
                        f"{len(prompts)} rows ({len(first)} distinct prompts)")
    return Split(train, val, test, removed_val, removed_test, len(first))


def fingerprint(examples: Sequence[dict]) -> str:
    """SHA-256 over every example's input_ids and labels in order; one changed token changes it."""
    h = hashlib.sha256()
    for ex in examples:
        ids, labels = array("q", ex["input_ids"]), array("q", ex["labels"])
        h.update(array("q", [len(ids)]).tobytes())
        h.update(ids.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()[:16]


def _family_counts(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("family") is not None:
            counts[r["family"]] = counts.get(r["family"], 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class StudyData:
    """What every arm trains and evaluates on, with the evidence of what it was.

    ``*_rows`` are the source rows behind the examples, one per example and in the same order, each
    ``{"id", "family", "instruction", "input", "output"}``.
    """

    train: list[dict]
    val: list[dict]
    test: list[dict]
    train_rows: list[dict] = field(repr=False)
    val_rows: list[dict] = field(repr=False)
    test_rows: list[dict] = field(repr=False)
    train_fingerprint: str
    val_fingerprint: str
    test_fingerprint: str
    template: str
    max_seq_length: int
    data_seed: int
    source: str = ""
    skipped_bad_rows: int = 0
    dropped_no_response: int = 0
    dropped_no_response_by_split: dict = field(default_factory=dict)
    removed_overlap_val: int = 0
    removed_overlap_test: int = 0
    distinct_prompts: int = 0
    synthetic: dict | None = None
    # The preset's val / test sizes when held_out_sizes lowered them for this source, else None.
    sizes_asked: dict | None = None
    # Per split: {"rows", "response_tokens", "response_tokens_kept", "eos_kept"}, dropped rows included
    # (every response token of a dropped row is lost).
    token_counts: dict = field(default_factory=dict)
    # Passes over the train split the run draws (steps x batch x accumulation / train rows; check_run_length).
    epochs: float | None = None

    def token_retention(self, split: str = "train") -> dict:
        """The share of response tokens and of EOS tokens of ``split`` that ``max_seq_length`` kept."""
        c = self.token_counts.get(split) or {"rows": 0, "response_tokens": 0, "response_tokens_kept": 0, "eos_kept": 0}
        return {**c, "response_share": c["response_tokens_kept"] / c["response_tokens"] if c["response_tokens"] else None,
                "eos_share": c["eos_kept"] / c["rows"] if c["rows"] else None}

    def summary(self) -> dict:
        out = {
            "source": self.source, "data_seed": self.data_seed,
            "train_examples": len(self.train), "val_examples": len(self.val), "test_examples": len(self.test),
            "train_fingerprint": self.train_fingerprint, "val_fingerprint": self.val_fingerprint,
            "test_fingerprint": self.test_fingerprint,
            "template": self.template, "max_seq_length": self.max_seq_length,
            "skipped_bad_rows": self.skipped_bad_rows, "dropped_no_response": self.dropped_no_response,
            "dropped_no_response_by_split": dict(self.dropped_no_response_by_split),
            "removed_overlap_val": self.removed_overlap_val, "removed_overlap_test": self.removed_overlap_test,
            "distinct_prompts": self.distinct_prompts,
            "val_families": _family_counts(self.val_rows), "test_families": _family_counts(self.test_rows),
            "sizes_asked": self.sizes_asked, "epochs": self.epochs,
            "token_retention": {name: self.token_retention(name) for name in ("train", "val", "test")},
        }
        if self.synthetic is not None:
            out["synthetic"] = self.synthetic
        return out


def build_study_data(tokenizer, *, source: str, template: str = "alpaca", max_seq_length: int = 2048,
                     val_size: int = 200, test_size: int = 0, num_examples: int = 0, data_seed: int = 3407,
                     on_bad_rows: str = "error") -> StudyData:
    """Load, split (``split_by_prompt``), tokenize and fingerprint.

    ``data_seed`` alone decides the synthetic rows and the split; the training seed must not be passed
    here (it changes only LoRA init and data order). The split is drawn on rendered prompts, before
    tokenization, so it depends neither on ``max_seq_length`` nor (for the Alpaca template) on the
    tokenizer; afterwards responses are cut at ``max_seq_length`` and rows whose prompt leaves no room for
    a response token are dropped, both counted per split. A file or hub source gets at most
    ``MAX_HELD_OUT_SHARE`` of its distinct prompts in val and in test (``held_out_sizes``).
    """
    rows, skipped = load_rows(source, num_examples=num_examples, data_seed=data_seed, on_bad_rows=on_bad_rows)
    prompts = [format_prompt(r, tokenizer, template) for r in rows]
    sizes_asked = None
    if source != "synthetic":
        distinct = len(set(prompts))
        fitted = held_out_sizes(distinct, val_size, test_size)
        if fitted != (val_size, test_size):
            logger.warning("%s has %d distinct prompts: val / test lowered from %d / %d to %d / %d prompts (at most "
                           "%g of them each)", source, distinct, val_size, test_size, *fitted, MAX_HELD_OUT_SHARE)
            sizes_asked = {"val": val_size, "test": test_size}
            val_size, test_size = fitted
    split = split_by_prompt(prompts, [r["family"] for r in rows], val_size=val_size, test_size=test_size,
                            data_seed=data_seed)
    dropped: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}

    def encode(name: str, indices: list[int]) -> tuple[list[dict], list[dict]]:
        examples, kept_rows = [], []
        c = counts[name] = {"rows": len(indices), "response_tokens": 0, "response_tokens_kept": 0, "eos_kept": 0}
        for i in indices:
            ex, full = _encode(rows[i], tokenizer, template, max_seq_length)
            c["response_tokens"] += full
            if ex is None:
                dropped[name] = dropped.get(name, 0) + 1
                continue
            kept = sum(label != IGNORE_INDEX for label in ex["labels"])
            c["response_tokens_kept"] += kept
            c["eos_kept"] += kept == full  # EOS is the response's last token: kept only with all of it
            examples.append(ex)
            kept_rows.append(rows[i])
        return examples, kept_rows

    train, train_rows = encode("train", split.train)
    val, val_rows = encode("val", split.val)
    test, test_rows = encode("test", split.test)
    if dropped:
        logger.warning("dropped example(s) whose prompt leaves no room for a response in max_seq_length=%d: %s",
                       max_seq_length, dropped)
    removed = split.removed_overlap_val + split.removed_overlap_test
    if removed:
        logger.warning("removed %d training row(s) whose prompt is a val (%d) or test (%d) prompt", removed,
                       split.removed_overlap_val, split.removed_overlap_test)
    if not train:
        raise DataError(f"no training examples left from {source!r}")
    synthetic = None
    if source == "synthetic":
        from .synthetic import describe

        synthetic = describe()
    return StudyData(
        train=train, val=val, test=test, train_rows=train_rows, val_rows=val_rows, test_rows=test_rows,
        train_fingerprint=fingerprint(train), val_fingerprint=fingerprint(val), test_fingerprint=fingerprint(test),
        template=template, max_seq_length=max_seq_length, data_seed=data_seed, source=source,
        skipped_bad_rows=skipped, dropped_no_response=sum(dropped.values()), dropped_no_response_by_split=dropped,
        removed_overlap_val=split.removed_overlap_val, removed_overlap_test=split.removed_overlap_test,
        distinct_prompts=split.distinct_prompts, synthetic=synthetic, sizes_asked=sizes_asked, token_counts=counts)


def check_run_length(data: StudyData, *, max_steps: int, sequences_per_step: int) -> float:
    """The epochs (passes over ``data.train``) that ``max_steps`` optimizer steps of ``sequences_per_step``
    sequences draw. Raises ``DataError``, before any training, when the train split holds fewer rows than one
    step draws, or would be drawn more than ``MAX_EPOCHS`` times."""
    n = len(data.train)
    sizes = (f"{data.source or 'the data'}: the train split has {n} rows (val {len(data.val)}, test {len(data.test)} "
             f"prompts; {data.distinct_prompts} distinct prompts in all)")
    fixes = ["use a bigger file"]
    if data.val or data.test:
        fixes.append("lower the val / test sizes (GRIT_VAL_SIZE, GRIT_TEST_SIZE)")
    if n < sequences_per_step:
        raise DataError(f"{sizes}, fewer than the {sequences_per_step} sequences of one optimizer step "
                        f"(per_device_train_batch_size x gradient_accumulation_steps): {', or '.join(fixes)}")
    epochs = max_steps * sequences_per_step / n
    if epochs > MAX_EPOCHS:
        limit = int(MAX_EPOCHS * n // sequences_per_step)
        fixes.insert(0, f"set MAX_STEPS <= {limit} (notebook parameter, or GRIT_MAX_STEPS)")
        raise DataError(f"{sizes}; {max_steps} steps x {sequences_per_step} sequences would draw {epochs:.1f} epochs "
                        f"of it, more than {MAX_EPOCHS:g} (past that the rows are memorized): {', or '.join(fixes)}")
    return epochs


def train_schedule(rows: int, *, batch_size: int, accumulation: int, max_steps: int, seed: int) -> list[list[list[int]]]:
    """The train-split indices of every micro-batch the HF Trainer draws in ``max_steps`` optimizer steps, in its
    order: ``schedule[step][micro_batch] = [row indices]``. Computed before training, with no Trainer.

    What it reproduces (transformers 5.17 + accelerate; one process, no length grouping, ``dataloader_drop_last``
    False, as ``arms.training_arguments`` sets them): ``Trainer._get_train_sampler`` returns a ``RandomSampler``
    without a generator; ``accelerator.prepare`` replaces it by accelerate's ``SeedableRandomSampler`` seeded with
    ``args.data_seed`` (``arms.training_arguments`` sets it to the training seed), whose epoch ``e`` is
    ``torch.randperm(rows)`` from a generator seeded ``seed + e`` (the Trainer calls ``set_epoch(e)``). An epoch's
    ``ceil(rows / batch_size)`` micro-batches are consecutive slices of that permutation (the last one shorter);
    an optimizer step takes ``accumulation`` of them, the epoch's last step the remainder (a step never spans
    two epochs), and training stops after ``max_steps`` steps. The TRL SFTTrainer of the baseline inherits this
    sampler (the batch hashes prove every arm's batches equal). tests/test_memory_plan.py checks it against the
    Trainer's own loop."""
    import math

    import torch

    if rows < 1 or batch_size < 1 or accumulation < 1:
        raise ValueError(f"train_schedule needs rows, batch_size, accumulation >= 1, got {rows}, {batch_size}, "
                         f"{accumulation}")
    micro_per_epoch = math.ceil(rows / batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / accumulation))
    device = torch.get_default_device() if hasattr(torch, "get_default_device") else "cpu"
    schedule: list[list[list[int]]] = []
    epoch = 0
    while len(schedule) < max_steps:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed + epoch)
        order = torch.randperm(rows, generator=generator).tolist()
        micro = [order[i:i + batch_size] for i in range(0, rows, batch_size)]
        for s in range(min(steps_per_epoch, max_steps - len(schedule))):
            schedule.append(micro[s * accumulation:(s + 1) * accumulation])
        epoch += 1
    return schedule


def _trainer_rows(examples: Sequence[dict]) -> list[dict]:
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]


def as_hf_dataset(examples: Sequence[dict]):
    """A ``datasets.Dataset`` view for trainers that require one (TRL's SFTTrainer)."""
    from datasets import Dataset

    return Dataset.from_list(_trainer_rows(examples))


def trainer_dataset(examples: Sequence[dict]):
    """What the HF ``Trainer`` trains on: ``as_hf_dataset`` where ``datasets`` is installed, else the same rows
    as a list (a map-style dataset: the Trainer's seeded sampler draws the same indices from its length and
    the collator receives the same rows, so the batches and their hashes are the same). The lent GPU machine
    has no ``datasets``; TRL (the baseline) needs it and imports it itself."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return _trainer_rows(examples)
    return as_hf_dataset(examples)


# ----------------------------------------------------------------------------- batching

def response_token_count(labels) -> int:
    """Tokens a causal LM is scored on: labels after the one-position shift that are not IGNORE_INDEX.

    ``labels``: a ``(batch, seq)`` tensor as ``PadCollator`` makes it. The one place this is counted, so
    the recorder's train-token counts and ``eval_loss`` agree by construction.
    """
    return int(scored_positions(labels).sum())


def scored_positions(labels):
    """Bool ``(batch, seq - 1)``: the positions ``response_token_count`` counts (a device tensor, no sync)."""
    return labels[..., 1:] != IGNORE_INDEX


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
