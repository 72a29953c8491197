"""A preset's pre-registration: ``docs/preregistration/<preset>.json``, loaded, checked and required here.

    p = load_preregistration("docs/preregistration/alpaca-smollm2.json")   # PreregistrationError names the field
    commit = committed_version(path, repo)        # the commit that last changed it; refuses untracked/modified
    record = require_for_run(preset, "grit", repo=REPO)   # the sweep's gate (None for a preset without one)

A preset whose ``preregistration`` field names a file (``getattr(preset, "preregistration", None)``: a real-data
preset) runs GRIT only under a committed pre-registration: the sweep refuses every run of an arm other than
``control`` unless the file exists, validates as final (margin set) and is committed in git (tracked and
unmodified), and records that commit in each run's summary (``sweep.preregistration``). Control-only runs (the
pilot that measures the margin's inputs and the noise) are allowed before it; they record what they found.

Schema, version 1 (docs/preregistration/README.md explains each field with an example):

    schema_version   1
    preset           the preset's name (must equal the preset that names the file)
    primary          {"arm": "grit", "reference": "control", "metric": "test_loss", "steps": int (the run length),
                      "test": "tost", "alpha": 0.05, "decides": "paired_t" | "crossed_bootstrap"}
    base_test_loss   the untuned base model's test loss (from the pilot), or null while not measured
    margin           {"rule": "absolute" | "fraction_of_control_gain", "fraction": float (that rule only),
                      "value": float > 0 or null (not final), "justification": str,
                      "inputs": {"control_test_loss": [float], "control_runs": [str]} (that rule only)}
                     fraction_of_control_gain: value = fraction x (base_test_loss - mean(control_test_loss)),
                     checked to 1e-6 relative
    seeds            the n training seeds of the primary comparison, distinct integers
    n                len(seeds), >= 2
    tuning_seed      the seed tier 1 tunes with; not one of ``seeds``
    diverged_runs    {"rule": "exclude_pair" | "base_loss", "justification": str}: a run is diverged when its
                     test loss is not finite; exclude_pair drops that seed from both arms (the count is
                     reported), base_loss counts the diverged run's test loss as ``base_test_loss`` (the run
                     learned nothing)
    power            optional, free-form: the power calculation behind n (``grit_study.stats.tost_power``)
    notes            optional, free text

A template (``final=False``, what is committed before the pilot) may leave ``margin.value``, ``base_test_loss``,
``primary.steps``, ``seeds`` and ``n`` null; a GRIT run needs them all (``final=True``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .stats import METRIC_DIRECTION

SCHEMA_VERSION = 1
CONTROL_ARM = "control"  # the one arm allowed before the pre-registration is committed (the pilot)
DECIDING_ANALYSES = ("paired_t", "crossed_bootstrap")
MARGIN_RULES = ("absolute", "fraction_of_control_gain")
DIVERGED_RULES = ("exclude_pair", "base_loss")
REL_TOL = 1e-6


class PreregistrationError(ValueError):
    """A pre-registration that is missing, malformed, not final, or not committed; the message names the field."""


@dataclass(frozen=True)
class Preregistration:
    path: str
    preset: str
    arm: str
    reference: str
    metric: str
    steps: int | None  # None only in a template (not final)
    alpha: float
    decides: str  # "paired_t" or "crossed_bootstrap": which analysis's TOST is the primary's decision
    base_test_loss: float | None
    margin: float | None  # None: not final yet (the template, before the pilot)
    margin_rule: str
    margin_fraction: float | None
    margin_justification: str
    seeds: tuple[int, ...]  # () only in a template (not final)
    tuning_seed: int
    diverged_rule: str
    diverged_justification: str
    raw: dict = field(repr=False, compare=False)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def final(self) -> bool:
        return self.margin is not None


def fraction_of_control_gain(fraction: float, base_test_loss: float, control_test_loss: list[float]) -> float:
    """The margin rule ``fraction_of_control_gain``: fraction x (base test loss - mean control test loss), the
    part of what fine-tuning gains over the base that counts as no difference."""
    gain = base_test_loss - sum(control_test_loss) / len(control_test_loss)
    if not gain > 0:
        raise PreregistrationError(f"the control's mean test loss {base_test_loss - gain:.6g} is not below the base "
                                   f"model's {base_test_loss:.6g}: no gain to take a fraction of")
    return fraction * gain


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _get(obj: Mapping[str, Any], key: str, where: str, path: str, kind: type | tuple[type, ...], *,
         nullable: bool = False):
    """``obj[key]`` checked to be of ``kind`` (JSON's true/false is not a number here), or null if ``nullable``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if key not in obj:
        raise PreregistrationError(f"{path}: field '{_name(where, key)}' is missing")
    value = obj[key]
    if value is None and nullable:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise PreregistrationError(f"{path}: field '{_name(where, key)}' must be {expected}"
                                   f"{' or null' if nullable else ''}, got {value!r}")
    return value


def _number(obj, key, where, path, *, nullable=False, positive=False) -> float | None:
    value = _get(obj, key, where, path, (int, float), nullable=nullable)
    if value is None:
        return None
    name = _name(where, key)
    if not math.isfinite(value) or (positive and value <= 0):
        raise PreregistrationError(f"{path}: field '{name}' must be a finite number{' > 0' if positive else ''}, "
                                   f"got {value!r}")
    return float(value)


def _text(obj, key, where, path) -> str:
    value = _get(obj, key, where, path, str)
    if not value.strip():
        raise PreregistrationError(f"{path}: field '{_name(where, key)}' must not be empty")
    return value


def _choice(obj, key, where, path, choices) -> str:
    value = _get(obj, key, where, path, str)
    if value not in choices:
        raise PreregistrationError(f"{path}: field '{_name(where, key)}' must be one of {list(choices)}, got {value!r}")
    return value


def parse_preregistration(data: Any, path: str = "preregistration", *, final: bool = True) -> Preregistration:
    """Check a pre-registration's JSON (the module docstring's schema) and return it. ``final``: everything set
    (what a GRIT run needs); ``final=False`` accepts the template, where ``margin.value``, ``base_test_loss``,
    ``primary.steps``, ``seeds`` and ``n`` may be null (the pilot and the power analysis fill them)."""
    if not isinstance(data, dict):
        raise PreregistrationError(f"{path}: a pre-registration is a JSON object, got {type(data).__name__}")
    version = _get(data, "schema_version", "", path, int)
    if version != SCHEMA_VERSION:
        raise PreregistrationError(f"{path}: field 'schema_version' must be {SCHEMA_VERSION}, got {version!r}")
    preset = _text(data, "preset", "", path)
    primary = _get(data, "primary", "", path, dict)
    arm = _get(primary, "arm", "primary", path, str)
    reference = _get(primary, "reference", "primary", path, str)
    if arm == reference:
        raise PreregistrationError(f"{path}: fields 'primary.arm' and 'primary.reference' are the same arm {arm!r}")
    metric = _choice(primary, "metric", "primary", path, tuple(METRIC_DIRECTION))
    steps = _get(primary, "steps", "primary", path, int, nullable=not final)
    if steps is not None and steps < 1:
        raise PreregistrationError(f"{path}: field 'primary.steps' must be >= 1, got {steps}")
    _choice(primary, "test", "primary", path, ("tost",))
    alpha = _number(primary, "alpha", "primary", path, positive=True)
    if not alpha < 0.5:
        raise PreregistrationError(f"{path}: field 'primary.alpha' must be in (0, 0.5), got {alpha}")
    decides = _choice(primary, "decides", "primary", path, DECIDING_ANALYSES)
    base = _number(data, "base_test_loss", "", path, nullable=True, positive=True)

    margin = _get(data, "margin", "", path, dict)
    rule = _choice(margin, "rule", "margin", path, MARGIN_RULES)
    justification = _text(margin, "justification", "margin", path)
    value = _number(margin, "value", "margin", path, nullable=not final, positive=True)
    fraction = None
    if rule == "fraction_of_control_gain":
        fraction = _number(margin, "fraction", "margin", path, positive=True)
        inputs = _get(margin, "inputs", "margin", path, dict)
        losses = _get(inputs, "control_test_loss", "margin.inputs", path, list)
        runs = _get(inputs, "control_runs", "margin.inputs", path, list)
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in losses):
            raise PreregistrationError(f"{path}: field 'margin.inputs.control_test_loss' must list finite numbers")
        if any(not isinstance(r, str) for r in runs):
            raise PreregistrationError(f"{path}: field 'margin.inputs.control_runs' must list run names (strings)")
        if value is not None:
            if base is None or not losses:
                raise PreregistrationError(f"{path}: field 'margin.value' is set but the rule's inputs are not: "
                                           "'base_test_loss' and 'margin.inputs.control_test_loss' are needed")
            expected = fraction_of_control_gain(fraction, base, [float(x) for x in losses])
            if not math.isclose(value, expected, rel_tol=REL_TOL):
                raise PreregistrationError(f"{path}: field 'margin.value' is {value!r}, but the rule gives "
                                           f"{fraction} x ({base} - mean {losses}) = {expected!r}")

    seeds = _get(data, "seeds", "", path, list, nullable=not final)
    n = _get(data, "n", "", path, int, nullable=not final)
    if seeds is not None or n is not None:  # the template may leave both null (issue 22's power analysis sets n)
        seeds = seeds if seeds is not None else []
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise PreregistrationError(f"{path}: field 'seeds' must list integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise PreregistrationError(f"{path}: field 'seeds' lists a seed twice: {seeds!r}")
        if n != len(seeds) or n < 2:
            raise PreregistrationError(f"{path}: field 'n' must equal the number of seeds ({len(seeds)}) and be >= 2, "
                                       f"got {n}")
    tuning_seed = _get(data, "tuning_seed", "", path, int)
    if seeds is not None and tuning_seed in seeds:
        raise PreregistrationError(f"{path}: field 'tuning_seed' ({tuning_seed}) is one of 'seeds': the seed that "
                                   "chose the learning rates must not be one of the n seeds that test them")
    diverged = _get(data, "diverged_runs", "", path, dict)
    diverged_rule = _choice(diverged, "rule", "diverged_runs", path, DIVERGED_RULES)
    diverged_why = _text(diverged, "justification", "diverged_runs", path)
    if final and diverged_rule == "base_loss" and base is None:
        raise PreregistrationError(f"{path}: field 'base_test_loss' must be set: 'diverged_runs.rule' is base_loss")
    return Preregistration(path, preset, arm, reference, metric, steps, alpha, decides, base, value, rule, fraction,
                           justification, tuple(seeds or ()), tuning_seed, diverged_rule, diverged_why, data)


def load_preregistration(path: str | os.PathLike, *, final: bool = True) -> Preregistration:
    """Read and check ``path`` (``parse_preregistration``); a missing or non-JSON file raises
    PreregistrationError naming it."""
    p = Path(path)
    if not p.is_file():
        raise PreregistrationError(f"{p}: the pre-registration does not exist; write it (docs/preregistration/"
                                   "README.md) and commit it before any GRIT run of this preset")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PreregistrationError(f"{p}: not a readable JSON file ({e})") from None
    return parse_preregistration(data, str(path), final=final)


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PreregistrationError("git is not installed: the pre-registration's commit cannot be checked") from None
    if out.returncode != 0:
        raise PreregistrationError(f"git {' '.join(args)} failed in {repo}: {out.stderr.strip()}")
    return out.stdout


def committed_version(path: str | os.PathLike, repo: str | os.PathLike) -> str:
    """The commit (full hash) that last changed ``path`` in the git repository ``repo``, refusing a file that is
    not tracked (``git ls-files``) or differs from that commit (``git status --porcelain``: staged or not)."""
    repo = Path(repo).resolve()
    rel = os.path.relpath(Path(repo, path).resolve(), repo)
    if not _git(repo, "ls-files", "--", rel).strip():
        raise PreregistrationError(f"{rel}: not committed (git does not track it); commit the pre-registration "
                                   "before any GRIT run")
    status = _git(repo, "status", "--porcelain", "--", rel).strip()
    if status:
        raise PreregistrationError(f"{rel}: changed since its last commit ({status}); commit it (a change after "
                                   "GRIT runs started is a new pre-registration) before any GRIT run")
    commit = _git(repo, "log", "-1", "--format=%H", "--", rel).strip()
    if not commit:
        raise PreregistrationError(f"{rel}: tracked but in no commit yet; commit it before any GRIT run")
    return commit


def preregistration_path(preset) -> str | None:
    """The preset's pre-registration file (relative to the repository), None for a preset without one (the
    synthetic presets). ``getattr``: presets written before the field existed have none."""
    return getattr(preset, "preregistration", None)


def require_for_run(preset, arm: str, *, repo: str | os.PathLike) -> dict[str, Any] | None:
    """The sweep's gate for one run of ``arm`` on ``preset``: what the run records (``sweep.preregistration``), or
    PreregistrationError when the run is refused.

    - no ``preregistration`` on the preset: None (nothing required, nothing recorded);
    - ``control``: allowed before the file is final or committed (the pilot); records the commit when it is;
    - any other arm: the file must exist, validate as final for this preset, and be committed unmodified."""
    rel = preregistration_path(preset)
    if rel is None:
        return None
    path = Path(repo) / rel
    try:
        try:
            prereg = load_preregistration(path, final=True)
        except PreregistrationError as e:
            if path.is_file():  # say whether it is a valid template that only lacks the pilot's numbers
                try:
                    load_preregistration(path, final=False)
                except PreregistrationError:
                    raise e from None
                raise PreregistrationError(f"{rel} is a template, not final yet ({e})") from None
            raise
        if prereg.preset != preset.name:
            raise PreregistrationError(f"{rel}: field 'preset' is {prereg.preset!r}, but the preset naming this file "
                                       f"is {preset.name!r}")
        commit = committed_version(rel, repo)
    except PreregistrationError as e:
        if arm == CONTROL_ARM:
            return {"path": rel, "commit": None, "note": f"control run before the pre-registration was final and "
                    f"committed (allowed: the pilot): {e}"}
        raise PreregistrationError(f"refusing arm {arm!r} on preset {preset.name!r}: {e}") from None
    return {"path": rel, "commit": commit}


def apply_diverged_rule(a: Mapping[int, float], b: Mapping[int, float], rule: str,
                        base_test_loss: float | None) -> tuple[dict[int, float], dict[int, float], list[int]]:
    """The pre-registered treatment of diverged runs (test loss not finite) before the primary analysis.

    ``exclude_pair``: a seed where either arm diverged is dropped from both; ``base_loss``: the diverged run's
    value becomes ``base_test_loss``. Returns (a, b, the affected seeds, sorted)."""
    bad = sorted(s for s in set(a) | set(b) if not math.isfinite(a.get(s, 0.0)) or not math.isfinite(b.get(s, 0.0)))
    if rule == "exclude_pair":
        return ({s: v for s, v in a.items() if s not in bad}, {s: v for s, v in b.items() if s not in bad}, bad)
    if rule == "base_loss":
        if bad and base_test_loss is None:
            raise PreregistrationError("diverged_runs rule base_loss needs base_test_loss")
        fix = lambda d: {s: (v if math.isfinite(v) else float(base_test_loss)) for s, v in d.items()}
        return fix(a), fix(b), bad
    raise PreregistrationError(f"unknown diverged_runs rule {rule!r}; one of {list(DIVERGED_RULES)}")


# ----------------------------------------------------------------------------- filling the template from the pilot

N_CHOICES = (10, 11, 12)  # the rule's candidate n (docs/preregistration/<preset>.json, power.rule)


def fill_from_pilot(template: Mapping[str, Any], pilot: list[Mapping[str, Any]], *, source: str = "") -> dict[str, Any]:
    """The template filled with what the control-only pilot measured, by the template's own rules.

    ``pilot``: the control's runs at its chosen rate, one ``{"run", "seed", "test_loss", "base_test_loss"}`` per
    seed. Fills ``base_test_loss`` (equal in every run: the same base, measured once), ``margin.inputs`` and
    ``margin.value`` (``fraction_of_control_gain``), the power calculation (paired sd = sqrt(2) x the pilot's
    seed sd, n the smallest of ``N_CHOICES`` reaching ``power.target_power`` by ``tost_power``, else the largest
    with its power written), ``seeds`` (tuning seed + 1, + 2, ...) and ``n``. Refuses a template that is
    already final, a rule other than ``fraction_of_control_gain``, fewer than two pilot runs, a non-finite loss,
    or base losses that differ. The result validates as final (``parse_preregistration``)."""
    import statistics

    from .stats import tost_power

    where = str(template.get("preset", "template"))
    t = parse_preregistration(template, where, final=False)
    if t.final:
        raise PreregistrationError(f"{where}: already final (margin.value is set); a filled pre-registration is "
                                   "never filled again")
    if t.margin_rule != "fraction_of_control_gain":
        raise PreregistrationError(f"{where}: margin.rule is {t.margin_rule!r}; only fraction_of_control_gain is "
                                   "filled from a pilot")
    if len(pilot) < 2:
        raise PreregistrationError(f"the pilot has {len(pilot)} control run(s); its seed sd needs at least 2")
    losses = [float(r["test_loss"]) for r in pilot]
    bases = [float(r["base_test_loss"]) for r in pilot]
    if not all(math.isfinite(x) for x in losses + bases):
        raise PreregistrationError(f"a pilot loss is not finite (test {losses}, base {bases}); a diverged control "
                                   "run cannot set the margin")
    if max(bases) - min(bases) > 1e-9 * max(bases):
        raise PreregistrationError(f"the pilot's runs measured different base test losses {bases}: they were not "
                                   "evaluated on the same test split and base model")
    base = bases[0]
    margin = fraction_of_control_gain(t.margin_fraction, base, losses)
    sd = statistics.stdev(losses)
    paired_sd = math.sqrt(2.0) * sd
    power_spec = dict(template.get("power") or {})
    target = float(power_spec.get("target_power", 0.8))
    powers = {n: tost_power(n, paired_sd, margin, alpha=t.alpha) for n in N_CHOICES}
    n = next((k for k in N_CHOICES if powers[k] >= target), N_CHOICES[-1])
    seeds = [t.tuning_seed + 1 + k for k in range(n)]

    out = json.loads(json.dumps(template))  # a deep copy, as JSON holds it
    out["base_test_loss"] = base
    out["margin"]["value"] = margin
    out["margin"]["inputs"] = {"control_test_loss": losses, "control_runs": [str(r["run"]) for r in pilot]}
    out["seeds"], out["n"] = seeds, n
    out["power"] = {**power_spec, "control_seed_sd": sd, "sd": paired_sd, "n": n, "power_at_n": powers[n],
                    "power_by_n": {str(k): powers[k] for k in N_CHOICES}, "reached": powers[n] >= target}
    out["notes"] = (f"Filled from the control-only pilot ({len(pilot)} control runs at seeds "
                    f"{', '.join(str(r['seed']) for r in pilot)}, before any GRIT run of this preset) by "
                    f"`python -m grit_study.prereg fill{source}`. The rules are the template's, unchanged."
                    + ("" if powers[n] >= target else
                       f" n = {n} does not reach the target power {target}: the power reached is {powers[n]:.3f}."))
    parse_preregistration(out, where, final=True)
    return out


def pilot_runs(preset_name: str, logdir: str | os.PathLike, *, control_only: bool = True) -> list[dict[str, Any]]:
    """The control-only pilot of a pre-registered preset, read from its sweep folder (``<logdir>/<preset>``):
    the control's full-evaluation runs at its tier-1 rate and the registered protocol's pilot seeds. Refuses
    while the pilot is unfinished, and, with ``control_only`` (filling the file), once any run of another arm
    exists: the pilot must be filled in before any GRIT data is seen. ``control_only=False`` re-reads the
    pilot afterwards, to check a committed file against it."""
    from . import sweep
    from .files import read_summary
    from .presets import resolve_preset

    preset = resolve_preset(preset_name)
    folder = sweep.preset_logdir(logdir, preset_name)
    records = sweep.finished_records(folder, preset_name) if folder.is_dir() else []
    others = sorted({r["arm"] for r in records} - {CONTROL_ARM})
    if others and control_only:
        raise PreregistrationError(f"{folder} holds runs of {others}: the pre-registration is filled from the "
                                   "control-only pilot, before any other arm has run")
    _, chosen = sweep.tier1_plan(records, preset.max_steps, (CONTROL_ARM,), sweep.REGISTERED)
    lr = chosen[CONTROL_ARM]
    if lr is None:
        raise PreregistrationError(f"the control's tier-1 grid in {folder} is not finished: run "
                                   f"`make sweep PRESET={preset_name} SWEEP_ARGS=\"--arms control --tiers 1\"`")
    out = []
    for seed in sweep.REGISTERED.seeds(sweep.PILOT_SEEDS):
        run = sweep.PlannedRun(2, CONTROL_ARM, lr, seed, preset.max_steps, "full")
        summary = read_summary(sweep.run_dir(folder, run), missing_ok=True)
        if sweep.status(folder, run, preset_name) != "done" or summary is None or "base_test_loss" not in summary:
            raise PreregistrationError(f"pilot run {run.name} is not finished with its test evaluation: run "
                                       f"`make sweep PRESET={preset_name} SWEEP_ARGS=\"--arms control --tiers 2\"`")
        out.append({"run": run.name, "seed": seed, "test_loss": summary["test_loss"],
                    "base_test_loss": summary["base_test_loss"]})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m grit_study.prereg", description=(
        "fill a pre-registration template from its preset's control-only pilot (issue 22) and print it; "
        "--write replaces the file, to be reviewed and committed before any GRIT run"))
    parser.add_argument("command", choices=["fill"])
    parser.add_argument("--preset", required=True, help="a pre-registered preset, e.g. alpaca-smollm2")
    parser.add_argument("--logdir", default="tensorboard_logs/sweep", help="the sweep's log root")
    parser.add_argument("--write", action="store_true", help="write the filled file in place of the template")
    args = parser.parse_args(argv)

    from .presets import resolve_preset

    rel = preregistration_path(resolve_preset(args.preset))
    if rel is None:
        parser.error(f"preset {args.preset} has no pre-registration")
    path = Path(__file__).resolve().parents[1] / rel
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
        filled = fill_from_pilot(template, pilot_runs(args.preset, args.logdir), source=f" --preset {args.preset}")
    except PreregistrationError as e:
        print(f"[prereg] REFUSED: {e}")
        return 2
    text = json.dumps(filled, indent=2) + "\n"
    print(text, end="")
    if args.write:
        path.write_text(text, encoding="utf-8")
        print(f"[prereg] wrote {rel}: check it, then commit it before any GRIT run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
