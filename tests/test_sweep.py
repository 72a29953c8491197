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
    recs = [_rec("control", lr, v) for lr, v in zip(grid, (0.9, 0.7, 0.65, 0.6))]  # best at the high edge
    runs, chosen = sweep.tier1_plan(recs, 60, arms=("control",))
    assert [r.learning_rate for r in runs] == [*grid, pytest.approx(grid[-1] * 4)]
    assert chosen["control"] is None  # the new point is not measured yet
    recs.append(_rec("control", grid[-1] * 4, 0.65))
    runs, chosen = sweep.tier1_plan(recs, 60, arms=("control",))
    assert len(runs) == len(grid) + 1 and chosen["control"] == grid[-1]
    # A low edge extends downward; the extensions stop after MAX_EXTENSIONS even if the edge persists.
    low = [_rec("grit", lr, v) for lr, v in zip(grid, (0.5, 0.6, 0.7, 0.8))]
    low += [_rec("grit", grid[0] / 4, 0.4), _rec("grit", grid[0] / 16, 0.3)]
    runs, chosen = sweep.tier1_plan(low, 60, arms=("grit",))
    assert len(runs) == len(grid) + sweep.MAX_EXTENSIONS and chosen["grit"] == pytest.approx(grid[0] / 16)


def test_tiers_2_and_3_follow_the_chosen_rates_and_reuse_the_tier1_run():
    recs = []
    for arm in sweep.TIER1_ARMS:
        grid = sweep.GRIDS["sgd" if arm.endswith("_sgd") else "adamw"]
        recs += [_rec(arm, lr, v) for lr, v in zip(grid, (0.8, 0.5, 0.9, 0.95))]  # an inner rate wins everywhere
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


def test_the_registered_protocol_tunes_the_issues_arms_and_never_tests_on_the_tuning_seed():
    """A pre-registered (real-data) preset: control and grit on the family grid, riemannian, loraplus and
    grit_published on three rates x4 apart centred on the control's chosen rate (issue 22: grids of their own;
    LoRA+, whose lora_B moves 16 x faster, a step lower),
    no SGD pair; tiers 2 and 3 never use the tuning seed; before the pre-registration the control runs its
    four pilot seeds and grit none, after it both run the pre-registered seeds."""
    from grit_study.presets import resolve_preset

    reg = sweep.protocol_for(resolve_preset("alpaca-smollm2"))
    assert reg is sweep.REGISTERED and sweep.protocol_for(resolve_preset("smollm2-135m")) is sweep.SYNTHETIC
    assert 5 in reg.default_tiers and 4 not in reg.default_tiers and sweep.SYNTHETIC.default_tiers == (1, 2, 3, 4)
    grid = sweep.GRIDS["adamw"]
    runs, chosen = sweep.tier1_plan([], 60, protocol=reg)
    assert sorted({r.arm for r in runs}) == ["control", "grit"]  # the peers wait for the control's rate
    assert chosen == {a: None for a in ("control", "grit", "riemannian", "loraplus", "grit_published")}

    c = grid[2]
    recs = [_rec("control", lr, v) for lr, v in zip(grid, (0.9, 0.7, 0.6, 0.65))]  # 8e-4 wins, inside the grid
    runs, notes = sweep.plan(recs, 60, published_lr=2e-4, protocol=reg)
    peers = {}
    for r in runs:
        if r.tier == 1 and r.arm not in ("control", "grit"):
            peers.setdefault(r.arm, []).append(r.learning_rate)
    assert peers == {**{a: [pytest.approx(c / 4), pytest.approx(c), pytest.approx(c * 4)]
                        for a in ("riemannian", "grit_published")},
                     "loraplus": [pytest.approx(c / 16), pytest.approx(c / 4), pytest.approx(c)]}
    pilot = [r for r in runs if r.tier == 2]
    assert [(r.arm, r.learning_rate, r.seed, r.evaluation) for r in pilot] == [
        ("control", c, sweep.BASE_SEED + k, "full") for k in (1, 2, 3, 4)]
    assert "tier 2 grit: the pre-registered seeds, once the pre-registration is final" in notes
    long = [r for r in runs if r.tier == 3 and r.arm == "control"]
    assert sorted(r.seed for r in long) == [sweep.BASE_SEED + k for k in (1, 2, 3)]

    # Every arm tuned with an inner best: tier 2 at the pre-registered seeds and the peers' three.
    for arm in ("grit", "riemannian", "loraplus", "grit_published"):
        rates = grid if arm == "grit" else [c / 16, c / 4, c] if arm == "loraplus" else [c / 4, c, c * 4]
        recs += [_rec(arm, lr, v) for lr, v in zip(rates, (0.9, 0.5, 0.8, 0.95))]
    primary = list(range(sweep.BASE_SEED + 1, sweep.BASE_SEED + 11))
    runs, notes = sweep.plan(recs, 60, published_lr=2e-4, primary_seeds=primary, protocol=reg)
    assert notes == []
    seeds = {}
    for r in runs:
        if r.evaluation == "full" and r.steps == 60:
            seeds.setdefault(r.arm, []).append(r.seed)
    assert seeds == {"control": primary, "grit": primary, **{a: primary[:3] for a in
                                                             ("riemannian", "loraplus", "grit_published")}}
    assert not [r for r in runs if r.tier > 1 and r.seed == sweep.BASE_SEED]
    assert [r.learning_rate for r in runs if r.arm == "loraplus" and r.tier == 2] == [pytest.approx(c / 4)] * 3


