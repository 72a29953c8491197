"""make sweep: the plan follows the finished runs (grids, edges, chosen rates, reuse of tier 1)."""

from __future__ import annotations

import pytest

from grit_study import sweep


def _rec(arm, lr, val, tier=1, seed=sweep.BASE_SEED, steps=60, test=None):
    return {"arm": arm, "learning_rate": lr, "seed": seed, "max_steps": steps, "tier": tier, "val_loss": val,
            "test_loss": test}


def test_tier1_starts_with_each_familys_grid():
    runs, chosen = sweep.tier1_plan([], 60)
    by_arm = {}
    for r in runs:
        by_arm.setdefault(r.arm, []).append(r.learning_rate)
    assert by_arm == {a: list(sweep.GRIDS["sgd" if a.endswith("_sgd") else "adamw"]) for a in sweep.TIER1_ARMS}
    assert all(r.tier == 1 and r.evaluation == "val" and r.seed == sweep.BASE_SEED for r in runs)
    assert set(chosen.values()) == {None}


def test_a_best_rate_at_an_edge_adds_one_point_outward_until_it_is_inside():
    grid = sweep.GRIDS["adamw"]
    recs = [_rec("control", lr, v) for lr, v in zip(grid, (0.9, 0.7, 0.6))]  # best at the high edge
    runs, chosen = sweep.tier1_plan(recs, 60, arms=("control",))
    assert [r.learning_rate for r in runs] == [*grid, pytest.approx(grid[-1] * 4)]
    assert chosen["control"] is None  # the new point is not measured yet
    recs.append(_rec("control", grid[-1] * 4, 0.65))
    runs, chosen = sweep.tier1_plan(recs, 60, arms=("control",))
    assert len(runs) == 4 and chosen["control"] == grid[-1]
    # A low edge extends downward; the extensions stop after MAX_EXTENSIONS even if the edge persists.
    low = [_rec("grit", lr, v) for lr, v in zip(grid, (0.5, 0.6, 0.7))]
    low += [_rec("grit", grid[0] / 4, 0.4), _rec("grit", grid[0] / 16, 0.3)]
    runs, chosen = sweep.tier1_plan(low, 60, arms=("grit",))
    assert len(runs) == 3 + sweep.MAX_EXTENSIONS and chosen["grit"] == pytest.approx(grid[0] / 16)


def test_tiers_2_and_3_follow_the_chosen_rates_and_reuse_the_tier1_run():
    recs = []
    for arm in sweep.TIER1_ARMS:
        grid = sweep.GRIDS["sgd" if arm.endswith("_sgd") else "adamw"]
        recs += [_rec(arm, lr, v) for lr, v in zip(grid, (0.8, 0.5, 0.9))]  # the middle rate wins everywhere
    runs, notes = sweep.plan(recs, 60, published_lr=2e-4)
    assert notes == []
    full = [r for r in runs if r.evaluation == "full" and r.steps == 60]
    seeds = {}
    for r in full:
        seeds.setdefault(r.arm, []).append(r.seed)
    assert {a: len(s) for a, s in seeds.items()} == sweep.TIER2_SEEDS
    control_lr = sweep.GRIDS["adamw"][1]
    assert {r.learning_rate for r in full if r.arm in ("control", "loraplus")} == {control_lr}
    # The tier-1 run at the chosen rate is one of the seeds: one entry, evaluated in full, not retrained.
    reused = [r for r in runs if r.arm == "control" and r.learning_rate == control_lr and r.seed == sweep.BASE_SEED
              and r.steps == 60]
    assert len(reused) == 1 and reused[0].tier == 1 and reused[0].evaluation == "full"
    long = [r for r in runs if r.tier == 3]
    assert sorted((r.arm, r.seed) for r in long) == sorted(
        (a, sweep.BASE_SEED + k) for a in sweep.TIER3_ARMS for k in range(sweep.TIER3_SEEDS))
    assert all(r.steps == sweep.TIER3_STEPS and r.eval_steps == sweep.TIER3_EVAL_STEPS for r in long)
    assert len({r.name for r in runs}) == len(runs)


