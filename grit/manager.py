"""GRITManager: the one object a training loop talks to (kfac-pytorch's ``KFACPreconditioner`` convention).

    manager = GRITManager(model, GRITConfig(...), max_steps=1000)
    loss.backward()        # one or more micro-batches; the manager's hooks capture the statistics
    manager.step()         # after the last backward, before optimizer.step(): changes the LoRA .grad
    optimizer.step()

Who does what: ``grit.schedule`` (when: factor updates, first inversion, warm-up), ``grit.factors``
(the factor state), ``grit.hooks`` (capturing u and ĝ), ``grit.apply`` (what a step does to the
gradients), ``grit.metrics`` (the ``grit/...`` scalars), ``grit.kfac_math`` (the math).

Nothing silently: ``max_steps`` refuses up front a schedule that cannot precondition any step; without
it the first ``step()`` warns (``GRITScheduleWarning``) when preconditioning cannot start at once, and
says when it can at the earliest. The first ``step()`` with LoRA gradients raises ``RuntimeError`` if a
LoRA module has a gradient but no statistics (a fused LoRA kernel such as Unsloth's): without the error
the run would silently equal its control.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from . import apply
from . import metrics as grit_metrics
from .config import GRITConfig
from .discovery import find_lora_layers
from .distributed import world_size
from .factors import FactorState, ModuleSpec
from .hooks import StatCapture
from .schedule import GRITScheduleWarning, Schedule

STATE_VERSION = 3  # GRITManager.state_dict() format; load_state_dict refuses any other

NO_CAPTURE_HELP = (
    "The usual cause is a fused LoRA kernel that reads the LoRA weights directly instead of calling PEFT's "
    "lora_A/lora_B modules (Unsloth's FastLanguageModel does so on CUDA), or any custom forward that bypasses "
    "those modules (or in which lora_A's output does not require grad). GRIT would precondition and regularize "
    "nothing and the run would equal its control. Fix: train with the plain PEFT forward: load the model with "
    "transformers + peft (AutoModelForCausalLM.from_pretrained, then peft.get_peft_model) instead of a fused "
    "stack such as Unsloth's FastLanguageModel, or disable its fused LoRA kernels, and build the GRITManager "
    "on that model.")

# The hyperparameters repr(manager) lists (kfac-pytorch's KFACPreconditioner lists its own likewise).
REPR_FIELDS = ("kfac_update_freq", "kfac_min_samples", "kfac_damping", "kfac_damping_mode", "pairing", "grafting",
               "stat_update", "ng_warmup_steps", "lambda_kfac", "lambda_reproj", "enable_reprojection",
               "reprojection_freq", "precondition")


class GRITManager:
    """Rank-space K-FAC natural gradient for the LoRA layers of a PEFT model.

    Built on ``model``, it finds every PEFT LoRA Linear layer (plain or bnb 4-bit base; adapter
    ``config.adapter_name`` or the active one) and hooks it now; a forward pre-hook on ``model`` reads
    ``attention_mask`` (padding never enters the statistics). The factor state is allocated where the
    statistics arrive, at first use, so the model may still be moved, re-typed or loaded. ``max_steps``:
    the run's length (:meth:`set_max_steps`). ``step()`` changes ``.grad`` only (and, with
    ``enable_reprojection``, the LoRA weights every ``reprojection_freq`` steps); with ``precondition=False``,
    both lambdas 0 and reprojection off training is bit-identical to no manager (statistics are still
    captured). Host syncs in ``step()``: only at the first step with gradients (the capture check) and at
    update steps before the first inversion (``kfac_min_samples``).

    Attributes: ``optimizer_steps``, ``preconditioned_steps``, ``inversions``, ``ready`` (a first inversion
    happened), ``schedule``, ``max_steps`` (None until told), ``lora_modules``, ``lora_module_names``,
    ``adapter_name``, ``factor_state`` (``grit.factors.FactorState``).
    """

    def __init__(self, model: nn.Module, config: Optional[GRITConfig] = None, *, max_steps: Optional[int] = None):
        self.config = cfg = config if config is not None else GRITConfig()
        self.schedule = Schedule(cfg)
        self.optimizer_steps = 0
        self.preconditioned_steps = 0
        self.inversions = 0
        self.ready = False                      # a first inversion happened
        self.max_steps: Optional[int] = None    # the run's length, once told (set_max_steps)
        if max_steps is not None:  # refused before anything is hooked
            if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
                raise ValueError(f"GRITManager: max_steps must be None or an int >= 1, got {max_steps!r}")
            self.set_max_steps(max_steps)
        found, adapter = find_lora_layers(model, cfg.adapter_name)
        self.adapter_name = adapter
        self._modules = [apply.LoraModule(name, layer, layer.lora_A[adapter], layer.lora_B[adapter], adapter)
                         for name, layer in found]
        for m in self._modules:
            r = m.lora_A.out_features
            if cfg.lora_rank is not None and r != cfg.lora_rank:
                raise ValueError(f"GRITConfig.lora_rank={cfg.lora_rank} but {m.name} has rank {r}; set lora_rank "
                                 "to the model's rank or None")
        # Devices are read when the factor state is first used, not now: the model may still be moved.
        specs = [ModuleSpec(m.name, m.lora_A.out_features, lambda a=m.lora_A: a.weight.device,
                            lambda layer=m.layer, a=adapter: layer.scaling[a]) for m in self._modules]
        self.factor_state = FactorState(specs, cfg)
        self._param_groups: list | None = None  # laid out at first use (_layout)
        self._counters: list | None = None      # one grit.apply.GroupCounters per factor group
        self._capture = StatCapture(model, [m.lora_A for m in self._modules], self.factor_state,
                                    stride=cfg.stat_micro_batch_stride)
        self._capture_checked = False           # a step with LoRA gradients checked that statistics arrive
        self._announced = False                 # the first step() told when preconditioning can start
        self._ng_scale = None                   # the loss scale of the last preconditioned step (fp16)
        self._inv_time = None
        self._scaler = None

    def __repr__(self) -> str:
        cfg = self.config
        fields = {"lora_modules": len(self._modules), "adapter": self.adapter_name, "max_steps": self.max_steps,
                  **{k: getattr(cfg, k) for k in REPR_FIELDS}}
        return f"{type(self).__name__}(\n" + "".join(f"  {k}={v!r},\n" for k, v in fields.items()) + ")"

    @property
    def lora_modules(self) -> list:
        return [m.layer for m in self._modules]

    @property
    def lora_module_names(self) -> list:
        return [m.name for m in self._modules]

    def set_max_steps(self, max_steps: int, *, global_step: int = 0, who: str = "GRITManager") -> None:
        """The run ends after ``max_steps`` optimizer steps, ``global_step`` of which its trainer has taken.

        The manager counts its own steps (they may carry over from a loaded state): the run ends at its
        step ``optimizer_steps + max_steps - global_step``. With preconditioning on, a schedule that cannot
        precondition any step up to there is refused (``ValueError``, ``Schedule.check_run``); the first
        step then does not warn. ``max_steps <= 0``: unknown (nothing checked).
        """
        if max_steps <= 0:
            return
        done = self.optimizer_steps
        self.schedule.check_run(done + max_steps - global_step, done=done, inverted=self.ready,
                                max_steps=max_steps, who=who)
        self.max_steps = max_steps

    @torch.no_grad()
    def step(self) -> bool:
        """Regularize, precondition and graft the LoRA gradients (after the last backward, before the
        optimizer's step); update and invert the factors when due. True iff it preconditioned."""
        n = self._begin_step()
        if self.schedule.is_update_step(n):
            self._update_factors()
        precondition = self.schedule.preconditions(n, self.ready)
        regularize = self.schedule.regularizes(self.ready)
        if precondition or regularize:
            scale = self._loss_scale() if self._scaler is not None else None
            sums = apply.StepSums(len(self.factor_state.groups))
            for stack in apply.grad_stacks(self._layout(), self.factor_state.version):
                if regularize:
                    apply.regularize(stack, self.config, scale, sums)
                if precondition:
                    apply.precondition_and_graft(stack, self.config)
                    apply.mask_nonfinite(stack, self._counters[stack.group.gi], scale, sums)
                stack.write_back()
            self._record(precondition, regularize, sums, scale)
        if self.schedule.reprojects(n, self.ready):
            apply.reproject(self._layout(), self.config.use_two_sided_reprojection)
        return precondition

    def counters(self) -> dict:
        """The host-side counters under ``grit/`` (no device read; keys: ``grit.metrics``)."""
        return {"grit/optimizer_steps": float(self.optimizer_steps),
                "grit/preconditioned_steps": float(self.preconditioned_steps),
                "grit/inversions": float(self.inversions),
                "grit/mask_mismatches": float(self._capture.masks.mismatches)}

    def metrics(self) -> dict:
        """Scalars for logging under ``grit/`` (keys: ``grit.metrics``); the one method that syncs with the device."""
        if self.factor_state.materialized:
            self._layout()
        return grit_metrics.collect(self.counters(), self.factor_state, self._counters or [], self._ng_scale,
                                    self.ready, self._inv_time)

    def factors(self) -> dict:
        """{module name: {"U", "G", "F_A", "F_B", "inv_A", "inv_B", "P_A", "P_B" (r, r), "tokens"}} on the CPU.

        U and G are the current statistics (``grit.kfac_math``); F_*, inv_*, P_* those of the last inversion
        (zeros / identity where none was valid yet). Syncs with the device: for tests and inspection.
        """
        return self.factor_state.module_factors()

    def state_dict(self) -> dict:
        """Everything it owns (pending sums, factors, inverses, projectors, counters): tensors and ints."""
        fs = self.factor_state.state_dict()
        self._layout()
        nonfinite = sum(int(c.nonfinite_grads) for c in self._counters)
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "adapter_name": self.adapter_name,
                "optimizer_steps": self.optimizer_steps, "preconditioned_steps": self.preconditioned_steps,
                "inversions": self.inversions, "ready": self.ready, "capture_checked": self._capture_checked,
                "nonfinite_grads": torch.tensor(nonfinite), **fs}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"unknown GRITManager state version {sd.get('version')!r} (this grit writes and "
                             f"reads version {STATE_VERSION})")
        self.factor_state.load_state_dict(sd)
        self._layout()
        self.optimizer_steps = int(sd["optimizer_steps"])
        self.preconditioned_steps = int(sd["preconditioned_steps"])
        self.inversions = int(sd["inversions"])
        self.ready = bool(sd["ready"])
        self._capture_checked = bool(sd["capture_checked"])
        for i, c in enumerate(self._counters):  # the total goes to the first group's counter
            c.nonfinite_grads.fill_(int(sd["nonfinite_grads"]) if i == 0 else 0)

    def close(self) -> None:
        """Remove the hooks."""
        self._capture.remove()

    def attach_grad_scaler(self, scaler) -> None:
        """fp16: ``scaler`` (a ``torch.amp.GradScaler``; None detaches) scales every loss, and ``step()`` runs
        before it unscales. Its scale is read as a device tensor at each use (no sync): divided out of ĝ and
        the logged norms, multiplied into the regularizer gradients; non-finite gradients are left for the
        scaler to skip. Preconditioning and grafting are linear, so its unscale gives the unscaled update."""
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"attach_grad_scaler needs a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._capture.loss_scale = self._loss_scale if self._scaler is not None else None

    # --------------------------------------------------------------- the phases of step()
    def _begin_step(self) -> int:
        """Close the step's statistics, count it, and run the first-step checks; returns its number n."""
        # Hand the last micro-batch's statistics over now: under a GradScaler its loss scale is the one the
        # scaler's update() may change right after this step.
        self._capture.flush()
        self._capture.new_step()
        if not self._announced:
            self._announced = True
            message = None if self.max_steps is not None else self.schedule.start_warning(self.optimizer_steps,
                                                                                         self.ready)
            if message is not None:
                warnings.warn(GRITScheduleWarning(message), stacklevel=4)
        self.optimizer_steps += 1
        # Checked before end_step, which drops a non-finite step's statistics (an fp16 overflow): the hooks
        # did capture them, which is all the bypass check asks.
        if not self._capture_checked:
            self._check_capture()
        self.factor_state.end_step()
        return self.optimizer_steps

    def _check_capture(self) -> None:
        """At the first step with LoRA gradients (on any rank): refuse modules with gradients but no statistics.
        Decided on all-reduced flags and counts (``FactorState.missing_statistics``): every rank raises together."""
        flags = [m.lora_A.weight.grad is not None or m.lora_B.weight.grad is not None for m in self._modules]
        if world_size() == 1 and not any(flags):
            return  # nothing trained yet: nothing to decide (and no collective to join)
        missing = self.factor_state.missing_statistics(flags)
        if missing is None:
            return
        self._capture_checked = True
        names = [m.name for m, bad in zip(self._modules, missing) if bad]
        if names:
            raise RuntimeError(
                f"GRIT captured no statistics for {len(names)} of the {len(self._modules)} LoRA modules that have "
                f"gradients (first: {names[:3]}) at optimizer step {self.optimizer_steps}, the first with LoRA "
                f"gradients: their lora_A module was never called in a forward that was backpropagated. "
                f"{NO_CAPTURE_HELP}")

    def _update_factors(self) -> None:
        """All-reduce the pending sums (one collective), fold them into U and G, and invert when due."""
        fs = self.factor_state
        fs.all_reduce()
        fs.fold()
        # folded_tokens() is the one host sync outside metrics(): only at update steps before the first inversion.
        if self.ready or self.schedule.may_invert(fs.folded_tokens()):
            self._invert()

    def _invert(self) -> None:
        self._inv_time = grit_metrics.timed(self.factor_state.invert, self.factor_state.groups[0].device)
        self.inversions += 1
        self.ready = True

    def _record(self, precondition: bool, regularize: bool, sums: apply.StepSums, scale) -> None:
        """Keep this step's per-group sums for metrics() and count a preconditioned step."""
        if precondition and any(s is not None for s in sums.sq_norm):
            for c, s in zip(self._counters, sums.sq_norm):
                c.ng_sq = s
            # The loss scale is the same for every group; metrics() divides it out of the total norm. A copy:
            # the scaler updates its scale tensor in place.
            self._ng_scale = None if scale is None else scale.clone()
        if regularize:
            for c, k, r in zip(self._counters, sums.curv, sums.reproj):
                c.reg_kfac, c.reg_reproj = k, r
        if precondition:
            self.preconditioned_steps += 1

    def _layout(self) -> list:
        """The LoRA weights' param groups (``grit.apply``), laid out once, at first use, with their counters."""
        if self._param_groups is None:
            self._param_groups, self._counters = apply.layout(self._modules, self.factor_state)
        return self._param_groups

    def _loss_scale(self) -> torch.Tensor:
        # GradScaler keeps the scale as a device tensor; get_scale() would .item() it (a sync per call).
        scale = self._scaler._get_scale_async()
        if scale is None:
            raise RuntimeError("the attached GradScaler has not scaled a loss yet: call scaler.scale(loss).backward()")
        return scale.float()
