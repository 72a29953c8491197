"""Evaluation shared by every arm: token-weighted response loss, greedy exact-match accuracy with every
prediction kept, and side-by-side responses of the tuned and the base model.

The base model is the same quantized model with its adapters disabled (``disable_adapter()``), so
"base" means exactly the network every arm started from; its accuracy and its response loss are cached
by model id, quantization, template and the evaluated rows' fingerprint, because they do not depend on
the arm.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .data import IGNORE_INDEX, format_prompt, prompt_ids, row_id

# Positions whose logits are materialised at once by eval_loss (see there for the memory it bounds).
EVAL_CHUNK_POSITIONS = 512


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode and no grad for the duration; restores the previous training flag."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _device(model):
    return next(p for p in model.parameters()).device


# ----------------------------------------------------------------------------- loss, in chunks

# Config fields by which HF and Unsloth models transform logits after lm_head (Unsloth's own table).
_LOGIT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_LOGIT_SCALES = ("logit_scale", "lm_head_multiplier", "output_multiplier", "logits_scaling")


def causal_lm_parts(model):
    """``(body, lm_head)`` of an HF causal LM, bare or PEFT-wrapped.

    ``body`` (``LlamaModel`` for a ``LlamaForCausalLM``) returns the final hidden states, after the last
    norm; ``lm_head(hidden)`` gives the logits, exactly as the model's own forward does. PEFT's LoRA layers
    sit inside these modules, so adapters (and ``disable_adapter()``) act on this path as on ``forward``.
    Models whose forward transforms the logits further (soft-capping, logit scaling) are refused rather
    than scored differently from their own loss.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or body is base or head is None:
        prefix = getattr(base, "base_model_prefix", "?")
        raise TypeError(f"{type(base).__name__} does not expose a decoder body (.{prefix}) and an lm_head "
                        "(get_output_embeddings()); evaluate an HF *ForCausalLM model")
    config = getattr(base, "config", None)
    for name in _LOGIT_CAPS + _LOGIT_SCALES:
        value = getattr(config, name, None)
        if value not in (None, 0) and not (name in _LOGIT_SCALES and value == 1):
            raise ValueError(f"{type(base).__name__} applies {name}={value} to its logits; the chunked loss "
                             "(lm_head on hidden states) would not, so it refuses to score this model")
    return body, head


def response_hidden_states(model, input_ids, attention_mask, labels):
    """``(hidden, targets)``: the final hidden states of the positions that predict a response token, and
    those tokens. hidden: ``(N, hidden_size)``, targets: ``(N,)``, N = ``response_token_count(labels)``."""
    body, _ = causal_lm_parts(model)
    targets = labels[:, 1:]                                  # (B, L-1): the token each position predicts
    keep = targets != IGNORE_INDEX
    # use_cache=False: an evaluation has no next step, and a KV cache of a long batch costs GiBs.
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # (B, L, H)
    return hidden[:, :-1][keep], targets[keep]


def chunked_ce(lm_head, hidden, targets, chunk_positions: int = EVAL_CHUNK_POSITIONS):
    """-log softmax(lm_head(hidden))[target] per position, ``(N,)`` float64, computed ``chunk_positions``
    rows at a time with fp32 logits (as HF's loss upcasts them)."""
    import torch
    import torch.nn.functional as F

    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    out = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_positions):
        logits = lm_head(hidden[s:s + chunk_positions]).float()       # (chunk, vocab)
        out[s:s + chunk_positions] = F.cross_entropy(logits, targets[s:s + chunk_positions], reduction="none")
    return out