def test_tier2_alone_still_takes_the_reused_run_as_tier1():
    """`--tiers 2` must plan the reused seed as the tier-1 run it is: planned as tier 2, its evaluation wrote
    tier 2 into the summary, tier 1 lost that arm's chosen point and tier 2 then dropped the arm's seeds."""
    recs = []
    for arm in sweep.TIER1_ARMS:
        grid = sweep.GRIDS["sgd" if arm.endswith("_sgd") else "adamw"]
        recs += [_rec(arm, lr, v) for lr, v in zip(grid, (0.8, 0.5, 0.9))]
    both, _ = sweep.plan(recs, 60, published_lr=2e-4, tiers=(1, 2))
    alone, notes = sweep.plan(recs, 60, published_lr=2e-4, tiers=(2,))
    assert notes == []
    reused = {r.name: r for r in both if r.tier == 1 and r.evaluation == "full"}
    assert set(reused) == {f"{a}/lr{sweep.GRIDS['sgd' if a.endswith('_sgd') else 'adamw'][1]:.0e}_seed"
                           f"{sweep.BASE_SEED}_steps60" for a in sweep.TIER1_ARMS}
    assert {r.name: r for r in alone if r.name in reused} == reused  # same entries, tier 1, evaluation full
    assert not [r for r in alone if r.evaluation == "val"]  # the other tuning points stay out of --tiers 2
    assert sorted(r.name for r in alone) == sorted(r.name for r in both if r.tier == 2 or r.name in reused)


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_with_only_what_is_left(tmp_path, capfd):
    import json
    from dataclasses import asdict

    from grit_study.files import PREDICTIONS_NAME, SUMMARY_NAME

    logdir, adapters = tmp_path / "logs", tmp_path / "adapters"
    first, second = "control/lr2e-04_seed3407_steps4", "grit/lr2e-04_seed3407_steps4"
    common = ["--preset", "tiny", "--logdir", str(logdir), "--adapters", str(adapters), "--tiers", "1",
              "--only", f"{first},{second}"]
    assert sweep.main([*common, "--max-runs", "1"]) == 0  # stopped after its first run
    assert (logdir / first / SUMMARY_NAME).is_file() and not (logdir / second).exists()
    done_at = (logdir / first / SUMMARY_NAME).stat().st_mtime_ns
    # A run killed half-way leaves a directory without a summary: it is not done, and starts again.
    (logdir / second).mkdir(parents=True)
    (logdir / second / "events.out.tfevents.partial").write_text("half")
    capfd.readouterr()
    assert sweep.main(common) == 0
    out = capfd.readouterr().out
    assert f"running tier 1  grit" in out and "running tier 1  control" not in out
    assert (logdir / first / SUMMARY_NAME).stat().st_mtime_ns == done_at
    assert not (logdir / second / "events.out.tfevents.partial").exists()
    summary = json.loads((logdir / second / SUMMARY_NAME).read_text())
    assert summary["sweep"]["tier"] == 1 and summary["steps"] == 4 and "test_loss" not in summary
    assert summary["retention_kl"] >= 0 and summary["drift"] > 0 and summary["arm_definition"]["name"] == "grit"
    # The same definition is done; the dry run lists both as done and trains nothing.
    assert sweep.main([*common, "--dry-run"]) == 0
    assert capfd.readouterr().out.count("done       tier 1") == 2
    # A tier-1 run reused as a tier-2 seed: its saved adapter is evaluated on the test split, not retrained.
    reused = sweep.PlannedRun(1, "control", 2e-4, sweep.BASE_SEED, 4, "full")
    assert sweep.status(logdir, reused, "tiny") == "needs_test"
    before = json.loads((logdir / first / SUMMARY_NAME).read_text())
    assert sweep.main(["--one", json.dumps(asdict(reused)), "--evaluate-only", *common[:6]]) == 0
    after = json.loads((logdir / first / SUMMARY_NAME).read_text())
    assert after["batch_hashes"] == before["batch_hashes"] and after["eval_loss"] == before["eval_loss"]
    assert after["test_loss"] > 0 and after["final_split"] == "test" and sweep.status(logdir, reused, "tiny") == "done"
    predictions = [json.loads(line) for line in (logdir / first / PREDICTIONS_NAME).read_text().splitlines()]
    assert len(predictions) == after["exact_match_n"] == len(after["test_predictions"]) > 0
