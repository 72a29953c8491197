"""Build and run one arm of the study; the notebooks are parameters plus calls into this module.

Each arm is a few steps, one function each; notebooks 01 and 02 show them one per cell, and
``run_baseline`` / ``run_hf`` (the sweep's, ``make study``'s and the tests' entry point) call the same
functions in the same order:

    02 (HF + PEFT): load_tokenizer -> study_data -> load_base_model -> attach_lora
                    -> GRITManager(model, grit_config(preset, spec)) (None: the control, the peers)
                    -> run_recorder -> hf_trainer (GritTrainer, or the plain Trainer) -> trainer.train()
    01 (Unsloth):   load_unsloth_model -> attach_unsloth_lora -> load_tokenizer -> study_data
                    -> run_recorder -> sft_trainer (TRL SFTTrainer) -> trainer.train()

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import PadCollator, StudyData, as_hf_dataset, build_study_data, trainer_dataset
from .files import SUMMARY_NAME
from .registry import SGD_MOMENTUM, ArmSpec, get_arm
from .models import attach_lora, load_base_model, load_tokenizer, resolve_model_path
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
    """``resolve_preset`` for a notebook: the same preset, precision included, for every arm."""
    return resolve_preset(name, **overrides)


def grit_config(preset: Preset, spec: ArmSpec):
    """The arm's ``GRITConfig``: the registry's settings over the preset's rank and factor update frequency;
    None for an arm without GRIT (no GRIT object is built at all). An arm that reprojects does so at the
    published 50 of 200 steps scaled to the run length, every max(1, max_steps // 4) steps (15 of 60)."""
    if spec.grit is None:
        return None
    from grit import GRITConfig

    scheduled = {"lora_rank": preset.lora_r, "kfac_update_freq": preset.kfac_update_freq}
    if spec.grit.get("enable_reprojection"):
        scheduled["reprojection_freq"] = reprojection_freq(preset.max_steps)
    return GRITConfig(**{**scheduled, **spec.grit})


def reprojection_freq(max_steps: int) -> int:
    """The published reprojection schedule (every 50 of 200 steps) scaled to ``max_steps``."""
    return max(1, max_steps // 4)


# ----------------------------------------------------------------------------- shared pieces

def study_data(preset: Preset, tokenizer) -> StudyData:
    """The preset's splits (``build_study_data``), refused before any training when the run's steps would draw
    more than a few passes over the train split, or less than one step (``check_run_length``); the epochs it
    draws go into the data summary. On a CUDA card the memory plan (``grit_study.memory.check``) is printed: the
    longest micro-batch of the run's schedule and each kind of arm's estimated peak; a run that cannot fit it is
    stopped here, before any model is trained."""
    from . import memory
    from .data import check_run_length

    data = build_study_data(tokenizer, source=preset.data, template=preset.template,
                            max_seq_length=preset.max_seq_length, val_size=preset.val_size,
                            test_size=preset.test_size, num_examples=preset.num_examples, data_seed=preset.data_seed)
    data.epochs = check_run_length(data, max_steps=preset.max_steps, sequences_per_step=preset.per_device_train_batch_size
                                   * preset.gradient_accumulation_steps)
    memory.check(preset, data.train)
    return data


def collator(preset: Preset, shared_tokenizer, loss_on_padding: bool = False) -> PadCollator:
    """The collator of every arm. ``shared_tokenizer`` is the one the data was tokenized with
    (``load_tokenizer(preset.model_id)``), never a stack's own: Unsloth's ``fix_pad_token`` replaces a
    pad token equal to EOS by a reserved token on Llama-3 tokenizers, and the batch hashes cover the
    padded positions, so one pad id for all arms is what lets the hashes prove identical batches."""
    # The published artifact padded with EOS.
    pad = shared_tokenizer.pad_token_id if not loss_on_padding else shared_tokenizer.eos_token_id
    return PadCollator(pad, loss_on_padding=loss_on_padding,
                       max_seq_length=preset.max_seq_length if loss_on_padding else None)


def training_arguments(preset: Preset, output_dir: str, optimizer: str = "adamw") -> dict[str, Any]:
    """The TrainingArguments fields every arm shares (SFTConfig takes them too). ``optimizer``: the arm's
    family ('adamw' = the preset's optimizer, 'sgd' = SGD with momentum, grit_study.registry)."""
    optim = dict(optim=preset.optim) if optimizer == "adamw" else dict(optim="sgd", optim_args=f"momentum={SGD_MOMENTUM}")
    # HF's data_seed orders the batches: the training seed's job. The preset's data_seed draws the splits.
    return dict(
        output_dir=output_dir, per_device_train_batch_size=preset.per_device_train_batch_size,
        gradient_accumulation_steps=preset.gradient_accumulation_steps, max_steps=preset.max_steps,
        learning_rate=preset.learning_rate, warmup_steps=preset.warmup_steps, weight_decay=preset.weight_decay,
        lr_scheduler_type=preset.lr_scheduler_type, max_grad_norm=preset.max_grad_norm, **optim,
        seed=preset.seed, data_seed=preset.seed, logging_steps=preset.logging_steps, report_to="none",
        eval_strategy="no", save_strategy="steps" if preset.save_steps else "no", save_steps=preset.save_steps or 500,
        # Not a preset field (it changes no result, and a new field would change every run's definition): the
        # Colab cell sets GRIT_SAVE_TOTAL_LIMIT so checkpoints on Drive do not pile up.
        save_total_limit=param("SAVE_TOTAL_LIMIT", None, None, int),
        remove_unused_columns=False, disable_tqdm=False,
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
    # The tokenizer the data was tokenized and padded with (load_tokenizer(preset.model_id)); ``tokenizer``
    # is the stack's own (Unsloth's on the baseline), used for decoding.
    shared_tokenizer: Any = None

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / SUMMARY_NAME).read_text())


def _recorder(preset: Preset, spec: ArmSpec, data: StudyData, model, shared_tokenizer, logdir: str, *,
              model_id: str, run_name: str | None, grit_manager=None, extra=None, resume_from: str | None = None):
    from .evaluate import eval_loss
    from .runs import RunRecorder, new_run_dir

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if p.requires_grad})
    info = {
        "arm": spec.name, "arm_definition": spec.to_dict(), "stack": spec.stack, "preset": preset.name,
        "model_id": model_id, "data_source": preset.data, "learning_rate": preset.learning_rate, "seed": preset.seed,
        "data_seed": preset.data_seed, "max_steps": preset.max_steps,
        "optimizer": preset.optim if spec.optimizer == "adamw" else spec.optimizer, "peer": spec.peer,
        "compute_dtype": preset.compute_dtype, "trainable_parameters": trainable,
        "trainable_dtypes": lora_dtypes, "loss_on_padding": spec.loss_on_padding,
        # The padding artifact trains on other batches by design: the comparison exempts it from the hash check.
        "departs_from": spec.name.replace("padding_artifact_", "").replace("padding_artifact", "grit")
        if spec.loss_on_padding else None,
        "preset_fields": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(preset).items()},
        "data": data.summary(), "train_fingerprint": data.train_fingerprint, "val_fingerprint": data.val_fingerprint,
        "test_fingerprint": data.test_fingerprint, **(extra or {}),
    }
    if resume_from is not None:
        run_dir = RunRecorder.saved_run_dir(resume_from)  # the same run, continued
    elif run_name is None:
        run_dir = new_run_dir(logdir, spec.name)
    else:
        run_dir = Path(logdir) / run_name
        run_dir.mkdir(parents=True)  # a fresh directory: a rerun must not mix its events with an old run's
    info["run_dir"] = str(run_dir)
    pad = shared_tokenizer.pad_token_id
    recorder = RunRecorder(run_dir, info=info, eval_steps=preset.eval_steps, grit_manager=grit_manager,
                           evaluate=lambda m: eval_loss(m, data.val, pad, preset.eval_batch_size))
    if resume_from is not None:
        recorder.restore(resume_from)
    return recorder


