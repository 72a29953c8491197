"""grit.schedule.Schedule against a brute-force enumeration of the documented rule, written out here.

The rule (grit.schedule's docstring): factors update at n % kfac_update_freq == 0; the first inversion is at
the first such step by which >= kfac_min_samples statistics tokens were seen; step n is preconditioned iff
precondition and n > ng_warmup_steps and n >= that first inversion. The reference below walks the steps one
by one and never calls the schedule.
"""

from __future__ import annotations

import itertools
import random

import pytest

from grit import GRITConfig, GRITManager, Schedule, expected_preconditioned_steps
from grit_fixtures import tiny_lora_model

GRID = list(itertools.product([1, 2, 3, 5, 50],       # kfac_update_freq
                              [0, 1, 4, 12],          # ng_warmup_steps
                              [0, 1, 40, 100],        # kfac_min_samples
                              [True, False]))         # precondition


def brute_force(freq, warmup, min_samples, precondition, tokens, start=0, inverted=False, end=None):
    """[n for n in start+1..end if step n is preconditioned], stepping through the rule; tokens[n-1] = step n's."""
    end = len(tokens) if end is None else end
    seen, out = 0, []
    for n in range(1, end + 1):
        seen += tokens[n - 1]
        if n <= start:
            continue
        if n % freq == 0 and seen >= min_samples:
            inverted = True
        if precondition and inverted and n > warmup:
            out.append(n)
    return out


def config(freq, warmup, min_samples, precondition):
    return GRITConfig(kfac_update_freq=freq, ng_warmup_steps=warmup, kfac_min_samples=min_samples,
                      precondition=precondition)


@pytest.mark.parametrize("freq,warmup,min_samples,precondition", GRID)
def test_schedule_agrees_with_brute_force_enumeration(freq, warmup, min_samples, precondition):
    rng = random.Random(hash((freq, warmup, min_samples, precondition)) % 1000)
    schedule = Schedule(config(freq, warmup, min_samples, precondition))
    for max_steps in (1, 4, 12, 49, 50, 60):
        for tokens in ([rng.choice([0, 5, 21, 30]) for _ in range(max_steps)], [21] * max_steps):
            want = brute_force(freq, warmup, min_samples, precondition, tokens)
            assert schedule.preconditioned_steps(max_steps, tokens) == len(want), (max_steps, tokens)
            cfg = config(freq, warmup, min_samples, precondition)
            assert expected_preconditioned_steps(cfg, max_steps, tokens) == len(want)
            if len(set(tokens)) == 1:  # one int for every step
                assert expected_preconditioned_steps(cfg, max_steps, tokens[0]) == len(want)
            # Step by step, as the manager asks: the first inversion and then preconditioned steps.
            seen, inverted, got = 0, False, []
            for n in range(1, max_steps + 1):
                seen += tokens[n - 1]
                if schedule.is_update_step(n) and not inverted and schedule.may_invert(seen):
                    inverted = True
                if schedule.preconditions(n, inverted):
                    got.append(n)
            assert got == want


@pytest.mark.parametrize("freq,warmup,min_samples,precondition", GRID)
def test_earliest_step_and_run_check_agree_with_brute_force(freq, warmup, min_samples, precondition):
    """With tokens enough from step 1 on, the first preconditioned step is the earliest one; a run (done, last]
    is refused iff it preconditions nothing even then; a loop is warned iff step done + 1 is not preconditioned."""
    schedule = Schedule(config(freq, warmup, min_samples, precondition))
    plenty = [10**6] * 200
    for done, inverted, last in itertools.product([0, 3, 49, 50], [False, True], [1, 2, 5, 12, 50, 51, 100]):
        if last <= done:
            continue
        want = brute_force(freq, warmup, 0, precondition, plenty, start=done, inverted=inverted, end=last)
        earliest = schedule.earliest_preconditioned_step(done, inverted)
        if not precondition:
            assert earliest is None and want == []
        else:
            everything = brute_force(freq, warmup, 0, True, plenty, start=done, inverted=inverted)
            assert earliest == everything[0]
        if want or not precondition:
            schedule.check_run(last, done=done, inverted=inverted)
        else:
            with pytest.raises(ValueError, match=f"run ends at step {last} .*precondition=False"):
                schedule.check_run(last, done=done, inverted=inverted)
        message = schedule.start_warning(done, inverted)
        if precondition and earliest > done + 1:
            assert f"optimizer step {earliest} at the earliest" in message
        else:
            assert message is None


def test_updates_and_reprojection_steps_follow_their_frequencies():
    schedule = Schedule(GRITConfig(kfac_update_freq=4, enable_reprojection=True, reprojection_freq=6))
    assert [n for n in range(1, 25) if schedule.is_update_step(n)] == [4, 8, 12, 16, 20, 24]
    assert [n for n in range(1, 25) if schedule.reprojects(n, inverted=True)] == [6, 12, 18, 24]
    assert not any(schedule.reprojects(n, inverted=False) for n in range(1, 25))  # needs factors
    assert not Schedule(GRITConfig()).reprojects(50, inverted=True)  # reprojection is off by default
    assert Schedule(GRITConfig()).regularizes(True) and not Schedule(GRITConfig()).regularizes(False)
    assert not Schedule(GRITConfig(lambda_kfac=0.0, lambda_reproj=0.0)).regularizes(True)


def test_the_manager_decides_with_its_schedule():
    """The manager's schedule is the one built from its config, and the glue's check goes through it."""
    cfg = GRITConfig(kfac_update_freq=7, ng_warmup_steps=2)
    manager = GRITManager(tiny_lora_model(seed=3, targets=("v_proj",)), cfg)
    assert isinstance(manager.schedule, Schedule) and manager.schedule.update_freq == 7
    with pytest.raises(ValueError, match="Trainer-ish: .*first factor update is at step 7"):
        manager.set_max_steps(6, who="Trainer-ish")
    manager.set_max_steps(7)
    assert manager.max_steps == 7
