"""grit_study.prereg: the pre-registration's schema, its git check, and the sweep's gate (issue 21).

The git cases run in a temporary repository; no run trains (``arms.run_hf`` is replaced by a stand-in that
writes a summary the way the recorder does)."""

from __future__ import annotations

import copy
import json
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from grit_study import prereg, sweep
from grit_study.files import SUMMARY_NAME
from grit_study.prereg import PreregistrationError

ROOT = Path(__file__).resolve().parents[1]
REL = "docs/preregistration/tiny-prereg.json"


def _final() -> dict:
    """A final pre-registration: margin 0.1 x (2.0 - mean(1.4, 1.6)) = 0.05."""
    return {
        "schema_version": 1, "preset": "tiny-prereg",
        "primary": {"arm": "grit", "reference": "control", "metric": "test_loss", "steps": 4, "test": "tost",
                    "alpha": 0.05, "decides": "paired_t"},
        "base_test_loss": 2.0,
        "margin": {"rule": "fraction_of_control_gain", "fraction": 0.1, "value": 0.05,
                   "inputs": {"control_test_loss": [1.4, 1.6], "control_runs": ["control/a", "control/b"]},
                   "justification": "a tenth of what fine-tuning gains"},
        "seeds": [3408, 3409], "n": 2, "tuning_seed": 3407,
        "diverged_runs": {"rule": "base_loss", "justification": "a diverged run learned nothing"},
    }


def test_a_final_preregistration_parses_with_every_field():
    p = prereg.parse_preregistration(_final(), "x.json")
    assert p.final and p.margin == 0.05 and p.seeds == (3408, 3409) and p.n == 2 and p.tuning_seed == 3407
    assert (p.arm, p.reference, p.metric, p.steps, p.decides) == ("grit", "control", "test_loss", 4, "paired_t")
    assert prereg.fraction_of_control_gain(0.1, 2.0, [1.4, 1.6]) == pytest.approx(0.05, rel=1e-12)
    absolute = _final()
    absolute["margin"] = {"rule": "absolute", "value": 0.03, "justification": "a fixed 0.03 nats"}
    assert prereg.parse_preregistration(absolute).margin == 0.03


def _set(data, dotted, value):
    *head, last = dotted.split(".")
    for k in head:
        data = data[k]
    if value is KeyError:
        del data[last]
    else:
        data[last] = value


