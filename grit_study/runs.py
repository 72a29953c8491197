"""Run recording: one TensorBoard directory and one ``run_summary.json`` per training run.

Every arm (Unsloth + TRL ``SFTTrainer``, HF ``Trainer``, ``GritTrainer``) is recorded by the same
``RunRecorder``, attached with ``recorder.attach(trainer)``, so the numbers the comparison reads are
computed by one code path:

``train/loss``
    Token-weighted cross-entropy over the response tokens of all micro-batches of the optimizer
    step: sum over micro-batches of the summed per-token CE, divided by their response-token count.
    The per-micro-batch sum is recovered from the model's own loss (``outputs["loss"]``, the task
    loss without any GRIT regularizer), which transformers 5.x computes as ``sum / num_items_in_batch``
    when the model accepts loss kwargs, else as the micro-batch mean.
``eval/loss``
    Token-weighted CE over the shared validation set (``grit_study.evaluate.eval_loss``), at step 0
    (the base model: LoRA B starts at zero), every ``eval_steps`` and after the last step. The
    Trainers' own evaluation is off (it averages per-batch means, which is not token-weighted).
batch hashes
    SHA-256 of every optimizer step's ``input_ids`` and ``labels`` exactly as ``compute_loss``
    received them (after TRL's preprocessing and the collator), so fairness is checked on what was
    trained, not on what was meant to be trained.

HF's ``TensorBoardCallback`` would prefix ``grit/...`` keys with ``train/``; run the trainers with
``report_to="none"`` and let this recorder write the events.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from .data import IGNORE_INDEX, scored_positions
from .files import SUMMARY_NAME, atomic_write_text

RECORDER_STATE_NAME = "grit_recorder.json"

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "unsloth",
            "unsloth_zoo", "grit-study", "tensorboard")


def new_run_dir(logdir: str | os.PathLike, arm: str) -> Path:
    """``<logdir>/<arm>_<UTC timestamp>``; a numeric suffix keeps two runs in one second apart."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(logdir) / f"{arm}_{stamp}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        capability = torch.cuda.get_device_capability(0)
        # Native bf16 only (what resolve_preset decides by); is_bf16_supported() would count emulation.
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{capability[0]}.{capability[1]}", bf16=capability >= (8, 0))
    return info


