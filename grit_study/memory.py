"""GPU memory of a Llama-3-8B arm, estimated before training, and the settings a small card shares across arms.

The model (one line, fitted to two measurements of this project's HF + PEFT stack):

    peak bytes = FIXED_BYTES + PER_TOKEN_BYTES x tokens of the micro-batch      (rows x padded width)

Measured on an NVIDIA H200 (``benchmarks/step_overhead.py --model llama3-8b-shaped``: a random Llama-3-8B-shaped
model, NF4 double quant, bf16 compute, ``prepare_model_for_kbit_training`` (embeddings and head upcast to fp32),
LoRA r=16 on the 7 projections (224 modules), reentrant gradient checkpointing, AdamW8bit, micro-batch 2; peak =
``torch.cuda.max_memory_allocated`` of the control arm's steps):

    benchmarks/results/h200_seq512_batched.json    2 x   512 =  1,024 tokens   10,426,186,752 bytes ( 9.71 GiB)
    benchmarks/results/h200_seq2048_batched.json   2 x 2,048 =  4,096 tokens   16,814,201,856 bytes (15.66 GiB)

so PER_TOKEN_BYTES = 2,079,432 (1.98 MiB a token: mostly the fp32 logits of a 128,256-token vocabulary and their
gradient) and FIXED_BYTES = 8,296,848,384 (7.73 GiB: the 4-bit weights, the fp32 embeddings and head, LoRA, its
gradients and optimizer state; the benchmark's log says 7.54 GiB idle after the first step). The GRIT arm peaked
0.03 GiB lower than the control (its factors are r x r), so one line serves every HF arm. Two terms are derived,
not measured:

* ``EMBEDDINGS_FP32_EXTRA_BYTES``: keeping ``embed_tokens`` and ``lm_head`` in 16 bits instead of the fp32 copy
  ``prepare_model_for_kbit_training`` makes saves 2 x 128,256 x 4,096 x 2 bytes = 1.96 GiB (``Preset.fp32_embeddings``).
  The Unsloth baseline keeps them in 16 bits itself, so its estimate is the 16-bit one (it matches the ~5.7 GiB
  Unsloth holds before training against the HF arm's ~7.5); its fused loss and offloaded checkpoints make the
  per-token term an upper bound for it.
* ``HEADROOM_GIB``: what ``max_memory_allocated`` does not see (the CUDA context, the allocator's fragmentation).
  1 GiB puts the largest micro-batch of 2 rows that fits a T4 (14.57 GiB reported) at 1,508 tokens a row,
  consistent with the ~1,500-token rows seen to fail there.

The estimate is for that configuration only (``covers``): another model, no 4-bit, no gradient checkpointing or
fp32 compute gets no plan. Other LoRA ranks move it little (r=16 adapters with their optimizer state are 0.4 GiB).

What uses it: ``resolve_preset`` (``fit_to_card``) picks, on a CUDA card under ``SMALL_CARD_GIB``, settings every
arm shares, from the preset and the card alone; ``arms.study_data`` (``check``) prints the estimate of each kind of
arm for the longest micro-batch the run will draw and stops before any training when it cannot fit;
``arms.run_recorder`` records the plan as ``memory_plan`` in the run summary. CPU presets and cards of
``SMALL_CARD_GIB`` or more keep the preset's settings (on a CUDA card the plan is still printed and recorded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

GIB = 2**30

# (micro-batch tokens, peak bytes) of the control arm, benchmarks/results/h200_seq{512,2048}_batched.json.
MEASURED = ((2 * 512, 10_426_186_752), (2 * 2048, 16_814_201_856))
MEASURED_SOURCES = ("benchmarks/results/h200_seq512_batched.json", "benchmarks/results/h200_seq2048_batched.json")
PER_TOKEN_BYTES = (MEASURED[1][1] - MEASURED[0][1]) / (MEASURED[1][0] - MEASURED[0][0])
FIXED_BYTES = MEASURED[0][1] - PER_TOKEN_BYTES * MEASURED[0][0]
# Llama-3-8B: vocabulary 128,256 x hidden 4,096, untied embeddings and head; fp32 (4 bytes) instead of 16-bit (2).
LLAMA3_8B_SHAPE = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
EMBEDDINGS_FP32_EXTRA_BYTES = 2 * 128256 * 4096 * (4 - 2)
HEADROOM_GIB = 1.0
# Cards with at least this much memory keep the preset's settings.
SMALL_CARD_GIB = 24.0
# The settings fit_to_card may change (and that an explicit parameter or GRIT_* variable keeps).
BATCH_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")
EMBEDDINGS_FIELD = "fp32_embeddings"


class MemoryPlanError(RuntimeError):
    """The longest micro-batch of the run cannot fit the card, even with the small-card settings."""


# ----------------------------------------------------------------------------- the card

def card_total_gib() -> float | None:
    """Total memory of CUDA device 0 in GiB (``torch.cuda.get_device_properties(0).total_memory``); None without
    CUDA. Tests patch this function."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def card_name() -> str:
    try:
        import torch

        return str(torch.cuda.get_device_properties(0).name)
    except Exception:  # a test's card, or no CUDA: the name is only printed
        return "CUDA device"