# Synthetic prompts are short: decode them 64 at a time. On CPU every decode step dequantizes all 4-bit
# weights once, whatever the batch, so fewer, wider batches are what makes decoding cheap.
GENERATION_BATCH = 64


def retention_figures(res: ArmResult) -> dict[str, Any]:
    """Retention KL(base || tuned) on the fixed texts sampled once from the untuned 4-bit base, and the
    drift sum of ||s B A||_F (grit_study.retention); cheap enough for every run, tuning runs included. Each
    text's summed KL and token count go into the run's ``retention_per_text.jsonl``."""
    from .retention import PER_TEXT_NAME, retention_summary

    p = res.preset
    model_id = res.recorder.info["model_id"]
    return retention_summary(res.model, res.shared_tokenizer, model_id=model_id, template=p.template,
                             key_extra={"load_in_4bit": p.load_in_4bit, "compute_dtype": p.compute_dtype},
                             batch_size=p.eval_batch_size, per_text_file=Path(res.run_dir) / PER_TEXT_NAME)


def final_evaluation(res: ArmResult, *, accuracy: bool | None = None) -> dict[str, Any]:
    """The reported figures of a final run, all into ``run_summary.json``: test loss (token-weighted
    response CE) and the base model's (cached: ``base_test_loss``), exact match overall and per family
    with every test prediction kept (also as ``predictions.jsonl`` next to the summary), the base model's
    exact match (cached), retention KL and drift. Without a test split (test_size 0) the validation split stands in and the summary says so.
    Per prompt, the summed response NLL and its token count go into ``per_prompt.jsonl`` next to the summary
    (one ``{"id", "family", "nll_sum", "tokens"}`` per line; Σ nll_sum / Σ tokens is the test loss), so runs
    can be compared prompt by prompt (grit_study.stats)."""
    from .evaluate import (accuracy as tuned_accuracy, base_accuracy_cached, base_loss_cached, response_nll, write_jsonl,
                           write_predictions)
    from .files import PER_PROMPT_NAME, PREDICTIONS_NAME

    p, data = res.preset, res.data
    split = "test" if data.test else "val"
    examples, rows = (data.test, data.test_rows) if split == "test" else (data.val, data.val_rows)
    pad = res.shared_tokenizer.pad_token_id
    per_prompt = response_nll(res.model, examples, pad, p.eval_batch_size)
    tokens = sum(n for _, n in per_prompt)
    if tokens == 0:
        raise ValueError(f"final_evaluation: the {split} split holds no response tokens; check the data summary")
    loss = sum(s for s, _ in per_prompt) / tokens
    write_jsonl(Path(res.run_dir) / PER_PROMPT_NAME, [{"id": r["id"], "family": r.get("family"), "nll_sum": s,
                                                      "tokens": n} for r, (s, n) in zip(rows, per_prompt)])
    extra: dict[str, Any] = {"final_split": split, "test_loss": loss, "test_tokens": tokens}
    fingerprint = data.test_fingerprint if split == "test" else data.val_fingerprint
    # One key for both stacks: with adapters off they run the same quantized network (the smoke test
    # checks their step-0 eval losses agree), so the base is measured once per study.
    key = {"model_id": res.recorder.info["model_id"], f"{split}_fingerprint": fingerprint,
           "template": p.template, "load_in_4bit": p.load_in_4bit, "compute_dtype": p.compute_dtype}
    base_loss = base_loss_cached(res.model, examples, pad, key=key, batch_size=p.eval_batch_size)
    if base_loss["tokens"] != tokens:
        raise RuntimeError(f"final_evaluation: the base loss was measured on {base_loss['tokens']} response tokens, "
                           f"this run on {tokens}; the cache key {key} names other examples. Delete the cache "
                           "entry ($GRIT_ACCURACY_CACHE or <cache_dir>/base_accuracy.json) and rerun")
    extra.update(base_test_loss=base_loss["loss"], base_test_loss_cached=base_loss["cached"])
    if accuracy is None:
        accuracy = p.data == "synthetic"
    if accuracy and rows:
        tuned = tuned_accuracy(res.model, res.tokenizer, rows, p.template, batch_size=GENERATION_BATCH)
        base = base_accuracy_cached(res.model, res.tokenizer, rows, p.template, key=key, batch_size=GENERATION_BATCH)
        write_predictions(Path(res.run_dir) / PREDICTIONS_NAME, tuned["predictions"])
        extra.update(exact_match=tuned["exact_match"], exact_match_n=tuned["n"],
                     exact_match_by_family={f: v["exact_match"] for f, v in tuned["per_family"].items()},
                     base_exact_match=base["exact_match"], base_exact_match_cached=base["cached"],
                     test_predictions=[{k: x[k] for k in ("id", "family", "correct")} for x in tuned["predictions"]])
    extra.update(retention_figures(res))
    res.recorder.update(**extra)
    return res.summary


