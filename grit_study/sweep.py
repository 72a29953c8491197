"""``make sweep``: the study's verdict protocol, in tiers, one run at a time, resumable.

    python -m grit_study.sweep --dry-run --preset smollm2-135m   # the plan and its estimated time, nothing run
    python -m grit_study.sweep --preset smollm2-135m             # run what is not done yet (skips finished runs)
    python -m grit_study.sweep --tiers 1                         # only tier 1 (of the auto preset)

Tiers (issue "A verdict with power"):

1. Tuning on the validation split: every tuned arm at a x4 learning-rate grid around its family's
   usual value, one seed, ``preset.max_steps`` steps, validation loss only (no decoding, no test).
   The adapter is saved. Whenever an arm's best rate sits at an edge of what it tried, one more point
   outward is added (at most ``MAX_EXTENSIONS`` per arm). Each arm's rate is the one with the lowest
   final validation loss (``grit_study.stats.choose_learning_rates``).
2. Seeds at each chosen configuration, with the full evaluation (test loss, exact match with every
   prediction saved, retention KL, drift): ``control`` and ``grit`` at 5 seeds (a pre-registered preset: its
   ``seeds``), the others at 3, ``grit_published`` at 1, ``loraplus`` at the control's rate. The tier-1 run
   is one of the seeds: its saved adapter is evaluated on the test split instead of retraining.
3. Length: ``control`` and ``grit`` for ``TIER3_STEPS`` steps at 3 seeds, evaluated every 25 steps.
4. GRIT's other claims (``grit_study.claims``): ``grit_full`` at 3 seeds, its adapter and the control's cut
   to GRIT's ranks, ``control_rk``, and the one-seed regularizer and EMA runs. A cut whose source adapter
   is not on disk trains the source again first and checks it reproduces the committed run. Reported
   apart from the verdict (``--report`` writes both), so it never enters the verdict's comparison family.

Layout: one folder per preset under the log root (``--logdir``, ``tensorboard_logs/sweep/`` by default),
``<root>/<preset>/<arm>/lr<lr>_seed<seed>_steps<steps>/``; adapters likewise under ``<adapters>/<preset>/``.
A preset's sweep reads, plans and writes only its own folder, and only records whose summary names that
preset, so presets sharing a root leave each other alone. Runs directly under the root (``<root>/<arm>/<run>``,
the layout before per-preset folders) are refused with a message saying where to move them.

Every run runs in its own process (``python -m grit_study.sweep --one ...``). A run is done when its
``run_summary.json`` records the same definition (``definition``: arm, preset fields, learning rate, seed,
steps, evaluation). A directory without a summary, or whose summary has no sweep record yet (the sweep writes
it last), is an interrupted run and is started again from scratch. A finished run of another definition is
'stale': the sweep never deletes it; it stops and names it, and the user moves it aside (e.g. under
``tensorboard_logs/archive/``) or restores the definition.

Pre-registration (``grit_study.prereg``): a preset whose ``preregistration`` field names a file runs arms other
than ``control`` only once that file is final and committed in git; each run records the commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .files import SUMMARY_NAME, read_summary

DEFAULT_LOGDIR = "tensorboard_logs/sweep"
DEFAULT_ADAPTERS = "outputs/sweep"
REPO = Path(__file__).resolve().parents[1]
PER_PROMPT_NAME = "per_prompt.jsonl"  # per-prompt test losses next to run_summary.json (grit_study.stats)
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
# Arms compared with another reference than the control, in the verdict's family (issue 21): the SGD pair.
VERDICT_PAIRS = (("grit_sgd", "control_sgd"),)

# The Preset and ArmSpec fields that the definitions of the committed sweep runs hold
# (tensorboard_logs/sweep/smollm2-135m). A field added later is a *later field*: ``definition`` leaves it out
# while it holds its default, so adding a field never turns finished runs stale; set to anything else it is
# part of the definition (a run that uses it is another run). Never add a name here: that would make every
# finished run stale.
DEFINITION_PRESET_FIELDS = frozenset((
    "name", "model_id", "baseline_model_id", "device", "load_in_4bit", "compute_dtype", "lora_r", "lora_alpha",
    "lora_dropout", "use_rslora", "lora_targets", "per_device_train_batch_size", "gradient_accumulation_steps",
    "warmup_steps", "max_steps", "learning_rate", "weight_decay", "lr_scheduler_type", "max_grad_norm", "optim",
    "seed", "data_seed", "max_seq_length", "gradient_checkpointing", "data", "num_examples", "val_size",
    "test_size", "template", "eval_steps", "logging_steps", "save_steps", "kfac_update_freq", "eval_batch_size"))
DEFINITION_ARM_FIELDS = frozenset((
    "name", "description", "stack", "notebook", "optimizer", "grit", "peer", "peer_args", "loss_on_padding", "group"))


class SweepRefusal(RuntimeError):
    """The sweep will not go on: stale runs, runs in the old layout, or a missing pre-registration."""


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

def preset_logdir(root: str | os.PathLike, preset_name: str) -> Path:
    """A preset's own folder under the log (or adapter) root: ``<root>/<preset>``."""
    if not preset_name or "/" in preset_name or preset_name in (".", ".."):
        raise ValueError(f"{preset_name!r} cannot name a log folder")
    return Path(root) / preset_name


