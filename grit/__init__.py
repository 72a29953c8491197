"""GRIT: rank-space K-FAC natural gradient for PEFT LoRA (torch + peft only).

    from grit import GRITConfig, GRITManager
    manager = GRITManager(peft_model, GRITConfig(pairing="kfac"))
    loss.backward(); manager.step(); optimizer.step()

Layout: ``grit.config`` (GRITConfig), ``grit.schedule`` (when GRIT acts: ``Schedule``, stated
once), ``grit.discovery`` (finding the LoRA layers), ``grit.hooks`` (capturing u and ĝ),
``grit.factors`` (the factor state: statistics, estimates, inverses), ``grit.kfac_math`` (the math
and its conventions, pure functions), ``grit.regularizers``, ``grit.distributed``, ``grit.apply``
(what a step does to the gradients), ``grit.metrics`` (the ``grit/...`` scalars), ``grit.manager``
(``GRITManager``, the one object a loop talks to), and the framework glue in ``grit.integrations``
(``GritOptimizer``: plain torch; ``GritTrainer``, ``GritCallback``: HF Trainer / TRL). The glue is
imported lazily, so ``import grit`` never imports transformers.
"""

__version__ = "0.2.0"

from .config import GRITConfig
from .manager import GRITManager
from .schedule import GRITScheduleWarning, Schedule, expected_preconditioned_steps

__all__ = ["GRITConfig", "GRITManager", "GRITScheduleWarning", "GritOptimizer", "GritTrainer", "GritCallback",
           "Schedule", "expected_preconditioned_steps"]

_LAZY = {"GritOptimizer": "grit.integrations.optimizer", "GritTrainer": "grit.integrations.hf",
         "GritCallback": "grit.integrations.hf"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grit' has no attribute {name!r}")
