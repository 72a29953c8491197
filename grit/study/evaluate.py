"""Evaluation shared by every arm: token-weighted validation loss, greedy exact-match accuracy, and
side-by-side responses of the tuned and the base model.

The base model is the same quantized model with its adapters disabled (``disable_adapter()``), so
"base" means exactly the network every arm started from; its accuracy is cached by model id,
quantization, template and validation fingerprint, because it does not depend on the arm.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .data import IGNORE_INDEX, format_prompt, prompt_ids


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


def eval_loss(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Token-weighted CE over the response tokens of ``examples``: (sum of token CE / count, count).

    Each batch's summed CE comes from the model's own loss with ``num_items_in_batch`` set to the
    batch's token count (loss = sum / count), which every HF causal LM (and Unsloth's chunked CE)
    honours, so no vocab-sized logits are materialised for big models.
    """
    import torch

    from .data import PadCollator

    collate = PadCollator(pad_token_id)
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model):
        for i in range(0, len(examples), batch_size):
            batch = collate(list(examples[i:i + batch_size]))
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch, num_items_in_batch=torch.tensor(n, device=device))
            total += float(out.loss.float()) * n
            count += n
    if count == 0:
        raise ValueError("eval_loss: the examples hold no response tokens; check the labels (-100 everywhere?)")
    return total / count, count


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


def accuracy(model, tokenizer, rows: Sequence[dict], template: str, batch_size: int = 16) -> dict[str, Any]:
    preds = generate(model, tokenizer, rows, template, max_new_tokens=max_answer_tokens(tokenizer, rows),
                     batch_size=batch_size)
    return {"exact_match": exact_match(preds, rows), "n": len(rows), "predictions": preds}


@contextlib.contextmanager
def base_model_view(model):
    """The PEFT model with its adapters disabled: the base every arm started from."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def base_accuracy_cached(model, tokenizer, rows: Sequence[dict], template: str, *, key: dict[str, Any],
                         cache_file: str | Path | None = None, batch_size: int = 16) -> dict[str, Any]:
    """The base model's exact-match accuracy, computed once per ``key`` (model id, val fingerprint, ...),
    cached in ``cache_file``, else ``$GRIT_ACCURACY_CACHE``, else ``<cache_dir>/base_accuracy.json``."""
    from .models import cache_dir

    path = Path(cache_file or os.environ.get("GRIT_ACCURACY_CACHE") or cache_dir() / "base_accuracy.json")
    cache = json.loads(path.read_text()) if path.is_file() else {}
    k = json.dumps(key, sort_keys=True)
    if k in cache:
        return {**cache[k], "cached": True}
    with base_model_view(model):
        result = accuracy(model, tokenizer, rows, template, batch_size=batch_size)
    cache[k] = {"exact_match": result["exact_match"], "n": result["n"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=2))
    tmp.replace(path)
    return {**cache[k], "cached": False}


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
