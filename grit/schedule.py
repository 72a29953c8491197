"""When GRIT acts: the schedule, stated once (``Schedule``) and asked by everything that needs it.

Optimizer steps are numbered n = 1, 2, ... by the calls to ``GRITManager.step()``:

* the factors are updated (and inverted) at the steps n with ``n % kfac_update_freq == 0``;
* the first inversion happens at the first such step m* by which at least ``kfac_min_samples``
  statistics tokens (non-padding positions, summed over micro-batches and ranks) were seen;
* step n is preconditioned iff ``precondition`` and ``n > ng_warmup_steps`` and ``n >= m*``;
* the regularizers act at every step n >= m* (they need factors), warm-up or not;
* with ``enable_reprojection`` the weights are projected at the steps n >= m* with
  ``n % reprojection_freq == 0``.

So over ``max_steps`` steps ``max(0, max_steps - max(ng_warmup_steps + 1, m*) + 1)`` steps are
preconditioned (0 if m* > max_steps): :meth:`Schedule.preconditioned_steps`, also exported as
:func:`expected_preconditioned_steps`. The manager decides step by step with the same object
(``GRITManager.schedule``), and the Trainer glue refuses a run that cannot precondition with
:meth:`Schedule.check_run` (through ``GRITManager.set_max_steps``).

Like kfac-pytorch's ``KFACPreconditioner`` (whose ``factor_update_steps`` and ``inv_update_steps``
are callables of the step), the manager never restates the rule: it asks ``is_update_step(n)``,
``may_invert(tokens)``, ``preconditions(n, inverted)``, ``regularizes(inverted)`` and
``reprojects(n, inverted)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

if TYPE_CHECKING:
    from .config import GRITConfig

__all__ = ["GRITScheduleWarning", "Schedule", "expected_preconditioned_steps"]


class GRITScheduleWarning(UserWarning):
    """A run's first optimizer step cannot be preconditioned (``GRITManager.step()`` says when it can be)."""


