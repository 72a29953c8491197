"""``make sweep``: the study's verdict protocol, in tiers, one run at a time, resumable.

    python -m grit_study.sweep --dry-run --preset smollm2-135m   # the plan and its estimated time, nothing run
    python -m grit_study.sweep --preset smollm2-135m             # run what is not done yet (skips finished runs)
    python -m grit_study.sweep --tiers 1                         # only tier 1 (of the auto preset)

Tiers (issue "A verdict with power"), as the synthetic study's protocol runs them; a pre-registered (real-data)
preset runs ``REGISTERED`` instead (``Protocol``, issue 22): ``control`` and ``grit`` tuned on the family grid,
``riemannian``, ``loraplus`` and ``grit_published`` on three rates x4 apart centred on the control's chosen rate
(LoRA+, whose lora_B moves 16 x faster, a step lower),
no SGD pair, tiers 2 and 3 at seeds after the tuning seed (the control's four pilot seeds before the
pre-registration, its seeds after), and tiers 1, 2, 3 and 5 by default:

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
5. IFEval on the deployed model, only when named (``--tiers 5``, or e.g. ``--tiers 3,5``: after the others):
   the base model converted to GGUF q8_0 by ``grit_study.ifeval.convert_base_gguf`` and every finished tier-3
   run's saved adapter merged and converted by ``grit_study.export.export_gguf``, both with the preset's
   tokenizer and chat template; greedy generation through llama.cpp with one ``--ifeval-max-new-tokens`` for
   all (default 512, recorded), scored with lm-eval's checkers (``grit_study.ifeval.run_ifeval``), every
   response saved. Results: ``<run_dir>/ifeval/`` and ``<root>/<preset>/base/ifeval/``; GGUFs under
   ``<adapters>/<preset>/<run>/export/`` and ``<adapters>/<preset>/base/gguf/`` (the merged folder is removed
   after conversion). Resumable: a model whose ``ifeval_summary.json`` is complete with the same settings is
   skipped, a partial one resumes from its saved responses; a folder holding responses made with another
   max_new_tokens is refused, never overwritten. ``--ifeval-limit N``: the first N prompts only (a smoke
   run, recorded and never done for the full tier). ``--arms``/``--only`` pick the runs (the base, named
   ``base`` for ``--only``, stays with ``--arms``). Needs llama-cpp-python (``make .venv/.llama-cpp-0.3.36``).
   The plan prints an upper-bound estimate: prompts left x max_new_tokens at the tokens/s measured by the
   preset's earlier IFEval summaries (else ``IFEVAL_DEFAULT_TOKENS_PER_S``), plus each export still to do.
   ``--report`` adds its table (``ifeval_markdown``) to the verdict once results exist.

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
import hashlib
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

from .files import PER_PROMPT_NAME, SUMMARY_NAME, read_summary

DEFAULT_LOGDIR = "tensorboard_logs/sweep"
DEFAULT_ADAPTERS = "outputs/sweep"
REPO = Path(__file__).resolve().parents[1]
BASE_SEED = 3407
# In the order they run: the arms without GRIT first (the synthetic protocol; ``Protocol`` below).
TIER1_ARMS = ("control", "riemannian", "control_sgd", "grit", "grit_sgd")
# x4 grids of four rates around each family's usual value (the real-data protocol tunes on at least four); SGD's
# centre is a first measurement's guess, and the edge rule moves the grid where the measurements say. The fourth
# rate is computed as the edge rule computes an extension, so the synthetic study's finished runs (whose grids were
# three rates, extended) are the same rates to the last bit.
GRID_FACTOR = 4.0
GRIDS = {"adamw": (5e-5, 2e-4, 8e-4, 8e-4 * GRID_FACTOR), "sgd": (5e-3, 2e-2, 8e-2, 8e-2 * GRID_FACTOR)}
MAX_EXTENSIONS = 2
TIER2_SEEDS = {"control": 5, "grit": 5, "riemannian": 3, "control_sgd": 3, "grit_sgd": 3, "loraplus": 3,
               "grit_published": 1}
TIER3_ARMS, TIER3_SEEDS, TIER3_STEPS, TIER3_EVAL_STEPS = ("control", "grit"), 3, 200, 25
# The real-data protocol (issue 22): peers tuned on x4 grids of three rates centred on the control's chosen
# rate; the pilot runs the control at the PILOT_SEEDS seeds after the tuning seed.
RELATIVE_GRID = (1 / GRID_FACTOR, 1.0, GRID_FACTOR)
PILOT_SEEDS = 4


@dataclass(frozen=True)
class Protocol:
    """Which arms a preset's sweep tunes (tier 1), on which grids, and how many seeds tiers 2 and 3 give each.

    ``synthetic`` is the protocol the synthetic study ran (its committed runs are its plan). ``registered``
    is the real-data protocol of a pre-registered preset (issue 22): ``control`` and ``grit`` tuned on the
    family grid, the peers ``riemannian``, ``loraplus`` and ``grit_published`` on grids of their own
    (``RELATIVE_GRID`` times the control's chosen rate, LoRA+'s a step lower), the SGD pair left out; no seed of tiers 2 and 3 is
    the tuning seed, so a rate is never tested on the run that chose it."""

    name: str
    tier1_arms: tuple[str, ...]
    relative_arms: tuple[str, ...] = ()      # tuned on RELATIVE_GRID x the control's chosen rate x its centre
    # A relative arm's grid centre as a fraction of the control's rate: LoRA+ moves lora_B at 16 x its rate, so
    # its grid starts a step lower (the synthetic study's LoRA+ diverged at the control's rate).
    relative_centres: tuple[tuple[str, float], ...] = ()
    at_control_rate: tuple[str, ...] = ()    # not tuned: run at the control's chosen rate
    at_published_rate: tuple[str, ...] = ()  # not tuned: run at the preset's (the seed protocol's) rate
    tier2_seeds: tuple[tuple[str, int], ...] = ()
    seed_offset: int = 0                     # tiers 2 and 3 use seeds BASE_SEED + seed_offset + k
    default_tiers: tuple[int, ...] = (1, 2, 3, 4)  # what `make sweep` runs without --tiers

    def seeds(self, n: int) -> list[int]:
        return [BASE_SEED + self.seed_offset + k for k in range(n)]


SYNTHETIC = Protocol("synthetic", TIER1_ARMS, at_control_rate=("loraplus",), at_published_rate=("grit_published",),
                     tier2_seeds=tuple(TIER2_SEEDS.items()))
REGISTERED = Protocol("registered", ("control", "grit", "riemannian", "loraplus", "grit_published"),
                      relative_arms=("riemannian", "loraplus", "grit_published"),
                      relative_centres=(("loraplus", 1 / GRID_FACTOR),),
                      tier2_seeds=(("control", PILOT_SEEDS), ("grit", 0), ("riemannian", 3), ("loraplus", 3),
                                   ("grit_published", 3)),
                      seed_offset=1, default_tiers=(1, 2, 3, 5))


def protocol_for(preset) -> Protocol:
    """``REGISTERED`` for a preset with a pre-registration (a real-data preset), else ``SYNTHETIC``."""
    return REGISTERED if getattr(preset, "preregistration", None) else SYNTHETIC
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


def tier1_plan(records: list[dict], steps: int, arms: Iterable[str] | None = None,
               protocol: Protocol = SYNTHETIC) -> tuple[list[PlannedRun], dict]:
    """Tier-1 runs: each arm's grid, extended outward while its best finished rate sits at an edge. An arm of
    ``protocol.relative_arms`` has its grid once the control's rate is chosen. ``arms``: a subset of the
    protocol's (default all of them).

    Returns (runs, {arm: chosen rate or None while the arm's grid is unfinished or not known yet}).
    """
    from .registry import get_arm

    runs, chosen = [], {}
    wanted = protocol.tier1_arms if arms is None else tuple(arms)
    # The control first: the relative grids are centred on its chosen rate.
    order = sorted(wanted, key=lambda a: (a in protocol.relative_arms, protocol.tier1_arms.index(a)
                                          if a in protocol.tier1_arms else len(protocol.tier1_arms)))
    for arm in order:
        if arm in protocol.relative_arms:
            centre = chosen.get("control") if "control" in chosen else tier1_plan(records, steps, ("control",),
                                                                                protocol)[1]["control"]
            if centre is None:
                chosen[arm] = None
                continue
            start = [centre * dict(protocol.relative_centres).get(arm, 1.0) * f for f in RELATIVE_GRID]
        else:
            start = list(GRIDS[get_arm(arm).lr_family])
        rates = list(start)
        done = {r["learning_rate"]: r["val_loss"] for r in records
                if r["arm"] == arm and r["tier"] == 1 and r["max_steps"] == steps and r["seed"] == BASE_SEED}
        while all(_has(done, lr) for lr in rates) and len(rates) - len(start) < MAX_EXTENSIONS:
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
    by_arm = {a: [r for r in runs if r.arm == a] for a in wanted}
    return [r for a in wanted for r in by_arm[a]], {a: chosen[a] for a in wanted}


def _has(done: dict, lr: float) -> bool:
    return any(math.isclose(k, lr, rel_tol=1e-6) for k in done)


def _get(done: dict, lr: float) -> float:
    return next(v for k, v in done.items() if math.isclose(k, lr, rel_tol=1e-6))


def plan(records: list[dict], steps: int, published_lr: float, tiers: Iterable[int] = (1, 2, 3), *,
         primary_seeds: Sequence[int] | None = None,
         protocol: Protocol = SYNTHETIC) -> tuple[list[PlannedRun], list[str]]:
    """The runs the sweep needs, as far as the finished runs determine them, and notes on what is still open
    (tiers 2 and 3 need tier 1's chosen rates). ``published_lr``: the seed protocol's rate, at which the
    protocol's ``at_published_rate`` arms run the authors' recipe. ``primary_seeds``: a pre-registration's
    seeds, which ``control`` and ``grit`` then run at in tier 2 instead of the protocol's count (under the
    registered protocol ``grit`` waits for them, and the control's count is the pilot's)."""
    tiers = set(tiers)
    notes: list[str] = []
    t1, chosen = tier1_plan(records, steps, protocol=protocol)
    if chosen.get("control") is None:
        notes += [f"tier 1 {arm}: {len(RELATIVE_GRID)} rates x{GRID_FACTOR:g} apart centred on the control's chosen "
                  "rate, once it is chosen" for arm in protocol.relative_arms]
    # Tier 1 is always planned, and filtered out only after the merge: a tier-2 seed at the tier-1
    # configuration is the tier-1 run, whatever --tiers says, so its summary keeps tier 1 and tier 1
    # keeps the arm's chosen point.
    out = list(t1)
    for arm in protocol.at_control_rate:  # LoRA+ at the control's rate (its ratio is its own knob)
        chosen[arm] = chosen.get("control")
    for arm in protocol.at_published_rate:
        chosen[arm] = published_lr
    for arm, n in protocol.tier2_seeds:
        seeds = (list(primary_seeds) if primary_seeds is not None and arm in ("control", "grit")
                 else protocol.seeds(n))
        if not seeds:
            notes.append(f"tier 2 {arm}: the pre-registered seeds, once the pre-registration is final")
            continue
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
            out += [PlannedRun(3, arm, lr, s, TIER3_STEPS, "full", TIER3_EVAL_STEPS)
                    for s in protocol.seeds(TIER3_SEEDS)]
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
    (``sweep.seconds`` in the summaries); a kind not measured yet takes its ``DEFAULT_SECONDS`` scaled by how
    much slower or faster the measured kinds ran than their defaults (a longer sequence, a slower machine)."""
    measured: dict[str, list[float]] = {}
    for r in records:
        for kind, sec in (r.get("seconds") or {}).items():
            if kind in DEFAULT_SECONDS:
                measured.setdefault(kind, []).append(sec)
    means = {k: sum(v) / len(v) for k, v in measured.items()}
    scale = (sum(means[k] / DEFAULT_SECONDS[k] for k in means) / len(means)) if means else 1.0
    per = {k: means.get(k, DEFAULT_SECONDS[k] * scale) for k in DEFAULT_SECONDS}
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
    ifeval_md = ifeval_markdown(logdir, preset)  # tier 5; "" without IFEval results (the block is unchanged)
    if ifeval_md:
        md = md.rstrip("\n") + "\n\n" + ifeval_md
    atomic_write_text(out / "verdict.md", md)
    return md


# ----------------------------------------------------------------------------- tier 5: IFEval on the deployed model

IFEVAL_TIER = 5
IFEVAL_DIR = "ifeval"   # a model's IFEval files (grit_study.ifeval): <run_dir>/ifeval/, <preset folder>/base/ifeval/
BASE_NAME = "base"      # the untuned base model's entry: <logdir>/<preset>/base/ and <adapters>/<preset>/base/
IFEVAL_OUTTYPE = "q8_0"  # what the study deploys (grit_study.arms.export_figures)
# The estimate before any summary measured a rate (a guess for llama.cpp on a 2-core CPU and SmolLM2-135M
# q8_0, prompt processing included), and before any export was timed (merge and convert of a 135M model).
IFEVAL_DEFAULT_TOKENS_PER_S = 30.0
IFEVAL_DEFAULT_EXPORT_S = 120.0
# The Makefile target that builds and installs llama-cpp-python (its LLAMA_STAMP; tests check the version).
LLAMA_CPP_MAKE_TARGET = ".venv/.llama-cpp-0.3.36"


@dataclass(frozen=True)
class IFEvalTarget:
    """One model the IFEval tier evaluates: the base (``run`` None) or a finished tier-3 run."""

    name: str          # "base" or the run's name (arm/lr.._seed.._steps..)
    out_dir: Path      # its IFEval files (committed with the logs)
    export_dir: Path   # its GGUF (under the adapters folder, not committed)
    run: PlannedRun | None = None

    @property
    def model_name(self) -> str:
        return BASE_NAME if self.run is None else f"grit-study-{self.run.arm}"

    @property
    def gguf_path(self) -> Path:
        return self.export_dir / f"{self.model_name}.{IFEVAL_OUTTYPE}.gguf"

    def exported(self) -> bool:
        """The GGUF is there, finished (export_gguf writes the Modelfile last; the base has none)."""
        return self.gguf_path.is_file() and (self.run is None or (self.export_dir / "Modelfile").is_file())


def ifeval_targets(logdir: Path, adapters: Path, preset_name: str) -> tuple[list[IFEvalTarget], list[str]]:
    """The base and every finished tier-3 run of the preset (``logdir``/``adapters``: the preset's folders),
    and notes on the tier-3 runs not finished yet (or stale: left out)."""
    from .presets import resolve_preset

    records = finished_records(logdir, preset_name) if logdir.is_dir() else []
    targets = [IFEvalTarget(BASE_NAME, logdir / BASE_NAME / IFEVAL_DIR, adapters / BASE_NAME / "gguf")]
    notes = []
    for rec in sorted((r for r in records if r["tier"] == 3), key=lambda r: r["run_dir"]):
        s = read_summary(rec["run_dir"])
        recorded = s["sweep"].get("definition") or {}
        run = PlannedRun(3, rec["arm"], rec["learning_rate"], rec["seed"], rec["max_steps"], "full",
                         (recorded.get("preset") or {}).get("eval_steps"))
        if Path(rec["run_dir"]) != run_dir(logdir, run) or status(logdir, run, preset_name) != "done":
            notes.append(f"{rec['run_dir']}: not a finished tier-3 run of the current definition; left out")
            continue
        targets.append(IFEvalTarget(run.name, run_dir(logdir, run) / IFEVAL_DIR, adapters / run.name / "export", run))
    base = resolve_preset(preset_name)
    planned, _ = plan(records, base.max_steps, base.learning_rate, (3,), protocol=protocol_for(base))
    waiting = [r for r in planned if r.tier == 3 and status(logdir, r, preset_name) != "done"]
    if waiting:
        notes.append(f"{len(waiting)} tier-3 run(s) not finished yet (--tiers 3); their IFEval follows once they are")
    elif not any(t.run is not None for t in targets):
        notes.append("no tier-3 run yet (tier 1 chooses the rates first): only the base can be evaluated")
    return targets, notes


def ifeval_status(target: IFEvalTarget, max_new_tokens: int, limit: int | None) -> str:
    """'done' (a summary with the sweep's record, these settings, and all 541 prompts, or with ``limit`` at
    least ``limit`` of them), 'other settings' (responses made with another max_new_tokens: refused, never
    deleted), or 'todo' (nothing yet, a limited or interrupted run: resumed from its saved responses)."""
    from . import ifeval

    run_file = target.out_dir / ifeval.RUN_NAME
    if run_file.is_file():
        old = json.loads(run_file.read_text(encoding="utf-8"))
        if old.get("max_new_tokens") != max_new_tokens:
            return "other settings"
    s = _read_ifeval_summary(target.out_dir)
    if s is None or "sweep" not in s or s.get("max_new_tokens") != max_new_tokens:
        return "todo"
    if s.get("complete") or (limit is not None and s.get("n_prompts", 0) >= limit):
        return "done"
    return "todo"


def _read_ifeval_summary(out_dir: Path) -> dict | None:
    from . import ifeval

    path = Path(out_dir) / ifeval.SUMMARY_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _saved_responses(out_dir: Path) -> int:
    """How many responses a model's folder holds (complete lines; read only, unlike ifeval.read_responses)."""
    from . import ifeval

    path = out_dir / ifeval.RESPONSES_NAME
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def ifeval_rates(summaries: Iterable[dict]) -> tuple[float, str, float, str]:
    """(tokens/s, where it comes from, export seconds, where they come from) for the estimate: the means of
    what earlier IFEval summaries of the preset measured, else ``IFEVAL_DEFAULT_TOKENS_PER_S`` and
    ``IFEVAL_DEFAULT_EXPORT_S``."""
    summaries = list(summaries)
    tps = [s["tokens_per_second"] for s in summaries if s.get("tokens_per_second")]
    exports = [x for s in summaries if (x := (s.get("sweep") or {}).get("seconds", {}).get("export"))]
    rate, rate_src = ((sum(tps) / len(tps), f"measured, mean of {len(tps)} summaries") if tps
                      else (IFEVAL_DEFAULT_TOKENS_PER_S, "default, none measured yet"))
    export_s, export_src = ((sum(exports) / len(exports), f"measured, mean of {len(exports)}") if exports
                            else (IFEVAL_DEFAULT_EXPORT_S, "default"))
    return rate, rate_src, export_s, export_src


def ifeval_estimate(targets: Sequence[IFEvalTarget], states: dict[str, str], adapters: Path, *, max_new_tokens: int,
                    limit: int | None, tokens_per_s: float, export_s: float, retrain_s: float) -> float:
    """Seconds the models not done will take, an upper bound: every prompt left generates ``max_new_tokens``
    at ``tokens_per_s``; a model whose GGUF is not on disk adds ``export_s``, and a run whose adapter is not
    on disk (adapters are not committed) ``retrain_s`` before that."""
    from . import ifeval

    total = 0.0
    for t in targets:
        if states[t.name] != "todo":
            continue
        left = max(0, (limit or ifeval.N_PROMPTS) - _saved_responses(t.out_dir))
        total += left * max_new_tokens / tokens_per_s
        if not t.exported():
            total += export_s
            if t.run is not None and not (adapters / t.run.name / "adapter" / "adapter_config.json").is_file():
                total += retrain_s
    return total


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (the tier's refusal), or None when ``import llama_cpp`` works."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return (f"tier {IFEVAL_TIER} (IFEval) generates through llama.cpp, but `import llama_cpp` failed ({e}); "
                f"build and install llama-cpp-python first: `make {LLAMA_CPP_MAKE_TARGET}`")
    return None


def ifeval_one(target: IFEvalTarget, preset_name: str, logdir: Path, adapters: Path, *, max_new_tokens: int,
               limit: int | None, progress: bool = True) -> dict:
    """Export ``target`` to GGUF q8_0 where its GGUF is not on disk (the base through ``convert_base_gguf``, a
    run's saved adapter merged into the preset's 16-bit base by ``export_gguf``, both with the preset's
    tokenizer and chat template), run IFEval on it (``run_ifeval``: resumes from saved responses), and add the
    sweep's record to its summary, last. Returns the summary."""
    from . import claims, ifeval
    from .export import chat_template_for, export_gguf
    from .files import atomic_write_text
    from .models import load_tokenizer
    from .presets import resolve_preset
    from .runs import SummaryFile

    preset = resolve_preset(preset_name) if target.run is None else _preset(preset_name, target.run)
    tokenizer = load_tokenizer(preset.model_id)
    jinja = chat_template_for(tokenizer, preset.template)
    old = _read_ifeval_summary(target.out_dir) or {}
    seconds = dict((old.get("sweep") or {}).get("seconds", {}))
    record: dict[str, Any] = {"tier": IFEVAL_TIER, "model": target.name, "export_dir": str(target.export_dir),
                              "outtype": IFEVAL_OUTTYPE, "template": preset.template, "merged_base": preset.model_id,
                              "chat_template_sha256": hashlib.sha256(jinja.encode()).hexdigest(),
                              "max_new_tokens": max_new_tokens, "limit": limit}
    t0 = time.time()
    if target.run is None:
        exported = target.exported()
        gguf = ifeval.convert_base_gguf(preset.model_id, target.export_dir, tokenizer=tokenizer,
                                        template=preset.template, outtype=IFEVAL_OUTTYPE, model_name=BASE_NAME)
    else:
        adapter_dir = adapters / target.run.name / "adapter"
        record["adapter_dir"], record["run_dir"] = str(adapter_dir), str(run_dir(logdir, target.run))
        exported = target.exported()
        if not exported:
            if not (adapter_dir / "adapter_config.json").is_file():  # adapters are not committed: train it again
                claims.retrain_source(preset, arm_spec(target.run.arm), SummaryFile(run_dir(logdir, target.run)).info,
                                      adapter_dir)
            result = export_gguf(adapter_dir, preset.model_id, target.export_dir, tokenizer=tokenizer,
                                 template=preset.template, outtype=IFEVAL_OUTTYPE, model_name=target.model_name)
            shutil.rmtree(result.merged_dir, ignore_errors=True)  # the GGUF is what is evaluated; merged/ is big
        gguf = target.gguf_path
    if not exported:
        seconds["export"] = round(time.time() - t0, 1)
    t0 = time.time()
    summary = ifeval.run_ifeval(gguf, target.out_dir, max_new_tokens=max_new_tokens, limit=limit, progress=progress)
    seconds["ifeval"] = round(time.time() - t0, 1)
    summary["sweep"] = {**record, "seconds": seconds}
    atomic_write_text(target.out_dir / ifeval.SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def run_ifeval_tier(preset_name: str, logdir: Path, adapters: Path, *, max_new_tokens: int, limit: int | None,
                    dry_run: bool = False, only: Sequence[str] | None = None, arms: Sequence[str] | None = None,
                    max_runs: int | None = None) -> int:
    """Tier 5: print the plan and its estimate, then evaluate each model not done yet, one after the other.
    Refused (2; 0 for a dry run, which still prints the plan) when llama.cpp is missing or a model's folder
    holds responses made with another ``max_new_tokens`` (never deleted: move it aside)."""
    from . import ifeval

    if max_new_tokens < 1:
        raise ValueError(f"--ifeval-max-new-tokens must be >= 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"--ifeval-limit must be >= 1, got {limit}")
    everything, notes = ifeval_targets(logdir, adapters, preset_name)
    targets = list(everything)
    if only:
        targets = [t for t in targets if t.name in set(only)]
    if arms:
        targets = [t for t in targets if t.run is None or t.run.arm in set(arms)]
    states = {t.name: ifeval_status(t, max_new_tokens, limit) for t in targets}
    todo = [t for t in targets if states[t.name] == "todo"]
    conflicts = [t for t in targets if states[t.name] == "other settings"]
    records = finished_records(logdir, preset_name) if logdir.is_dir() else []
    long = [sec for r in records if (sec := (r.get("seconds") or {}).get("long"))]
    rate, rate_src, export_s, export_src = ifeval_rates(
        s for t in everything if (s := _read_ifeval_summary(t.out_dir)))
    eta = ifeval_estimate(targets, states, adapters, max_new_tokens=max_new_tokens, limit=limit, tokens_per_s=rate,
                          export_s=export_s, retrain_s=sum(long) / len(long) if long else DEFAULT_SECONDS["long"])
    prompts = f"the first {limit} prompts (--ifeval-limit: a smoke run, never the tier's result)" if limit else \
        f"all {ifeval.N_PROMPTS} prompts"
    print(f"[sweep] tier {IFEVAL_TIER} (IFEval on the deployed GGUF {IFEVAL_OUTTYPE}), preset {preset_name}: "
          f"{len(targets)} models, {len(targets) - len(todo) - len(conflicts)} done, {len(todo)} to do"
          f"{f', {len(conflicts)} with other settings' if conflicts else ''}; greedy, "
          f"max_new_tokens {max_new_tokens}, {prompts}; estimated {eta / 60:.0f} min (at most: prompts left x "
          f"max_new_tokens / {rate:.1f} tokens/s ({rate_src}), + {export_s:.0f} s per export ({export_src}))",
          flush=True)
    for t in targets:
        extra = "" if states[t.name] == "done" else (
            f"  {_saved_responses(t.out_dir)} responses saved, "
            + ("GGUF on disk" if t.exported() else "GGUF to export" + (
                "" if t.run is None or (adapters / t.run.name / "adapter" / "adapter_config.json").is_file()
                else ", adapter not on disk: trained again first")) + f" ({t.gguf_path})")
        print(f"[sweep]   {states[t.name]:10s} ifeval {t.name} -> {t.out_dir}{extra}", flush=True)
    for n in notes:
        print(f"[sweep]   open: {n}", flush=True)
    if conflicts:
        print(f"[sweep] REFUSED: IFEval responses made with another max_new_tokens (never deleted): "
              + "; ".join(f"{t.out_dir} ({json.loads((t.out_dir / ifeval.RUN_NAME).read_text())['max_new_tokens']})"
                          for t in conflicts)
              + f". Pass that --ifeval-max-new-tokens, or move the folder(s) aside (e.g. under "
              "tensorboard_logs/archive/) to generate again with the new one", flush=True)
        return 0 if dry_run else 2
    why = llama_cpp_missing() if todo else None
    if why is not None:
        print(f"[sweep] REFUSED: {why}", flush=True)
        return 0 if dry_run else 2
    if dry_run or not todo:
        return 0
    for i, t in enumerate(todo):
        if max_runs is not None and i >= max_runs:
            print(f"[sweep] stopping after {i} IFEval model(s) (--max-runs)", flush=True)
            return 0
        print(f"[sweep] IFEval {t.name}", flush=True)
        t0 = time.time()
        s = ifeval_one(t, preset_name, logdir, adapters, max_new_tokens=max_new_tokens, limit=limit)
        print(f"[sweep] finished in {time.time() - t0:.0f} s: IFEval {t.name}: prompt strict "
              f"{s['prompt_level_strict_acc']:.3f}, n {s['n_prompts']}, ended by EOS {s['share_stop']:.0%}", flush=True)
    return 0


# ----------------------------------------------------------------------------- tier 5's report

IFEVAL_METRICS = (("prompt_level_strict_acc", "prompt strict"), ("prompt_level_loose_acc", "prompt loose"),
                  ("inst_level_strict_acc", "instruction strict"), ("inst_level_loose_acc", "instruction loose"))
IFEVAL_HEADLINE = ("ifeval_strict_mean", "IFEval (strict mean)")  # SmolLM2's authors' "IFEval" figure


def ifeval_results(logdir: str | os.PathLike, preset: str | None = None) -> list[dict[str, Any]]:
    """The IFEval summaries under a preset's folder (with the sweep's record): the base's first, then the
    finished tier-3 runs', each with ``model``, ``arm`` (None for the base), ``seed`` and ``dir``."""
    logdir = Path(logdir)
    out = []
    base = _read_ifeval_summary(logdir / BASE_NAME / IFEVAL_DIR)
    if base is not None and "sweep" in base:
        out.append({**base, "model": BASE_NAME, "arm": None, "seed": None, "dir": str(logdir / BASE_NAME / IFEVAL_DIR)})
    for rec in sorted(finished_records(logdir, preset), key=lambda r: (r["arm"], r["seed"], r["run_dir"])):
        d = Path(rec["run_dir"]) / IFEVAL_DIR
        s = _read_ifeval_summary(d)
        if rec["tier"] == 3 and s is not None and "sweep" in s:
            out.append({**s, "model": str(Path(rec["run_dir"]).relative_to(logdir)), "arm": rec["arm"],
                        "seed": rec["seed"], "dir": str(d)})
    return out


def _prompt_strict(folder: str | os.PathLike) -> dict[str, bool]:
    from . import ifeval

    path = Path(folder) / ifeval.SCORES_NAME
    if not path.is_file():
        return {}
    return {str(p["key"]): bool(p["prompt_strict"]) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() for p in [json.loads(line)]}


def ifeval_markdown(logdir: str | os.PathLike, preset: str | None = None) -> str:
    """The IFEval section of the verdict (tier 5), "" when the preset has no IFEval results: per model the four
    accuracies, n, max_new_tokens and the share ended by EOS, with the prompts it follows (strict) that the
    base does not and vice versa; per arm, mean ± sd over seeds, the difference to the base and its MDE, and
    grit − control paired by seed. Descriptive: no test, outside the verdict's comparison family."""
    from .stats import minimum_detectable_effect
    from .tables import cell, markdown_table, mean_sd, mean_sd_text

    from .ifeval import N_PROMPTS as N_IFEVAL_PROMPTS

    results = ifeval_results(logdir, preset)
    if not results:
        return ""
    base = next((r for r in results if r["arm"] is None), None)
    settings = lambda r: (r["max_new_tokens"], r["n_prompts"])  # noqa: E731
    ref = settings(base) if base is not None else max(
        {settings(r) for r in results}, key=lambda k: sum(settings(r) == k for r in results))
    base_keys = _prompt_strict(base["dir"]) if base is not None else {}
    rows = []
    for r in results:
        mine = _prompt_strict(r["dir"]) if r["arm"] is not None and base_keys else {}
        common = set(mine) & set(base_keys)
        gained = sum(mine[k] and not base_keys[k] for k in common)
        lost = sum(base_keys[k] and not mine[k] for k in common)
        rows.append([r["model"] + ("" if r.get("complete") else " (limited)"),
                     *[cell(r[k], ".3f") for k, _ in (*IFEVAL_METRICS, IFEVAL_HEADLINE)], cell(r["n_prompts"]),
                     cell(r["max_new_tokens"]), f"{r['share_stop']:.0%}",
                     f"+{gained} / −{lost}" if common else "–"])
    md = [f"### IFEval on the deployed model (tier {IFEVAL_TIER})", "",
          f"Each model exported to GGUF {IFEVAL_OUTTYPE} (the base through the same converter and chat template), "
          "greedy decoding through llama.cpp with one max_new_tokens for every prompt, scored with lm-eval's IFEval "
          "checkers (`grit_study.ifeval`; responses and per-prompt scores beside each summary). \"ended by EOS\": "
          "the share of responses that stopped by themselves rather than at max_new_tokens; \"vs base\": prompts "
          "this model follows (strict) that the base does not / that the base follows and it does not. "
          "Descriptive: no test and no p-value, outside the verdict's comparison family.", ""]
    limited = sorted({r["n_prompts"] for r in results if not r.get("complete")})
    if limited:
        md += [f"**Smoke run** (marked limited): only the first {' or '.join(map(str, limited))} of IFEval's "
               f"{N_IFEVAL_PROMPTS} prompts (--ifeval-limit); not IFEval's score.", ""]
    md += markdown_table(["model", *[n for _, n in IFEVAL_METRICS], IFEVAL_HEADLINE[1], "n", "max_new_tokens",
                          "ended by EOS", "vs base (strict prompts)"], rows) + [""]
    same = [r for r in results if r["arm"] is not None and settings(r) == ref]
    left_out = [r["model"] for r in results if settings(r) != ref]
    arms = sorted({r["arm"] for r in same})
    if arms:
        key = IFEVAL_HEADLINE[0]
        agg = []
        for arm in arms:
            vals = {r["seed"]: r[key] for r in same if r["arm"] == arm}
            mean, sd = mean_sd(list(vals.values()))
            delta = cell(mean - base[key], "+.3f") if base is not None else "–"
            mde = (cell(minimum_detectable_effect(sd, len(vals)).exact, ".3f") if sd is not None else "–")
            agg.append([arm, cell(len(vals)),
                        *[mean_sd_text(*mean_sd([r[k] for r in same if r["arm"] == arm]), ".3f")
                          for k, _ in (*IFEVAL_METRICS, IFEVAL_HEADLINE)], delta, mde])
        md += [f"Per arm over training seeds (mean ± sd, sd with n − 1; max_new_tokens {ref[0]}, {ref[1]} prompts). "
               f"Δ vs base: the arm's mean {IFEVAL_HEADLINE[1]} minus the base's; MDE: the smallest true difference "
               "from a fixed value that a t-test at these seeds would detect with 80% power at alpha 0.05 "
               "(noncentral t, observed sd): the resolution of the design, not a test.", ""]
        md += markdown_table(["arm", "seeds", *[n for _, n in IFEVAL_METRICS], IFEVAL_HEADLINE[1], "Δ vs base",
                              "MDE"], agg) + [""]
        by = {a: {r["seed"]: r[IFEVAL_HEADLINE[0]] for r in same if r["arm"] == a} for a in ("grit", "control")}
        seeds = sorted(set(by["grit"]) & set(by["control"]))
        if len(seeds) >= 2:
            diffs = [by["grit"][s] - by["control"][s] for s in seeds]
            mean, sd = mean_sd(diffs)
            md += [f"grit − control, paired by seed ({len(seeds)} seeds), {IFEVAL_HEADLINE[1]}: "
                   f"{mean:+.3f} ± {sd:.3f} (MDE {minimum_detectable_effect(sd, len(seeds)).exact:.3f}).", ""]
    if left_out:
        md += [f"Left out of the per-arm rows (other max_new_tokens or number of prompts than "
               f"{'the base' if base is not None else 'most'}): {', '.join(left_out)}.", ""]
    return "\n".join(md)


# ----------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR, help="the log root; each preset's runs go to <root>/<preset>/")
    parser.add_argument("--adapters", default=DEFAULT_ADAPTERS,
                        help="where adapters are kept (not committed), per preset in <adapters>/<preset>/")
    parser.add_argument("--preset", default=None, help="preset name (default: GRIT_PRESET or the auto choice)")
    parser.add_argument("--tiers", default=None,
                        help="comma-separated tiers to run (default: the preset's protocol's, 1,2,3,4 for the synthetic "
                        f"study, 1,2,3,{IFEVAL_TIER} for a pre-registered preset); tier {IFEVAL_TIER} (IFEval on the "
                        "deployed GGUF of the base and of every finished tier-3 run, through llama.cpp) runs after "
                        "the others")
    parser.add_argument("--ifeval-max-new-tokens", type=int, default=None, metavar="N",
                        help="tier 5: one generation limit for every model and prompt, recorded in each summary "
                        "(default 512, grit_study.ifeval.DEFAULT_MAX_NEW_TOKENS); a folder holding responses made "
                        "with another value is refused, never overwritten")
    parser.add_argument("--ifeval-limit", type=int, default=None, metavar="N",
                        help="tier 5: only IFEval's first N prompts (a smoke run: recorded, marked not complete, "
                        "never counted as done for the full tier)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimate only")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--commit", action="store_true",
                        help="commit each finished run's log folder to git as it finishes (only that folder; a long "
                        "sweep's logs land run by run)")
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
    protocol = protocol_for(resolve_preset(preset_name))
    tiers = ([int(t) for t in args.tiers.split(",")] if args.tiers is not None else list(protocol.default_tiers))
    unknown = sorted(set(tiers) - {1, 2, 3, 4, IFEVAL_TIER})
    if unknown:
        parser.error(f"--tiers: no tier {unknown} (tiers 1-4 train and evaluate, {IFEVAL_TIER} is IFEval)")
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
    train_tiers = [t for t in tiers if t != IFEVAL_TIER]
    done_runs = 0
    while train_tiers:
        records = finished_records(logdir, preset_name) if logdir.is_dir() else []
        runs, notes = plan(records, steps, base.learning_rate, train_tiers,
                           primary_seeds=prereg.seeds if prereg is not None else None, protocol=protocol_for(base))
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
            break
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
        if args.commit:
            commit_run(run_dir(logdir, run), f"Sweep {preset_name} {' '.join(run.describe().split())}")
        done_runs += 1
    if IFEVAL_TIER in tiers:
        from .ifeval import DEFAULT_MAX_NEW_TOKENS

        max_new = args.ifeval_max_new_tokens if args.ifeval_max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
        left = None if args.max_runs is None else max(0, args.max_runs - done_runs)
        return run_ifeval_tier(preset_name, logdir, adapters, max_new_tokens=max_new, limit=args.ifeval_limit,
                               dry_run=args.dry_run, only=args.only.split(",") if args.only else None,
                               arms=args.arms.split(",") if args.arms else None, max_runs=left)
    return 0


COMMIT_RETRY_S = 2.0


def commit_run(folder: Path, message: str, repo: str | os.PathLike = REPO) -> bool:
    """Commit ``folder`` (a finished run's logs) and nothing else: other staged or unstaged changes stay as they
    are. A failure (no git, a lock held by another commit) is printed and the sweep goes on: the logs are on
    disk, and a later ``git add`` commits them. Returns whether a commit was made."""
    rel = os.path.relpath(Path(folder).resolve(), Path(repo).resolve())
    for args in (["add", "--", rel], ["commit", "-q", "-m", message, "--only", "--", rel]):
        for attempt in range(3):
            try:
                out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
            except FileNotFoundError:
                print("[sweep] --commit: git is not installed; the run's logs are not committed", flush=True)
                return False
            if out.returncode == 0:
                break
            time.sleep(COMMIT_RETRY_S * (attempt + 1))  # another git command may hold the index lock
        else:
            print(f"[sweep] --commit: git {args[0]} failed for {rel}: {out.stderr.strip()}; commit it by hand",
                  flush=True)
            return False
    print(f"[sweep] committed {rel}: {message}", flush=True)
    return True


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

    preset = resolve_preset(preset_name)
    steps = preset.max_steps
    records = finished_records(Path(logdir), preset_name)
    _, chosen = tier1_plan(records, steps, protocol=protocol_for(preset))
    out = Path(out_dir)
    md = write_claims(records, out, chosen=chosen, steps=steps, base_seed=BASE_SEED,
                      image_prefix=str(out).rstrip("/") + "/")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.md", md)
    return md


if __name__ == "__main__":
    sys.exit(main())