# ----------------------------------------------------------------------------- the model

def estimate_gib(tokens: int, *, fp32_embeddings: bool = True) -> float:
    """Peak GiB of an HF arm training on micro-batches of ``tokens`` (rows x padded width): the measured line,
    less ``EMBEDDINGS_FP32_EXTRA_BYTES`` when the embeddings and head stay 16-bit."""
    extra = 0 if fp32_embeddings else -EMBEDDINGS_FP32_EXTRA_BYTES
    return (FIXED_BYTES + extra + PER_TOKEN_BYTES * tokens) / GIB


def max_tokens(usable_gib: float, *, fp32_embeddings: bool = True) -> int:
    """The most micro-batch tokens whose estimate fits ``usable_gib``."""
    fixed = estimate_gib(0, fp32_embeddings=fp32_embeddings)
    return max(0, math.floor((usable_gib - fixed) * GIB / PER_TOKEN_BYTES))


def usable_gib(card_gib: float) -> float:
    return card_gib - HEADROOM_GIB


def _is_llama3_8b(model_id: str) -> bool:
    if re.search(r"llama-?3(\.\d)?-8b", model_id.lower()):
        return True
    config = Path(model_id) / "config.json"
    try:
        c = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(c, dict) and all(c.get(k) == v for k, v in LLAMA3_8B_SHAPE.items())


def covers(preset) -> bool:
    """Whether the measured configuration is the preset's: a Llama-3-8B, 4-bit, gradient checkpointing, 16-bit
    compute, on CUDA."""
    return (preset.device == "cuda" and preset.load_in_4bit and preset.gradient_checkpointing
            and preset.compute_dtype in ("bfloat16", "float16") and _is_llama3_8b(preset.model_id))


def model_facts() -> dict[str, Any]:
    """The model's constants, for the run summary."""
    return {"fixed_gib": round(FIXED_BYTES / GIB, 4), "per_token_mib": round(PER_TOKEN_BYTES / 2**20, 4),
            "embeddings_fp32_extra_gib": round(EMBEDDINGS_FP32_EXTRA_BYTES / GIB, 4), "headroom_gib": HEADROOM_GIB,
            "measured": [{"tokens": t, "peak_bytes": b, "source": s} for (t, b), s in zip(MEASURED, MEASURED_SOURCES)]}


# ----------------------------------------------------------------------------- the shared small-card settings

def _worst_case_fits(p, usable: float) -> bool:
    """The preset's largest possible micro-batch (batch x max_seq_length; what the padding-artifact arm always
    draws) fits an HF arm."""
    return estimate_gib(p.per_device_train_batch_size * p.max_seq_length, fp32_embeddings=p.fp32_embeddings) <= usable


def fit_to_card(preset, explicit: frozenset[str] | set[str] = frozenset(), card_gib: float | None = None):
    """The settings every arm shares on a CUDA card under ``SMALL_CARD_GIB``, decided from the preset and the
    card alone (never from an arm or the data, so the comparison stays fair). Unchanged on CPU presets, on bigger
    cards, on models the estimate does not cover, and when the preset's largest possible micro-batch already fits.
    Otherwise, in order, until it fits:

    1. micro-batches of 1 row with ``gradient_accumulation_steps`` multiplied by the old batch size (the same
       sequences per optimizer step, drawn in the same order: 2 x 4 -> 1 x 8);
    2. the HF arms keep ``embed_tokens`` and ``lm_head`` in 16 bits (``fp32_embeddings=False``; 1.96 GiB less).

    A field given explicitly (``explicit``: a parameter or GRIT_* variable) is left as given. When even both
    cannot hold the largest possible micro-batch, ``check`` still runs the data whose rows fit and stops the rest.
    """
    if preset.device != "cuda" or not covers(preset):
        return preset
    card = card_total_gib() if card_gib is None else card_gib
    if card is None or card >= SMALL_CARD_GIB:
        return preset
    usable = usable_gib(card)
    p = preset
    if _worst_case_fits(p, usable):
        return p
    if not set(BATCH_FIELDS) & set(explicit) and p.per_device_train_batch_size > 1:
        sequences = p.gradient_accumulation_steps * p.per_device_train_batch_size
        p = dataclasses.replace(p, per_device_train_batch_size=1, gradient_accumulation_steps=sequences)
        if _worst_case_fits(p, usable):
            return p
    if EMBEDDINGS_FIELD not in explicit and p.fp32_embeddings:
        p = dataclasses.replace(p, fp32_embeddings=False)
    return p


