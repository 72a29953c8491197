"""The sweep's verdict table and plots, from a list of run records (see ``grit_study.stats``).

    md = write_report(records, "readme_files")   # writes the PNGs there, returns the Markdown

Sections, one per run length (60-step tier 2, 200-step tier 3): per arm mean ± sd over seeds; per arm
vs control the paired difference, its interval, p, the computed verdict and the MDE; exact match by
family. Then the tuning table (tier 1) and three plots:
- ``val_loss_by_step.png``: val loss vs step per arm, line = mean over seeds, band = min-max over seeds;
- ``lr_sweep.png``: final val loss vs learning rate per tuned arm (tier 1, log x), chosen rate starred;
- ``retention_frontier.png``: retention KL vs val-loss gain over the base model (step-0 val loss minus
  final val loss) for every run that recorded both. Val, not test: tuning runs have no test loss, and
  one quantity on one axis for every point is what makes the frontier readable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .stats import (METRICS, Comparison, FinalRuns, LearningRateChoice, choose_learning_rates,
                    compare_to_control, final_runs, normalize_records)
from .tables import markdown_table, mean_sd, mean_sd_text

SUMMARY_COLUMNS = (  # (record key, column title, format)
    ("test_loss", "test loss", ".4f"),
    ("exact_match", "exact match", ".3f"),
    ("retention_kl", "retention KL", ".4g"),
    ("drift", "drift", ".4g"),
    ("median_s_per_step", "s/step", ".2f"),
)
METRIC_TITLES = {"test_loss": "test loss", "exact_match": "exact match", "retention_kl": "retention KL",
                 "drift": "drift"}
PLOTS = ("val_loss_by_step.png", "lr_sweep.png", "retention_frontier.png")


# ----------------------------------------------------------------------------- numbers

def arm_summary(runs: FinalRuns, arm_order: Sequence[str]) -> list[dict[str, Any]]:
    """Per arm: learning rate, seeds, and (mean, sd with ddof=1, n) over seeds of each summary column."""
    rows = []
    for arm in arm_order:
        by_seed = runs.by_arm.get(arm)
        if not by_seed:
            continue
        row: dict[str, Any] = {"arm": arm, "learning_rate": runs.learning_rate[arm], "seeds": sorted(by_seed)}
        for key, _, _ in SUMMARY_COLUMNS:
            vals = [r[key] for r in by_seed.values() if r[key] is not None]
            row[key] = (*mean_sd(vals), len(vals)) if vals else None
        rows.append(row)
    return rows


def family_exact_match(runs: FinalRuns, arm_order: Sequence[str]) -> dict[str, dict[str, float]]:
    """arm -> family -> exact match averaged over the arm's seeds (runs without it are skipped)."""
    out = {}
    for arm in arm_order:
        fams: dict[str, list[float]] = {}
        for r in runs.by_arm.get(arm, {}).values():
            for f, v in (r["exact_match_by_family"] or {}).items():
                fams.setdefault(f, []).append(v)
        if fams:
            out[arm] = {f: float(np.mean(v)) for f, v in sorted(fams.items())}
    return out


# ----------------------------------------------------------------------------- markdown

def _cell(stat: tuple[float, float | None, int] | None, spec: str, n_seeds: int) -> str:
    if stat is None:
        return "–"
    mean, sd, n = stat
    return mean_sd_text(mean, sd, spec) + (f" (n={n})" if n != n_seeds else "")


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["arm", "lr", "seeds"] + [title for _, title, _ in SUMMARY_COLUMNS]
    body = [[r["arm"], f"{r['learning_rate']:.3g}", str(len(r["seeds"]))]
            + [_cell(r[k], spec, len(r["seeds"])) for k, _, spec in SUMMARY_COLUMNS] for r in rows]
    return markdown_table(header, body)


def comparison_markdown(comps: Sequence[Comparison], reference: str) -> list[str]:
    header = ["arm", "metric", "method", "seeds", f"Δ (arm − {reference})", "interval", "p", "verdict", "MDE", "note"]
    body = []
    for c in comps:
        title = METRIC_TITLES.get(c.metric, c.metric)
        if c.diff is None:
            body.append([c.arm, title, c.method, str(c.n), "–", "–", "–", "descriptive", "–", c.note])
            continue
        d, v = c.diff, c.verdict
        interval = f"[{d.lower:+.4g}, {d.upper:+.4g}] ({100 * d.confidence:.4g}%)"
        p = "–" if c.p_adjusted is None else f"{c.p_adjusted:.3g}"
        verdict = f"**{v.label}**" if c.role == "primary" else v.label
        body.append([c.arm, title + (" (primary)" if c.role == "primary" else ""), c.method, str(c.n),
                     f"{d.mean:+.4g}", interval, p, verdict, f"{v.mde:.3g}", c.note])
    return markdown_table(header, body)