def finish(res: ArmResult, *, accuracy: bool | None = None, export: bool = False) -> dict[str, Any]:
    """After training (notebooks 01 and 02): ``final_evaluation`` and, with ``export``, the GGUF export
    figures; all written into the run summary. Returns the summary."""
    final_evaluation(res, accuracy=accuracy)
    if export:
        res.recorder.update(export=export_figures(res))
    return res.summary


def load_saved_adapter(preset: Preset, spec: ArmSpec, adapter_dir: str | Path) -> ArmResult:
    """A saved adapter folder loaded with plain PEFT (``PeftModel.from_pretrained``) on a fresh 4-bit base,
    prepared as the trained model was, with the preset's data; no trainer and no recorder."""
    from peft import PeftModel, prepare_model_for_kbit_training

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no saved adapter; the run that wrote it must be trained "
                                "again (delete its run directory and rerun)")
    tokenizer = load_tokenizer(preset.model_id)
    data = study_data(preset, tokenizer)
    base_id = preset.baseline_model_id if spec.stack == "unsloth+trl" else preset.model_id
    model = load_base_model(preset, base_id)
    if preset.load_in_4bit:  # the same preparation the trained model had (norms in fp32, input grads)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return ArmResult(spec.name, preset, model, tokenizer, None, None, data, adapter_dir, shared_tokenizer=tokenizer)


