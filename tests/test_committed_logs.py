"""The logs committed at the top of tensorboard_logs/ must be comparable with what `make study` writes now.

`make study` on a fresh checkout adds its runs beside the committed ones and 03_compare reads every run
there; it refuses runs on different data, so one committed run on data the current code no longer builds
makes `make study` fail at its last notebook. Runs of earlier code belong under tensorboard_logs/archive/.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "tensorboard_logs"


def test_committed_top_level_runs_are_on_the_data_the_code_builds_now():
    from grit_study.arms import study_data, study_preset
    from grit_study.compare import load_runs
    from grit_study.models import load_tokenizer

    summaries = {p.parent.name: json.loads(p.read_text()) for p in LOGS.glob("*/run_summary.json")}
    current = {}
    for name, s in sorted(summaries.items()):
        preset_name = s["preset"]
        if preset_name not in current:
            preset = study_preset(preset_name)
            data = study_data(preset, load_tokenizer(preset.model_id))
            current[preset_name] = (data.train_fingerprint, data.val_fingerprint, data.test_fingerprint)
        recorded = (s.get("train_fingerprint"), s.get("val_fingerprint"), s.get("test_fingerprint"))
        assert recorded == current[preset_name], (
            f"tensorboard_logs/{name} was trained on data the code no longer builds for preset {preset_name} "
            f"(recorded {recorded}, now {current[preset_name]}): 03_compare would refuse it beside a new "
            "`make study` run. Move it under tensorboard_logs/archive/ or rerun `make study`.")
    if summaries:  # 03's own reader sees the same runs, so the check above covers what it compares
        assert {r.name for r in load_runs(LOGS, latest_per_key=False)} == set(summaries)


SWEEP_ROOT = LOGS / "sweep"
SWEEP_PRESET = "smollm2-135m"  # the committed synthetic study (63 runs)


def test_the_committed_sweep_lives_in_its_preset_folder_and_is_done():
    """Per-preset layout (issue 21): every committed sweep run is under tensorboard_logs/sweep/<its preset>/, none
    in the old layout, and the plan of the synthetic preset finds all 63 finished under the current definition
    (a field added to Preset or ArmSpec since, at its default, must not make them stale)."""
    from grit_study import sweep
    from grit_study.presets import resolve_preset

    misplaced = [str(p) for p in SWEEP_ROOT.rglob("run_summary.json")
                 if p.relative_to(SWEEP_ROOT).parts[0] != json.loads(p.read_text())["preset"]]
    assert not misplaced, f"sweep runs outside their preset's folder: {misplaced[:3]}"
    assert sweep.legacy_runs(SWEEP_ROOT) == []
    logdir = sweep.preset_logdir(SWEEP_ROOT, SWEEP_PRESET)
    records = sweep.finished_records(logdir, SWEEP_PRESET)
    base = resolve_preset(SWEEP_PRESET)
    runs, notes = sweep.plan(records, base.max_steps, base.learning_rate, (1, 2, 3, 4))
    states = {r.name: sweep.status(logdir, r, SWEEP_PRESET) for r in runs}
    assert len(runs) == len(records) == 63 and notes == []
    assert set(states.values()) == {"done"}, {k: v for k, v in states.items() if v != "done"}


REAL_PRESET = "alpaca-smollm2"  # the real-data study (issue 22), pre-registered


def _git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _git_ok(*args: str) -> bool:
    import subprocess

    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True).returncode == 0


def test_the_real_data_runs_are_current_and_every_grit_run_follows_the_committed_preregistration():
    """Every committed run of the real-data preset is finished under the current definition (none stale); every
    run of an arm other than the control records the pre-registration's commit, which is the commit that last
    changed the file; and in git history each such run's logs were first committed after it (the
    pre-registration precedes the first real-data GRIT run)."""
    from grit_study import sweep
    from grit_study.prereg import committed_version

    logdir = sweep.preset_logdir(SWEEP_ROOT, REAL_PRESET)
    records = sweep.finished_records(logdir, REAL_PRESET)
    assert records, f"no committed run under {logdir}"
    rel = "docs/preregistration/alpaca-smollm2.json"
    prereg_commit = committed_version(rel, ROOT)
    shallow = _git("rev-parse", "--is-shallow-repository") == "true"
    for r in records:
        run = sweep.PlannedRun(r["tier"], r["arm"], r["learning_rate"], r["seed"], r["max_steps"], "val")
        assert sweep.status(logdir, run, REAL_PRESET) == "done", f"{r['run_dir']} is not a current finished run"
        if r["arm"] == "control":
            continue
        recorded = json.loads((Path(r["run_dir"]) / "run_summary.json").read_text())["sweep"].get("preregistration")
        assert recorded == {"path": rel, "commit": prereg_commit}, (r["run_dir"], recorded)
        if not shallow:
            added = _git("log", "--diff-filter=A", "--format=%H", "--", f"{r['run_dir']}/run_summary.json").split()
            assert added, f"{r['run_dir']} is not committed"
            first = added[-1]
            assert first != prereg_commit and _git_ok("merge-base", "--is-ancestor", prereg_commit, first), (
                f"{r['run_dir']} was first committed in {first}, not after the pre-registration {prereg_commit}")