def test_a_relative_grid_extends_at_its_edge_like_the_family_grid():
    reg = sweep.REGISTERED
    grid = sweep.GRIDS["adamw"]
    recs = [_rec("control", lr, v) for lr, v in zip(grid, (0.9, 0.7, 0.6, 0.65))]
    c = grid[2]
    recs += [_rec("riemannian", lr, v) for lr, v in zip((c / 4, c, c * 4), (0.5, 0.6, 0.9))]  # best at the low edge
    runs, chosen = sweep.tier1_plan(recs, 60, arms=("riemannian",), protocol=reg)
    assert [r.learning_rate for r in runs] == [pytest.approx(c / 16), pytest.approx(c / 4), pytest.approx(c),
                                               pytest.approx(c * 4)]
    assert chosen == {"riemannian": None}
    recs.append(_rec("riemannian", c / 16, 0.55))
    assert sweep.tier1_plan(recs, 60, arms=("riemannian",), protocol=reg)[1] == {"riemannian": pytest.approx(c / 4)}


def test_tier2_alone_still_takes_the_reused_run_as_tier1():
    """`--tiers 2` must plan the reused seed as the tier-1 run it is: planned as tier 2, its evaluation wrote
    tier 2 into the summary, tier 1 lost that arm's chosen point and tier 2 then dropped the arm's seeds."""
    recs = []
    for arm in sweep.TIER1_ARMS:
        grid = sweep.GRIDS["sgd" if arm.endswith("_sgd") else "adamw"]
        recs += [_rec(arm, lr, v) for lr, v in zip(grid, (0.8, 0.5, 0.9, 0.95))]
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
    runs = logdir / "tiny"  # the preset's own folder under the log root
    first, second = "control/lr2e-04_seed3407_steps4", "grit/lr2e-04_seed3407_steps4"
    common = ["--preset", "tiny", "--logdir", str(logdir), "--adapters", str(adapters), "--tiers", "1",
              "--only", f"{first},{second}"]
    assert sweep.main([*common, "--max-runs", "1"]) == 0  # stopped after its first run
    assert (runs / first / SUMMARY_NAME).is_file() and not (runs / second).exists()
    done_at = (runs / first / SUMMARY_NAME).stat().st_mtime_ns
    # A run killed half-way leaves a directory without a summary: it is not done, and starts again.
    (runs / second).mkdir(parents=True)
    (runs / second / "events.out.tfevents.partial").write_text("half")
    capfd.readouterr()
    assert sweep.main(common) == 0
    out = capfd.readouterr().out
    assert f"running tier 1  grit" in out and "running tier 1  control" not in out
    assert (runs / first / SUMMARY_NAME).stat().st_mtime_ns == done_at
    assert not (runs / second / "events.out.tfevents.partial").exists()
    summary = json.loads((runs / second / SUMMARY_NAME).read_text())
    assert summary["sweep"]["tier"] == 1 and summary["steps"] == 4 and "test_loss" not in summary
    assert summary["retention_kl"] >= 0 and summary["drift"] > 0 and summary["arm_definition"]["name"] == "grit"
    # The same definition is done; the dry run lists both as done and trains nothing.
    assert sweep.main([*common, "--dry-run"]) == 0
    assert capfd.readouterr().out.count("done       tier 1") == 2
    # A tier-1 run reused as a tier-2 seed: its saved adapter is evaluated on the test split, not retrained.
    reused = sweep.PlannedRun(1, "control", 2e-4, sweep.BASE_SEED, 4, "full")
    assert sweep.status(runs, reused, "tiny") == "needs_test"
    before = json.loads((runs / first / SUMMARY_NAME).read_text())
    assert sweep.main(["--one", json.dumps(asdict(reused)), "--evaluate-only", *common[:6]]) == 0
    after = json.loads((runs / first / SUMMARY_NAME).read_text())
    assert after["batch_hashes"] == before["batch_hashes"] and after["eval_loss"] == before["eval_loss"]
    assert after["test_loss"] > 0 and after["final_split"] == "test" and sweep.status(runs, reused, "tiny") == "done"
    predictions = [json.loads(line) for line in (runs / first / PREDICTIONS_NAME).read_text().splitlines()]
    assert len(predictions) == after["exact_match_n"] == len(after["test_predictions"]) > 0