def reload_arm(preset: Preset, spec: ArmSpec, adapter_dir: str | Path, run_dir: str | Path) -> ArmResult:
    """A finished run's saved adapter on the same 4-bit base, for evaluating it later (the sweep's tier-1
    runs reused as a seed of tier 2); its figures are added to the run's existing summary."""
    from .runs import SummaryFile

    res = load_saved_adapter(preset, spec, adapter_dir)
    recorder = SummaryFile(Path(run_dir))
    if recorder.info.get("train_fingerprint") != res.data.train_fingerprint:
        raise ValueError(f"{run_dir} was trained on other data (train fingerprint "
                         f"{recorder.info.get('train_fingerprint')} != {res.data.train_fingerprint})")
    return dataclasses.replace(res, recorder=recorder, run_dir=Path(run_dir))


def export_figures(res: ArmResult) -> dict[str, Any]:
    """Merge into the preset's 16-bit base (``preset.model_id``, for every arm: the baseline's
    ``baseline_model_id`` is Unsloth's pre-quantized copy of the same weights, which cannot be merged into),
    convert to GGUF q8_0 (grit_study.export), release the training model, and evaluate the merged model and
    the GGUF on the shared validation set: the figures that show what deployment costs in loss.
    ``eval_load`` says how the merged model was loaded ('cpu', '16bit', or 'offload' on a card too small)."""
    from . import export as ex

    p = res.preset
    out_dir = Path(res.trainer.args.output_dir if res.trainer is not None else res.run_dir) / "export"
    result = ex.export_gguf(res.model, p.model_id, out_dir, tokenizer=res.shared_tokenizer or res.tokenizer,
                            template=p.template, outtype="q8_0", model_name=f"grit-study-{res.arm}")
    res.export_result = result
    out: dict[str, Any] = {**result.summary(), "merged_dir": str(result.merged_dir), "merged_base": p.model_id}
    out["training_model_released"] = ex.release_training_model(res)
    merged = ex.eval_merged_model(result.merged_dir, res.data.val, device=p.device, dtype=p.compute_dtype,
                                  batch_size=p.eval_batch_size)
    out["eval_loss_merged"], out["eval_load"] = merged["loss"], merged["load"]
    try:
        out["eval_loss_gguf"] = ex.eval_loss_gguf(result.gguf_path, res.data.val)["loss"]
    except ex.ExportError as e:  # llama-cpp-python missing: the GGUF exists, its loss is not measured
        out["eval_loss_gguf"], out["gguf_eval_error"] = None, str(e)
        print(f"GGUF evaluation skipped: {e}")
    return out


