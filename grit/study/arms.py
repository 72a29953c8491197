"""Build and run one arm of the study; the notebooks are parameters plus calls into this module.

    res = run_baseline(preset, logdir=..., output_dir=...)          # 01: Unsloth + TRL SFTTrainer
    res = run_hf(preset, grit=GritSettings(precondition=False), ...)  # 02: control (GRIT off)
    res = run_hf(preset, grit=GritSettings(), ...)                  # 02: pure GRIT

Everything an arm could do differently is decided here once, for all arms: the examples and their
order (``build_study_data`` + the Trainer's seeded sampler), the collator (``PadCollator``), the
optimizer, schedule and precision (``training_arguments``), the LoRA init (``torch.manual_seed(seed)``
before ``get_peft_model``; Unsloth's ``random_state=seed`` does the same), the validation loss and
the run record (``RunRecorder``). Import ``unsloth`` before this module in the baseline's kernel:
Unsloth patches transformers when it is imported, and never in a process that runs the other arms.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import PadCollator, StudyData, as_hf_dataset, build_study_data
from .models import load_tokenizer, resolve_model_path
from .presets import Preset, _parse_env, resolve_preset

DEFAULT_LOGDIR = "tensorboard_logs"
DEFAULT_OUTPUT_DIR = "outputs"


# ----------------------------------------------------------------------------- parameters

def param(name: str, value: Any, default: Any, kind: type | None = None) -> Any:
    """A notebook parameter: the explicit value, else ``GRIT_<NAME>`` parsed as ``kind`` (default: the
    type of ``default``), else ``default``. The same precedence as ``resolve_preset`` for preset fields."""
    if value is not None:
        return value
    raw = os.environ.get(f"GRIT_{name.upper()}")
    if raw is None:
        return default
    kind = kind or (type(default) if default is not None else str)
    return _parse_env(name.lower(), raw, kind())


def study_preset(name: str | None = None, **overrides: Any) -> Preset:
    """``resolve_preset`` plus the device fallback every arm shares: no bf16 on this GPU -> fp16."""
    preset = resolve_preset(name, **overrides)
    import torch

    if preset.compute_dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        preset = dataclasses.replace(preset, compute_dtype="float16")
    return preset


@dataclass
class GritSettings:
    """The notebook's GRIT parameters; ``None`` leaves a field at ``GRITConfig``'s (published) default."""

    precondition: bool = field(default=True, metadata={"help": "Apply the natural gradient; False with both "
                                                               "lambdas 0 is the control arm (no manager)."})
    pairing: str = field(default="kfac", metadata={"help": "'kfac' (ours) or 'reference' (the published pairing)."})
    lambda_kfac: float | None = field(default=None, metadata={"help": "Curvature regularizer weight (0 = off)."})
    lambda_reproj: float | None = field(default=None, metadata={"help": "Reprojection regularizer weight (0 = off)."})
    grafting: bool | None = field(default=None, metadata={"help": "Per-module norm grafting (GRITConfig default "
                                                                "True); False is the published scale."})
    kfac_update_freq: int | None = field(default=None, metadata={"help": "Update/invert factors every n steps."})
    kfac_damping: float | None = field(default=None, metadata={"help": "Damping (GRITConfig says relative or not)."})
    ng_warmup_steps: int | None = field(default=None, metadata={"help": "Steps without preconditioning."})
    other: dict = field(default_factory=dict, metadata={"help": "Any other GRITConfig field -> value."})

    def __post_init__(self):
        if self.pairing not in ("kfac", "reference"):
            raise ValueError(f"pairing must be 'kfac' or 'reference', got {self.pairing!r}")
        if not self.precondition:
            # PRECONDITION=False alone means GRIT entirely off (the control); regularizers only when asked.
            self.lambda_kfac = 0.0 if self.lambda_kfac is None else self.lambda_kfac
            self.lambda_reproj = 0.0 if self.lambda_reproj is None else self.lambda_reproj

    @property
    def is_control(self) -> bool:
        return not self.precondition and not self.lambda_kfac and not self.lambda_reproj

    def config_kwargs(self) -> dict[str, Any]:
        out = {"precondition": self.precondition, "pairing": self.pairing, **self.other}
        for name in ("lambda_kfac", "lambda_reproj", "grafting", "kfac_update_freq", "kfac_damping",
                     "ng_warmup_steps"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def grit_config(preset: Preset, settings: GritSettings):
    from grit import GRITConfig

    return GRITConfig(lora_rank=preset.lora_r, **settings.config_kwargs())


def arm_name(settings: GritSettings | None, config=None, loss_on_padding: bool = False) -> str:
    """grit / control / ng_only / reg_only / reference / padding_artifact, from what is switched on; a
    preconditioned arm without grafting gets the suffix ``_no_grafting`` (e.g. grit_no_grafting)."""
    if loss_on_padding:
        return "padding_artifact"
    if settings is None:
        return "baseline"
    if settings.is_control:
        return "control"
    regs = config is not None and (config.lambda_kfac > 0 or config.lambda_reproj > 0)
    if settings.pairing == "reference":
        name = "reference"
    elif settings.precondition and regs:
        name = "grit"
    else:
        name = "ng_only" if settings.precondition else "reg_only"
    if settings.precondition and config is not None and not config.grafting:
        name += "_no_grafting"
    return name


# ----------------------------------------------------------------------------- shared pieces

def study_data(preset: Preset, tokenizer) -> StudyData:
    return build_study_data(tokenizer, source=preset.data, template=preset.template,
                            max_seq_length=preset.max_seq_length, val_size=preset.val_size,
                            num_examples=preset.num_examples, seed=preset.seed)


def collator(preset: Preset, tokenizer, loss_on_padding: bool = False) -> PadCollator:
    # pad = EOS on every tokenizer of the study; the published artifact also padded with EOS.
    pad = tokenizer.pad_token_id if not loss_on_padding else tokenizer.eos_token_id
    return PadCollator(pad, loss_on_padding=loss_on_padding,
                       max_seq_length=preset.max_seq_length if loss_on_padding else None)


def training_arguments(preset: Preset, output_dir: str) -> dict[str, Any]:
    """The TrainingArguments fields every arm shares (SFTConfig takes them too)."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=preset.per_device_train_batch_size,
        gradient_accumulation_steps=preset.gradient_accumulation_steps, max_steps=preset.max_steps,
        learning_rate=preset.learning_rate, warmup_steps=preset.warmup_steps, weight_decay=preset.weight_decay,
        lr_scheduler_type=preset.lr_scheduler_type, max_grad_norm=preset.max_grad_norm, optim=preset.optim,
        seed=preset.seed, data_seed=preset.seed, logging_steps=preset.logging_steps, report_to="none",
        eval_strategy="no", save_strategy="no", remove_unused_columns=False, disable_tqdm=False,
        bf16=preset.compute_dtype == "bfloat16" and preset.device == "cuda",
        fp16=preset.compute_dtype == "float16" and preset.device == "cuda",
        use_cpu=preset.device == "cpu", dataloader_num_workers=0,
    )


