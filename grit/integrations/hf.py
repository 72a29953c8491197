"""HF ``Trainer`` glue: ``GritTrainer`` (a Trainer subclass) and ``GritCallback`` (for TRL's SFTTrainer).

    manager = GRITManager(model, GRITConfig(lora_rank=16))
    trainer = GritTrainer(model=model, args=args, train_dataset=ds, data_collator=collate, grit_manager=manager)
    trainer.train()

What transformers 5.17 really does per optimizer step (``Trainer._run_epoch``), and where GRIT goes:

    backward of every micro-batch              <- the manager's hooks capture u and g-hat
    if args.max_grad_norm > 0: _clip_grad_norm <- GritTrainer runs manager.step() first, so the
                                                  Trainer's clip bounds the natural-gradient step
    _get_grad_norm (always called)             <- with max_grad_norm == 0 there is no clip call:
                                                  GritTrainer runs manager.step() here instead
    callback on_pre_optimizer_step             <- GritCallback runs manager.step() here and re-clips
    optimizer.step()                           <- GritOptimizer's step pre-hook runs manager.step() here
                                                  and re-clips (grit.integrations.optimizer)

``create_optimizer_and_scheduler`` and an ``optimizer_step`` method are never called by that loop,
which is how the published GRIT code ended up preconditioning nothing; the manager counts the
steps it preconditioned (``manager.preconditioned_steps``, logged as ``grit/preconditioned_steps``),
and the tests count them in real ``Trainer.train()`` runs. A second path calling ``manager.step()``
in the same run is refused where it can be seen (GritTrainer with a GritCallback or a GritOptimizer)
and warned about where it cannot (the manager's step count then runs ahead of the Trainer's).

Logging: the "grit/..." scalars are merged into the logs dict of every training log step, before
the reporting callbacks see it; TensorBoard's callback prefixes every training key with ``train/``,
so they land as ``train/grit/...`` next to ``train/loss``. With ``GritTrainer(grit_metrics_every=N)``
or ``GritCallback(metrics_every=N)``, every N-th training log step and the log step of the last
training step get ``manager.metrics()`` (device values: one device-to-host copy); the other log
steps get only ``manager.counters()`` (host ints, no device read). The default N = 1 logs
everything at every log step, as before; N > 1 saves the device read where ``logging_steps=1``
would otherwise pay it at every step. The regularizers act on
``.grad`` inside ``manager.step()`` and are never added to the loss, so ``loss`` / ``train/loss`` is
the task loss alone.

Checkpoints: ``manager.state_dict()`` is written as ``grit_state.pt`` in every checkpoint folder
and loaded back by ``trainer.train(resume_from_checkpoint=...)``.

Nothing silently: with preconditioning on, both refuse (ValueError, before the first step) a schedule
that cannot precondition any step of the run (first factor update at ``kfac_update_freq`` or warm-up
end after ``max_steps``), and end a run that preconditioned 0 steps anyway (``kfac_min_samples`` never
reached) with a RuntimeError saying why: GritTrainer right after ``Trainer.train()`` returns,
GritCallback in ``on_train_end``. The schedule check is the manager's own (``GRITManager.set_max_steps``,
``grit.schedule``), told the Trainer's ``max_steps``; so the manager's first-step warning about a late
start is not needed and not given. The manager itself refuses LoRA gradients without statistics (a
fused LoRA kernel) at the first step (``grit.manager``).

fp16 (T4-class GPUs without bf16): GritTrainer hands the accelerator's GradScaler to the manager
(``attach_grad_scaler``), which divides the loss scale out of the statistics and runs before the
Trainer unscales; GritCallback refuses fp16.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import torch
from transformers import Trainer, TrainerCallback

from .optimizer import check_max_grad_norm, clip_after_preconditioning, has_grit_hook

if TYPE_CHECKING:
    from ..manager import GRITManager

__all__ = ["GRIT_STATE_NAME", "GritCallback", "GritTrainer", "load_grit_state", "save_grit_state"]

logger = logging.getLogger(__name__)

GRIT_STATE_NAME = "grit_state.pt"


def _model_device(model) -> torch.device:
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    return torch.device("cpu")


def save_grit_state(manager: GRITManager, checkpoint_dir: str) -> str:
    """Write ``manager.state_dict()`` to ``checkpoint_dir/grit_state.pt``; returns the path."""
    path = os.path.join(checkpoint_dir, GRIT_STATE_NAME)
    torch.save(manager.state_dict(), path)
    return path


def load_grit_state(manager: GRITManager, checkpoint_dir: str, device: torch.device | str = "cpu") -> None:
    """Load ``checkpoint_dir/grit_state.pt`` into ``manager`` (tensors mapped to ``device``)."""
    path = os.path.join(checkpoint_dir, GRIT_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: this checkpoint has no GRIT state (it was not written by GritTrainer or "
            "GritCallback). Resuming would restart the K-FAC statistics and warm-up from zero, which is a "
            "different run; start a fresh run instead, or load what you want into the manager yourself.")
    manager.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def _check_metrics_every(metrics_every: int, who: str) -> None:
    if isinstance(metrics_every, bool) or not isinstance(metrics_every, int) or metrics_every < 1:
        raise ValueError(f"{who}: metrics_every must be an int >= 1 (1 = all GRIT metrics at every log step), "
                         f"got {metrics_every!r}")


class _MetricsLog:
    """Which training log steps carry ``manager.metrics()`` (the rest carry ``manager.counters()``)."""

    def __init__(self, manager: GRITManager, every: int):
        self.manager, self.every, self.logged = manager, every, 0

    def merge(self, logs: dict, state) -> dict:
        """Add this log step's "grit/..." scalars to ``logs``; returns them."""
        self.logged += 1
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        full = self.logged % self.every == 0 or last
        metrics = self.manager.metrics() if full else self.manager.counters()
        metrics = {k if k.startswith("grit/") else f"grit/{k}": float(v) for k, v in metrics.items()}
        logs.update(metrics)
        return metrics