def deploy(res: ArmResult, *, install_ollama: bool | None = None) -> dict[str, Any]:
    """Create an Ollama model from the exported GGUF and ask it one held-out prompt (grit_study.export.deploy_ollama):
    starts ``ollama serve`` when none runs (and stops it after), installs Ollama first when ``install_ollama``
    (None: only in Colab); without an ``ollama`` binary it prints the commands to run."""
    from . import export as ex
    from .data import merged_instruction

    if res.export_result is None:
        raise RuntimeError("deploy() needs the export: run arms.finish(res, export=True) first")
    prompt = merged_instruction(res.data.val_rows[0])
    out = ex.deploy_ollama(res.export_result, f"grit-study-{res.arm}".replace("_", "-"), prompt,
                           install=install_ollama)
    if out.get("deployed"):
        print(f"ollama answered {out['response']!r} (done_reason {out['done_reason']!r}; reference "
              f"{res.data.val_rows[0]['output']!r})")
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
    if "test_loss" in s:
        print(f"{s['final_split']} loss {s['test_loss']:.4f} | retention KL(base || tuned) {s['retention_kl']:.4f} | "
              f"drift sum ||sBA||_F {s['drift']:.3f}")
    if "exact_match" in s:
        print(f"exact match {s['exact_match']:.3f} (base model {s['base_exact_match']:.3f}) on {s['exact_match_n']} "
              f"{s['final_split']} prompts; by family: " +
              ", ".join(f"{f} {v:.2f}" for f, v in s.get("exact_match_by_family", {}).items()))
    if s.get("export"):
        e = s["export"]
        print(f"export: {e['gguf']} | eval loss merged {e['eval_loss_merged']:.4f}, GGUF q8_0 {e['eval_loss_gguf']}")
    print(f"data: train {s['train_fingerprint']} val {s['val_fingerprint']} test {s.get('test_fingerprint')} | "
          f"run {s.get('run_dir', '')}")


# ----------------------------------------------------------------------------- the steps of an arm

def arm_spec(arm: ArmSpec | str, stack: str) -> ArmSpec:
    """The registry's arm (``arm``: its name or the ArmSpec), refused unless it runs on ``stack``."""
    spec = get_arm(arm) if isinstance(arm, str) else arm
    if spec.stack != stack:
        runner = "run_hf" if spec.stack == "hf+peft" else "run_baseline"
        raise ValueError(f"arm {spec.name} runs on the {spec.stack} stack: use {runner} (notebook {spec.notebook})")
    return spec


