"""Framework glue over the Fisher core (``grit``): each module imports its framework, the core never does.

* ``grit.integrations.optimizer``: ``GritOptimizer`` (plain torch: a step pre-hook on any optimizer);
* ``grit.integrations.hf``: ``GritTrainer``, ``GritCallback`` and the checkpoint helpers (transformers).

Import rule (tests/test_imports.py): the glue imports the core, never ``grit_study``.
"""