class Schedule:
    """The schedule of one ``GRITConfig`` (module docstring); every method is pure.

    ``config`` is read once: a schedule does not follow later edits of the config object.
    """

    def __init__(self, config: GRITConfig):
        self.update_freq = config.kfac_update_freq
        self.min_samples = config.kfac_min_samples
        self.warmup_steps = config.ng_warmup_steps
        self.precondition = config.precondition
        self.regularize = config.regularized
        self.reprojection_freq = config.reprojection_freq if config.enable_reprojection else None

    def __repr__(self) -> str:
        return (f"Schedule(kfac_update_freq={self.update_freq}, kfac_min_samples={self.min_samples}, "
                f"ng_warmup_steps={self.warmup_steps}, precondition={self.precondition}, "
                f"regularize={self.regularize}, reprojection_freq={self.reprojection_freq})")

    # ------------------------------------------------------------ step by step (the manager asks)
    def is_update_step(self, n: int) -> bool:
        """Step n updates the factors (and inverts them once ``may_invert``)."""
        return n % self.update_freq == 0

    def may_invert(self, tokens: float) -> bool:
        """The first inversion may happen with ``tokens`` statistics tokens seen (global, non-padding)."""
        return tokens >= self.min_samples

    def preconditions(self, n: int, inverted: bool) -> bool:
        """Step n is preconditioned, the factors having been inverted (``inverted``) by then."""
        return self.precondition and inverted and n > self.warmup_steps

    def regularizes(self, inverted: bool) -> bool:
        return self.regularize and inverted

    def reprojects(self, n: int, inverted: bool) -> bool:
        return self.reprojection_freq is not None and inverted and n % self.reprojection_freq == 0

    # ------------------------------------------------------------ ahead of time
    def first_update_after(self, done: int) -> int:
        """The first update step after step ``done``."""
        return (done // self.update_freq + 1) * self.update_freq

    def earliest_preconditioned_step(self, done: int = 0, inverted: bool = False) -> Optional[int]:
        """The first step after ``done`` that can be preconditioned (whatever the token counts; None if
        ``precondition`` is off). ``inverted``: the factors were inverted by step ``done`` (a resumed run)."""
        if not self.precondition:
            return None
        first = done + 1 if inverted else self.first_update_after(done)
        return max(first, self.warmup_steps + 1)

    def first_inversion(self, max_steps: int, tokens_per_step: Union[int, Sequence[int]]) -> Optional[int]:
        """m*: the first update step within ``max_steps`` with ``kfac_min_samples`` tokens seen, or None."""
        per_step = [tokens_per_step] * max_steps if isinstance(tokens_per_step, int) else list(tokens_per_step)
        if len(per_step) < max_steps:
            raise ValueError(f"tokens_per_step has {len(per_step)} entries for max_steps={max_steps}")
        cumulative = 0
        for n in range(1, max_steps + 1):
            cumulative += per_step[n - 1]
            if self.is_update_step(n) and self.may_invert(cumulative):
                return n
        return None

    def preconditioned_steps(self, max_steps: int, tokens_per_step: Union[int, Sequence[int]]) -> int:
        """How many of ``max_steps`` steps are preconditioned; ``tokens_per_step``: statistics tokens per
        optimizer step (all micro-batches, all ranks), one int for every step or one per step."""
        if not self.precondition:
            return 0
        m_star = self.first_inversion(max_steps, tokens_per_step)
        if m_star is None:
            return 0
        return max(0, max_steps - max(self.warmup_steps + 1, m_star) + 1)

    def check_run(self, last: int, *, done: int = 0, inverted: bool = False, max_steps: Optional[int] = None,
                  who: str = "GRITManager") -> None:
        """Refuse (``ValueError``) a run of steps ``done + 1 .. last`` of which none can be preconditioned.

        ``done``: steps already taken (a manager carried over from a resumed run), ``inverted``: whether
        its factors were inverted; ``max_steps``: the run length as its caller counts it (for the message).
        Nothing to refuse with ``precondition`` off (a control run).
        """
        first = self.earliest_preconditioned_step(done, inverted)
        if first is None or first <= last:
            return
        first_update = done + 1 if inverted else self.first_update_after(done)
        why = (f"the first factor update is at step {first_update} (kfac_update_freq={self.update_freq})"
               if first_update > last else f"the warm-up (ng_warmup_steps={self.warmup_steps}) lasts the whole run")
        max_steps = last - done if max_steps is None else max_steps
        raise ValueError(
            f"{who}: preconditioning is on but this run cannot precondition a single step: {why}, and the run ends "
            f"at step {last} (max_steps={max_steps}). It would train exactly as its control. Set "
            f"kfac_update_freq <= {last - done} and ng_warmup_steps < {last}, train for more steps, or use "
            "GRITConfig(precondition=False) for a control run.")

    def start_warning(self, done: int = 0, inverted: bool = False) -> Optional[str]:
        """What to tell a loop whose step ``done + 1`` cannot be preconditioned (None if it can, or if
        preconditioning is off): the first step that can be, at the earliest, and why."""
        first = self.earliest_preconditioned_step(done, inverted)
        if first is None or first <= done + 1:
            return None
        if inverted:
            why = f"ng_warmup_steps={self.warmup_steps}"
        else:
            why = (f"kfac_update_freq={self.update_freq}: the factors are first inverted at a multiple of it, once "
                   f"kfac_min_samples={self.min_samples} statistics tokens were seen; "
                   f"ng_warmup_steps={self.warmup_steps}")
        return (f"GRIT: preconditioning starts at optimizer step {first} at the earliest ({why}); the steps before "
                f"it are plain gradient steps, and a run that ends before it trains exactly as its control. Pass "
                f"GRITManager(..., max_steps=N) to have a schedule that cannot precondition refused up front, or "
                f"lower kfac_update_freq / ng_warmup_steps.")


def expected_preconditioned_steps(cfg: GRITConfig, max_steps: int,
                                  tokens_per_step: Union[int, Sequence[int]]) -> int:
    """How many of ``max_steps`` optimizer steps a manager with ``cfg`` preconditions
    (``Schedule(cfg).preconditioned_steps``; the rule: ``grit.schedule``).

    ``tokens_per_step``: statistics tokens per optimizer step (non-padding positions of all
    micro-batches, all ranks), one int for every step or one per step.
    """
    return Schedule(cfg).preconditioned_steps(max_steps, tokens_per_step)