def _is_training_log(logs: dict) -> bool:
    # Training log steps carry "loss"; evaluation logs carry "eval_*" and the final summary "train_loss".
    return "loss" in logs and not any(k.startswith(("eval_", "test_")) for k in logs)


def _refuse_run_that_preconditioned_nothing(manager: GRITManager, start: tuple | None, who: str) -> None:
    """After training: with preconditioning on, a run that stepped but preconditioned nothing is an error."""
    if start is None or not manager.config.precondition:
        return
    steps = manager.optimizer_steps - start[0]
    if steps <= 0 or manager.preconditioned_steps > start[1]:
        return
    cfg = manager.config
    if not manager.ready:
        tokens = manager.metrics()["grit/stat_tokens"]
        why = (f"the factors were never inverted: no factor update (every kfac_update_freq={cfg.kfac_update_freq} "
               f"steps) had the kfac_min_samples={cfg.kfac_min_samples} statistics tokens it needs ({tokens:.0f} "
               "were seen in all); lower kfac_min_samples or kfac_update_freq, or train longer")
    else:
        why = f"the warm-up (ng_warmup_steps={cfg.ng_warmup_steps}) covered every step; lower it"
    raise RuntimeError(
        f"{who}: preconditioning was on but GRIT preconditioned 0 of the {steps} optimizer steps of this run, so "
        f"the model was trained exactly as its control would be: {why}.")


class GritTrainer(Trainer):
    """An HF ``Trainer`` that preconditions LoRA gradients with GRIT once per optimizer step.

    ``manager.step()`` runs just before the Trainer clips (``_clip_grad_norm``), or, with
    ``max_grad_norm=0``, just before it measures the gradient norm (``_get_grad_norm``), so the
    logged ``grad_norm`` is the natural gradient's and clipping bounds the natural-gradient step.
    A guard in ``on_pre_optimizer_step`` makes sure it ran exactly once per optimizer step even if
    a future transformers skips both methods (then it preconditions there and re-clips, with a warning).

    Args:
        grit_manager: the ``GRITManager`` built on ``model`` (keyword only, as in the seed notebook).
        grit_metrics_every: log ``manager.metrics()`` at every this-many-th training log step and at the
            last step, ``manager.counters()`` at the others (module docstring); 1 (default): at every one.
        everything else: as ``transformers.Trainer``.

    The preconditioned-step count is the manager's: ``grit_manager.preconditioned_steps``.

    Nothing silently: with preconditioning on, ``train()`` raises ``ValueError`` before the first step if
    the schedule cannot precondition any step of the run (the first factor update, ``kfac_update_freq``,
    or the end of the warm-up comes after ``max_steps``), and ``RuntimeError`` right after training (when
    ``Trainer.train()`` has returned: every callback, checkpoint and log is written) if the run
    preconditioned 0 steps anyway (e.g. ``kfac_min_samples`` never reached).
    """

    def __init__(self, *args, grit_manager: Optional[GRITManager] = None, grit_metrics_every: int = 1, **kwargs):
        if grit_manager is None:
            raise ValueError("GritTrainer needs grit_manager=GRITManager(model, config); without it use a plain "
                             "Trainer (the control arm)")
        _check_metrics_every(grit_metrics_every, "GritTrainer")
        # A second glue path on the same trainer would call manager.step() twice per optimizer step.
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if optimizer is not None and has_grit_hook(optimizer):
            raise ValueError("GritTrainer preconditions by itself: pass the plain optimizer, not a GritOptimizer")
        if any(isinstance(cb, GritCallback) for cb in kwargs.get("callbacks") or []):
            raise ValueError("GritTrainer preconditions by itself: do not also pass a GritCallback")
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            # The GradScaler (CUDA fp16) scales the loss before every backward; manager.step() runs before the
            # Trainer's clip unscales, so the manager must know the scale (statistics, regularizers, overflow).
            # Without a scaler (fp16 autocast on the CPU) the loss is not scaled and there is nothing to do.
            if getattr(self.accelerator, "distributed_type", None) == "DEEPSPEED":
                raise ValueError("GritTrainer: DeepSpeed scales fp16 losses inside its engine, out of GRIT's "
                                 "sight; use bf16=True or fp32 with DeepSpeed")
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                grit_manager.attach_grad_scaler(scaler)
        self.grit_manager = grit_manager
        self._grit_metrics = _MetricsLog(grit_manager, grit_metrics_every)
        # Owns the once-per-optimizer-step state (which step is open, where this train() began).
        self._grit_guard = _GritTrainerGuard(grit_manager)
        self.add_callback(self._grit_guard)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        _refuse_run_that_preconditioned_nothing(self.grit_manager, self._grit_guard.take_run_start(), "GritTrainer")
        return output

    # -- where the natural gradient happens ------------------------------------------------------
    def _clip_grad_norm(self, model):
        self._grit_guard.precondition()
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._grit_guard.precondition()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # -- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if _is_training_log(logs):
            self._grit_metrics.merge(logs, self.state)
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------
    # The manager's statistics and inverses are optimizer state: saved and loaded with the optimizer, so
    # save_only_model (which cannot resume anyway) skips them too.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_grit_state(self.grit_manager, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_grit_state(self.grit_manager, checkpoint, _model_device(self.model))