def apply_embedding_dtype(model, preset) -> bool:
    """On an HF arm whose preset says ``fp32_embeddings=False``: cast ``embed_tokens`` and ``lm_head`` (upcast to
    fp32 by ``prepare_model_for_kbit_training``, which has no switch for it in peft 0.21.2) back to the compute
    dtype. They are frozen and hold no LoRA, so this changes only their storage (under autocast the head computes
    in 16 bits either way) and the residual stream's dtype. Returns whether anything was cast."""
    if getattr(preset, EMBEDDINGS_FIELD, True):
        return False
    import torch

    dtype = getattr(torch, preset.compute_dtype)
    changed = False
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dtype != dtype and weight.dtype.is_floating_point:
            module.to(dtype)
            changed = True
    return changed


# ----------------------------------------------------------------------------- the run's longest micro-batch

def longest_micro_batch(train: Sequence[dict], preset, *, pad_to: int | None = None) -> dict[str, Any]:
    """The micro-batch of the run's schedule (``data.train_schedule``: the rows, the batch size and the order the
    Trainer draws them in, seeded by the training seed) with the most tokens once padded: ``tokens`` = rows x
    width, the width being its longest row (``PadCollator``), or ``pad_to`` for an arm that pads every batch to
    ``max_seq_length``. ``step`` and ``micro_batch`` count from 1. ``upper_bound_tokens``: the longest row times
    the batch size, whatever the order."""
    from .data import train_schedule

    b = preset.per_device_train_batch_size
    lengths = [len(e["input_ids"]) for e in train]
    schedule = train_schedule(len(lengths), batch_size=b, accumulation=preset.gradient_accumulation_steps,
                              max_steps=preset.max_steps, seed=preset.seed)
    best = {"tokens": -1}
    for s, step in enumerate(schedule, 1):
        for m, rows in enumerate(step, 1):
            width = pad_to if pad_to is not None else max(lengths[i] for i in rows)
            if len(rows) * width > best["tokens"]:
                best = {"tokens": len(rows) * width, "rows": len(rows), "width": width, "step": s, "micro_batch": m}
    best["upper_bound_tokens"] = b * (pad_to if pad_to is not None else max(lengths))
    return best


ARM_KINDS = ("baseline", "hf", "padding_artifact")
ARM_KIND_HELP = {"baseline": "Unsloth baseline (16-bit embeddings)", "hf": "HF arms (control, GRIT, peers)",
                 "padding_artifact": "padding artifact (padded to max_seq_length)"}


def arm_kind(spec) -> str:
    if spec.stack == "unsloth+trl":
        return "baseline"
    return "padding_artifact" if spec.loss_on_padding else "hf"


def plan(preset, train: Sequence[dict], card_gib: float | None = None) -> dict[str, Any] | None:
    """The run's memory plan on this card: the longest micro-batch of its schedule, the estimate of each kind of arm,
    the card, and the settings; None without CUDA or for a model the estimate does not cover (``covers``)."""
    from .presets import PRESETS

    if not covers(preset):
        return None
    card = card_total_gib() if card_gib is None else card_gib
    if card is None:
        return None
    usable = usable_gib(card)
    longest = longest_micro_batch(train, preset)
    padded = longest_micro_batch(train, preset, pad_to=preset.max_seq_length)
    estimates = {
        "baseline": estimate_gib(longest["tokens"], fp32_embeddings=False),
        "hf": estimate_gib(longest["tokens"], fp32_embeddings=preset.fp32_embeddings),
        "padding_artifact": estimate_gib(padded["tokens"], fp32_embeddings=preset.fp32_embeddings),
    }
    settings = {f: getattr(preset, f) for f in (*BATCH_FIELDS, EMBEDDINGS_FIELD)}
    default = PRESETS.get(preset.name)
    return {
        "card": card_name(), "card_gib": round(card, 2), "usable_gib": round(usable, 2),
        "small_card": card < SMALL_CARD_GIB,
        "longest_micro_batch_tokens": longest["tokens"], "longest_micro_batch": longest,
        "padded_micro_batch_tokens": padded["tokens"],
        "estimate_gib": round(estimates["hf"], 2),
        "estimates_gib": {k: round(v, 2) for k, v in estimates.items()},
        "settings": settings,
        "preset_settings": {f: getattr(default, f) for f in settings} if default is not None else None,
        "model": model_facts(),
    }