def legacy_runs(root: str | os.PathLike) -> list[Path]:
    """Sweep runs directly under ``root`` (``<root>/<arm>/<run>/run_summary.json``): the layout before per-preset
    folders. The sweep refuses to run beside them (``check_layout``)."""
    return sorted(p.parent for p in Path(root).glob(f"*/*/{SUMMARY_NAME}"))


def check_layout(root: str | os.PathLike) -> None:
    """Raise ``SweepRefusal`` when ``root`` holds runs in the old layout, saying where they belong."""
    old = legacy_runs(root)
    if old:
        presets = sorted({str((read_summary(p) or {}).get("preset")) for p in old})
        raise SweepRefusal(f"{len(old)} run(s) under {root} are in the layout before per-preset folders (e.g. {old[0]}); "
                           f"move each into {root}/<its preset>/ (presets found: {presets}), e.g. `mkdir -p "
                           f"{root}/{presets[0]} && mv {root}/<arm> {root}/{presets[0]}/` for every arm folder "
                           "(or, if this is a preset's folder, pass its parent, the root, as --logdir)")


def run_dir(logdir: Path, run: PlannedRun) -> Path:
    """Where ``run`` lives; ``logdir`` is the preset's folder (``preset_logdir``)."""
    return logdir / run.name


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def definition_fields(obj: Any, original: frozenset[str]) -> dict[str, Any]:
    """A dataclass's fields for a run definition (tuples as lists, as JSON holds them), without the later
    fields (not in ``original``) that hold their default."""
    values = asdict(obj)
    out = {}
    for f in dataclasses.fields(obj):
        value = values[f.name]
        if f.name not in original and value == _default(f):
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def definition(run: PlannedRun, preset_name: str) -> dict[str, Any]:
    """What makes a run the same run: a finished summary with an equal definition is skipped.

    Strict on purpose: every preset field and the arm's whole registry entry, except the *later fields*
    (``DEFINITION_PRESET_FIELDS``): a field added to Preset or ArmSpec after the committed runs is left out
    while it holds its default. Any other change (an edited preset value or arm) makes a finished run 'stale',
    and the sweep stops at it: such a change must be decided before a sweep, never during one."""
    from . import claims

    preset = _preset(preset_name, run)
    return {"arm": definition_fields(arm_spec(run.arm), DEFINITION_ARM_FIELDS),
            "preset": definition_fields(preset, DEFINITION_PRESET_FIELDS), "learning_rate": run.learning_rate,
            "seed": run.seed, "steps": run.steps, **claims.definition_extra(run)}


def definition_differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two definitions differ (for the stale-run message)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(recorded) | set(current), key=str):
            out += definition_differences(recorded.get(k), current.get(k), f"{prefix}{k}.")
        return out
    return [] if recorded == current else [f"{prefix.rstrip('.')}: {recorded!r} -> {current!r}"]


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
    """'done', 'needs_test' (trained, its full evaluation missing), 'stale' (a finished run of another
    definition: never deleted, the sweep stops), or 'todo' (nothing there, or an interrupted run: no summary,
    or a summary without the sweep's record, which is written last). ``logdir``: the preset's folder."""
    s = read_summary(run_dir(logdir, run), missing_ok=True)
    if s is None or "sweep" not in s:
        return "todo"
    if s["sweep"].get("definition") != definition(run, preset_name):
        return "stale"
    if run.evaluation == "full" and "test_loss" not in s:
        return "needs_test"
    return "done"


