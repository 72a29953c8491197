"""GRIT: rank-space K-FAC natural gradient for PEFT LoRA (torch + peft only).

    from grit import GRITConfig, GRITManager
    manager = GRITManager(peft_model, GRITConfig(pairing="kfac"))
    loss.backward(); manager.step(); optimizer.step()

Layout: ``grit.config`` (GRITConfig), ``grit.discovery`` (finding the LoRA layers), ``grit.hooks``
(capturing u and ĝ), ``grit.factors`` (the factor state: statistics, estimates, inverses),
``grit.kfac_math`` (the math and its conventions, pure functions), ``grit.regularizers``,
``grit.distributed``, ``grit.manager`` (the schedule and applying the preconditioner), and the
framework glue in ``grit.integrations`` (``GritOptimizer``: plain torch; ``GritTrainer``,
``GritCallback``: HF Trainer / TRL). The glue is imported lazily, so ``import grit`` never imports
transformers.
"""

__version__ = "0.2.0"

from .config import GRITConfig, expected_preconditioned_steps
from .manager import GRITManager

__all__ = ["GRITConfig", "GRITManager", "GritOptimizer", "GritTrainer", "GritCallback",
           "expected_preconditioned_steps"]

_LAZY = {"GritOptimizer": "grit.integrations.optimizer", "GritTrainer": "grit.integrations.hf",
         "GritCallback": "grit.integrations.hf"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grit' has no attribute {name!r}")