def family_markdown(fam: Mapping[str, Mapping[str, float]]) -> list[str]:
    families = sorted({f for per in fam.values() for f in per})
    return markdown_table(["arm"] + families, [[arm] + [f"{per[f]:.3f}" if f in per else "–" for f in families]
                                               for arm, per in fam.items()])


def tuning_markdown(choices: Mapping[str, LearningRateChoice]) -> list[str]:
    body = []
    for arm, c in choices.items():
        cells = ", ".join(f"{lr:.3g}: {c.val_loss[lr]:.4f}" + ("*" if lr == c.best else "") for lr in c.grid)
        edge = "–" if c.at_edge is None else f"{c.at_edge} edge: add {c.next_point:.3g}"
        body.append([arm, cells, f"{c.best:.3g}", edge])
    return markdown_table(["arm", "final val loss by learning rate (* = chosen)", "chosen lr", "grid edge"], body)


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _colors(arm_order: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(arm_order)}


def plot_val_curves(groups: Sequence[FinalRuns], arm_order: Sequence[str], path: Path) -> Path:
    """One panel per run length; per arm the mean val loss over seeds and a min-max band, on the steps
    every seed of the arm evaluated."""
    plt = _plt()
    colors = _colors(arm_order)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for arm in arm_order:
            curves = [r["val_loss_curve"] for r in g.by_arm.get(arm, {}).values() if r["val_loss_curve"]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            y = np.array([[c[s] for s in steps] for c in curves])  # (seeds, steps)
            ax.plot(steps, y.mean(axis=0), marker=".", color=colors[arm], label=f"{arm} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, y.min(axis=0), y.max(axis=0), color=colors[arm], alpha=0.2)
        ax.set(title=f"val loss, {g.max_steps} steps\nline: mean over seeds; band: min-max over seeds",
               xlabel="optimizer step (0 = base model)", ylabel="cross-entropy (response tokens)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_sweep(choices: Mapping[str, LearningRateChoice], arm_order: Sequence[str], path: Path) -> Path:
    """Final val loss vs learning rate (log x) per tuned arm; diverged points are drawn as x at the top."""
    plt = _plt()
    colors = _colors(arm_order)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    finite = [v for c in choices.values() for v in c.val_loss.values() if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    for arm, c in choices.items():
        ok = [lr for lr in c.grid if math.isfinite(c.val_loss[lr])]
        ax.plot(ok, [c.val_loss[lr] for lr in ok], marker="o", color=colors.get(arm), label=arm)
        ax.plot([c.best], [c.val_loss[c.best]], marker="*", markersize=14, color=colors.get(arm), linestyle="none")
        if c.diverged:
            ax.plot(c.diverged, [top] * len(c.diverged), marker="x", color=colors.get(arm), linestyle="none")
    ax.set_xscale("log")
    grid = sorted({lr for c in choices.values() for lr in c.grid})
    ax.set_xticks(grid, [f"{lr:.3g}" for lr in grid], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(title="tier 1: final val loss vs learning rate (* = chosen, x = diverged)",
           xlabel="learning rate (log scale)", ylabel="final val loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier_points(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Runs with a retention KL and a val curve that includes step 0: their val-loss gain over the base."""
    out = []
    for r in normalize_records(records):
        curve = r["val_loss_curve"] or {}
        if r["retention_kl"] is not None and 0 in curve:
            out.append({"arm": r["arm"], "tier": r["tier"], "gain": curve[0] - r["val_loss"],
                        "retention_kl": r["retention_kl"]})
    return out


def plot_retention_frontier(points: Sequence[Mapping[str, Any]], arm_order: Sequence[str], path: Path) -> Path:
    plt = _plt()
    colors = _colors(arm_order)
    markers = {1: "o", 2: "s", 3: "^"}
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for arm in arm_order:
        for tier, mk in markers.items():
            pts = [p for p in points if p["arm"] == arm and p["tier"] == tier]
            if pts:
                ax.scatter([p["gain"] for p in pts], [p["retention_kl"] for p in pts], color=colors[arm], marker=mk,
                           label=f"{arm} (tier {tier})")
    ax.set(title="retention frontier: lower right is better", xlabel="val loss gain over the base model "
           "(step-0 val loss − final val loss)", ylabel="retention KL(base ‖ tuned)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report

def _arm_order(records: Sequence[Mapping[str, Any]], reference: str, primary_arm: str | None,
               given: Sequence[str] | None) -> list[str]:
    seen = list(dict.fromkeys(r["arm"] for r in records))
    head = list(given) if given is not None else [a for a in (reference, primary_arm) if a]
    return [a for a in head if a in seen] + [a for a in seen if a not in head]


def write_report(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, *, reference: str = "control",
                 primary_arm: str = "grit", primary_steps: int | None = None,
                 learning_rates: Mapping[str, float] | None = None, arm_order: Sequence[str] | None = None,
                 image_prefix: str | None = None, n_boot: int = 10_000, rng_seed: int = 0) -> str:
    """Write the plots into ``out_dir`` and return the report as Markdown.

    ``records``: every run of the sweep (tiers 1-3), dicts as ``grit_study.stats.normalize_record`` reads.
    ``primary_steps``: the run length whose ``primary_arm`` vs ``reference`` test-loss comparison is the
    primary one (default: the shortest length at which both arms were evaluated); at other lengths every
    comparison is secondary, in that length's own Holm family. ``learning_rates``: arm -> rate, only
    needed when an arm was evaluated at several rates. ``image_prefix``: how the Markdown links the
    PNGs (default: ``out_dir`` as given).
    """
    recs = normalize_records(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = str(out_dir) if image_prefix is None else image_prefix
    order = _arm_order(recs, reference, primary_arm, arm_order)
    lengths = sorted({r["max_steps"] for r in recs if r["test_loss"] is not None})
    groups = [final_runs(recs, max_steps=s, learning_rates=learning_rates) for s in lengths]
    if primary_steps is None:
        both = [g.max_steps for g in groups if {reference, primary_arm} <= set(g.by_arm)]
        primary_steps = both[0] if both else None

    md = ["### Verdict, computed from the sweep logs", "",
          f"Differences are arm − {reference}, paired by training seed (same LoRA init and data order). "
          f"The primary comparison is {primary_arm} vs {reference} on test loss at "
          f"{f'{primary_steps} steps' if primary_steps else 'the tier-2 length (none evaluated yet)'}, "
          "with an uncorrected 95% t-interval. Every other row of a table is in one family per run length: "
          "p is Holm-adjusted and the interval is a Bonferroni (1 − 0.05/m) t-interval. The verdict is "
          "computed: better/worse only when the interval excludes 0 (lower is better for loss, KL and drift; "
          "higher for exact match), otherwise no detectable difference, with the MDE: the smallest true "
          "difference the design detects with 80% power at the row's level (noncentral t, observed sd). "
          "Bootstrap rows resample test prompts (same prompts for both arms, pooled over shared seeds, "
          "stratified by family); their MDE is the normal approximation from the bootstrap se.", ""]
    if not groups:  # tuning only so far: say so rather than print an empty verdict
        md += ["**No verdict yet**: no run has been evaluated on the test split (tier 2 has not run). "
               "What follows is the tuning so far.", ""]
    for g in groups:
        primary = (primary_arm, "test_loss") if g.max_steps == primary_steps else None
        comps = compare_to_control(recs, reference=reference, primary=primary, metrics=METRICS,
                                   max_steps=g.max_steps, learning_rates=learning_rates, n_boot=n_boot,
                                   rng_seed=rng_seed)
        md += [f"### {g.max_steps} steps", "", "Per arm, mean ± sd over seeds (sd with n − 1):", ""]
        md += summary_markdown(arm_summary(g, order)) + [""]
        md += [f"Each arm vs {reference}:", ""] + comparison_markdown(comps, reference) + [""]
        fam = family_exact_match(g, order)
        if fam:
            md += ["Exact match by family (mean over seeds):", ""] + family_markdown(fam) + [""]

    paths = []
    tuned = {r["arm"] for r in recs if r["tier"] == 1}
    choices = choose_learning_rates(recs, [a for a in order if a in tuned]) if tuned else {}
    if choices:
        md += ["### Tuning (tier 1, final val loss)", ""] + tuning_markdown(choices) + [""]
    if groups:
        paths.append(plot_val_curves(groups, order, out / PLOTS[0]))
    if choices:
        paths.append(plot_lr_sweep(choices, order, out / PLOTS[1]))
    else:
        md += ["No tier-1 runs: no learning-rate plot.", ""]
    points = frontier_points(recs)
    if points:
        paths.append(plot_retention_frontier(points, order, out / PLOTS[2]))
    else:
        md += ["No run recorded both a retention KL and a step-0 val loss: no retention frontier.", ""]
    md += ["### Plots", ""] + [f"![{p.stem}]({os.path.join(prefix, p.name)})" for p in paths] + [""]
    return "\n".join(md)