@dataclass
class ArmResult:
    arm: str
    preset: Preset
    model: Any
    tokenizer: Any
    trainer: Any
    recorder: Any
    data: StudyData
    run_dir: Path
    grit_manager: Any = None
    export_result: Any = None

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "run_summary.json").read_text())


def _recorder(preset: Preset, arm: str, data: StudyData, model, tokenizer, logdir: str, *,
              model_id: str, loss_on_padding: bool, departs_from: str | None, grit_manager=None, extra=None):
    from .evaluate import eval_loss
    from .runs import RunRecorder, new_run_dir

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if p.requires_grad})
    info = {
        "arm": arm, "preset": preset.name, "model_id": model_id, "data_source": preset.data,
        "optimizer": preset.optim, "compute_dtype": preset.compute_dtype, "trainable_parameters": trainable,
        "trainable_dtypes": lora_dtypes, "loss_on_padding": loss_on_padding, "departs_from": departs_from,
        "preset_fields": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(preset).items()},
        "data": data.summary(), "train_fingerprint": data.train_fingerprint, "val_fingerprint": data.val_fingerprint,
        **(extra or {}),
    }
    run_dir = new_run_dir(logdir, arm)
    info["run_dir"] = str(run_dir)
    return RunRecorder(run_dir, info=info, eval_steps=preset.eval_steps, grit_manager=grit_manager,
                       evaluate=lambda m: eval_loss(m, data.val, tokenizer.pad_token_id, preset.eval_batch_size))