def load_unsloth_model(preset: Preset):
    """01's model and tokenizer: Unsloth ``FastLanguageModel.from_pretrained`` (4-bit when the preset says so,
    the preset's compute dtype) of ``preset.baseline_model_id``; a tokenizer without a pad token gets EOS."""
    import unsloth  # noqa: F401  (first, so its patches apply; the notebook imports it first anyway)
    from unsloth import FastLanguageModel

    from .presets import torch_dtype

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=resolve_model_path(preset.baseline_model_id), max_seq_length=preset.max_seq_length,
        dtype=torch_dtype(preset), load_in_4bit=preset.load_in_4bit)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_unsloth_lora(model, preset: Preset):
    """The preset's LoRA through Unsloth's ``FastLanguageModel.get_peft_model``; ``random_state=seed`` draws
    the same adapters as ``attach_lora`` (seeded ``get_peft_model``) on the HF arms."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model, r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout, bias="none",
        target_modules=list(preset.lora_targets), use_rslora=preset.use_rslora, random_state=preset.seed,
        use_gradient_checkpointing="unsloth" if preset.gradient_checkpointing else False)


def run_recorder(preset: Preset, spec: ArmSpec, data: StudyData, model, shared_tokenizer, logdir: str = DEFAULT_LOGDIR,
                 *, grit_manager=None, run_name: str | None = None, resume_from: str | None = None,
                 rank_pattern: dict[str, int] | None = None):
    """The run's ``RunRecorder``: a new directory ``<logdir>/<arm>_<time>/`` (``run_name`` names it instead;
    ``resume_from``, a checkpoint folder, continues the run that wrote it), ``run_summary.json`` with the
    arm's definition, the preset, the data fingerprints and GRIT's config, and the validation loss every
    ``eval_steps``. The trainer builders attach it (``recorder.attach(trainer)``): per-step losses, batch
    hashes, timings and TensorBoard events. On a CUDA card the summary's ``memory_plan`` holds the card, the longest
    micro-batch, this arm's estimated peak and the settings (``grit_study.memory``); an arm that cannot fit it is
    stopped here."""
    from . import memory

    plan = memory.check(preset, data.train, kinds=(memory.arm_kind(spec),), quiet=True)
    config = grit_manager.config if grit_manager is not None else grit_config(preset, spec)
    extra = {"grit_config": config.to_dict()} if config is not None else {}
    if plan is not None:
        extra["memory_plan"] = memory.for_arm(plan, spec)
    if rank_pattern:
        extra["rank_pattern"] = dict(rank_pattern)
    model_id = preset.baseline_model_id if spec.stack == "unsloth+trl" else preset.model_id
    return _recorder(preset, spec, data, model, shared_tokenizer, logdir, model_id=model_id, run_name=run_name,
                     grit_manager=grit_manager, extra=extra, resume_from=resume_from)


def trainer_output_dir(output_dir: str, recorder) -> str:
    """The trainer's folder (checkpoints, exports): ``<output_dir>/<run directory name>``."""
    return str(Path(output_dir) / recorder.run_dir.name)


def sft_trainer(preset: Preset, spec: ArmSpec, model, tokenizer, shared_tokenizer, data: StudyData, recorder, *,
                output_dir: str = DEFAULT_OUTPUT_DIR):
    """01's trainer: TRL ``SFTTrainer`` on the shared pre-tokenized examples and collator (padded with
    ``shared_tokenizer``'s pad id), the shared ``training_arguments`` as ``SFTConfig``; the recorder attached."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**training_arguments(preset, trainer_output_dir(output_dir, recorder)),
                     max_length=preset.max_seq_length, packing=False, dataset_text_field=None)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=as_hf_dataset(data.train),
                         data_collator=collator(preset, shared_tokenizer, spec.loss_on_padding))
    recorder.attach(trainer)
    return trainer


def peer_optimizer(spec: ArmSpec, args, model):
    """The arm's PEFT optimizer factory around the exact optimizer class and arguments the control's
    Trainer would build from ``args`` (fused AdamW on CPU, bnb 8-bit AdamW on CUDA)."""
    from peft.optimizers import create_loraplus_optimizer, create_riemannian_optimizer
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    if spec.peer == "riemannian":
        return create_riemannian_optimizer(model, cls, lr=lr, weight_decay=args.weight_decay, **spec.peer_args, **kwargs)
    if spec.peer == "loraplus":
        return create_loraplus_optimizer(model, cls, lr=lr, loraplus_weight_decay=args.weight_decay, **spec.peer_args,
                                         **kwargs)
    raise ValueError(f"arm {spec.name}: no peer optimizer {spec.peer!r}")


def hf_trainer(preset: Preset, spec: ArmSpec, model, tokenizer, data: StudyData, recorder, grit_manager=None, *,
               output_dir: str = DEFAULT_OUTPUT_DIR):
    """02's trainer: ``GritTrainer(..., grit_manager=grit_manager)`` when the arm has GRIT, else the plain
    ``Trainer`` (a peer arm's with its PEFT optimizer, ``peer_optimizer``); the shared ``training_arguments``
    (the arm's optimizer family), examples and collator; the recorder attached."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**training_arguments(preset, trainer_output_dir(output_dir, recorder),
                                                  optimizer=spec.optimizer))
    kwargs = dict(model=model, args=args, train_dataset=trainer_dataset(data.train), processing_class=tokenizer,
                  data_collator=collator(preset, tokenizer, spec.loss_on_padding))
    if spec.peer is not None:
        kwargs["optimizers"] = (peer_optimizer(spec, args, model), None)
    if grit_manager is None:
        trainer = Trainer(**kwargs)
    else:
        from grit import GritTrainer

        trainer = GritTrainer(**kwargs, grit_manager=grit_manager)
    recorder.attach(trainer)
    return trainer