def peak_memory_mb() -> float:
    """Peak allocated CUDA memory when on a GPU, else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def batch_digest(h, input_ids, labels) -> None:
    """Feed one micro-batch into the step hash: shapes first, so [a][bc] and [ab][c] differ."""
    import torch

    for t in (input_ids, labels):
        t = t.detach().to("cpu", dtype=torch.int64).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())


def data_figures(data: dict[str, Any]) -> dict[str, Any]:
    """What a reader of a run needs beside its loss, from the data summary (``StudyData.summary()``): the passes
    over the train split the run draws, and the share of the train split's response tokens and EOS tokens that
    ``max_seq_length`` kept (a response cut before its EOS teaches the model not to stop)."""
    kept = (data.get("token_retention") or {}).get("train") or {}
    return {"epochs": data.get("epochs"), "response_tokens_kept_share": kept.get("response_share"),
            "eos_tokens_kept_share": kept.get("eos_share")}


class RunRecorder(TrainerCallback):
    """Writes a run's TensorBoard scalars and ``run_summary.json``; see the module docstring.

    ``evaluate``: ``callable(model) -> (loss, n_tokens)``, the shared validation loss; called at
    step 0, every ``eval_steps`` and at the end, outside the timed step.
    ``info``: fixed facts for the summary (arm, preset, model id, optimizer, fingerprints, ...).
    """

    def __init__(self, run_dir: str | os.PathLike, *, info: dict[str, Any], eval_steps: int,
                 evaluate: Callable[[Any], tuple[float, int]] | None = None, grit_manager: Any = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))
        self.info = dict(info)
        self.eval_steps = eval_steps
        self.evaluate = evaluate
        self.grit_manager = grit_manager
        self.trainer = None
        self.step_hashes: list[str] = []
        self.train_losses: list[float] = []
        self.step_times: list[float] = []
        self.step_cpu_times: list[float] = []
        self.eval_losses: dict[int, float] = {}
        self.eval_tokens = 0
        self.eval_seconds: list[float] = []
        self.response_tokens = 0
        self.total_tokens = 0
        self.num_items_mismatches = 0
        self.extra: dict[str, Any] = {}
        self.grit_metrics: dict[str, float] = {}  # the latest logged value of every "grit/..." key
        self._reset_step()

    # -------------------------------------------------------------- wiring

    def attach(self, trainer) -> "RunRecorder":
        """Wrap ``trainer.compute_loss`` (hash + loss bookkeeping) and register as a callback."""
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            if model.training:
                batch_digest(self._hash, inputs["input_ids"], inputs["labels"])
            loss, outputs = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch,
                                     **kwargs)
            if model.training:
                self._record_micro_batch(trainer, inputs, loss, outputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        trainer.compute_loss = compute_loss
        trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _reset_step(self) -> None:
        self._hash = hashlib.sha256()
        self._micro: list = []  # per micro-batch device scalars, read once at the step's end (one sync per step)
        self._step_start = None

    def _record_micro_batch(self, trainer, inputs, loss, outputs, num_items_in_batch) -> None:
        import torch

        labels = inputs["labels"]
        task = outputs["loss"] if isinstance(outputs, dict) and outputs.get("loss") is not None else loss
        # transformers divides by num_items_in_batch (the step's token count) when the model takes loss
        # kwargs; otherwise the model returns the micro-batch mean.
        weighted = getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        mask = inputs.get("attention_mask")
        scored = scored_positions(labels).sum()
        self._micro.append(torch.stack([
            task.detach().double().to(labels.device),
            torch.as_tensor(num_items_in_batch, device=labels.device).double() if weighted else torch.tensor(
                -1.0, dtype=torch.float64, device=labels.device),
            scored.double(), (labels != IGNORE_INDEX).sum().double(),
            mask.sum().double() if mask is not None else torch.tensor(float(inputs["input_ids"].numel()),
                                                                        dtype=torch.float64, device=labels.device)]))

    def _close_step(self) -> tuple[float, int, int | None]:
        """(token-weighted train loss, scored response tokens, the trainer's num_items_in_batch or None) of the
        step's micro-batches, summed in their order in float64 as the loss weighting needs; adds the step's
        token counts to the run totals."""
        import torch

        loss_sum, tokens, num_items = 0.0, 0, None
        if not self._micro:
            return 0.0, 0, None
        for task, items, scored, response, attended in torch.stack(self._micro).cpu().tolist():
            scored, items = int(scored), int(items)
            if items >= 0:
                num_items = items
                loss_sum += task * items
            else:
                loss_sum += task * scored
            tokens += scored
            self.response_tokens += int(response)
            self.total_tokens += int(attended)
        return loss_sum / max(tokens, 1), tokens, num_items

    # -------------------------------------------------------------- callback events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._t0 = time.time()
        self.info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
        # What the trainer really runs (Unsloth may substitute the preset's choice), next to what was asked.
        self.info["optimizer_used"] = str(args.optim.value if hasattr(args.optim, "value") else args.optim)
        self.info.setdefault("optimizer", self.info["optimizer_used"])
        self._run_eval(model, 0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._reset_step()
        self._step_start = time.perf_counter()
        self._step_cpu_start = time.process_time()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        if step == 1 and optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            self.info["optimizer_class"] = f"{type(inner).__module__}.{type(inner).__name__}"
        elapsed = time.perf_counter() - self._step_start
        # CPU seconds of all this process's threads: on a shared machine wall time measures the neighbours
        # too, CPU time / threads estimates the step on an idle one.
        cpu = time.process_time() - self._step_cpu_start
        self.step_cpu_times.append(cpu)
        self.writer.add_scalar("train/step_cpu_s", cpu, step)
        loss, tokens, num_items = self._close_step()
        if num_items is not None and num_items != tokens:
            # The trainer's own count disagrees with ours: the loss would be mis-weighted, say so.
            self.num_items_mismatches += 1
        self.step_hashes.append(self._hash.hexdigest()[:16])
        self.train_losses.append(loss)
        self.step_times.append(elapsed)
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/step_time_s", elapsed, step)
        self.writer.add_scalar("train/peak_memory_mb", peak_memory_mb(), step)
        self.writer.add_scalar("train/response_tokens", tokens, step)
        if step % self.eval_steps == 0 or step >= state.max_steps:
            self._run_eval(model, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:  # the end-of-training summary repeats the last step's values
            return
        step = state.global_step
        for key, value in (logs or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key == "grad_norm":
                self.writer.add_scalar("train/grad_norm", value, step)
            elif key == "learning_rate":
                self.writer.add_scalar("train/learning_rate", value, step)
            elif key.startswith("grit/"):  # merged into the logs by the GRIT glue, the one place that logs them
                self.writer.add_scalar(key, value, step)
                self.grit_metrics[key] = float(value)

    # -------------------------------------------------------------- checkpoints

    STATE_FIELDS = ("step_hashes", "train_losses", "step_times", "step_cpu_times", "eval_seconds", "response_tokens",
                    "total_tokens", "num_items_mismatches", "eval_tokens")

    def on_save(self, args, state, control, **kwargs):
        """Next to the Trainer's checkpoint: everything this recorder has measured so far, so a run resumed
        from it (``resume_from_checkpoint``) continues the same run directory and summary."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            record = {k: getattr(self, k) for k in self.STATE_FIELDS}
            record.update(run_dir=str(self.run_dir), info=self.info,
                          eval_losses={str(k): v for k, v in self.eval_losses.items()})
            atomic_write_text(folder / RECORDER_STATE_NAME, json.dumps(record, default=str))

    @staticmethod
    def saved_run_dir(checkpoint_dir: str | os.PathLike) -> Path:
        """The run directory a checkpoint's recorder wrote to."""
        return Path(RunRecorder._saved_state(checkpoint_dir)["run_dir"])

    @staticmethod
    def _saved_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
        path = Path(checkpoint_dir) / RECORDER_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: this checkpoint was not written by a RunRecorder run "
                                    "(or predates checkpoints in the study); start a fresh run instead")
        return json.loads(path.read_text())

    def restore(self, checkpoint_dir: str | os.PathLike) -> None:
        """Take up a run from its checkpoint: the steps measured before it are kept, the rest appended."""
        saved = self._saved_state(checkpoint_dir)
        for k in self.STATE_FIELDS:
            setattr(self, k, saved[k])
        self.eval_losses = {int(k): v for k, v in saved["eval_losses"].items()}
        self.info = {**saved["info"], **{k: v for k, v in self.info.items() if k not in saved["info"]}}
        self.info.setdefault("resumed_from", []).append(str(checkpoint_dir))

    def on_train_end(self, args, state, control, **kwargs):
        self.info["train_runtime_s"] = time.time() - self._t0
        self.info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.write_summary()

    def _run_eval(self, model, step: int) -> None:
        if self.evaluate is None or model is None or step in self.eval_losses:
            return
        t0 = time.perf_counter()
        loss, tokens = self.evaluate(model)
        self.eval_seconds.append(round(time.perf_counter() - t0, 3))
        self.eval_losses[step] = loss
        self.eval_tokens = tokens
        self.writer.add_scalar("eval/loss", loss, step)
        self.writer.flush()

    # -------------------------------------------------------------- summary

    def summary(self) -> dict[str, Any]:
        steps = len(self.step_times)
        total_time = sum(self.step_times)
        manager = self.grit_manager
        out = {
            **self.info,
            "steps": steps,
            "preconditioned_steps": int(getattr(manager, "preconditioned_steps", 0)) if manager is not None else 0,
            "response_tokens_seen": self.response_tokens,
            "total_tokens_seen": self.total_tokens,
            "final_train_loss": self.train_losses[-1] if self.train_losses else None,
            "train_loss_per_step": self.train_losses,
            "step_times_s": [round(t, 4) for t in self.step_times],
            "step_cpu_times_s": [round(t, 4) for t in self.step_cpu_times],
            "median_cpu_s_per_step": statistics.median(self.step_cpu_times) if steps else None,
            "eval_loss": {str(k): v for k, v in sorted(self.eval_losses.items())},
            "eval_tokens": self.eval_tokens,
            "eval_seconds": self.eval_seconds,
            "median_s_per_step": statistics.median(self.step_times) if steps else None,
            "mean_s_per_step": total_time / steps if steps else None,
            "tokens_per_s": self.total_tokens / total_time if total_time > 0 else None,
            "response_tokens_per_s": self.response_tokens / total_time if total_time > 0 else None,
            "peak_memory_mb": peak_memory_mb(),
            "num_items_mismatches": self.num_items_mismatches,
            "batch_hashes": self.step_hashes,
            "package_versions": package_versions(),
            "hardware": hardware(),
        }
        if self.grit_metrics:
            out["grit_metrics"] = {k: v for k, v in self.grit_metrics.items() if math.isfinite(v)}
        if self.info.get("data"):
            out.update(data_figures(self.info["data"]))
        out.update(self.extra)
        return out

    def update(self, **extra: Any) -> None:
        """Add facts known only after training (accuracy, export figures) and rewrite the summary."""
        self.extra.update(extra)
        self.write_summary()

    def write_summary(self) -> Path:
        self.writer.flush()
        return atomic_write_text(self.run_dir / SUMMARY_NAME, json.dumps(self.summary(), indent=2, default=str))

    def close(self) -> None:
        self.writer.close()


class SummaryFile:
    """A finished run's ``run_summary.json`` opened for adding figures (a later evaluation), with the
    ``info`` / ``update`` interface of ``RunRecorder``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        path = self.run_dir / SUMMARY_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the run did not finish")
        self.info = json.loads(path.read_text())

    def update(self, **extra: Any) -> None:
        self.info.update(extra)
        atomic_write_text(self.run_dir / SUMMARY_NAME, json.dumps(self.info, indent=2, default=str))