def stale_message(logdir: Path, runs: Iterable[PlannedRun], preset_name: str) -> str:
    """Why each stale run is stale (the keys that differ) and what to do; the sweep deletes none of them."""
    lines = []
    for r in runs:
        recorded = read_summary(run_dir(logdir, r))["sweep"].get("definition")
        diff = definition_differences(recorded, definition(r, preset_name))
        lines.append(f"  {run_dir(logdir, r)}: {len(diff)} difference(s) (recorded -> now): {'; '.join(diff[:4])}"
                     f"{' ...' if len(diff) > 4 else ''}")
    return ("finished run(s) of another definition (stale); the sweep never deletes a finished run. Move each "
            "aside (e.g. `mv <dir> tensorboard_logs/archive/...`) to train it again under the current definition, "
            "or restore the definition it was run with:\n" + "\n".join(lines))


def read_per_prompt(run_dir_: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The run's per-prompt test losses (``per_prompt.jsonl``: one ``{"id", "nll_sum", "tokens"}`` per line, see
    ``grit_study.stats``), or None when the run has none. A line that is not JSON raises naming the file."""
    path = Path(run_dir_) / PER_PROMPT_NAME
    if not path.is_file():
        return None
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path} line {i}: not JSON ({e})") from None
    return rows


def check_per_prompt(per_prompt: list[dict[str, Any]], test_loss: float | None, where: str) -> None:
    """Σ nll_sum / Σ tokens must be the run's test loss (1e-4 relative): else the file is not what it claims."""
    from .stats import parse_per_prompt

    parsed = parse_per_prompt(per_prompt, where)
    if test_loss is None or not parsed:
        return
    pooled = sum(v for v, _ in parsed.values()) / sum(t for _, t in parsed.values())
    if not math.isclose(pooled, test_loss, rel_tol=1e-4):
        raise ValueError(f"{where}: Σ nll_sum / Σ tokens = {pooled:.6g}, but the run's test loss is {test_loss:.6g}; "
                         "per_prompt.jsonl must hold each prompt's summed NLL and token count")


def finished_records(logdir: Path, preset: str | None = None) -> list[dict[str, Any]]:
    """Every finished sweep run under ``logdir`` as a record for grit_study.stats / report.

    ``preset``: only runs whose summary names it (runs of other presets are not counted). Without it the runs
    must be of one preset (a summary without a preset name counts as any), else ValueError: pass ``preset=``."""
    out = []
    for f in sorted(Path(logdir).rglob(SUMMARY_NAME)):
        s = read_summary(f.parent)
        if "sweep" not in s or (preset is not None and s.get("preset") != preset):
            continue
        evals = {int(k): v for k, v in s.get("eval_loss", {}).items()}
        per_prompt = read_per_prompt(f.parent)
        if per_prompt is not None:
            check_per_prompt(per_prompt, s.get("test_loss"), str(f.parent / PER_PROMPT_NAME))
        out.append({
            "arm": s["arm"], "learning_rate": s["learning_rate"], "seed": s["seed"], "max_steps": s["max_steps"],
            "tier": s["sweep"]["tier"], "val_loss": evals[max(evals)] if evals else None, "preset": s.get("preset"),
            "val_loss_curve": evals, "test_loss": s.get("test_loss"), "exact_match": s.get("exact_match"),
            "exact_match_by_family": s.get("exact_match_by_family", {}), "predictions": s.get("test_predictions"),
            "per_prompt": per_prompt, "retention_kl": s.get("retention_kl"), "drift": s.get("drift"),
            "median_s_per_step": s.get("median_s_per_step"), "median_cpu_s_per_step": s.get("median_cpu_s_per_step"),
            "seconds": s.get("sweep", {}).get("seconds"), "run_dir": str(f.parent),
            # What tier 4's report (grit_study.claims) reads besides.
            "parameters": s.get("trainable_parameters"), "adapter_bytes": s.get("adapter_bytes"),
            "truncation": s.get("truncation"), "projector_truncation": s.get("projector_truncation"),
            "parameter_curve": s.get("parameter_curve"), "source_test_loss": s.get("source_test_loss"),
            "grit_metrics": s.get("grit_metrics", {}), "grit_config": s.get("grit_config"),
        })
    if preset is None:
        names = sorted({r["preset"] for r in out if r["preset"] is not None})
        if len(names) > 1:
            raise ValueError(f"runs of several presets under {logdir} ({names}): pass preset= (or read the preset's "
                             "own folder, <root>/<preset>)")
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