# ----------------------------------------------------------------------------- per-preset logs (issue 21)

def _finished(root, preset, run, *, val=1.0, definition=None, summary_preset=None, sweep_record=True):
    """A finished run's summary in ``<root>/<preset>/<run>``, as the sweep writes it (``definition``: the
    recorded one, default the current definition under ``summary_preset`` or ``preset``)."""
    import json

    from grit_study.files import SUMMARY_NAME

    name = summary_preset or preset
    d = sweep.run_dir(sweep.preset_logdir(root, preset), run)
    d.mkdir(parents=True)
    summary = {"arm": run.arm, "preset": name, "learning_rate": run.learning_rate, "seed": run.seed,
               "max_steps": run.steps, "eval_loss": {"0": 2.0, str(run.steps): val}}
    if sweep_record:
        summary["sweep"] = {"tier": run.tier, "definition": definition or sweep.definition(run, name)}
    (d / SUMMARY_NAME).write_text(json.dumps(summary))
    return d


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_presets_in_one_root_leave_each_other_alone(tmp_path, capfd):
    """tiny's sweep beside smollm2-135m's runs: it reads, counts and plans only its own folder and its own
    preset's records; a smollm2-135m run misplaced at a tiny run's path is stale (refused), never deleted."""
    from grit_study.presets import resolve_preset

    root = tmp_path / "sweep"
    steps = resolve_preset("tiny").max_steps
    grid = sweep.GRIDS["adamw"]
    tiny = [sweep.PlannedRun(1, "control", lr, sweep.BASE_SEED, steps, "val") for lr in grid]
    _finished(root, "tiny", tiny[0], val=1.2)
    _finished(root, "tiny", tiny[2], val=1.1)
    misplaced = _finished(root, "tiny", tiny[1], val=0.1, summary_preset="smollm2-135m")
    other = [_finished(root, "smollm2-135m", sweep.PlannedRun(1, "control", lr, sweep.BASE_SEED, 60, "val"), val=v)
             for lr, v in zip(grid, (1.3, 0.9, 1.0, 1.1))]
    before = _snapshot(root)

    assert sorted(r["learning_rate"] for r in sweep.finished_records(root / "tiny", "tiny")) == [grid[0], grid[2]]
    assert len(sweep.finished_records(root, "smollm2-135m")) == len(grid) + 1  # its own folder and the misplaced run
    with pytest.raises(ValueError, match="several presets"):
        sweep.finished_records(root)
    states = {r.name: sweep.status(root / "tiny", r, "tiny") for r in tiny}
    assert list(states.values()) == ["done", "stale", "done", "todo"]
    assert all(sweep.status(root / "smollm2-135m", sweep.PlannedRun(1, "control", lr, sweep.BASE_SEED, 60, "val"),
                            "smollm2-135m") == "done" for lr in grid)

    capfd.readouterr()
    common = ["--preset", "tiny", "--logdir", str(root), "--adapters", str(tmp_path / "adapters"), "--tiers", "1",
              "--arms", "control"]
    assert sweep.main([*common, "--dry-run"]) == 0
    out = capfd.readouterr().out
    assert f"logdir {root / 'tiny'}: 4 runs planned, 2 done, 2 to do" in out
    assert "REFUSED" in out and f"{misplaced}: " in out and "difference(s)" in out
    # Not a dry run: refused before anything is trained or deleted (--max-runs 0 keeps a broken check from training).
    assert sweep.main([*common, "--max-runs", "0"]) == 2
    with pytest.raises(sweep.SweepRefusal, match="never deletes"):
        sweep.clear_interrupted(misplaced, tiny[1], "tiny")
    assert _snapshot(root) == before
    assert not (tmp_path / "adapters").exists()


