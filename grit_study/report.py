"""The sweep's verdict table and plots, from a list of run records (see ``grit_study.stats``).

    md = write_report(records, "readme_files")   # writes the PNGs there, returns the Markdown

Sections, one per run length (60-step tier 2, 200-step tier 3): per arm mean ± sd over seeds; per arm
vs control (and grit_sgd vs control_sgd) the paired difference, its interval, p, the computed verdict and the
MDE, with a crossed bootstrap beside the t where there is per-prompt data; with a pre-registration
(``grit_study.prereg``) the primary's equivalence decision; exact match by family. Then the tuning table
(tier 1) and three plots:
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

from .stats import (CROSSED, INCONCLUSIVE, METRICS, PAIRED_T, Comparison, FinalRuns, LearningRateChoice,
                    choose_learning_rates, compare_to_control, final_runs, normalize_records)
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


def _mde_cell(c: Comparison) -> str:
    v = c.verdict
    if v is None or v.mde is None:
        return "–"
    return f"{v.mde:.3g}" + (f" / {v.mde_upper:.3g}" if v.mde_upper is not None else "")


def comparison_markdown(comps: Sequence[Comparison], reference: str) -> list[str]:
    """The comparison table; a row against another reference (grit_sgd vs control_sgd) names it in the arm cell.
    MDE: at the observed sd / at the sd's one-sided 95% upper bound (paired t rows)."""
    header = ["arm", "metric", "method", "seeds", "Δ (arm − reference)", "interval", "p", "verdict",
              "MDE (sd / sd 95% upper)", "note"]
    body = []
    for c in comps:
        title = METRIC_TITLES.get(c.metric, c.metric)
        arm = c.arm if c.reference == reference else f"{c.arm} vs {c.reference}"
        d = c.diff
        if d is None:
            body.append([arm, title, c.method, str(c.n), "–", "–", "–", "descriptive", "–", c.note])
            continue
        interval = f"[{d.lower:+.4g}, {d.upper:+.4g}] ({100 * d.confidence:.4g}%)"
        if c.verdict is None:
            body.append([arm, title, c.method, str(c.n), f"{d.mean:+.4g}", interval, "–", "descriptive", "–", c.note])
            continue
        p = "–" if c.p_adjusted is None else f"{c.p_adjusted:.3g}"
        verdict = f"**{c.verdict.label}**" if c.role == "primary" else c.verdict.label
        body.append([arm, title + (" (primary)" if c.role == "primary" else ""), c.method, str(c.n),
                     f"{d.mean:+.4g}", interval, p, verdict, _mde_cell(c), c.note])
    return markdown_table(header, body)


INCOMPLETE = "incomplete"
ANALYSIS_NAMES = {"paired_t": "paired t over seeds", "crossed_bootstrap": "crossed bootstrap"}


def preregistered_decision(comps: Sequence[Comparison], prereg) -> dict[str, Any]:
    """The primary's decision under ``prereg`` (``grit_study.prereg.Preregistration``): the TOST of the analysis it
    names (``decides``), the other analysis beside it, whether they disagree, and "incomplete" while the primary
    lacks any of the pre-registered seeds (or the deciding analysis has no data)."""
    rows = {c.method: c for c in comps if c.role == "primary" and c.equivalence is not None}
    deciding = rows.get(PAIRED_T if prereg.decides == "paired_t" else CROSSED)
    other = rows.get(CROSSED if prereg.decides == "paired_t" else PAIRED_T)
    t_row = rows.get(PAIRED_T)
    seeds = set(t_row.diff.seeds) if t_row is not None else set()
    missing = sorted(set(prereg.seeds) - seeds)
    extra = sorted(seeds - set(prereg.seeds))
    if deciding is None:
        label, why = INCOMPLETE, f"the deciding analysis ({ANALYSIS_NAMES[prereg.decides]}) has no data yet"
    elif missing or extra:
        label, why = INCOMPLETE, (f"the primary's seeds differ from the pre-registered {list(prereg.seeds)} "
                                  f"(missing {missing}, not pre-registered {extra})")
    else:
        label, why = deciding.equivalence.label, ""
    disagree = (deciding is not None and other is not None
                and deciding.equivalence.label != other.equivalence.label)
    return {"label": label, "why": why, "deciding": deciding, "other": other, "disagree": disagree}


def preregistered_markdown(comps: Sequence[Comparison], prereg) -> list[str]:
    dec = preregistered_decision(comps, prereg)
    md = [f"**Pre-registered primary** ({prereg.arm} − {prereg.reference}, {METRIC_TITLES.get(prereg.metric)}, "
          f"{prereg.steps} steps; `{prereg.path}`): **{dec['label']}**" + (f" ({dec['why']})" if dec["why"] else "")
          + "."]
    for key, what in (("deciding", "Deciding analysis"), ("other", "Beside it (not deciding)")):
        c = dec[key]
        if c is not None:
            e = c.equivalence
            p = f"; TOST p = {e.p:.3g}" if e.p is not None else ""
            md[-1] += f" {what}: {e.text}{p}."
    if dec["disagree"]:
        md[-1] += (" The two analyses disagree; the pre-registered one decides and the other is reported, "
                   "not taken.")
    return md + [""]


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