def plan(records: list[dict], steps: int, published_lr: float, tiers: Iterable[int] = (1, 2, 3), *,
         primary_seeds: Sequence[int] | None = None) -> tuple[list[PlannedRun], list[str]]:
    """The runs the sweep needs, as far as the finished runs determine them, and notes on what is still open
    (tiers 2 and 3 need tier 1's chosen rates). ``published_lr``: the seed protocol's rate, at which
    ``grit_published`` (descriptive, one seed) runs the authors' recipe. ``primary_seeds``: a pre-registration's
    seeds, which ``control`` and ``grit`` then run at in tier 2 instead of their ``TIER2_SEEDS`` count."""
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
        seeds = (list(primary_seeds) if primary_seeds is not None and arm in ("control", "grit")
                 else [BASE_SEED + k for k in range(n)])
        lr = chosen.get(arm)
        if lr is None:
            notes.append(f"tier 2 {arm}: {len(seeds)} seed(s) once tier 1 has chosen its learning rate")
            continue
        if 2 in tiers:
            out += [PlannedRun(2, arm, lr, s, steps, "full") for s in seeds]
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

def preregistration_record(run: PlannedRun, preset_name: str, repo: str | os.PathLike = REPO) -> dict | None:
    """What the run records of its preset's pre-registration (``grit_study.prereg.require_for_run``): None for
    a preset without one; raises ``PreregistrationError`` for a run the pre-registration does not allow yet."""
    from .prereg import require_for_run
    from .presets import resolve_preset

    return require_for_run(resolve_preset(preset_name), run.arm, repo=repo)


def clear_interrupted(target: Path, run: PlannedRun, preset_name: str) -> None:
    """Delete ``target`` before training ``run`` into it, only when it is an interrupted run (no summary, or no
    sweep record in it) or this very run (same definition: a tier-1 run trained again because its adapter is
    not on disk). A finished run of another definition raises ``SweepRefusal``: never deleted."""
    s = read_summary(target, missing_ok=True)
    if s is not None and "sweep" in s and s["sweep"].get("definition") != definition(run, preset_name):
        raise SweepRefusal(stale_message(target.parents[1], [run], preset_name))
    if target.exists():
        shutil.rmtree(target)


def run_one(run: PlannedRun, preset_name: str, logdir: Path, adapters: Path, evaluate_only: bool, *,
            repo: str | os.PathLike = REPO) -> None:
    """Train (or, ``evaluate_only``, reload the saved adapter) and evaluate one planned run. ``logdir`` and
    ``adapters``: the preset's folders. Refused (``PreregistrationError``) before anything is trained when the
    preset's pre-registration does not allow the run; otherwise its commit goes into the sweep record."""
    from . import arms, claims

    prereg = preregistration_record(run, preset_name, repo)
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
        clear_interrupted(target, run, preset_name)
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
    record = {"tier": run.tier, "definition": definition(run, preset_name), "seconds": seconds,
              "adapter_dir": str(adapter_dir)}
    if prereg is not None:
        record["preregistration"] = prereg
    res.recorder.update(sweep=record)


# ----------------------------------------------------------------------------- report

VERDICT_MARKERS = ("<!-- verdict:start -->", "<!-- verdict:end -->")
CLAIMS_MARKERS = ("<!-- claims:start -->", "<!-- claims:end -->")
# The pages of docs/ that ``--report`` splices the verdict and the claims into (README gets the answer,
# grit_study.headline).
REPORT_PAGES = {"verdict": "verdict.md", "claims": "claims.md"}


def verdict_records(logdir: str | os.PathLike, preset: str | None = None) -> list[dict[str, Any]]:
    """The records the verdict and README's answer read: finished runs of tiers 1-3 (tier 4 answers other
    questions, ``grit_study.claims``, and stays out of the verdict's comparisons)."""
    return [r for r in finished_records(Path(logdir), preset) if r["tier"] in VERDICT_TIERS]


def verdict_preregistration(preset_name: str | None, repo: str | os.PathLike = REPO):
    """The preset's final pre-registration (``grit_study.prereg.Preregistration``) for the report, or None: no
    preset given, a preset without one, or one not final yet (then the report says it is not pre-registered)."""
    if preset_name is None:
        return None
    from .prereg import PreregistrationError, load_preregistration, preregistration_path
    from .presets import resolve_preset

    rel = preregistration_path(resolve_preset(preset_name))
    if rel is None:
        return None
    try:
        return load_preregistration(Path(repo) / rel, final=True)
    except PreregistrationError:
        return None


def has_preregistration(preset_name: str | None) -> bool:
    """Whether the preset names a pre-registration file (a real-data preset), final or not."""
    from .prereg import preregistration_path
    from .presets import resolve_preset

    return preset_name is not None and preregistration_path(resolve_preset(preset_name)) is not None