def for_arm(p: dict[str, Any], spec) -> dict[str, Any]:
    """The plan as one arm's summary records it: ``estimate_gib`` is that arm's."""
    kind = arm_kind(spec)
    return {**p, "arm_kind": kind, "estimate_gib": p["estimates_gib"][kind]}


def describe(p: dict[str, Any]) -> str:
    s = p["settings"]
    lm = p["longest_micro_batch"]
    lines = [f"memory plan: {p['card']} {p['card_gib']:.2f} GiB, {p['usable_gib']:.2f} GiB usable "
             f"({HEADROOM_GIB:g} GiB headroom); settings shared by every arm: per_device_train_batch_size "
             f"{s['per_device_train_batch_size']} x gradient_accumulation_steps {s['gradient_accumulation_steps']}, "
             f"HF embeddings and head in {'fp32' if s['fp32_embeddings'] else '16 bits'}"
             + (f" (preset: {p['preset_settings']})" if p["preset_settings"] not in (None, s) else ""),
             f"  longest micro-batch of the run: {lm['rows']} x {lm['width']:,} = {lm['tokens']:,} tokens (step "
             f"{lm['step']}, micro-batch {lm['micro_batch']}); padded to max_seq_length: "
             f"{p['padded_micro_batch_tokens']:,}"]
    for kind in ARM_KINDS:
        est = p["estimates_gib"][kind]
        lines.append(f"  estimated peak, {ARM_KIND_HELP[kind]}: {est:.2f} GiB"
                     + ("" if est <= p["usable_gib"] else "  (does not fit)"))
    return "\n".join(lines)


def check(preset, train: Sequence[dict], kinds: Sequence[str] = ("baseline", "hf"), card_gib: float | None = None,
          quiet: bool = False) -> dict[str, Any] | None:
    """``plan``, printed; raises ``MemoryPlanError`` before any training when an arm of ``kinds`` cannot fit its
    longest micro-batch, with the estimate, the card and the ``max_seq_length`` that would fit. The baseline is
    stopped with the HF arms: the study compares them on the same rows."""
    p = plan(preset, train, card_gib)
    if p is None:
        return None
    if not quiet:
        print(describe(p))
    over = [k for k in kinds if p["estimates_gib"][k] > p["usable_gib"]]
    if over:
        kind = max(over, key=lambda k: (p["estimates_gib"][k], k != "baseline"))  # the HF arms' name on a tie
        fp32 = preset.fp32_embeddings if kind != "baseline" else False
        b = preset.per_device_train_batch_size
        fit = max_tokens(p["usable_gib"], fp32_embeddings=fp32) // b
        lm = p["longest_micro_batch"] if kind != "padding_artifact" else {
            "rows": b, "width": preset.max_seq_length, "tokens": p["padded_micro_batch_tokens"]}
        fixes = [f"set max_seq_length <= {fit} (notebook parameter MAX_SEQ_LENGTH or GRIT_MAX_SEQ_LENGTH; rows are "
                 f"cut to it)" if fit >= 1 else "use a card with more memory"]
        if b > 1:
            fixes.append("leave per_device_train_batch_size and gradient_accumulation_steps unset (the small-card "
                         "settings use 1 row per micro-batch)")
        if fp32 and kind != "baseline":
            fixes.append("leave fp32_embeddings unset")
        raise MemoryPlanError(
            f"the longest micro-batch of this run ({lm['rows']} x {lm['width']:,} = {lm['tokens']:,} tokens) needs "
            f"about {p['estimates_gib'][kind]:.2f} GiB for the {ARM_KIND_HELP[kind]} on {p['card']} "
            f"({p['card_gib']:.2f} GiB, {p['usable_gib']:.2f} usable); stopped before training. To fit: "
            f"{'; or '.join(fixes)}.")
    return p