def _check_in_step(manager: GRITManager, state, owner) -> None:
    """Warn once if the manager's step count and the Trainer's disagree (step() called elsewhere too, or a
    manager reused across runs, whose schedule and statistics then carry over)."""
    if manager.optimizer_steps != state.global_step and not getattr(owner, "_warned_count", False):
        owner._warned_count = True
        logger.warning("GRIT: the manager has counted %d optimizer steps but the Trainer is at step %d; is "
                       "manager.step() also called elsewhere, or is this manager reused from another run? "
                       "(its schedule and statistics carry over)", manager.optimizer_steps, state.global_step)


class _GritTrainerGuard(TrainerCallback):
    """GritTrainer's once-per-optimizer-step logic, and the one owner of its state: ``on_step_begin`` opens
    a step, :meth:`precondition` (called by the Trainer's clip / grad-norm hooks, or here as a fallback)
    runs ``manager.step()`` once in it; ``on_train_begin`` checks the schedule and notes where the run began."""

    def __init__(self, manager: GRITManager):
        self.manager = manager
        self._pending = False     # an optimizer step is open and manager.step() has not run in it
        self._run_start = None    # (manager steps, preconditioned steps) when this train() began
        self._warned = False

    def precondition(self) -> bool:
        """Run ``manager.step()`` if it has not run in this optimizer step; True if it ran now."""
        if not self._pending:
            return False
        self._pending = False
        self.manager.step()
        return True

    def take_run_start(self) -> tuple | None:
        """Where the last train() began (None if it never reached on_train_begin); forgotten once taken."""
        start, self._run_start = self._run_start, None
        return start

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run's GRIT state was loaded before this (Trainer._load_optimizer_and_scheduler).
        self._run_start = None
        # The manager's own schedule check (ValueError before the first step; no first-step warning then).
        self.manager.set_max_steps(state.max_steps, global_step=state.global_step, who="GritTrainer")
        self._run_start = (self.manager.optimizer_steps, self.manager.preconditioned_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self._pending = True

    def on_step_end(self, args, state, control, **kwargs):
        _check_in_step(self.manager, state, self)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.precondition():
            # Only reachable if the Trainer called neither _clip_grad_norm nor _get_grad_norm this step.
            if not self._warned:
                logger.warning("GritTrainer: transformers did not call _clip_grad_norm/_get_grad_norm before "
                               "optimizer.step(); preconditioning in on_pre_optimizer_step and re-clipping instead")
                self._warned = True
            clip_after_preconditioning(model.parameters(), args.max_grad_norm)


class GritCallback(TrainerCallback):
    """GRIT for any ``Trainer`` you cannot subclass (TRL's ``SFTTrainer``): precondition in ``on_pre_optimizer_step``.

        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=ds, data_collator=collate)
        GritCallback(manager).install(trainer)     # first in line, so TensorBoard sees the grit/ metrics
        trainer.train()

    The Trainer clips to ``args.max_grad_norm`` *before* ``on_pre_optimizer_step``, so this callback
    only sees clipped gradients; preconditioning can make them much longer again. It therefore
    re-clips the preconditioned gradients to ``max_grad_norm`` (``None``: the Trainer's
    ``args.max_grad_norm``; ``0``: no re-clip). The logged ``grad_norm`` is the Trainer's, measured
    before preconditioning; use GritTrainer if you want clipping and ``grad_norm`` on the natural gradient.

    Logging: ``on_log`` adds the "grit/..." metrics to the logs dict (and to ``state.log_history``).
    Callbacks run in list order and the Trainer puts its reporting callbacks (TensorBoard) before the
    ones passed as ``callbacks=[...]``: ``install(trainer)`` moves this callback to the front so that
    TensorBoard writes ``train/grit/...``. Passed via ``callbacks=`` the metrics still reach
    ``trainer.state.log_history`` but not the reporters that come earlier in the list.

    Checkpoints: ``on_save`` writes ``grit_state.pt`` into ``output_dir/checkpoint-<step>``. Callbacks are
    not told the ``resume_from_checkpoint`` path, so on a resumed run ``on_train_begin`` loads it from
    ``args.resume_from_checkpoint`` if set, else ``output_dir/checkpoint-<global_step>``; call
    ``resume_from(path)`` before ``train()`` for a checkpoint elsewhere.

    ``metrics_every``: as GritTrainer's ``grit_metrics_every``. The preconditioned-step count is the
    manager's: ``manager.preconditioned_steps``.

    Nothing silently: with preconditioning on, ``on_train_begin`` raises ``ValueError`` (so ``train()`` stops
    before the first step) if the schedule cannot precondition any step of the run, and ``on_train_end``
    raises ``RuntimeError`` if the run preconditioned 0 steps anyway (e.g. ``kfac_min_samples`` never
    reached). A callback cannot act after ``train()`` returns, so that error comes from inside it: the
    training loop, its checkpoints and logs are done, but callbacks after this one (``install`` puts it
    first) do not get ``on_train_end``.
    """

    def __init__(self, manager: GRITManager, max_grad_norm: float | None = None, metrics_every: int = 1):
        check_max_grad_norm(max_grad_norm, "GritCallback")
        _check_metrics_every(metrics_every, "GritCallback")
        self.manager = manager
        self.max_grad_norm = max_grad_norm
        self._metrics = _MetricsLog(manager, metrics_every)
        self._resume_dir: str | None = None
        self._run_start = None  # (manager steps, preconditioned steps) at on_train_begin

    def install(self, trainer: Trainer) -> "GritCallback":
        """Put this callback first in ``trainer``'s callback list (moving it if it is already there)."""
        if isinstance(trainer, GritTrainer):
            raise ValueError("GritTrainer preconditions by itself: do not also install a GritCallback")
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def resume_from(self, checkpoint_dir: str) -> None:
        """Load the manager state from ``checkpoint_dir`` at the start of the next ``train()``."""
        self._resume_dir = checkpoint_dir

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            # on_pre_optimizer_step sees unscaled gradients after the Trainer's clip but scaled ones without
            # it, and the hooks always see the scaled ĝ; GritTrainer handles the scaler, a callback cannot.
            raise ValueError("GritCallback does not support fp16 loss scaling; use GritTrainer (which does), "
                             "or bf16=True / fp32")
        resuming = state.global_step > 0 and self.manager.optimizer_steps != state.global_step
        if self._resume_dir is not None or resuming:
            path = self._resume_dir
            if path is None:
                explicit = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
                path = explicit or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            load_grit_state(self.manager, path, _model_device(model) if model is not None else "cpu")
            self._resume_dir = None
        # The manager's own schedule check (ValueError before the first step; no first-step warning then).
        self.manager.set_max_steps(state.max_steps, global_step=state.global_step, who="GritCallback")
        self._run_start = (self.manager.optimizer_steps, self.manager.preconditioned_steps)

    def on_train_end(self, args, state, control, **kwargs):
        start, self._run_start = self._run_start, None
        _refuse_run_that_preconditioned_nothing(self.manager, start, "GritCallback")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.manager.step()
        # The Trainer already clipped the raw gradient; bound the preconditioned one again.
        max_norm = args.max_grad_norm if self.max_grad_norm is None else self.max_grad_norm
        clip_after_preconditioning(model.parameters(), max_norm)

    def on_step_end(self, args, state, control, **kwargs):
        _check_in_step(self.manager, state, self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not _is_training_log(logs):
            return
        metrics = self._metrics.merge(logs, state)
        # Trainer.log appended a copy of logs to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint_dir = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint_dir):
            logger.warning("GritCallback: %s does not exist, GRIT state not saved with this checkpoint", checkpoint_dir)
            return
        save_grit_state(self.manager, checkpoint_dir)