# ----------------------------------------------------------------------------- the arms

def run_baseline(preset: Preset, arm: ArmSpec | str = "baseline", *, logdir: str = DEFAULT_LOGDIR,
                 output_dir: str = DEFAULT_OUTPUT_DIR, run_name: str | None = None, train: bool = True,
                 resume_from_checkpoint: str | None = None) -> ArmResult:
    """01: Unsloth ``FastLanguageModel`` (4-bit) + ``get_peft_model`` + TRL ``SFTTrainer``, the steps of
    notebook 01 in its order."""
    spec = arm_spec(arm, "unsloth+trl")
    model, tokenizer = load_unsloth_model(preset)
    model = attach_unsloth_lora(model, preset)
    # The shared pipeline tokenizes and pads with the HF arm's tokenizer: identical ids by construction.
    shared_tokenizer = load_tokenizer(preset.model_id)
    data = study_data(preset, shared_tokenizer)
    recorder = run_recorder(preset, spec, data, model, shared_tokenizer, logdir, run_name=run_name,
                            resume_from=resume_from_checkpoint)
    trainer = sft_trainer(preset, spec, model, tokenizer, shared_tokenizer, data, recorder, output_dir=output_dir)
    if train:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return ArmResult(spec.name, preset, model, tokenizer, trainer, recorder, data, recorder.run_dir,
                     shared_tokenizer=shared_tokenizer)


def run_hf(preset: Preset, arm: ArmSpec | str = "grit", *, logdir: str = DEFAULT_LOGDIR,
           output_dir: str = DEFAULT_OUTPUT_DIR, run_name: str | None = None, train: bool = True,
           resume_from_checkpoint: str | None = None, rank_pattern: dict[str, int] | None = None) -> ArmResult:
    """02: HF 4-bit model + ``prepare_model_for_kbit_training`` + ``get_peft_model``, then, as the arm says,
    ``GRITManager`` + ``GritTrainer``, or the plain ``Trainer`` (the control; a peer's PEFT optimizer): the
    steps of notebook 02 in its order. ``rank_pattern``: LoraConfig.rank_pattern (per-module ranks; the
    sweep's ``control_rk``), recorded in the run summary."""
    from grit import GRITManager

    spec = arm_spec(arm, "hf+peft")
    tokenizer = load_tokenizer(preset.model_id)
    data = study_data(preset, tokenizer)
    model = load_base_model(preset)
    model = attach_lora(model, preset, rank_pattern=rank_pattern)
    # An arm without GRIT builds no GRIT object at all: nothing of GRIT can touch its run.
    config = grit_config(preset, spec)
    manager = GRITManager(model, config) if config is not None else None
    recorder = run_recorder(preset, spec, data, model, tokenizer, logdir, grit_manager=manager, run_name=run_name,
                            resume_from=resume_from_checkpoint, rank_pattern=rank_pattern)
    trainer = hf_trainer(preset, spec, model, tokenizer, data, recorder, manager, output_dir=output_dir)
    if train:
        # GritTrainer restores the GRIT state (grit_state.pt) from the same checkpoint.
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return ArmResult(spec.name, preset, model, tokenizer, trainer, recorder, data, recorder.run_dir, manager,
                     shared_tokenizer=tokenizer)