def tuned_arms(records: Iterable[Mapping[str, Any]]) -> set[str] | None:
    """The arms whose learning rate was chosen on val (those with tier-1 runs); None when no record is from tier 1
    (then every arm counts as tuned)."""
    tuned = {r["arm"] for r in records if r["tier"] == 1}
    return tuned or None


def verdict_comparisons(records: Sequence[Mapping[str, Any]], max_steps: int, *, primary: tuple[str, str] | None,
                        reference: str = "control", learning_rates: Mapping[str, float] | None = None,
                        pairs: Sequence[tuple[str, str]] = (), margin: float | None = None, n_boot: int = 10_000,
                        rng_seed: int = 0) -> list[Comparison]:
    """The verdict's comparisons at one run length, the one call the verdict table and README's answer
    (``grit_study.headline``) share: tuned arms in the Holm family, untuned arms and drift descriptive,
    ``pairs`` besides the control, crossed-bootstrap rows where there is per-prompt data."""
    return compare_to_control(records, reference=reference, primary=primary, metrics=METRICS, max_steps=max_steps,
                              learning_rates=learning_rates, n_boot=n_boot, rng_seed=rng_seed,
                              tuned=tuned_arms(records), pairs=pairs, margin=margin)


def apply_diverged_rule(records: list[dict[str, Any]], prereg) -> tuple[list[dict[str, Any]], list[int]]:
    """The pre-registration's ``diverged_runs`` rule on the primary's runs (its arms, at its length): a test loss
    that is not finite is replaced by the base model's (base_loss), or that seed's records of both arms lose
    their test evaluation (exclude_pair). Returns (records, affected seeds)."""
    from .prereg import apply_diverged_rule as rule

    mine = [r for r in records if r["arm"] in (prereg.arm, prereg.reference) and r["max_steps"] == prereg.steps
            and r["test_loss"] is not None]
    a = {r["seed"]: r["test_loss"] for r in mine if r["arm"] == prereg.arm}
    b = {r["seed"]: r["test_loss"] for r in mine if r["arm"] == prereg.reference}
    a2, b2, bad = rule(a, b, prereg.diverged_rule, prereg.base_test_loss)
    if not bad:
        return records, []
    out = []
    for r in records:
        if any(r is m for m in mine) and r["seed"] in bad:
            fixed = (a2 if r["arm"] == prereg.arm else b2).get(r["seed"])
            r = {**r, "test_loss": fixed} if fixed is not None else {**r, "test_loss": None}
        out.append(r)
    return out, bad


# Why an arm of the synthetic protocol ran at a rate it was not tuned for (grit_study.sweep.SYNTHETIC); under the
# registered protocol every arm is tuned.
UNTUNED_REASONS = {"loraplus": "loraplus at the control's rate", "grit_published": "grit_published at the published rate"}


def _untuned_text(recs: Sequence[Mapping[str, Any]], order: Sequence[str]) -> str:
    """The arms evaluated without tier-1 runs of their own, with the rate they ran at where known."""
    tuned = tuned_arms(recs)
    untuned = [a for a in order if tuned is not None and a not in tuned]
    untuned = [a for a in UNTUNED_REASONS if a in untuned] + [a for a in untuned if a not in UNTUNED_REASONS]
    return ", ".join(UNTUNED_REASONS.get(a, a) for a in untuned) if untuned else "none here"


REANALYSIS_NOTE = ("**A re-analysis after the fact (issue 21), not pre-registered.** These runs were planned with "
                   "every other arm in one Holm family (untuned arms and drift labelled too) and exact match "
                   "bootstrapped over prompts only; the tables below re-analyse the same logs with the rules above.")
NOT_FINAL_NOTE = ("**Not pre-registered yet**: this preset's pre-registration is not final (or not readable), so its "
                  "primary is shown as a t-interval, not as the pre-registered equivalence test.")