def finish(res: ArmResult, *, accuracy: bool | None = None, export: bool = False) -> dict[str, Any]:
    """After training: exact-match accuracy (synthetic data) of the tuned and the base model, and the
    optional GGUF export figures; all written into the run summary. Returns the summary."""
    from .evaluate import accuracy as tuned_accuracy, base_accuracy_cached

    p = res.preset
    if accuracy is None:
        accuracy = p.data == "synthetic"
    extra: dict[str, Any] = {}
    # Synthetic prompts are short: decode them 64 at a time. On CPU every decode step dequantizes all
    # 4-bit weights once, whatever the batch, so fewer, wider batches are what makes decoding cheap.
    gen_batch = 64
    if accuracy and res.data.val_rows:
        tuned = tuned_accuracy(res.model, res.tokenizer, res.data.val_rows, p.template, batch_size=gen_batch)
        key = {"model_id": res.recorder.info["model_id"], "val_fingerprint": res.data.val_fingerprint,
               "template": p.template, "load_in_4bit": p.load_in_4bit, "compute_dtype": p.compute_dtype}
        # One key for both stacks: with adapters off they run the same quantized network (the smoke test
        # checks their step-0 eval losses agree), so the base is decoded once per study.
        base = base_accuracy_cached(res.model, res.tokenizer, res.data.val_rows, p.template, key=key,
                                    batch_size=gen_batch)
        extra.update(exact_match=tuned["exact_match"], base_exact_match=base["exact_match"],
                     exact_match_n=tuned["n"], base_exact_match_cached=base["cached"],
                     val_predictions=tuned["predictions"][:8])
    if export:
        extra["export"] = export_figures(res)
    res.recorder.update(**extra)
    return res.summary


def export_figures(res: ArmResult) -> dict[str, Any]:
    """Merge into the 16-bit base, convert to GGUF q8_0 (grit.study.export), and evaluate both on the
    shared validation set: the figures that show what deployment costs in loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import export as ex

    p = res.preset
    base_id = p.baseline_model_id if res.arm == "baseline" else p.model_id
    result = ex.export_gguf(res.model, base_id, Path(res.trainer.args.output_dir) / "export", tokenizer=res.tokenizer,
                            template=p.template, outtype="q8_0", model_name=f"grit-study-{res.arm}")
    res.export_result = result
    out: dict[str, Any] = {**result.summary(), "merged_dir": str(result.merged_dir)}
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32 if p.device == "cpu" else None,
                                                  device_map={"": 0} if p.device == "cuda" else None)
    out["eval_loss_merged"] = ex.eval_loss_hf(merged, res.data.val, p.eval_batch_size)["loss"]
    del merged
    try:
        out["eval_loss_gguf"] = ex.eval_loss_gguf(result.gguf_path, res.data.val)["loss"]
    except ex.ExportError as e:  # llama-cpp-python missing: the GGUF exists, its loss is not measured
        out["eval_loss_gguf"], out["gguf_eval_error"] = None, str(e)
        print(f"GGUF evaluation skipped: {e}")
    return out


def deploy(res: ArmResult, summary: dict[str, Any]) -> dict[str, Any]:
    """Create an Ollama model from the exported GGUF and ask it one held-out prompt (if ollama exists)."""
    from . import export as ex
    from .data import merged_instruction

    if res.export_result is None:
        raise RuntimeError("deploy() needs the export: run arms.finish(res, export=True) first")
    prompt = merged_instruction(res.data.val_rows[0])
    out = ex.deploy_ollama(res.export_result, f"grit-study-{res.arm}".replace("_", "-"), prompt)
    if out.get("deployed"):
        print(f"ollama answered {out['response']!r} (reference {res.data.val_rows[0]['output']!r})")
    return out


def print_summary(s: dict[str, Any]) -> None:
    """The summary's headline figures, one line each."""
    evals = s.get("eval_loss", {})
    print(f"arm {s['arm']} | preset {s['preset']} | model {s['model_id']} | optimizer {s['optimizer']}")
    print(f"steps {s['steps']} (preconditioned {s['preconditioned_steps']}) | response tokens "
          f"{s['response_tokens_seen']} of {s['total_tokens_seen']} | trainable parameters {s['trainable_parameters']:,}")
    print(f"final train loss {s['final_train_loss']:.4f} | eval loss " +
          ", ".join(f"step {k}: {v:.4f}" for k, v in evals.items()))
    print(f"s/step median {s['median_s_per_step']:.3f} mean {s['mean_s_per_step']:.3f} | tokens/s "
          f"{s['tokens_per_s']:.0f} | peak memory {s['peak_memory_mb']:.0f} MiB")
    if "exact_match" in s:
        print(f"exact match {s['exact_match']:.3f} (base model {s['base_exact_match']:.3f}) on {s['exact_match_n']} "
              "validation prompts")
    if s.get("export"):
        e = s["export"]
        print(f"export: {e['gguf']} | eval loss merged {e['eval_loss_merged']:.4f}, GGUF q8_0 {e['eval_loss_gguf']}")
    print(f"data: train {s['train_fingerprint']} val {s['val_fingerprint']} | run {s.get('run_dir', '')}")


