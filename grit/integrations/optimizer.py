"""``GritOptimizer``: GRIT's preconditioner run at the start of any torch optimizer's ``step()``.

    manager = GRITManager(model, GRITConfig(lora_rank=16))
    opt = GritOptimizer(torch.optim.AdamW(params, lr=2e-4), manager, max_grad_norm=1.0)
    for micro_batches in loader:
        for batch in micro_batches:
            model(**batch).loss.backward()   # hooks capture u and g-hat
        opt.step()                           # manager.step() -> clip to max_grad_norm -> AdamW's step
        opt.zero_grad()
    opt.grit_hook.remove()                   # back to the plain AdamW

``GritOptimizer`` is a factory, not a wrapper: it registers a step pre-hook
(``torch.optim.Optimizer.register_step_pre_hook``) on the optimizer you pass and returns that same
optimizer, so its class, ``state_dict``, param groups and LR schedulers are untouched. The hook
object is ``opt.grit_hook``; ``opt.grit_hook.remove()`` unregisters it.

This is the path for hand-written loops and for trainers that only let you hand in an optimizer.
Inside an HF ``Trainer`` prefer ``grit.integrations.hf.GritTrainer``: the Trainer clips *before* it
calls ``optimizer.step()``, so the hook only ever sees already-clipped gradients. That is why it
re-clips after preconditioning when ``max_grad_norm`` is given: the natural-gradient step can be
much longer than the clipped gradient it was computed from, and without the re-clip nothing would
bound it.

Hooks run in registration order: register GRIT before any other step pre-hook that should see the
preconditioned gradients.

fp16 loss scaling: ``GradScaler.step(opt)`` unscales and then calls ``opt.step()`` only when the
gradients are finite; on an overflow it skips ``step()`` and so skips this hook too: the manager does
not count that step (``manager.optimizer_steps`` falls behind the scaler's steps by one per overflow)
and the overflowed micro-batches' statistics stay pending. The statistics the hooks captured are
still scaled while the gradients were unscaled: use ``GritTrainer`` (which hands the scaler to the
manager) for fp16.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..manager import GRITManager

__all__ = ["GritOptimizer", "GritStepHook", "clip_after_preconditioning"]


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


def check_max_grad_norm(max_grad_norm: float | None, who: str) -> None:
    if max_grad_norm is None:
        return
    if not isinstance(max_grad_norm, (int, float)) or not math.isfinite(max_grad_norm) or max_grad_norm < 0:
        raise ValueError(f"{who}: max_grad_norm must be None or a finite number >= 0 (0 disables the re-clip), "
                         f"got {max_grad_norm!r}")


class GritStepHook:
    """The step pre-hook ``GritOptimizer`` registers: ``manager.step()``, then the re-clip.

    ``manager``, ``max_grad_norm``: as given to ``GritOptimizer``. ``remove()`` unregisters it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, manager: GRITManager, max_grad_norm: float | None):
        self.manager = manager
        self.max_grad_norm = max_grad_norm
        self._optimizer = weakref.ref(optimizer)  # the optimizer holds this hook; no cycle through it
        self._handle = optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer, args, kwargs):
        # args = (optimizer, *step's positional arguments)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None:
            raise ValueError("GritOptimizer: step() takes no closure: run backward() on every micro-batch, then "
                             "call step() so the manager can precondition the accumulated .grad")
        self.manager.step()
        clip_after_preconditioning((p for g in optimizer.param_groups for p in g["params"]), self.max_grad_norm)

    def remove(self) -> None:
        """Unregister the hook: the optimizer steps without GRIT from now on."""
        self._handle.remove()
        optimizer = self._optimizer()
        if optimizer is not None and getattr(optimizer, "grit_hook", None) is self:
            del optimizer.grit_hook

    def __repr__(self) -> str:
        return f"GritStepHook(max_grad_norm={self.max_grad_norm})"


def has_grit_hook(optimizer: object) -> bool:
    """True if ``optimizer`` (or the optimizer an accelerate wrapper holds) runs GRIT in its step."""
    inner = getattr(optimizer, "optimizer", None)
    return getattr(optimizer, "grit_hook", None) is not None or (
        inner is not None and getattr(inner, "grit_hook", None) is not None)


def GritOptimizer(optimizer: torch.optim.Optimizer, manager: GRITManager,  # noqa: N802
                  max_grad_norm: float | None = None) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` run ``manager.step()``, re-clip, then the optimizer's own step; returns ``optimizer``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the LoRA parameters (AdamW, SGD, bnb 8-bit...).
        manager: the ``GRITManager`` whose hooks are on the model being trained.
        max_grad_norm: clip the preconditioned gradients of this optimizer's parameters to this total
            norm before its step. ``None``/``0``: no clip. Inside an HF Trainer pass ``args.max_grad_norm``;
            the Trainer's own clip ran before the hook saw the gradients.

    A CamelCase factory so that existing ``GritOptimizer(AdamW(...), manager)`` code keeps working.
    The hook is ``optimizer.grit_hook`` (a :class:`GritStepHook`); ``optimizer.grit_hook.remove()``
    removes it. The manager's state is not in ``optimizer.state_dict()``: save ``manager.state_dict()``
    next to it (GritTrainer does). The preconditioned-step count is the manager's
    (``manager.preconditioned_steps``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"GritOptimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(getattr(manager, "step", None)):
        raise TypeError(f"GritOptimizer needs a GRITManager as manager, got {type(manager).__name__}")
    check_max_grad_norm(max_grad_norm, "GritOptimizer")
    if getattr(optimizer, "grit_hook", None) is not None:
        raise ValueError("GritOptimizer: this optimizer already runs GRIT in its step (a second hook would "
                         "precondition twice); call optimizer.grit_hook.remove() first to replace it")
    optimizer.grit_hook = GritStepHook(optimizer, manager, max_grad_norm)
    return optimizer