def test_an_interrupted_run_is_cleared_and_a_stale_one_is_not(tmp_path):
    from grit_study.files import SUMMARY_NAME

    run = sweep.PlannedRun(1, "control", 2e-4, sweep.BASE_SEED, 4, "val")
    logdir = tmp_path / "tiny"
    # The recorder writes its summary before the sweep adds its record last: without it, the run was interrupted.
    d = _finished(tmp_path, "tiny", run, sweep_record=False)
    assert sweep.status(logdir, run, "tiny") == "todo"
    sweep.clear_interrupted(d, run, "tiny")
    assert not d.exists()
    # The same definition (a tier-1 run trained again because its adapter is not on disk) may be replaced.
    d = _finished(tmp_path, "tiny", run)
    sweep.clear_interrupted(d, run, "tiny")
    assert not d.exists()
    # Another definition: stale, refused, kept.
    recorded = sweep.definition(run, "tiny")
    recorded["preset"] = {**recorded["preset"], "lora_r": 99}
    d = _finished(tmp_path, "tiny", run, definition=recorded)
    assert sweep.status(logdir, run, "tiny") == "stale"
    with pytest.raises(sweep.SweepRefusal, match="preset.lora_r: 99 -> "):
        sweep.clear_interrupted(d, run, "tiny")
    assert (d / SUMMARY_NAME).is_file()


def test_runs_in_the_layout_before_per_preset_folders_are_refused(tmp_path, capfd):
    root = tmp_path / "sweep"
    run = sweep.PlannedRun(1, "control", 2e-4, sweep.BASE_SEED, 4, "val")
    d = _finished(root, "tiny", run)
    root.joinpath("control").mkdir()
    d.rename(root / run.name)  # <root>/control/lr..: an arm folder directly under the root, no preset folder
    before = _snapshot(root)
    capfd.readouterr()
    assert sweep.main(["--preset", "tiny", "--logdir", str(root), "--dry-run"]) == 2
    out = capfd.readouterr().out
    assert "layout before per-preset folders" in out and f"{root}/<its preset>/" in out
    assert _snapshot(root) == before


def test_a_later_preset_or_arm_field_at_its_default_stays_out_of_the_definition(monkeypatch):
    """A field added to Preset or ArmSpec after the committed runs must not make them stale while it holds its
    default; set to anything else, it is part of the definition."""
    from dataclasses import asdict, dataclass

    from grit_study.presets import Preset
    from grit_study.registry import ArmSpec

    run = sweep.PlannedRun(1, "grit", 2e-4, sweep.BASE_SEED, 4, "val")
    base = sweep.definition(run, "tiny")
    assert set(base["preset"]) == sweep.DEFINITION_PRESET_FIELDS  # e.g. no 'preregistration' (None by default)
    assert set(base["arm"]) == sweep.DEFINITION_ARM_FIELDS

    @dataclass(frozen=True)
    class LaterPreset(Preset):
        new_knob: int = 0
        new_targets: tuple[str, ...] = ()

    @dataclass(frozen=True)
    class LaterArm(ArmSpec):
        new_switch: bool = False

    original_preset, original_arm = sweep._preset, sweep.arm_spec

    def with_fields(knob=0, targets=(), switch=False):
        monkeypatch.setattr(sweep, "_preset", lambda name, r: LaterPreset(
            **asdict(original_preset(name, r)), new_knob=knob, new_targets=targets))
        monkeypatch.setattr(sweep, "arm_spec", lambda arm: LaterArm(**asdict(original_arm(arm)), new_switch=switch))
        return sweep.definition(run, "tiny")

    assert with_fields() == base
    changed = with_fields(knob=3, targets=("q_proj",), switch=True)
    assert changed != base
    assert changed["preset"]["new_knob"] == 3 and changed["preset"]["new_targets"] == ["q_proj"]
    assert changed["arm"]["new_switch"] is True
    # An original field keeps its place even at its default (the committed definitions hold it).
    assert base["preset"]["save_steps"] == 0 and base["arm"]["loss_on_padding"] is False


