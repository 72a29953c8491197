"""GRIT: rank-space K-FAC natural gradient for PEFT LoRA (torch + peft only).

    from grit import GRITConfig, GRITManager
    manager = GRITManager(peft_model, GRITConfig(pairing="kfac"))
    loss.backward(); manager.step(); optimizer.step()

The trainer glue (``GritOptimizer``, ``GritTrainer``, ``GritCallback``) is imported lazily, so
``import grit`` never imports transformers. The math and its conventions: ``grit.math``.
"""

from .config import GRITConfig, expected_preconditioned_steps
from .manager import GRITManager

__all__ = ["GRITConfig", "GRITManager", "GritOptimizer", "GritTrainer", "GritCallback",
           "expected_preconditioned_steps"]

_LAZY = {"GritOptimizer": "grit.optim", "GritTrainer": "grit.trainer", "GritCallback": "grit.trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grit' has no attribute {name!r}")
