"""Model and training presets: the one place every notebook, benchmark and test reads its settings.

    from grit_study import resolve_preset
    p = resolve_preset()                      # auto: CUDA -> llama3-8b, else alpaca-smollm2
    p = resolve_preset("tiny", max_steps=3)   # explicit parameters win over everything

Precedence for every field: explicit parameter > ``GRIT_<FIELD>`` environment variable > preset
default. ``GRIT_PRESET`` picks the preset when no name is given.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

LORA_TARGETS_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The Alpaca-GPT4-style sample shipped with the checkout (data/alpaca-sample/README.md).
ALPACA_SAMPLE = "repo:data/alpaca-sample/alpaca_en_demo.json"


@dataclass(frozen=True)
class Preset:
    name: str = field(metadata={"help": "Preset name, recorded in every run summary."})
    model_id: str = field(
        metadata={"help": "Base model of the HF arms: a hub id, a local HF folder, or 'builtin:<name>' "
                  "for a model this package builds offline (see grit_study.models)."})
    baseline_model_id: str = field(
        metadata={"help": "Base model of the Unsloth arm. Must hold the same weights as model_id "
                  "(pre-quantized by Unsloth on the GPU preset, the same folder on CPU presets)."})
    device: str = field(metadata={"help": "'cuda' or 'cpu'."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Quantize the base to 4-bit NF4 with double quant."})
    compute_dtype: str = field(
        default="bfloat16",
        metadata={"help": "bnb compute dtype and LoRA dtype: 'bfloat16', 'float16' or 'float32'. CPU presets use "
                  "float32 because bf16 is slow on CPUs without AMX; GPUs without native bf16 (compute "
                  "capability < 8.0, e.g. T4) get float16 in every arm (resolve_preset decides it)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha; the adapter scale is alpha/r (or alpha/sqrt(r) with rsLoRA)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale adapters by alpha/sqrt(r) (rsLoRA)."})
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS_LLAMA, metadata={"help": "Module names LoRA attaches to."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Sequences per micro-batch."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimizer step."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear learning-rate warmup steps."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps per run."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "HF scheduler name."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (HF default); 0 disables."})
    optim: str = field(
        default="adamw_8bit",
        metadata={"help": "HF optimizer name, the same in every arm on a device. On CPU Unsloth replaces adamw_8bit "
                  "by adamw_torch_fused, so CPU presets name that directly."})
    seed: int = field(default=3407, metadata={"help": "Training seed: LoRA init, data order and dropout only. The "
                                                    "same seed gives every arm the same init and order."})
    data_seed: int = field(
        default=3407,
        metadata={"help": "Data seed, fixed and separate from the training seed: draws the synthetic rows and the "
                  "train / val / test split once, so every training seed sees the same three splits."})
    max_seq_length: int = field(default=2048, metadata={"help": "Sequences are truncated to this many tokens."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    fp32_embeddings: bool = field(
        default=True,
        metadata={"help": "HF arms: keep the fp32 copy of embed_tokens and lm_head that prepare_model_for_kbit_training "
                  "makes (True), or cast them back to the compute dtype (False: 1.96 GiB less on Llama-3-8B). The "
                  "Unsloth arm keeps its own 16-bit ones. resolve_preset sets False on a small card when needed "
                  "(grit_study.memory.fit_to_card)."})
    data: str = field(
        default="hub:vicgalle/alpaca-gpt4",
        metadata={"help": "Data source: 'hub:<dataset id>', 'synthetic', a path to .json/.jsonl/.csv Alpaca rows, or "
                  "'repo:<path>' for a file shipped in this checkout (resolved against the repository root, not the "
                  "working directory). Only 'hub:' sources touch the network."})
    num_examples: int = field(default=0, metadata={"help": "Rows drawn from the source before the split; 0 = all (synthetic: how many to generate)."})
    val_size: int = field(default=200, metadata={"help": "Prompts in the validation split (choosing hyperparameters; same rows, "
                                                      "same order, every arm). For a file or hub source a cap: at most "
                                                      "a quarter of its distinct prompts (grit_study.data.held_out_sizes)."})
    test_size: int = field(default=0, metadata={"help": "Prompts in the test split (reported, never used to choose); 0 = no test "
                                                    "split. Capped like val_size."})
    template: str = field(default="alpaca", metadata={"help": "'alpaca' (the seed baseline's prompt) or 'chat' (the tokenizer's chat template)."})
    eval_steps: int = field(default=50, metadata={"help": "Evaluate on the validation split every this many steps."})
    logging_steps: int = field(default=1, metadata={"help": "Log train/loss every this many steps."})
    save_steps: int = field(
        default=0,
        metadata={"help": "Write a resumable checkpoint (Trainer, GRIT state, the run's record) every this many "
                  "steps; 0 = none. A run resumes with RESUME_FROM_CHECKPOINT=<output dir>/checkpoint-<step>."})
    kfac_update_freq: int = field(
        default=50,
        metadata={"help": "GRIT arms update and invert their factors every this many steps. It belongs to the run "
                  "length: the published 50 of 200 steps; a 60-step preset at 50 would precondition 11 steps."})
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per evaluation batch."})
    preregistration: str | None = field(
        default=None,
        metadata={"help": "The pre-registration file GRIT runs of this preset require (a path in the repository); "
                  "None = none needed."})


# The seed protocol, verbatim: the only preset that runs on the hub model and data.
LLAMA3_8B = Preset(
    name="llama3-8b",
    model_id="NousResearch/Meta-Llama-3-8B",  # ungated 16-bit mirror of meta-llama/Meta-Llama-3-8B
    baseline_model_id="unsloth/llama-3-8b-bnb-4bit",  # the same weights, pre-quantized by Unsloth
    device="cuda",
    compute_dtype="bfloat16",
    optim="adamw_8bit",
    max_seq_length=2048,
    data="hub:vicgalle/alpaca-gpt4",
    val_size=200,
    eval_steps=25,
    kfac_update_freq=50,
)

# The synthetic study: the sweep's preset (tensorboard_logs/sweep/), selectable by name; the CPU default
# until alpaca-smollm2. Budget (2-core machine, issue "Paired notebooks"): the study runs three arms plus
# the compare notebook within 30 minutes. Measured with HF + PEFT on this machine: 4 micro-batches
# of 2 sequences at 128 tokens cost about 6.4 s per optimizer step; synthetic rows are 60-90
# tokens, so max_seq_length 128 never truncates them. 3 arms x 60 steps x ~6 s = 18 min of
# training, plus evaluation (4 evals x 64 rows), model loads and export, leaves margin under 30.
# Measured by `make study` (2026-11-26, second run, GRIT with grafting): 4.7-6.0 s median per step;
# 426 + 453 + 405 s for the three arms (training, evals, exact-match decoding, GGUF export) + 6 s for
# 03 = 21.5 min.
SMOLLM2_135M = Preset(
    name="smollm2-135m",
    model_id="builtin:smollm2-135m",
    baseline_model_id="builtin:smollm2-135m",
    device="cpu",
    compute_dtype="float32",
    optim="adamw_torch_fused",
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    warmup_steps=5,
    max_steps=60,
    learning_rate=2e-4,
    max_seq_length=128,
    data="synthetic",
    # 8 families: val 16 and test 32 prompts per family; the 1,616 training rows cover 200 steps x 8
    # sequences (tier 3) without repeating a row.
    num_examples=2000,
    val_size=128,
    test_size=256,
    eval_steps=20,
    eval_batch_size=16,
    # 10 of 60 steps: 51 steps preconditioned; the r x r factors cost next to nothing to invert.
    kfac_update_freq=10,
)

# Tests: a random tiny Llama with SmolLM2's real tokenizer, built locally in seconds. lora_alpha != r
# so the adapter scale s = 2 cannot hide a missing or doubled factor of s.
TINY = Preset(
    name="tiny",
    model_id="builtin:tiny",
    baseline_model_id="builtin:tiny",
    device="cpu",
    compute_dtype="float32",
    optim="adamw_torch_fused",
    lora_r=4,
    lora_alpha=8,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    warmup_steps=1,
    max_steps=4,
    max_seq_length=96,
    gradient_checkpointing=False,
    data="synthetic",
    num_examples=128,
    val_size=16,
    test_size=16,
    eval_steps=2,
    eval_batch_size=8,
    kfac_update_freq=2,
)

# CPU default: SmolLM2-135M-Instruct tuned on an Alpaca-GPT4-style sample of 999 instructions shipped in
# data/alpaca-sample/ (source, licence and sha256 in its README), in SmolLM2-Instruct's own chat template (ChatML
# with its system line: the template the GGUF carries and llama.cpp / Ollama serve).
# Splits (data seed 3407, split_by_prompt): test 200 and val 100 prompts of the 985 distinct ones, train the 694
# rows whose prompt is neither (5 more repeat a held-out prompt); 60 steps x 8 sequences draw 0.69 epochs, the
# 200-step tier 2.31.
# max_seq_length, measured: the sample tokenized with the chat template (prompt + response + EOS; longest prompt
# 204 tokens, median row 162), what each length keeps of the 151,125 response tokens (EOS included) and of the
# 999 EOS tokens:
#     length   256    320    384    448    512
#     tokens   74.8%  86.3%  93.8%  97.6%  99.1%
#     EOS      68.4%  77.8%  87.2%  94.8%  97.7%
# Rule: the shortest length that keeps at least 95% of both, since a response cut before its EOS teaches the model
# not to stop: 512. No prompt is too long for it (no row is dropped). Batches are padded to their longest row, so
# 512 costs about 2% more per step than 448 (expected micro-batch width 275 against 270 tokens). Every run
# summary records the shares kept per split (data.token_retention).
# Otherwise the synthetic study's preset: the same model, LoRA, optimizer, schedule and kfac_update_freq (51 of 60
# steps preconditioned).
ALPACA_SMOLLM2 = dataclasses.replace(
    SMOLLM2_135M,
    name="alpaca-smollm2",
    max_seq_length=512,
    template="chat",
    data=ALPACA_SAMPLE,
    num_examples=0,
    val_size=100,
    test_size=200,
    eval_batch_size=8,
    preregistration="docs/preregistration/alpaca-smollm2.json",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (LLAMA3_8B, SMOLLM2_135M, ALPACA_SMOLLM2, TINY)}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def auto_preset_name() -> str:
    return "llama3-8b" if cuda_available() else "alpaca-smollm2"


def _parse_env(name: str, raw: str, current: Any) -> Any:
    """Parse a GRIT_* string into the type of the preset field it overrides."""
    try:
        if isinstance(current, bool):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"environment variable GRIT_{name.upper()}={raw!r} is not a valid "
                         f"{type(current).__name__} for preset field {name!r}") from None
    return raw


def cuda_bf16_native() -> bool | None:
    """Whether the first CUDA device computes bf16 natively (compute capability >= 8.0); None without CUDA.

    ``torch.cuda.is_bf16_supported()`` counts emulation by default and says True on a T4 (sm75), where
    Unsloth (which checks the capability) switches to fp16: asking the capability keeps every arm on
    the same precision.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0) >= (8, 0)