def test_per_prompt_losses_are_read_next_to_the_summary_and_checked(tmp_path):
    """per_prompt.jsonl as grit_study.arms.final_evaluation writes it ({"id", "family", "nll_sum", "tokens"}): read
    into the record; a file whose pooled loss is not the run's test loss stops the report, naming the file."""
    import json

    from grit_study import stats
    from grit_study.files import SUMMARY_NAME

    run = sweep.PlannedRun(2, "control", 2e-4, sweep.BASE_SEED, 4, "full")
    d = _finished(tmp_path, "tiny", run)
    summary = json.loads((d / SUMMARY_NAME).read_text())
    lines = [{"id": "a", "family": "f", "nll_sum": 3.0, "tokens": 2}, {"id": "b", "family": "g", "nll_sum": 1.0,
                                                                        "tokens": 2}]
    (d / sweep.PER_PROMPT_NAME).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / SUMMARY_NAME).write_text(json.dumps({**summary, "test_loss": 1.0}))  # (3 + 1) / (2 + 2)
    (rec,) = sweep.finished_records(tmp_path / "tiny", "tiny")
    assert rec["per_prompt"] == lines
    norm = stats.normalize_record(rec)
    assert norm["per_prompt"] == {"a": (3.0, 2), "b": (1.0, 2)} and norm["per_prompt_strata"] == {"a": "f", "b": "g"}
    (d / SUMMARY_NAME).write_text(json.dumps({**summary, "test_loss": 0.9}))
    with pytest.raises(ValueError, match="per_prompt.jsonl: .* test loss is 0.9"):
        sweep.finished_records(tmp_path / "tiny", "tiny")


def test_every_family_is_tuned_on_at_least_four_rates_a_factor_apart():
    """The real-data protocol (issue 22) tunes on at least four rates; the grid stays x4-spaced, so the edge rule's
    extensions land on the same rates the committed synthetic runs used (tests/test_committed_logs.py)."""
    for family, grid in sweep.GRIDS.items():
        assert len(grid) >= 4, family
        assert all(abs(b / a - sweep.GRID_FACTOR) < 1e-12 for a, b in zip(grid, grid[1:])), family


def test_commit_run_commits_the_runs_folder_and_nothing_else(tmp_path, monkeypatch):
    """--commit: each finished run's folder lands in its own commit; a change staged meanwhile stays staged and
    out of it."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "README").write_text("x")
    git("add", "README")
    git("commit", "-q", "-m", "start")
    run = tmp_path / "logs" / "control" / "lr2e-04_seed3408_steps60"
    run.mkdir(parents=True)
    (run / "run_summary.json").write_text("{}")
    (tmp_path / "README").write_text("edited, staged, not part of the run")
    git("add", "README")
    (tmp_path / "other.txt").write_text("untracked")
    assert sweep.commit_run(run, "Sweep p tier 2 control", repo=tmp_path)
    assert git("log", "-1", "--format=%s").strip() == "Sweep p tier 2 control"
    assert git("show", "--name-only", "--format=", "HEAD").split() == ["logs/control/lr2e-04_seed3408_steps60/run_summary.json"]
    assert git("diff", "--cached", "--name-only").split() == ["README"]
    assert "?? other.txt" in git("status", "--porcelain")
    monkeypatch.setattr(sweep, "COMMIT_RETRY_S", 0.0)
    assert not sweep.commit_run(tmp_path / "missing", "nothing there", repo=tmp_path)


def test_the_estimate_scales_unmeasured_kinds_by_the_measured_ones():
    """A preset whose tuning runs took twice their default: its first full runs are estimated at twice the
    default too (before, at the default: the real-data pilot's 4 runs were estimated at 40 min, not ~70)."""
    runs = [sweep.PlannedRun(1, "control", 2e-4, 3407, 60, "val"), sweep.PlannedRun(2, "control", 2e-4, 3408, 60, "full")]
    states = {runs[0].name: "todo", runs[1].name: "todo"}
    recs = [{"seconds": {"val": 2 * sweep.DEFAULT_SECONDS["val"]}}, {"seconds": {"val": 2 * sweep.DEFAULT_SECONDS["val"]}}]
    assert sweep.estimate(runs, states, recs) == pytest.approx(2 * (sweep.DEFAULT_SECONDS["val"] + sweep.DEFAULT_SECONDS["full"]))
    recs.append({"seconds": {"full": 700.0}})  # measured: taken as it is
    assert sweep.estimate(runs, states, recs) == pytest.approx(2 * sweep.DEFAULT_SECONDS["val"] + 700.0)
    assert sweep.estimate(runs, states, []) == pytest.approx(sweep.DEFAULT_SECONDS["val"] + sweep.DEFAULT_SECONDS["full"])
