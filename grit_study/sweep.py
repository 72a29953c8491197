"""``make sweep``: the study's verdict protocol, in tiers, one run at a time, resumable.

    python -m grit_study.sweep --dry-run     # the plan and its estimated time, nothing run
    python -m grit_study.sweep               # run what is not done yet (skips finished runs)
    python -m grit_study.sweep --tiers 1     # only tier 1

Tiers (issue "A verdict with power"):

1. Tuning on the validation split: every tuned arm at a x4 learning-rate grid around its family's
   usual value, one seed, ``preset.max_steps`` steps, validation loss only (no decoding, no test).
   The adapter is saved. Whenever an arm's best rate sits at an edge of what it tried, one more point
   outward is added (at most ``MAX_EXTENSIONS`` per arm). Each arm's rate is the one with the lowest
   final validation loss (``grit_study.stats.choose_learning_rates``).
2. Seeds at each chosen configuration, with the full evaluation (test loss, exact match with every
   prediction saved, retention KL, drift): ``control`` and ``grit`` at 5 seeds, the others at 3,
   ``grit_published`` at 1, ``loraplus`` at the control's rate. The tier-1 run is one of the seeds: its
   saved adapter is evaluated on the test split instead of retraining.
3. Length: ``control`` and ``grit`` for ``TIER3_STEPS`` steps at 3 seeds, evaluated every 25 steps.
4. GRIT's other claims (``grit_study.claims``): ``grit_full`` at 3 seeds, its adapter and the control's cut
   to GRIT's ranks, ``control_rk``, and the one-seed regularizer and EMA runs. A cut whose source adapter
   is not on disk trains the source again first and checks it reproduces the committed run. Reported
   apart from the verdict (``--report`` writes both), so it never enters the verdict's comparison family.

Every run lives in ``<logdir>/<arm>/lr<lr>_seed<seed>_steps<steps>/`` and runs in its own process
(``python -m grit_study.sweep --one ...``). A run is done when its ``run_summary.json`` records the same
definition (arm, preset fields, learning rate, seed, steps, evaluation); a directory without one is an
interrupted run and is started again from scratch. Logs go to ``tensorboard_logs/sweep/`` by default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from .files import SUMMARY_NAME, read_summary

DEFAULT_LOGDIR = "tensorboard_logs/sweep"
DEFAULT_ADAPTERS = "outputs/sweep"
BASE_SEED = 3407
# In the order they run: the arms without GRIT first.
TIER1_ARMS = ("control", "riemannian", "control_sgd", "grit", "grit_sgd")
# x4 grids around each family's usual value; SGD's centre is a first measurement's guess, and the edge
# rule moves the grid where the measurements say.
GRIDS = {"adamw": (5e-5, 2e-4, 8e-4), "sgd": (5e-3, 2e-2, 8e-2)}
GRID_FACTOR = 4.0
MAX_EXTENSIONS = 2
TIER2_SEEDS = {"control": 5, "grit": 5, "riemannian": 3, "control_sgd": 3, "grit_sgd": 3, "loraplus": 3,
               "grit_published": 1}
TIER3_ARMS, TIER3_SEEDS, TIER3_STEPS, TIER3_EVAL_STEPS = ("control", "grit"), 3, 200, 25
# Seconds per run before any was measured (2-core CPU, smollm2-135m, 60 steps); measured ones replace them.
DEFAULT_SECONDS = {"val": 420.0, "full": 600.0, "evaluate": 180.0, "long": 1500.0, "derived": 300.0}
VERDICT_TIERS = (1, 2, 3)


@dataclass(frozen=True)
class PlannedRun:
    tier: int
    arm: str
    learning_rate: float
    seed: int
    steps: int
    evaluation: str            # "val" (tier 1) or "full"
    eval_steps: int | None = None
    source: str | None = None      # tier 4, derived runs: the run whose saved adapter is cut
    ranks_from: str | None = None  # tier 4: the grit_full run whose GRIT ranks are used

    @property
    def name(self) -> str:
        return f"{self.arm}/lr{self.learning_rate:.0e}_seed{self.seed}_steps{self.steps}"

    def describe(self) -> str:
        return (f"tier {self.tier}  {self.arm:15s} lr {self.learning_rate:.0e}  seed {self.seed}  steps {self.steps}  "
                f"{self.evaluation}")


# ----------------------------------------------------------------------------- state on disk

def run_dir(logdir: Path, run: PlannedRun) -> Path:
    return logdir / run.name


def definition(run: PlannedRun, preset_name: str) -> dict[str, Any]:
    """What makes a run the same run: a finished summary with an equal definition is skipped.

    Strict on purpose: every preset field and the arm's whole registry entry. A new Preset field, or an
    edited arm, makes every finished run 'stale' (it is trained again), so such a change must be decided
    before a sweep, never during one."""
    from . import claims

    preset = _preset(preset_name, run)
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(preset).items()}
    return {"arm": arm_spec(run.arm).to_dict(), "preset": fields, "learning_rate": run.learning_rate,
            "seed": run.seed, "steps": run.steps, **claims.definition_extra(run)}


def arm_spec(arm: str):
    """The registry's arm; tier 4's control_rk; for a derived (cut) run, the arm whose adapter it cuts."""
    from . import claims
    from .registry import get_arm

    if arm == claims.CONTROL_RK:
        return claims.control_rk_spec()
    return get_arm(claims.DERIVED[arm].source_arm if arm in claims.DERIVED else arm)


def _preset(preset_name: str, run: PlannedRun):
    from .presets import resolve_preset

    overrides = dict(learning_rate=run.learning_rate, seed=run.seed, max_steps=run.steps)
    if run.eval_steps is not None:
        overrides["eval_steps"] = run.eval_steps
    return resolve_preset(preset_name, **overrides)


def status(logdir: Path, run: PlannedRun, preset_name: str) -> str:
    """'done', 'needs_test' (trained, its full evaluation missing), 'stale' (another definition), or 'todo'."""
    s = read_summary(run_dir(logdir, run), missing_ok=True)
    if s is None:
        return "todo"
    if s.get("sweep", {}).get("definition") != definition(run, preset_name):
        return "stale"
    if run.evaluation == "full" and "test_loss" not in s:
        return "needs_test"
    return "done"


def finished_records(logdir: Path) -> list[dict[str, Any]]:
    """Every finished sweep run under ``logdir`` as a record for grit_study.stats / report."""
    out = []
    for f in sorted(logdir.rglob(SUMMARY_NAME)):
        s = read_summary(f.parent)
        if "sweep" not in s:
            continue
        evals = {int(k): v for k, v in s.get("eval_loss", {}).items()}
        out.append({
            "arm": s["arm"], "learning_rate": s["learning_rate"], "seed": s["seed"], "max_steps": s["max_steps"],
            "tier": s["sweep"]["tier"], "val_loss": evals[max(evals)] if evals else None,
            "val_loss_curve": evals, "test_loss": s.get("test_loss"), "exact_match": s.get("exact_match"),
            "exact_match_by_family": s.get("exact_match_by_family", {}), "predictions": s.get("test_predictions"),
            "retention_kl": s.get("retention_kl"), "drift": s.get("drift"),
            "median_s_per_step": s.get("median_s_per_step"), "median_cpu_s_per_step": s.get("median_cpu_s_per_step"),
            "seconds": s.get("sweep", {}).get("seconds"), "run_dir": str(f.parent),
            # What tier 4's report (grit_study.claims) reads besides.
            "parameters": s.get("trainable_parameters"), "adapter_bytes": s.get("adapter_bytes"),
            "truncation": s.get("truncation"), "projector_truncation": s.get("projector_truncation"),
            "parameter_curve": s.get("parameter_curve"), "source_test_loss": s.get("source_test_loss"),
            "grit_metrics": s.get("grit_metrics", {}), "grit_config": s.get("grit_config"),
        })
    return out


# ----------------------------------------------------------------------------- the plan

def _grid_runs(arm: str, rates: Iterable[float], steps: int) -> list[PlannedRun]:
    return [PlannedRun(1, arm, float(lr), BASE_SEED, steps, "val") for lr in rates]


def tier1_plan(records: list[dict], steps: int, arms: Iterable[str] = TIER1_ARMS) -> tuple[list[PlannedRun], dict]:
    """Tier-1 runs: each arm's grid, extended outward while its best finished rate sits at an edge.

    Returns (runs, {arm: chosen rate or None while the arm's grid is unfinished}).
    """
    from .registry import get_arm

    runs, chosen = [], {}
    for arm in arms:
        rates = list(GRIDS[get_arm(arm).lr_family])
        done = {r["learning_rate"]: r["val_loss"] for r in records
                if r["arm"] == arm and r["tier"] == 1 and r["max_steps"] == steps and r["seed"] == BASE_SEED}
        while all(_has(done, lr) for lr in rates) and _extensions(rates, arm) < MAX_EXTENSIONS:
            best = min(rates, key=lambda lr: _get(done, lr))
            if best == rates[0]:
                rates.insert(0, rates[0] / GRID_FACTOR)
            elif best == rates[-1]:
                rates.append(rates[-1] * GRID_FACTOR)
            else:
                break
        runs += _grid_runs(arm, rates, steps)
        complete = all(_has(done, lr) for lr in rates)
        chosen[arm] = min(rates, key=lambda lr: _get(done, lr)) if complete else None
    return runs, chosen


def _extensions(rates: list[float], arm: str) -> int:
    from .registry import get_arm

    return len(rates) - len(GRIDS[get_arm(arm).lr_family])


def _has(done: dict, lr: float) -> bool:
    return any(math.isclose(k, lr, rel_tol=1e-6) for k in done)


def _get(done: dict, lr: float) -> float:
    return next(v for k, v in done.items() if math.isclose(k, lr, rel_tol=1e-6))


def plan(records: list[dict], steps: int, published_lr: float, tiers: Iterable[int] = (1, 2, 3)
         ) -> tuple[list[PlannedRun], list[str]]:
    """The runs the sweep needs, as far as the finished runs determine them, and notes on what is still open
    (tiers 2 and 3 need tier 1's chosen rates). ``published_lr``: the seed protocol's rate, at which
    ``grit_published`` (descriptive, one seed) runs the authors' recipe."""
    tiers = set(tiers)
    t1, chosen = tier1_plan(records, steps)
    # Tier 1 is always planned, and filtered out only after the merge: a tier-2 seed at the tier-1
    # configuration is the tier-1 run, whatever --tiers says, so its summary keeps tier 1 and tier 1
    # keeps the arm's chosen point.
    out = list(t1)
    notes = []
    chosen["loraplus"] = chosen.get("control")  # LoRA+ at the control's rate (its ratio is its own knob)
    chosen["grit_published"] = published_lr
    for arm, n in TIER2_SEEDS.items():
        lr = chosen.get(arm)
        if lr is None:
            notes.append(f"tier 2 {arm}: {n} seed(s) once tier 1 has chosen its learning rate")
            continue
        if 2 in tiers:
            out += [PlannedRun(2, arm, lr, BASE_SEED + k, steps, "full") for k in range(n)]
    for arm in TIER3_ARMS:
        lr = chosen.get(arm)
        if lr is None:
            notes.append(f"tier 3 {arm}: {TIER3_SEEDS} seeds x {TIER3_STEPS} steps once tier 1 has chosen its rate")
            continue
        if 3 in tiers:
            out += [PlannedRun(3, arm, lr, BASE_SEED + k, TIER3_STEPS, "full", TIER3_EVAL_STEPS)
                    for k in range(TIER3_SEEDS)]
    if 4 in tiers:
        from .claims import tier4_plan

        t4, n4 = tier4_plan(records, chosen, steps, PlannedRun, BASE_SEED)
        out += t4
        notes += n4
    merged = _merge_reused(out)
    return [r for r in merged if r.tier in tiers or (r.tier == 1 and r.evaluation == "full" and 2 in tiers)], notes


def _merge_reused(runs: list[PlannedRun]) -> list[PlannedRun]:
    """A tier-2 run at the tier-1 configuration is the tier-1 run with its full evaluation: one entry, kept
    at tier 1's place with evaluation 'full' once tier 2 asks for it."""
    by_name: dict[str, PlannedRun] = {}
    for r in runs:
        if r.name in by_name:
            first = by_name[r.name]
            by_name[r.name] = replace(first, evaluation="full") if r.evaluation == "full" else first
        else:
            by_name[r.name] = r
    return list(by_name.values())


def estimate(runs: list[PlannedRun], states: dict[str, str], records: list[dict]) -> float:
    """Seconds the runs not yet done will take: the mean measured time of each kind of run so far
    (``sweep.seconds`` in the summaries), else ``DEFAULT_SECONDS``."""
    measured: dict[str, list[float]] = {}
    for r in records:
        for kind, sec in (r.get("seconds") or {}).items():
            measured.setdefault(kind, []).append(sec)
    per = {k: (sum(v) / len(v) if (v := measured.get(k)) else DEFAULT_SECONDS[k]) for k in DEFAULT_SECONDS}
    total = 0.0
    for r in runs:
        st = states[r.name]
        if st != "done":
            total += per["evaluate"] if st == "needs_test" else per[run_kind(r)]
    return total


def run_kind(run: PlannedRun) -> str:
    return "long" if run.tier == 3 else "derived" if run.source is not None else run.evaluation


# ----------------------------------------------------------------------------- one run (child process)

def run_one(run: PlannedRun, preset_name: str, logdir: Path, adapters: Path, evaluate_only: bool) -> None:
    """Train (or, ``evaluate_only``, reload the saved adapter) and evaluate one planned run."""
    from . import arms, claims

    preset = _preset(preset_name, run)
    spec = arm_spec(run.arm)
    target = run_dir(logdir, run)
    adapter_dir = adapters / run.name / "adapter"
    t0 = time.time()
    trained = not evaluate_only and run.source is None
    if evaluate_only:
        res = arms.reload_arm(preset, spec, adapter_dir, target)
    elif run.source is not None:  # tier 4: cut a finished run's adapter; nothing is trained
        res = claims.run_truncated(run, preset, logdir, adapters)
    else:
        if target.exists():
            shutil.rmtree(target)  # an interrupted run: start it again from scratch
        target.parent.mkdir(parents=True, exist_ok=True)
        runner = arms.run_baseline if spec.stack == "unsloth+trl" else arms.run_hf
        kwargs = {}
        if run.ranks_from is not None:  # tier 4's control_rk
            kwargs["rank_pattern"] = claims.peft_rank_pattern(claims.ranks_of(logdir, run.ranks_from))
        res = runner(preset, spec, logdir=str(logdir), output_dir=str(adapters / run.name / "trainer"),
                     run_name=run.name, **kwargs)
        res.model.save_pretrained(str(adapter_dir))
    seconds = dict((read_summary(target, missing_ok=True) or {}).get("sweep", {}).get("seconds", {}))
    kind = "evaluate" if evaluate_only else run_kind(run)
    if run.evaluation == "full":
        arms.final_evaluation(res)
    else:  # tuning runs: no decoding, no test split; retention and drift are cheap and feed the frontier plot
        res.recorder.update(**arms.retention_figures(res))
    if trained:
        res.recorder.update(**claims.training_figures(res, adapter_dir))
    seconds[kind] = round(time.time() - t0, 1)
    res.recorder.update(sweep={"tier": run.tier, "definition": definition(run, preset_name), "seconds": seconds,
                               "adapter_dir": str(adapter_dir)})


# ----------------------------------------------------------------------------- report

VERDICT_MARKERS = ("<!-- verdict:start -->", "<!-- verdict:end -->")
CLAIMS_MARKERS = ("<!-- claims:start -->", "<!-- claims:end -->")
# The pages of docs/ that ``--report`` splices the verdict and the claims into (README gets the answer,
# grit_study.headline).
REPORT_PAGES = {"verdict": "verdict.md", "claims": "claims.md"}


def write_verdict(logdir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The verdict table and plots from the finished sweep runs under ``logdir`` (grit_study.report), written
    to ``out_dir`` (plots + ``verdict.md``); returns the Markdown. ``03_compare`` and ``--report`` call this."""
    from .files import atomic_write_text
    from .report import write_report

    # Tier 4 answers other questions (grit_study.claims): its runs stay out of the verdict's comparisons.
    records = [r for r in finished_records(Path(logdir)) if r["tier"] in VERDICT_TIERS]
    if not records:
        raise FileNotFoundError(f"no finished sweep runs under {logdir}; run `make sweep` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Only evaluated (arm, rate) pairs at each arm's chosen rate enter the comparison; tuning runs feed the
    # learning-rate plot and the frontier.
    md = write_report(records, out, image_prefix=str(out).rstrip("/") + "/")
    atomic_write_text(out / "verdict.md", md)
    return md


# ----------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR)
    parser.add_argument("--adapters", default=DEFAULT_ADAPTERS, help="where adapters are kept (not committed)")
    parser.add_argument("--preset", default=None, help="preset name (default: GRIT_PRESET or the auto choice)")
    parser.add_argument("--tiers", default="1,2,3,4", help="comma-separated tiers to run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimate only")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--only", default=None, help="comma-separated run names (arm/lr..._seed..._steps..) to run")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write the verdict and claims (plots + verdict.md, claims.md) and README's answer plot "
                        "from the finished runs into DIR; splice the verdict into docs/verdict.md, the claims into "
                        "docs/claims.md and the answer into README.md, each between its markers; trains nothing")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one run, JSON-encoded
    parser.add_argument("--evaluate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from .presets import resolve_preset

    preset_name = args.preset or resolve_preset().name
    logdir, adapters = Path(args.logdir), Path(args.adapters)
    if args.report is not None:
        from .headline import ANSWER_MARKERS, write_headline
        from .main import DOCS, REPO, include_text

        md = write_verdict(logdir, args.report)
        include_text(DOCS / REPORT_PAGES["verdict"], md, *VERDICT_MARKERS)
        claims_md = write_claims_report(logdir, args.report, preset_name)
        include_text(DOCS / REPORT_PAGES["claims"], claims_md, *CLAIMS_MARKERS)
        answer_md = write_headline(logdir, args.report)
        include_text(REPO / "README.md", answer_md, *ANSWER_MARKERS)
        print(answer_md + "\n\n" + md + "\n" + claims_md)
        return 0
    if args.one is not None:
        run_one(PlannedRun(**json.loads(args.one)), preset_name, logdir, adapters, args.evaluate_only)
        return 0

    base = resolve_preset(preset_name)
    steps = base.max_steps
    tiers = [int(t) for t in args.tiers.split(",")]
    done_runs = 0
    while True:
        records = finished_records(logdir) if logdir.is_dir() else []
        runs, notes = plan(records, steps, base.learning_rate, tiers)
        if args.only:
            wanted = set(args.only.split(","))
            runs = [r for r in runs if r.name in wanted]
        states = {r.name: status(logdir, r, preset_name) for r in runs}
        todo = [r for r in runs if states[r.name] != "done"]
        eta = estimate(runs, states, records)
        print(f"[sweep] preset {preset_name}, logdir {logdir}: {len(runs)} runs planned, {len(runs) - len(todo)} done, "
              f"{len(todo)} to do, estimated {eta / 60:.0f} min", flush=True)
        for r in runs:
            print(f"[sweep]   {states[r.name]:10s} {r.describe()}", flush=True)
        for n in notes:
            print(f"[sweep]   open: {n}", flush=True)
        if args.dry_run or not todo:
            return 0
        if args.max_runs is not None and done_runs >= args.max_runs:
            print(f"[sweep] stopping after {done_runs} run(s) (--max-runs)", flush=True)
            return 0
        run = todo[0]
        # A tier-1 run reused as a seed is evaluated from its saved adapter; adapters are not committed
        # (outputs/), so on another checkout it is trained again instead, from the same seed and code.
        evaluate_only = states[run.name] == "needs_test" and (adapters / run.name / "adapter").is_dir()
        print(f"[sweep] {'evaluating' if evaluate_only else 'running'} {run.describe()}", flush=True)
        cmd = [sys.executable, "-m", "grit_study.sweep", "--one", json.dumps(asdict(run)), "--logdir", str(logdir),
               "--adapters", str(adapters), "--preset", preset_name] + (["--evaluate-only"] if evaluate_only else [])
        t0 = time.time()
        proc = subprocess.run(cmd, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"[sweep] FAILED ({proc.returncode}) after {time.time() - t0:.0f} s: {run.describe()}", flush=True)
            return proc.returncode
        print(f"[sweep] finished in {time.time() - t0:.0f} s: {run.describe()}", flush=True)
        done_runs += 1


def write_claims_report(logdir: str | os.PathLike, out_dir: str | os.PathLike, preset_name: str) -> str:
    """README's "GRIT's claims" section (grit_study.claims) from the finished runs under ``logdir``, at the
    learning rates tier 1 chose; its plot goes to ``out_dir``."""
    from .claims import write_claims
    from .files import atomic_write_text
    from .presets import resolve_preset

    steps = resolve_preset(preset_name).max_steps
    records = finished_records(Path(logdir))
    _, chosen = tier1_plan(records, steps)
    out = Path(out_dir)
    md = write_claims(records, out, chosen=chosen, steps=steps, base_seed=BASE_SEED,
                      image_prefix=str(out).rstrip("/") + "/")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.md", md)
    return md


if __name__ == "__main__":
    sys.exit(main())
