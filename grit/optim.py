"""``GritOptimizer``: any torch optimizer, with GRIT's preconditioner run inside ``step()``.

    manager = GRITManager(model, GRITConfig(lora_rank=16))
    opt = GritOptimizer(torch.optim.AdamW(params, lr=2e-4), manager, max_grad_norm=1.0)
    for micro_batches in loader:
        for batch in micro_batches:
            model(**batch).loss.backward()   # hooks capture u and g-hat
        opt.step()                           # manager.step() -> clip to max_grad_norm -> AdamW.step()
        opt.zero_grad()

This is the path for hand-written loops and for trainers that only let you hand in an optimizer.
Inside an HF ``Trainer`` prefer ``grit.trainer.GritTrainer``: the Trainer clips *before* it calls
``optimizer.step()``, so a wrapper only ever sees already-clipped gradients. That is why this
wrapper re-clips after preconditioning when ``max_grad_norm`` is given: the natural-gradient
step can be much longer than the clipped gradient it was computed from, and without the re-clip
nothing would bound it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GritOptimizer", "clip_after_preconditioning"]


def clip_after_preconditioning(params, max_grad_norm: float | None) -> None:
    """Clip the (already preconditioned) gradients of ``params`` to total norm ``max_grad_norm``.

    ``None`` or ``0`` does nothing, matching ``TrainingArguments.max_grad_norm=0``. Uses
    ``torch.nn.utils.clip_grad_norm_`` (no host sync: the clip coefficient stays on the device).
    """
    if not max_grad_norm:
        return
    grads = [p for p in params if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)


def _check_max_grad_norm(max_grad_norm: float | None, who: str) -> None:
    if max_grad_norm is None:
        return
    if not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm < 0:
        raise ValueError(f"{who}: max_grad_norm must be None or a finite number >= 0 (0 disables the re-clip), "
                         f"got {max_grad_norm!r}")


class GritOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that ``step()`` = ``manager.step()``, re-clip, ``optimizer.step()``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the LoRA parameters (AdamW, SGD, bnb 8-bit...).
        manager: the ``GRITManager`` whose hooks are on the model being trained.
        max_grad_norm: clip the preconditioned gradients of this optimizer's parameters to this total
            norm before the inner step. ``None``/``0``: no clip. Inside an HF Trainer pass
            ``args.max_grad_norm``; the Trainer's own clip ran before this wrapper saw the gradients.

    ``param_groups``, ``state``, ``defaults``, ``state_dict``, ``load_state_dict``, ``zero_grad``,
    ``add_param_group`` delegate to the inner optimizer, so LR schedulers, accelerate and the HF
    Trainer treat it like the optimizer it wraps. The manager's own state is not in
    ``state_dict()``: save ``manager.state_dict()`` next to it (GritTrainer does).

    fp16 loss scaling: a GradScaler unscales before it calls this ``step()``, while the statistics the
    hooks captured are still scaled; use ``GritTrainer`` (which hands the scaler to the manager) for fp16.

    Counters: ``optimizer_steps`` (calls of ``step()``), ``preconditioned_steps`` (those where the
    manager reported that it applied the natural gradient).
    """

    # Deliberately no super().__init__(): the state lives in the inner optimizer (accelerate's
    # AcceleratedOptimizer does the same). isinstance(..., Optimizer) still holds, which LR schedulers require.
    def __init__(self, optimizer: torch.optim.Optimizer, manager, max_grad_norm: float | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GritOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not hasattr(manager, "step"):
            raise TypeError(f"GritOptimizer needs a GRITManager as manager, got {type(manager).__name__}")
        _check_max_grad_norm(max_grad_norm, "GritOptimizer")
        self.optimizer = optimizer
        self.manager = manager
        self.max_grad_norm = max_grad_norm
        self.optimizer_steps = 0
        self.preconditioned_steps = 0
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    # -- delegation -----------------------------------------------------------------------------
    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups):
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def train(self):  # schedule-free optimizers have train()/eval(); accelerate forwards them
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()

    def eval(self):
        if callable(getattr(self.optimizer, "eval", None)):
            self.optimizer.eval()

    def __repr__(self) -> str:
        return f"GritOptimizer(max_grad_norm={self.max_grad_norm}, {self.optimizer!r})"

    # -- the step -------------------------------------------------------------------------------
    def step(self, closure=None):
        """Precondition ``.grad`` (``manager.step()``), re-clip, then run the inner optimizer's step.

        A closure is refused: GRIT preconditions the gradients already accumulated in ``.grad`` by
        the backward passes of this optimizer step, and a closure would recompute them afterwards.
        """
        if closure is not None:
            raise ValueError("GritOptimizer.step() takes no closure: run backward() on every micro-batch, "
                             "then call step() so the manager can precondition the accumulated .grad")
        if self.manager.step():
            self.preconditioned_steps += 1
        self.optimizer_steps += 1
        clip_after_preconditioning((p for g in self.param_groups for p in g["params"]), self.max_grad_norm)
        return self.optimizer.step()