def write_report(records: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, *, reference: str = "control",
                 primary_arm: str = "grit", primary_steps: int | None = None,
                 learning_rates: Mapping[str, float] | None = None, arm_order: Sequence[str] | None = None,
                 image_prefix: str | None = None, n_boot: int = 10_000, rng_seed: int = 0,
                 pairs: Sequence[tuple[str, str]] = (), preregistration=None, note: str = REANALYSIS_NOTE) -> str:
    """Write the plots into ``out_dir`` and return the report as Markdown.

    ``records``: every run of the sweep (tiers 1-3), dicts as ``grit_study.stats.normalize_record`` reads.
    ``primary_steps``: the run length whose ``primary_arm`` vs ``reference`` test-loss comparison is the
    primary one (default: the pre-registration's, else the shortest length at which both arms were
    evaluated); at other lengths every comparison is secondary, in that length's own Holm family.
    ``learning_rates``: arm -> rate, only needed when an arm was evaluated at several rates. ``image_prefix``:
    how the Markdown links the PNGs (default: ``out_dir`` as given). ``pairs``: (arm, reference) compared besides
    the control (``verdict_comparisons``). ``preregistration``: a final ``grit_study.prereg.Preregistration``:
    its primary as an equivalence test (``preregistered_markdown``); None: the block says it is not
    pre-registered, in ``note`` (default ``REANALYSIS_NOTE``, the synthetic study's; ``NOT_FINAL_NOTE`` for a
    preset whose pre-registration is not final yet).
    """
    recs = normalize_records(records)
    prereg = preregistration
    diverged: list[int] = []
    if prereg is not None:
        primary_arm, reference, primary_steps = prereg.arm, prereg.reference, prereg.steps
        recs, diverged = apply_diverged_rule(recs, prereg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = str(out_dir) if image_prefix is None else image_prefix
    order = _arm_order(recs, reference, primary_arm, arm_order)
    lengths = sorted({r["max_steps"] for r in recs if r["test_loss"] is not None})
    groups = [final_runs(recs, max_steps=s, learning_rates=learning_rates) for s in lengths]
    if primary_steps is None:
        both = [g.max_steps for g in groups if {reference, primary_arm} <= set(g.by_arm)]
        primary_steps = both[0] if both else None
    when = f"{primary_steps} steps" if primary_steps else "the tier-2 length (none evaluated yet)"
    if prereg is None:
        primary_text = (f"The primary comparison is {primary_arm} vs {reference} on test loss at {when}, with an "
                        "uncorrected 95% t-interval.")
    else:
        primary_text = (f"The primary comparison is {primary_arm} vs {reference} on test loss at {when}, "
                        f"pre-registered in `{prereg.path}` as an equivalence test: TOST at alpha "
                        f"{prereg.alpha:g} with margin ±{prereg.margin:.4g} ({prereg.margin_rule}), decided by the "
                        f"{ANALYSIS_NAMES[prereg.decides]}: equivalent within the margin when the 90% interval lies "
                        "inside (−margin, +margin); otherwise better or worse when the 95% interval excludes 0; "
                        f"otherwise {INCONCLUSIVE}. Diverged runs: {prereg.diverged_rule}"
                        + (f" (seeds {diverged})." if diverged else " (none)."))
    per_prompt = any(r["per_prompt"] for r in recs)
    md = ["### Verdict, computed from the sweep logs", "",
          f"Differences are arm − reference ({reference}; grit_sgd also vs control_sgd where both ran), paired by "
          f"training seed (same LoRA init and data order). {primary_text} The other comparisons of tuned arms "
          "(learning rate chosen on val in tier 1) on test loss, exact match and retention KL form one family per "
          "run length: p is Holm-adjusted and the interval is a Bonferroni (1 − 0.05/m) t-interval; better/worse "
          "only when it excludes 0 (lower is better for loss and KL, higher for exact match), otherwise no "
          "detectable difference, with the MDE: the smallest true difference the design detects with 80% power "
          "at the row's level (noncentral t), at the observed sd and at the sd's one-sided 95% upper bound "
          "(chi-square). Descriptive rows carry no label and stay outside the family: arms whose rate was not "
          f"tuned on val ({_untuned_text(recs, order)}), drift (a size, "
          "not a quality) and arms with fewer than 2 paired seeds; their interval is an uncorrected 95% one. "
          "Crossed-bootstrap rows resample seeds (paired) and, crossed with them, one common set of test prompts "
          "for every seed and arm (token-weighted for test loss; stratified by family for exact match), at the "
          "t-row's level, MDE from the bootstrap se; where exactly one of the two intervals excludes 0 both rows "
          "say \"t and bootstrap disagree\" and neither label is taken."
          + ("" if per_prompt else " No run holds per-prompt test losses (per_prompt.jsonl), so test loss has "
             "only its t-row."), ""]
    if prereg is None:
        md += [note, ""]
    if not groups:  # tuning only so far: say so rather than print an empty verdict
        md += ["**No verdict yet**: no run has been evaluated on the test split (tier 2 has not run). "
               "What follows is the tuning so far.", ""]
    for g in groups:
        primary = (primary_arm, "test_loss") if g.max_steps == primary_steps else None
        margin = prereg.margin if prereg is not None and primary is not None else None
        comps = verdict_comparisons(recs, g.max_steps, primary=primary, reference=reference,
                                    learning_rates=learning_rates, pairs=pairs, margin=margin, n_boot=n_boot,
                                    rng_seed=rng_seed)
        md += [f"### {g.max_steps} steps", ""]
        if margin is not None:
            md += preregistered_markdown(comps, prereg)
        md += ["Per arm, mean ± sd over seeds (sd with n − 1):", ""]
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