@pytest.mark.parametrize("field,value,message", [
    ("schema_version", 2, "'schema_version' must be 1"),
    ("preset", KeyError, "'preset' is missing"),
    ("primary.decides", "the_significant_one", "'primary.decides' must be one of"),
    ("primary.metric", "accuracy", "'primary.metric' must be one of"),
    ("primary.reference", "grit", "are the same arm"),
    ("primary.alpha", 0.7, "'primary.alpha' must be in"),
    ("primary.steps", None, "'primary.steps' must be int"),
    ("base_test_loss", True, "'base_test_loss' must be int or float"),
    ("margin.value", None, "'margin.value' must be int or float"),
    ("margin.value", 0.06, "the rule gives"),
    ("margin.value", -0.05, "'margin.value' must be a finite number > 0"),
    ("margin.justification", "  ", "'margin.justification' must not be empty"),
    ("margin.inputs.control_test_loss", [1.4, "x"], "'margin.inputs.control_test_loss' must list finite numbers"),
    ("base_test_loss", 1.0, "no gain"),
    ("seeds", [3408, 3408], "lists a seed twice"),
    ("n", 3, "'n' must equal the number of seeds"),
    ("tuning_seed", 3408, "'tuning_seed' (3408) is one of 'seeds'"),
    ("diverged_runs.rule", "ignore_them", "'diverged_runs.rule' must be one of"),
])
def test_a_bad_preregistration_names_its_field(field, value, message):
    data = copy.deepcopy(_final())
    _set(data, field, value)
    with pytest.raises(PreregistrationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prereg.parse_preregistration(data, "x.json")


def test_the_committed_preregistration_is_final_and_its_numbers_come_from_the_committed_pilot():
    """docs/preregistration/alpaca-smollm2.json is final, and filling its template (its rules, numbers nulled)
    from the committed pilot logs gives it back exactly: every number in it comes from those logs."""
    path = ROOT / "docs" / "preregistration" / "alpaca-smollm2.json"
    p = prereg.load_preregistration(path)
    assert p.preset == "alpaca-smollm2" and p.final and p.tuning_seed == sweep.BASE_SEED and p.steps == 60
    assert (p.arm, p.reference, p.decides, p.diverged_rule) == ("grit", "control", "paired_t", "base_loss")
    assert 10 <= p.n <= 12 and list(p.seeds) == list(range(3408, 3408 + p.n))
    pilot = prereg.pilot_runs("alpaca-smollm2", ROOT / "tensorboard_logs" / "sweep", control_only=False)
    assert [r["seed"] for r in pilot] == [3408, 3409, 3410, 3411]
    committed = json.loads(path.read_text())
    assert prereg.fill_from_pilot(_template(), pilot, source=" --preset alpaca-smollm2") == committed


def test_the_diverged_rule_replaces_or_drops_a_non_finite_loss():
    a, b = {1: 0.5, 2: float("nan"), 3: 0.4}, {1: 0.6, 2: 0.55, 3: float("inf")}
    a2, b2, bad = prereg.apply_diverged_rule(a, b, "base_loss", 2.0)
    assert bad == [2, 3] and a2 == {1: 0.5, 2: 2.0, 3: 0.4} and b2 == {1: 0.6, 2: 0.55, 3: 2.0}
    a2, b2, bad = prereg.apply_diverged_rule(a, b, "exclude_pair", None)
    assert bad == [2, 3] and a2 == {1: 0.5} and b2 == {1: 0.6}


# ----------------------------------------------------------------------------- git and the gate

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org",
                           "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    (r / "README").write_text("x")
    _git(r, "add", "README")
    _git(r, "commit", "-q", "-m", "start")
    return r


def _write(repo: Path, data: dict) -> Path:
    path = repo / REL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _commit(repo: Path) -> str:
    _git(repo, "add", REL)
    _git(repo, "commit", "-q", "-m", "pre-registration")
    return _git(repo, "rev-parse", "HEAD").strip()


def test_grit_runs_need_the_file_final_and_committed_control_runs_do_not(repo):
    preset = SimpleNamespace(name="tiny-prereg", preregistration=REL)
    assert prereg.require_for_run(SimpleNamespace(name="tiny", preregistration=None), "grit", repo=repo) is None

    def refused(match):
        with pytest.raises(PreregistrationError, match=match):
            prereg.require_for_run(preset, "grit", repo=repo)
        pilot = prereg.require_for_run(preset, "control", repo=repo)
        assert pilot["commit"] is None and "pilot" in pilot["note"]

    refused("does not exist")
    _write(repo, _final())
    refused("not committed")
    _git(repo, "add", REL)  # staged, not committed
    refused("changed since its last commit")
    _git(repo, "commit", "-q", "-m", "pre-registration")
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert prereg.committed_version(REL, repo) == head
    assert prereg.require_for_run(preset, "grit", repo=repo) == {"path": REL, "commit": head}
    assert prereg.require_for_run(preset, "control", repo=repo) == {"path": REL, "commit": head}
    _write(repo, {**_final(), "notes": "edited after the commit"})
    refused("changed since its last commit")
    _git(repo, "checkout", "-q", "--", REL)
    template = _final()
    template["margin"]["value"] = None
    _write(repo, template)
    _commit(repo)
    refused("is a template, not final")
    _write(repo, {**_final(), "preset": "another"})
    _commit(repo)
    refused("field 'preset' is 'another'")


class _Recorder:
    """What run_one needs of a RunRecorder: ``update`` rewrites run_summary.json with every figure so far."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.info = run_dir, {"arm": "grit", "preset": "tiny-prereg"}
        run_dir.mkdir(parents=True, exist_ok=True)

    def update(self, **extra):
        self.info.update(extra)
        (self.run_dir / SUMMARY_NAME).write_text(json.dumps(self.info))


@pytest.fixture
def prereg_preset(monkeypatch):
    """A registered preset 'tiny-prereg' (tiny + a pre-registration), and training replaced by a stand-in."""
    from grit_study import arms, claims, presets

    monkeypatch.setitem(presets.PRESETS, "tiny-prereg", replace(presets.PRESETS["tiny"], name="tiny-prereg",
                                                                preregistration=REL))
    trained = []

    def fake_run_hf(preset, spec, *, logdir, output_dir, run_name, **kwargs):
        trained.append(run_name)
        model = SimpleNamespace(save_pretrained=lambda path: Path(path).mkdir(parents=True))
        return SimpleNamespace(model=model, recorder=_Recorder(Path(logdir) / run_name))

    monkeypatch.setattr(arms, "run_hf", fake_run_hf)
    monkeypatch.setattr(arms, "retention_figures", lambda res: {"retention_kl": 0.1})
    monkeypatch.setattr(claims, "training_figures", lambda res, adapter_dir: {})
    return trained


def test_a_grit_run_is_refused_without_the_committed_file_and_records_the_commit_with_it(repo, tmp_path,
                                                                                          prereg_preset):
    run = sweep.PlannedRun(1, "grit", 2e-4, sweep.BASE_SEED, 4, "val")
    logdir, adapters = tmp_path / "logs" / "tiny-prereg", tmp_path / "adapters" / "tiny-prereg"
    with pytest.raises(PreregistrationError, match="does not exist"):
        sweep.run_one(run, "tiny-prereg", logdir, adapters, False, repo=repo)
    _write(repo, _final())
    with pytest.raises(PreregistrationError, match="not committed"):
        sweep.run_one(run, "tiny-prereg", logdir, adapters, False, repo=repo)
    assert prereg_preset == [] and not logdir.exists()  # refused before anything was trained or written
    head = _commit(repo)
    sweep.run_one(run, "tiny-prereg", logdir, adapters, False, repo=repo)
    assert prereg_preset == [run.name]
    summary = json.loads((logdir / run.name / SUMMARY_NAME).read_text())
    assert summary["sweep"]["preregistration"] == {"path": REL, "commit": head}
    assert summary["sweep"]["definition"]["preset"]["preregistration"] == REL  # not a default: in the definition
    assert sweep.status(logdir, run, "tiny-prereg") == "done"
    # A control run (the pilot) is allowed before the file exists, and says so.
    pilot = sweep.PlannedRun(1, "control", 2e-4, sweep.BASE_SEED, 4, "val")
    sweep.run_one(pilot, "tiny-prereg", logdir, adapters, False, repo=repo / "elsewhere")
    recorded = json.loads((logdir / pilot.name / SUMMARY_NAME).read_text())["sweep"]["preregistration"]
    assert recorded["commit"] is None and "pilot" in recorded["note"]


def test_the_sweep_driver_refuses_the_grit_run_and_lets_the_pilot_through(tmp_path, prereg_preset, capfd):
    """tiny-prereg's file does not exist in this checkout: the driver stops at the first GRIT run (exit 3);
    control runs go ahead (--max-runs 0 stops before training)."""
    common = ["--preset", "tiny-prereg", "--logdir", str(tmp_path / "logs"), "--adapters", str(tmp_path / "a"),
              "--tiers", "1", "--max-runs", "0"]
    capfd.readouterr()
    assert sweep.main([*common, "--arms", "grit"]) == 3
    out = capfd.readouterr().out
    assert "pre-registration not ready" in out and "REFUSED: refusing arm 'grit'" in out and "--arms control" in out
    assert sweep.main([*common, "--arms", "control"]) == 0
    assert prereg_preset == []


def test_a_preset_awaiting_its_preregistration_is_reported_as_not_preregistered(tmp_path, prereg_preset):
    """tiny-prereg names a file that does not exist here: the verdict and the answer say "not pre-registered
    yet" (not the synthetic study's re-analysis note), and the primary stays a t-interval."""
    from grit_study import headline, report

    logdir = tmp_path / "logs" / "tiny-prereg"
    for arm, seed, loss in (("control", 1, 1.0), ("control", 2, 1.1), ("grit", 1, 0.95), ("grit", 2, 1.12)):
        d = logdir / arm / f"lr2e-04_seed{seed}_steps60"
        d.mkdir(parents=True)
        (d / SUMMARY_NAME).write_text(json.dumps({
            "arm": arm, "preset": "tiny-prereg", "learning_rate": 2e-4, "seed": seed, "max_steps": 60,
            "eval_loss": {"0": 2.0, "60": loss}, "test_loss": loss, "sweep": {"tier": 2}}))
    md = sweep.write_verdict(logdir, tmp_path / "out", "tiny-prereg")
    assert report.NOT_FINAL_NOTE in md and report.REANALYSIS_NOTE not in md and "Pre-registered primary" not in md
    answer = headline.write_headline(logdir, tmp_path / "out", preset="tiny-prereg")
    assert headline.NOT_FINAL in answer and headline.REANALYSIS not in answer


def test_the_sweep_refuses_a_preregistration_it_would_not_follow():
    p = prereg.parse_preregistration(_final())
    tiny = SimpleNamespace(name="tiny-prereg", max_steps=4)
    assert sweep.prereg_mismatch(p, tiny) is None
    assert "'primary.steps' is 4" in sweep.prereg_mismatch(p, SimpleNamespace(name="x", max_steps=60))
    assert "'tuning_seed' is 1" in sweep.prereg_mismatch(replace(p, tuning_seed=1), tiny)
    assert "primary.arm" in sweep.prereg_mismatch(replace(p, arm="grit_sgd"), tiny)
    # With it, the plan runs grit and control at the pre-registered seeds (not the tuning seed).
    recs = [{"arm": arm, "learning_rate": lr, "seed": sweep.BASE_SEED, "max_steps": 4, "tier": 1,
             "val_loss": {2e-4: 0.5}.get(lr, 0.9), "test_loss": None}
            for arm in sweep.TIER1_ARMS for lr in sweep.GRIDS["sgd" if arm.endswith("_sgd") else "adamw"]]
    runs, _ = sweep.plan(recs, 4, 2e-4, (2,), primary_seeds=p.seeds)
    assert sorted(r.seed for r in runs if r.arm == "grit") == [3408, 3409]
    assert sorted(r.seed for r in runs if r.arm == "control") == [3408, 3409]
    assert sorted(r.seed for r in runs if r.arm == "riemannian") == [3407, 3408, 3409]


# ----------------------------------------------------------------------------- filling the template (issue 22)

def _template() -> dict:
    t = json.loads((ROOT / "docs/preregistration/alpaca-smollm2.json").read_text())
    if t["margin"]["value"] is not None:  # once the committed file is filled, take its rules as a template
        t.update(base_test_loss=None, seeds=None, n=None)
        t["margin"].update(value=None, inputs={"control_test_loss": [], "control_runs": []})
        t["power"].update(sd=None, n=None)
    return t


def _pilot(mean: float, sd: float, base: float = 2.0) -> list[dict]:
    z = [-1.5, -0.5, 0.5, 1.5]
    zsd = (sum(v * v for v in z) / 3) ** 0.5  # the sample sd of z (n - 1)
    return [{"run": f"control/lr3e-03_seed{3408 + k}_steps60", "seed": 3408 + k, "test_loss": mean + sd * v / zsd,
             "base_test_loss": base} for k, v in enumerate(z)]


def _simulated_tost_power(n: int, sd: float, margin: float, sims: int = 40000) -> float:
    """The paired TOST at 5% (90% t-interval strictly inside ±margin), simulated at a true difference 0."""
    import numpy as np
    from scipy import stats

    d = np.random.default_rng(0).normal(0.0, sd, size=(sims, n))
    mean, se = d.mean(axis=1), d.std(axis=1, ddof=1) / n ** 0.5
    tc = stats.t.ppf(0.95, n - 1)
    return float(np.mean((mean - tc * se > -margin) & (mean + tc * se < margin)))


@pytest.mark.parametrize("ratio, n", [(0.8, 10), (1.03, 11), (1.15, 12)])
def test_filling_the_template_applies_its_rules_to_the_pilot(ratio, n):
    """Margin = 0.1 x (base - mean control) by hand; the paired sd is sqrt(2) x the pilot's seed sd; n is the
    smallest of 10-12 whose TOST power reaches 0.8, checked by simulating the TOST, not by the code's power
    function; at 1.15 even 12 falls short, so n = 12 and the file says so."""
    import math
    import statistics

    base, mean = 2.0, 1.5
    margin = 0.1 * (base - mean)
    seed_sd = ratio * margin / math.sqrt(2)   # paired sd = ratio x margin
    pilot = _pilot(mean, seed_sd, base)
    out = prereg.fill_from_pilot(_template(), pilot)
    p = prereg.parse_preregistration(out, final=True)
    assert p.margin == pytest.approx(margin, rel=1e-12) and p.base_test_loss == base
    assert out["power"]["control_seed_sd"] == pytest.approx(statistics.stdev(r["test_loss"] for r in pilot))
    assert out["power"]["sd"] == pytest.approx(ratio * margin, rel=1e-9)
    assert p.n == n and list(p.seeds) == list(range(3408, 3408 + n)) and p.tuning_seed not in p.seeds
    simulated = {k: _simulated_tost_power(k, ratio * margin, margin) for k in (10, 11, 12)}
    for k in (10, 11, 12):  # 40,000 simulations: a standard error of at most 0.0025
        assert out["power"]["power_by_n"][str(k)] == pytest.approx(simulated[k], abs=0.01)
    assert n == next((k for k in (10, 11, 12) if simulated[k] >= 0.8), 12)
    assert out["power"]["reached"] is (simulated[n] >= 0.8)
    assert ("does not reach" in out["notes"]) is (n == 12 and not out["power"]["reached"])
    assert out["margin"]["inputs"]["control_runs"] == [r["run"] for r in pilot]
    # The rules themselves are the template's, untouched.
    t = _template()
    for key in ("primary", "diverged_runs", "tuning_seed"):
        assert out[key] == t[key]
    assert {k: out["margin"][k] for k in ("rule", "fraction", "justification")} == \
        {k: t["margin"][k] for k in ("rule", "fraction", "justification")}
    assert out["power"]["rule"] == t["power"]["rule"] and out["power"]["target_power"] == t["power"]["target_power"]


def test_filling_refuses_what_the_rules_do_not_cover():
    good = _pilot(1.5, 0.01)
    with pytest.raises(PreregistrationError, match="different base test losses"):
        prereg.fill_from_pilot(_template(), [*good[:3], {**good[3], "base_test_loss": 2.1}])
    with pytest.raises(PreregistrationError, match="not finite"):
        prereg.fill_from_pilot(_template(), [*good[:3], {**good[3], "test_loss": float("nan")}])
    with pytest.raises(PreregistrationError, match="at least 2"):
        prereg.fill_from_pilot(_template(), good[:1])
    with pytest.raises(PreregistrationError, match="not below the base"):
        prereg.fill_from_pilot(_template(), _pilot(2.5, 0.01, base=2.0))
    with pytest.raises(PreregistrationError, match="already final"):
        prereg.fill_from_pilot(prereg.fill_from_pilot(_template(), good), good)


def _write_run(folder: Path, arm: str, lr: float, seed: int, tier: int, *, val=None, test=None, base=None):
    from grit_study.presets import resolve_preset

    run = sweep.PlannedRun(tier, arm, lr, seed, 60, "val" if test is None else "full")
    d = sweep.run_dir(folder, run)
    d.mkdir(parents=True)
    s = {"arm": arm, "preset": "alpaca-smollm2", "learning_rate": lr, "seed": seed, "max_steps": 60,
         "eval_loss": {"0": 1.9, "60": val if val is not None else 1.7},
         "sweep": {"tier": tier, "definition": sweep.definition(run, "alpaca-smollm2")}}
    if test is not None:
        s.update(test_loss=test, base_test_loss=base)
    (d / SUMMARY_NAME).write_text(json.dumps(s))
    assert resolve_preset("alpaca-smollm2").max_steps == 60


def test_the_pilot_is_read_from_the_sweep_folder_and_refused_once_another_arm_ran(tmp_path):
    folder = sweep.preset_logdir(tmp_path, "alpaca-smollm2")
    grid = sweep.GRIDS["adamw"]
    for lr, v in zip(grid, (1.86, 1.74, 1.66, 1.70)):
        _write_run(folder, "control", lr, 3407, 1, val=v)
    with pytest.raises(PreregistrationError, match="pilot run control/lr8e-04_seed3408_steps60 is not finished"):
        prereg.pilot_runs("alpaca-smollm2", tmp_path)
    for k, loss in enumerate((1.60, 1.62, 1.61, 1.63)):
        _write_run(folder, "control", grid[2], 3408 + k, 2, test=loss, base=1.95)
    pilot = prereg.pilot_runs("alpaca-smollm2", tmp_path)
    assert [(r["seed"], r["test_loss"], r["base_test_loss"]) for r in pilot] == [
        (3408, 1.60, 1.95), (3409, 1.62, 1.95), (3410, 1.61, 1.95), (3411, 1.63, 1.95)]
    _write_run(folder, "grit", grid[1], 3407, 1, val=1.7)
    with pytest.raises(PreregistrationError, match=r"runs of \['grit'\]"):
        prereg.pilot_runs("alpaca-smollm2", tmp_path)
    assert prereg.pilot_runs("alpaca-smollm2", tmp_path, control_only=False) == pilot  # re-read to check a file