def write_verdict(logdir: str | os.PathLike, out_dir: str | os.PathLike, preset: str | None = None) -> str:
    """The verdict table and plots from the finished sweep runs under ``logdir`` (a preset's folder, or a root
    holding one preset's runs; ``preset`` filters), written to ``out_dir`` (plots + ``verdict.md``); returns the
    Markdown. A preset with a final pre-registration gets its pre-registered primary (TOST); any other is
    marked as not pre-registered. ``03_compare`` and ``--report`` call this."""
    from .files import atomic_write_text
    from .report import NOT_FINAL_NOTE, REANALYSIS_NOTE, write_report

    records = verdict_records(logdir, preset)
    if not records:
        raise FileNotFoundError(f"no finished sweep runs under {logdir}; run `make sweep` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Only evaluated (arm, rate) pairs at each arm's chosen rate enter the comparison; tuning runs feed the
    # learning-rate plot and the frontier.
    md = write_report(records, out, image_prefix=str(out).rstrip("/") + "/", pairs=VERDICT_PAIRS,
                      preregistration=verdict_preregistration(preset),
                      note=NOT_FINAL_NOTE if has_preregistration(preset) else REANALYSIS_NOTE)
    atomic_write_text(out / "verdict.md", md)
    return md


# ----------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR, help="the log root; each preset's runs go to <root>/<preset>/")
    parser.add_argument("--adapters", default=DEFAULT_ADAPTERS,
                        help="where adapters are kept (not committed), per preset in <adapters>/<preset>/")
    parser.add_argument("--preset", default=None, help="preset name (default: GRIT_PRESET or the auto choice)")
    parser.add_argument("--tiers", default="1,2,3,4", help="comma-separated tiers to run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimate only")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--only", default=None, help="comma-separated run names (arm/lr..._seed..._steps..) to run")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (e.g. control: a pilot)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write the verdict and claims (plots + verdict.md, claims.md) and README's answer plot "
                        "from the preset's finished runs into DIR; splice the verdict into docs/verdict.md, the "
                        "claims into docs/claims.md and the answer into README.md, each between its markers; "
                        "trains nothing")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one run, JSON-encoded
    parser.add_argument("--evaluate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from .presets import resolve_preset

    preset_name = args.preset or resolve_preset().name
    root = Path(args.logdir)
    logdir, adapters = preset_logdir(root, preset_name), preset_logdir(args.adapters, preset_name)
    try:
        check_layout(root)
    except SweepRefusal as e:
        print(f"[sweep] REFUSED: {e}", flush=True)
        return 2
    if args.report is not None:
        from .headline import ANSWER_MARKERS, write_headline
        from .main import DOCS, include_text

        md = write_verdict(logdir, args.report, preset_name)
        include_text(DOCS / REPORT_PAGES["verdict"], md, *VERDICT_MARKERS)
        claims_md = write_claims_report(logdir, args.report, preset_name)
        include_text(DOCS / REPORT_PAGES["claims"], claims_md, *CLAIMS_MARKERS)
        answer_md = write_headline(logdir, args.report, preset=preset_name)
        include_text(REPO / "README.md", answer_md, *ANSWER_MARKERS)
        print(answer_md + "\n\n" + md + "\n" + claims_md)
        return 0
    if args.one is not None:
        run_one(PlannedRun(**json.loads(args.one)), preset_name, logdir, adapters, args.evaluate_only)
        return 0

    from .prereg import PreregistrationError

    base = resolve_preset(preset_name)
    prereg = verdict_preregistration(preset_name)
    mismatch = prereg_mismatch(prereg, base) if prereg is not None else None
    if mismatch:
        print(f"[sweep] REFUSED: {prereg.path}: {mismatch}", flush=True)
        return 2
    _print_preregistration(base)
    steps = base.max_steps
    tiers = [int(t) for t in args.tiers.split(",")]
    done_runs = 0
    while True:
        records = finished_records(logdir, preset_name) if logdir.is_dir() else []
        runs, notes = plan(records, steps, base.learning_rate, tiers,
                           primary_seeds=prereg.seeds if prereg is not None else None)
        if args.only:
            wanted = set(args.only.split(","))
            runs = [r for r in runs if r.name in wanted]
        if args.arms:
            wanted_arms = set(args.arms.split(","))
            runs = [r for r in runs if r.arm in wanted_arms]
        states = {r.name: status(logdir, r, preset_name) for r in runs}
        todo = [r for r in runs if states[r.name] != "done"]
        stale = [r for r in runs if states[r.name] == "stale"]
        eta = estimate(runs, states, records)
        print(f"[sweep] preset {preset_name}, logdir {logdir}: {len(runs)} runs planned, {len(runs) - len(todo)} done, "
              f"{len(todo)} to do, estimated {eta / 60:.0f} min", flush=True)
        for r in runs:
            print(f"[sweep]   {states[r.name]:10s} {r.describe()}", flush=True)
        for n in notes:
            print(f"[sweep]   open: {n}", flush=True)
        if stale:
            print(f"[sweep] REFUSED: {stale_message(logdir, stale, preset_name)}", flush=True)
            return 0 if args.dry_run else 2
        if args.dry_run or not todo:
            return 0
        run = todo[0]
        try:
            preregistration_record(run, preset_name)
        except PreregistrationError as e:
            print(f"[sweep] REFUSED: {e}. Control-only runs are allowed before it: --arms control", flush=True)
            return 3
        if args.max_runs is not None and done_runs >= args.max_runs:
            print(f"[sweep] stopping after {done_runs} run(s) (--max-runs)", flush=True)
            return 0
        # A tier-1 run reused as a seed is evaluated from its saved adapter; adapters are not committed
        # (outputs/), so on another checkout it is trained again instead, from the same seed and code.
        evaluate_only = states[run.name] == "needs_test" and (adapters / run.name / "adapter").is_dir()
        print(f"[sweep] {'evaluating' if evaluate_only else 'running'} {run.describe()}", flush=True)
        cmd = [sys.executable, "-m", "grit_study.sweep", "--one", json.dumps(asdict(run)), "--logdir", str(root),
               "--adapters", str(args.adapters), "--preset", preset_name] + (["--evaluate-only"] if evaluate_only else [])
        t0 = time.time()
        proc = subprocess.run(cmd, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"[sweep] FAILED ({proc.returncode}) after {time.time() - t0:.0f} s: {run.describe()}", flush=True)
            return proc.returncode
        print(f"[sweep] finished in {time.time() - t0:.0f} s: {run.describe()}", flush=True)
        done_runs += 1


def prereg_mismatch(prereg, preset) -> str | None:
    """What a final pre-registration fixes that this sweep would not run as fixed, or None: its tuning seed
    (the sweep tunes with ``BASE_SEED``), its run length (the preset's ``max_steps``) and its comparison
    (the sweep's seeds go to ``grit`` and ``control``)."""
    if prereg.tuning_seed != BASE_SEED:
        return f"field 'tuning_seed' is {prereg.tuning_seed}, but the sweep tunes with seed {BASE_SEED}"
    if prereg.steps != preset.max_steps:
        return f"field 'primary.steps' is {prereg.steps}, but preset {preset.name} runs {preset.max_steps} steps"
    if (prereg.arm, prereg.reference) != ("grit", "control"):
        return (f"fields 'primary.arm'/'primary.reference' are {prereg.arm}/{prereg.reference}; the sweep's "
                "pre-registered seeds run grit and control")
    return None


def _print_preregistration(preset, repo: str | os.PathLike = REPO) -> None:
    """One line on the preset's pre-registration: none needed, committed (its commit), or why GRIT runs are
    refused for now."""
    from .prereg import PreregistrationError, preregistration_path, require_for_run

    rel = preregistration_path(preset)
    if rel is None:
        return
    try:
        record = require_for_run(preset, "grit", repo=repo)
        print(f"[sweep] pre-registration {rel}: commit {record['commit']}", flush=True)
    except PreregistrationError as e:
        print(f"[sweep] pre-registration not ready, runs of arms other than control will be refused: {e}", flush=True)


def write_claims_report(logdir: str | os.PathLike, out_dir: str | os.PathLike, preset_name: str) -> str:
    """README's "GRIT's claims" section (grit_study.claims) from the finished runs of ``preset_name`` under
    ``logdir``, at the learning rates tier 1 chose; its plot goes to ``out_dir``."""
    from .claims import write_claims
    from .files import atomic_write_text
    from .presets import resolve_preset

    steps = resolve_preset(preset_name).max_steps
    records = finished_records(Path(logdir), preset_name)
    _, chosen = tier1_plan(records, steps)
    out = Path(out_dir)
    md = write_claims(records, out, chosen=chosen, steps=steps, base_seed=BASE_SEED,
                      image_prefix=str(out).rstrip("/") + "/")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.md", md)
    return md


if __name__ == "__main__":
    sys.exit(main())