def response_nll(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 8,
                 chunk_positions: int = EVAL_CHUNK_POSITIONS) -> list[tuple[float, int]]:
    """Per example, in the order of ``examples``: (Σ CE over its response tokens, their count).

    Batches are formed in order of length, so a batch's rows are padded to about their own length (on the
    Alpaca sample at 512 tokens, in-order batches of 8 would be half padding); an example's sum does not
    depend on its batch (right padding, attention mask), up to float rounding.
    """
    import torch

    from .data import PadCollator, scored_positions

    collate = PadCollator(pad_token_id)
    device = _device(model)
    _, head = causal_lm_parts(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with _eval_mode(model):
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = collate([examples[i] for i in idx])
            scored = scored_positions(batch["labels"])                # (B, L-1)
            counts = scored.sum(dim=1).tolist()
            if not any(counts):
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden, targets = response_hidden_states(model, batch["input_ids"], batch["attention_mask"],
                                                     batch["labels"])
            ce = chunked_ce(head, hidden, targets, chunk_positions)    # (N,), positions in row-major order
            row = scored.nonzero()[:, 0].to(ce.device)                 # (N,): the batch row of each position
            sums = torch.zeros(len(idx), dtype=torch.float64, device=ce.device).index_add_(0, row, ce).tolist()
            for i, total, n in zip(idx, sums, counts):
                out[i] = (total, int(n))
            del hidden, targets, ce
    return out


def eval_loss(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 8,
              chunk_positions: int = EVAL_CHUNK_POSITIONS) -> tuple[float, int]:
    """Token-weighted CE over the response tokens of ``examples``: (sum of token CE / count, count).

    The model's body runs on a whole batch, but the logits are materialised only for response positions
    and at most ``chunk_positions`` of them at a time (``chunked_ce``). Peak memory of the logits is
    therefore about chunk_positions x vocab x 4 bytes for the fp32 logits, plus as much again for
    cross-entropy's log-softmax and the lm_head output in the compute dtype: at llama3-8b's vocab
    (128,256) and the default 512 positions, 251 MiB per fp32 copy (~0.6 GiB in all), where letting the
    model compute its loss on a batch of 8 x 2,048 tokens materialises 7.8 GiB of fp32 logits alone.
    Equals the model's own loss (``num_items_in_batch`` = token count) to float rounding. The per-example
    sums behind it: ``response_nll``.
    """
    per_example = response_nll(model, examples, pad_token_id, batch_size, chunk_positions)
    total, count = sum(s for s, _ in per_example), sum(n for _, n in per_example)
    if count == 0:
        raise ValueError("eval_loss: the examples hold no response tokens; check the labels (-100 everywhere?)")
    return total / count, count


# ----------------------------------------------------------------------------- decoding, predictions

def generate(model, tokenizer, rows: Sequence[dict], template: str, *, max_new_tokens: int = 48,
             batch_size: int = 16) -> list[str]:
    """Greedy responses to the prompts of ``rows``, prompts tokenized exactly as in training."""
    import torch

    device = _device(model)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    with _eval_mode(model):
        for i in range(0, len(rows), batch_size):
            prompts = [prompt_ids(format_prompt(r, tokenizer, template), tokenizer, template)
                       for r in rows[i:i + batch_size]]
            width = max(len(p) for p in prompts)
            # Left padding so every prompt ends where generation starts.
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            # use_cache=True explicitly: training setups (Unsloth's CPU loader, gradient checkpointing) set
            # config.use_cache=False, and generating without a KV cache recomputes every prefix.
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for row in out[:, width:].tolist():
                if eos in row:
                    row = row[:row.index(eos)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def exact_match(predictions: Sequence[str], rows: Sequence[dict]) -> float:
    """Fraction of predictions equal to the reference output after stripping surrounding whitespace."""
    if len(predictions) != len(rows) or not rows:
        raise ValueError(f"exact_match needs one prediction per row, got {len(predictions)} for {len(rows)} rows")
    return sum(p.strip() == r["output"].strip() for p, r in zip(predictions, rows)) / len(rows)


def max_answer_tokens(tokenizer, rows: Sequence[dict], margin: int = 4) -> int:
    """Enough new tokens for the longest reference answer plus EOS and a margin."""
    return max(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in rows) + 1 + margin


def score_predictions(outputs: Sequence[str], rows: Sequence[dict]) -> dict[str, Any]:
    """Every prediction with its row, and exact match overall and per family.

    Returns ``{"exact_match", "n", "correct", "per_family": {family: {"exact_match", "n", "correct"}},
    "predictions": [{"id", "family", "output", "reference", "correct"}, ...]}`` (rows without a family
    are in the overall figures only). ``correct``: output == reference after stripping whitespace.
    """
    if len(outputs) != len(rows) or not rows:
        raise ValueError(f"score_predictions needs one output per row, got {len(outputs)} for {len(rows)} rows")
    predictions = []
    per_family: dict[str, dict[str, Any]] = {}
    for out, row in zip(outputs, rows):
        family = row.get("family")
        ok = out.strip() == row["output"].strip()
        predictions.append({"id": row.get("id") or row_id(row, family), "family": family, "output": out,
                            "reference": row["output"], "correct": ok})
        if family is not None:
            f = per_family.setdefault(family, {"n": 0, "correct": 0})
            f["n"] += 1
            f["correct"] += ok
    for f in per_family.values():
        f["exact_match"] = f["correct"] / f["n"]
    correct = sum(p["correct"] for p in predictions)
    return {"exact_match": correct / len(rows), "n": len(rows), "correct": correct,
            "per_family": dict(sorted(per_family.items())), "predictions": predictions}


def accuracy(model, tokenizer, rows: Sequence[dict], template: str, batch_size: int = 16) -> dict[str, Any]:
    """Greedy decoding of every row's prompt, scored by ``score_predictions`` (same keys)."""
    outputs = generate(model, tokenizer, rows, template, max_new_tokens=max_answer_tokens(tokenizer, rows),
                       batch_size=batch_size)
    return score_predictions(outputs, rows)


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """Write ``records`` as JSON lines, atomically (predictions, per-prompt losses, per-text KL)."""
    from .files import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records ``write_jsonl`` wrote, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_predictions(path: str | os.PathLike, predictions: Sequence[dict]) -> Path:
    """Write predictions (``score_predictions(...)["predictions"]``) as JSON lines, atomically."""
    return write_jsonl(path, predictions)


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The predictions ``write_predictions`` wrote, in order."""
    return read_jsonl(path)


@contextlib.contextmanager
def base_model_view(model):
    """The PEFT model with its adapters disabled: the base every arm started from."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def _base_cache(key: dict[str, Any], compute, cache_file: str | Path | None) -> dict[str, Any]:
    """``compute()``'s figures for ``key``, computed once and kept in ``cache_file``, else
    ``$GRIT_ACCURACY_CACHE``, else ``<cache_dir>/base_accuracy.json`` (one file for every base figure;
    the keys differ). Returns the figures with ``cached`` saying whether they were read back."""
    from .files import atomic_write_text
    from .models import cache_dir

    path = Path(cache_file or os.environ.get("GRIT_ACCURACY_CACHE") or cache_dir() / "base_accuracy.json")
    cache = json.loads(path.read_text()) if path.is_file() else {}
    k = json.dumps(key, sort_keys=True)
    if k in cache:
        return {**cache[k], "cached": True}
    cache[k] = compute()
    atomic_write_text(path, json.dumps(cache, indent=2))
    return {**cache[k], "cached": False}


def base_accuracy_cached(model, tokenizer, rows: Sequence[dict], template: str, *, key: dict[str, Any],
                         cache_file: str | Path | None = None, batch_size: int = 16) -> dict[str, Any]:
    """The base model's exact match (overall and per family), computed once per ``key`` (model id, the
    rows' fingerprint, ...) and cached (``_base_cache``)."""
    def compute():
        with base_model_view(model):
            result = accuracy(model, tokenizer, rows, template, batch_size=batch_size)
        return {"exact_match": result["exact_match"], "n": result["n"], "per_family": result["per_family"]}

    return _base_cache(key, compute, cache_file)


def base_loss_cached(model, examples: Sequence[dict], pad_token_id: int, *, key: dict[str, Any],
                     cache_file: str | Path | None = None, batch_size: int = 8) -> dict[str, Any]:
    """The base model's token-weighted response loss on ``examples`` (``{"loss", "tokens"}``), computed once
    per ``key`` (which must name the examples' fingerprint) and cached (``_base_cache``). It is what a
    run's test loss is measured against: the pre-registered margin of a real-data preset is a fraction
    of the base-to-control gain, and a diverged run counts as the base."""
    def compute():
        with base_model_view(model):
            loss, tokens = eval_loss(model, examples, pad_token_id, batch_size)
        return {"loss": loss, "tokens": tokens}

    return _base_cache({**key, "measure": "response_loss"}, compute, cache_file)


def side_by_side(model, tokenizer, rows: Sequence[dict], template: str, k: int = 4) -> list[dict[str, str]]:
    """Tuned and base responses to ``k`` held-out prompts, with the reference answer."""
    rows = list(rows[:k])
    n_new = max_answer_tokens(tokenizer, rows, margin=16)
    tuned = generate(model, tokenizer, rows, template, max_new_tokens=n_new)
    with base_model_view(model):
        base = generate(model, tokenizer, rows, template, max_new_tokens=n_new)
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "reference": r["output"],
             "tuned": t, "base": b} for r, t, b in zip(rows, tuned, base)]


def print_side_by_side(pairs: list[dict[str, str]]) -> None:
    for i, p in enumerate(pairs, 1):
        print(f"--- held-out prompt {i}: {p['instruction']}" + (f" | input: {p['input']}" if p["input"] else ""))
        print(f"    reference : {p['reference']!r}")
        print(f"    tuned     : {p['tuned']!r}")
        print(f"    base      : {p['base']!r}")