# ----------------------------------------------------------------------------- the arms

def run_baseline(preset: Preset, *, logdir: str = DEFAULT_LOGDIR, output_dir: str = DEFAULT_OUTPUT_DIR,
                 loss_on_padding: bool = False, train: bool = True) -> ArmResult:
    """01: Unsloth ``FastLanguageModel`` (4-bit) + ``get_peft_model`` + TRL ``SFTTrainer``."""
    import unsloth  # noqa: F401  (first, so its patches apply; the notebook imports it first anyway)
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from .presets import torch_dtype

    model_path = resolve_model_path(preset.baseline_model_id)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path, max_seq_length=preset.max_seq_length, dtype=torch_dtype(preset),
        load_in_4bit=preset.load_in_4bit)
    model = FastLanguageModel.get_peft_model(
        model, r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout, bias="none",
        target_modules=list(preset.lora_targets), use_rslora=preset.use_rslora, random_state=preset.seed,
        use_gradient_checkpointing="unsloth" if preset.gradient_checkpointing else False)
    # The shared pipeline tokenizes with the HF arm's tokenizer: identical ids by construction.
    data = study_data(preset, load_tokenizer(preset.model_id))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Its own name, so it never shadows the GRIT-side padding_artifact run in a comparison.
    arm = "padding_artifact_baseline" if loss_on_padding else "baseline"
    recorder = _recorder(preset, arm, data, model, tokenizer, logdir, model_id=preset.baseline_model_id,
                         loss_on_padding=loss_on_padding, departs_from="baseline" if loss_on_padding else None,
                         extra={"stack": "unsloth+trl"})
    run_dir = recorder.run_dir
    args = SFTConfig(**training_arguments(preset, str(Path(output_dir) / run_dir.name)),
                     max_length=preset.max_seq_length, packing=False, dataset_text_field=None)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=as_hf_dataset(data.train),
                         data_collator=collator(preset, tokenizer, loss_on_padding))
    recorder.attach(trainer)
    if train:
        trainer.train()
    return ArmResult(arm, preset, model, tokenizer, trainer, recorder, data, run_dir)


def run_hf(preset: Preset, grit: GritSettings | None = None, *, logdir: str = DEFAULT_LOGDIR,
           output_dir: str = DEFAULT_OUTPUT_DIR, loss_on_padding: bool = False, arm: str | None = None,
           train: bool = True) -> ArmResult:
    """02: HF 4-bit model + ``prepare_model_for_kbit_training`` + ``get_peft_model``, then either
    ``GRITManager`` + ``GritTrainer`` or, with GRIT entirely off, the plain ``Trainer`` (control)."""
    from transformers import Trainer, TrainingArguments

    from .models import load_peft_model

    grit = grit or GritSettings()
    tokenizer = load_tokenizer(preset.model_id)
    data = study_data(preset, tokenizer)
    model = load_peft_model(preset)
    # The control builds no GRIT object at all: nothing of GRIT can touch its run.
    config = None if grit.is_control else grit_config(preset, grit)
    base_arm = arm_name(grit, config)
    name = arm or arm_name(grit, config, loss_on_padding)
    manager = None
    if config is not None:
        from grit import GRITManager

        manager = GRITManager(model, config)
    grit_info = {"grit_config": {k: v for k, v in dataclasses.asdict(config).items()}} if manager is not None else {}
    recorder = _recorder(preset, name, data, model, tokenizer, logdir, model_id=preset.model_id,
                         loss_on_padding=loss_on_padding, departs_from=base_arm if loss_on_padding else None,
                         grit_manager=manager, extra={"stack": "hf+peft", **grit_info})
    args = TrainingArguments(**training_arguments(preset, str(Path(output_dir) / recorder.run_dir.name)))
    kwargs = dict(model=model, args=args, train_dataset=as_hf_dataset(data.train), processing_class=tokenizer,
                  data_collator=collator(preset, tokenizer, loss_on_padding))
    if manager is None:
        trainer = Trainer(**kwargs)
    else:
        from grit import GritTrainer

        trainer = GritTrainer(**kwargs, grit_manager=manager)
    recorder.attach(trainer)
    if train:
        trainer.train()
    return ArmResult(name, preset, model, tokenizer, trainer, recorder, data, recorder.run_dir, manager)