def resolve_preset(name: str | None = None, **overrides: Any) -> Preset:
    """Return the preset ``name`` (or ``GRIT_PRESET``, or the auto choice) with overrides applied.

    Overrides whose value is ``None`` count as not given, so notebook parameters can default to
    ``None`` and fall through to the environment and then to the preset.

    Precision is decided here, once, for every arm: a bfloat16 CUDA preset on a GPU without native bf16
    (compute capability < 8.0: T4, V100) computes in float16, as Unsloth would decide for the baseline.

    So is memory, from the preset and the card alone: on a CUDA card under 24 GiB, a Llama-3-8B preset whose
    largest micro-batch would not fit gets 1 row per micro-batch with the accumulation multiplied to keep the
    sequences per step (2 x 4 -> 1 x 8), then, if still needed, 16-bit embeddings and head on the HF arms
    (``grit_study.memory.fit_to_card``; fields given explicitly stay as given). CPU presets and bigger cards
    keep the preset's settings.
    """
    chosen = name or os.environ.get("GRIT_PRESET") or auto_preset_name()
    if chosen not in PRESETS:
        raise ValueError(f"unknown preset {chosen!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[chosen]
    valid = {f.name for f in dataclasses.fields(Preset)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown preset field(s) {sorted(unknown)}; valid fields: {sorted(valid)}")
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(Preset):
        if f.name == "name":
            continue
        if overrides.get(f.name) is not None:
            value = overrides[f.name]
            changes[f.name] = tuple(value) if isinstance(getattr(base, f.name), tuple) else value
        elif (raw := os.environ.get(f"GRIT_{f.name.upper()}")) is not None:
            changes[f.name] = _parse_env(f.name, raw, getattr(base, f.name))
    preset = dataclasses.replace(base, **changes)
    if preset.device == "cuda" and preset.compute_dtype == "bfloat16" and cuda_bf16_native() is False:
        preset = dataclasses.replace(preset, compute_dtype="float16")
    if preset.device == "cuda":
        from . import memory

        preset = memory.fit_to_card(preset, explicit=frozenset(changes))
    _validate(preset)
    return preset


def _validate(p: Preset) -> None:
    if p.compute_dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"compute_dtype must be 'bfloat16', 'float16' or 'float32', got {p.compute_dtype!r}")
    if p.template not in ("alpaca", "chat"):
        raise ValueError(f"template must be 'alpaca' or 'chat', got {p.template!r}")
    for name in ("lora_r", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                 "max_seq_length", "eval_steps", "eval_batch_size", "kfac_update_freq"):
        if getattr(p, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(p, name)}")
    for name in ("val_size", "test_size"):
        if getattr(p, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(p, name)}")


def torch_dtype(p: Preset):
    import torch

    return getattr(torch, p.compute_dtype)
