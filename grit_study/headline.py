"""README's answer: GRIT vs its control on test loss, one small table and one plot, from the sweep's logs.

A pre-registered (real-data) preset gets ``registered_markdown`` instead: one row per arm at the primary length
(test loss, the difference to the control with its 90% and 95% intervals, the decision against the margin,
IFEval), the base above them, and ``plot_registered``.

    md = write_headline("tensorboard_logs/sweep/smollm2-135m", "readme_files/sweep", preset="smollm2-135m")

``python -m grit_study.sweep --report DIR`` splices the Markdown into README.md between ``ANSWER_MARKERS``.
The numbers are the verdict's own: the same records (``grit_study.sweep.verdict_records``, tiers 1-3), the
same primary length (the pre-registration's, else the shortest at which both arms were evaluated, as
``grit_study.report.write_report`` picks it) and the same ``grit_study.report.verdict_comparisons`` call
(bootstrap rows included: where the t and the crossed bootstrap disagree, the t-row's label says so), so each
row equals the ``grit`` / ``test loss`` paired-t row of the verdict table (docs/verdict.md). With a final
pre-registration the primary row's verdict is its equivalence decision (``grit_study.report.preregistered_decision``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .stats import PAIRED_T, final_runs, normalize_records
from .tables import markdown_table, mean_sd_cell

ANSWER_MARKERS = ("<!-- answer:start -->", "<!-- answer:end -->")
PLOT = "headline.png"


def answer_rows(records: Iterable[Mapping[str, Any]], *, reference: str = "control", arm: str = "grit",
                metric: str = "test_loss", preregistration=None) -> list[dict[str, Any]]:
    """One row per run length at which both ``arm`` and ``reference`` were evaluated: the verdict's paired-t
    comparison of ``metric`` (a ``grit_study.stats.Comparison``), each arm's values per seed and its rate, and
    at the primary length with a final ``preregistration`` its decision (``preregistered_decision``)."""
    from .report import apply_diverged_rule, preregistered_decision, verdict_comparisons
    from .sweep import VERDICT_PAIRS

    recs = normalize_records(records)
    prereg = preregistration
    if prereg is not None:
        recs, _ = apply_diverged_rule(recs, prereg)
    lengths = sorted({r["max_steps"] for r in recs if r["test_loss"] is not None})
    groups = [final_runs(recs, max_steps=s) for s in lengths]
    both = [g for g in groups if {reference, arm} <= set(g.by_arm)]
    primary_steps = prereg.steps if prereg is not None else (both[0].max_steps if both else None)
    rows = []
    for g in both:
        primary = (arm, metric) if g.max_steps == primary_steps else None
        margin = prereg.margin if prereg is not None and primary is not None else None
        comps = verdict_comparisons(recs, g.max_steps, primary=primary, reference=reference, pairs=VERDICT_PAIRS,
                                    margin=margin)
        comp = next(c for c in comps if c.arm == arm and c.reference == reference and c.metric == metric
                    and c.method == PAIRED_T)
        family = sum(1 for c in comps if c.role == "secondary" and c.method == PAIRED_T)  # the Holm family's m
        values = {a: {s: r[metric] for s, r in g.by_arm[a].items() if r[metric] is not None} for a in (reference, arm)}
        n_prompts = {len(r["predictions"]) for a in (reference, arm) for r in g.by_arm[a].values() if r["predictions"]}
        rows.append({"steps": g.max_steps, "comparison": comp, "values": values,
                     "learning_rate": {a: g.learning_rate[a] for a in (reference, arm)},
                     "prompts": n_prompts.pop() if len(n_prompts) == 1 else None, "family": family,
                     "decision": preregistered_decision(comps, prereg) if margin is not None else None})
    return rows


REANALYSIS = ("Not pre-registered: the rows besides the primary follow a re-analysis after the fact (issue 21), "
              "whose Holm family leaves out untuned arms and drift (docs/verdict.md).")
NOT_FINAL = ("Not pre-registered yet: the preset's pre-registration is not final, so the primary is a t-interval, "
             "not its equivalence test.")


def headline_markdown(rows: list[dict[str, Any]], *, image: str | None, reference: str = "control",
                      arm: str = "grit", note: str | None = None) -> str:
    """The answer block: a sentence on what is compared, the table, the primary verdict's text, ``note`` (why it
    is not pre-registered: ``REANALYSIS`` or ``NOT_FINAL``; shown when there is more than the primary row or the
    preset awaits its pre-registration), the plot."""
    if not rows:
        return (f"**No answer yet**: no run length has evaluated runs of both `{arm}` and `{reference}` "
                "(run `make sweep`).")
    first = rows[0]
    lr = first["learning_rate"]
    prompts = f" on {first['prompts']} held-out test prompts" if first["prompts"] else ""
    md = [f"Test loss (token-weighted cross-entropy of the response tokens{prompts}; lower is better), mean ± sd "
          f"over training seeds, of `{arm}` (GRIT) and `{reference}` (the same stack with GRIT off), each at its "
          f"tuned learning rate ({arm} {lr[arm]:.3g}, {reference} {lr[reference]:.3g}); the difference is paired "
          "by seed.", ""]
    header = ["run length", "paired seeds", reference, arm, f"{arm} − {reference}", "interval", "verdict"]
    body = []
    for row in rows:
        c = row["comparison"]
        vals = row["values"]
        length = f"{row['steps']} steps" + (" (primary)" if c.role == "primary" else "")
        cells = [length, str(c.n), mean_sd_cell(list(vals[reference].values()), ".4f"),
                 mean_sd_cell(list(vals[arm].values()), ".4f")]
        if c.diff is None:
            cells += ["–", "–", "descriptive (fewer than 2 paired seeds)"]
        else:
            d, v = c.diff, c.verdict
            level = f"{100 * d.confidence:.4g}%" + ("" if c.role == "primary" else f", Bonferroni m={row['family']}")
            if row["decision"] is not None:  # pre-registered: the equivalence decision, margin in the text below
                label = f"**{row['decision']['label']}** (TOST)"
            else:
                label = f"**{v.label}**" if c.role == "primary" else v.label
            cells += [f"{d.mean:+.4g}", f"[{d.lower:+.4g}, {d.upper:+.4g}] ({level})", f"{label} (MDE {v.mde:.3g})"]
        body.append(cells)
    md += markdown_table(header, body)
    primary = next((r for r in rows if r["comparison"].role == "primary"), None)
    if primary is not None and primary["decision"] is not None:
        dec = primary["decision"]
        md += ["", f"Primary comparison, {primary['steps']} steps, pre-registered as an equivalence test: "
               f"**{dec['label']}**" + (f" ({dec['why']})" if dec["why"] else "")
               + (f"; {dec['deciding'].equivalence.text}" if dec["deciding"] is not None else "") + "."]
    elif primary is not None:
        v = primary["comparison"].verdict
        ref_mean = float(np.mean(list(primary["values"][reference].values())))
        md += ["", f"Primary comparison, {primary['steps']} steps: {v.text} (the MDE is "
               f"{100 * v.mde / ref_mean:.0f}% of the {reference}'s mean test loss)."]
    if note is not None and (len(rows) > 1 or note is NOT_FINAL):
        md += ["", note]
    if image:
        md += ["", f"![{arm} − {reference}, test loss per seed]({image})"]
    return "\n".join(md)


def registered_rows(records: Iterable[Mapping[str, Any]], prereg, *,
                    ifeval: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The real-data answer (a final pre-registration): per arm at the primary length its test loss over seeds,
    its difference to the reference paired by seed with the 90% and 95% t-intervals, and its decision against
    the pre-registered margin (``grit_study.stats.tost_paired``): the primary arm's is the pre-registered
    decision (``preregistered_decision``: "incomplete" until its seeds are the pre-registered ones), the other
    arms' the same rule applied as a secondary, unadjusted reading. ``ifeval``: the tier-5 summaries
    (``grit_study.sweep.ifeval_results``), their strict mean over each arm's 200-step models and the base's."""
    from .report import apply_diverged_rule, preregistered_decision, verdict_comparisons
    from .stats import tost_paired
    from .sweep import IFEVAL_HEADLINE

    recs, diverged = apply_diverged_rule(normalize_records(records), prereg)
    g = final_runs(recs, max_steps=prereg.steps)
    ref, primary = prereg.reference, prereg.arm
    comps = verdict_comparisons(recs, prereg.steps, primary=(primary, prereg.metric), reference=ref,
                                margin=prereg.margin) if {ref, primary} <= set(g.by_arm) else []
    decision = preregistered_decision(comps, prereg) if comps else None
    by_arm_ifeval: dict[str | None, list[float]] = {}
    for r in ifeval:
        if r.get("complete", True):
            by_arm_ifeval.setdefault(r["arm"], []).append(r[IFEVAL_HEADLINE[0]])
    arms = [a for a in (ref, primary) if a in g.by_arm] + [a for a in g.by_arm if a not in (ref, primary)]
    rows = []
    for arm in arms:
        values = {s: r[prereg.metric] for s, r in g.by_arm[arm].items() if r[prereg.metric] is not None}
        row = {"arm": arm, "learning_rate": g.learning_rate.get(arm), "values": values, "equivalence": None,
               "label": None, "ifeval": by_arm_ifeval.get(arm, [])}
        if arm != ref and len(set(values) & set(g.by_arm.get(ref, {}))) >= 2:
            ref_values = {s: r[prereg.metric] for s, r in g.by_arm[ref].items() if r[prereg.metric] is not None}
            row["equivalence"] = tost_paired(values, ref_values, margin=prereg.margin, metric=prereg.metric,
                                             alpha=prereg.alpha)
            row["label"] = (decision["label"] if arm == primary and decision is not None
                            else row["equivalence"].label)
        rows.append(row)
    return {"rows": rows, "decision": decision, "diverged": diverged, "base_ifeval": by_arm_ifeval.get(None, [])}


def registered_markdown(answer: Mapping[str, Any], prereg, *, image: str | None) -> str:
    """README's answer block for a pre-registered preset: what is compared, the per-arm table (test loss, the
    difference to the reference with both intervals, the decision against the margin, IFEval), the primary's
    decision in words, the plot."""
    from .tables import mean_sd_cell

    rows, dec = answer["rows"], answer["decision"]
    if not rows:
        return (f"**No answer yet**: no `{prereg.arm}` or `{prereg.reference}` run of {prereg.steps} steps has been "
                "evaluated on the test split (`make sweep`).")
    md = [f"Test loss (token-weighted cross-entropy of the response tokens on the held-out test prompts; lower is "
          f"better) after {prereg.steps} steps, mean ± sd over training seeds, each arm at the learning rate it was "
          f"tuned to on val; differences to `{prereg.reference}` (the same stack with GRIT off) paired by seed. "
          f"Pre-registered ([{Path(prereg.path).name}]({prereg.path})): `{prereg.arm}` is equivalent to "
          f"`{prereg.reference}` when the 90% interval lies within ±{prereg.margin:.3g}, a tenth of what "
          f"fine-tuning gains over the base (test loss {prereg.base_test_loss:.3f}). The other arms' decisions apply "
          "the same rule as a secondary reading, without correction. IFEval (strict mean): the 200-step models, "
          "descriptive.", ""]
    header = ["arm", "lr", "seeds", "test loss", f"− {prereg.reference}", "90% interval", "95% interval",
              f"vs ±{prereg.margin:.3g}", "IFEval"]

    def ifeval_cell(vals: list[float]) -> str:
        return mean_sd_cell(vals, ".3f") if vals else "–"

    body = [["base (untuned)", "–", "–", f"{prereg.base_test_loss:.4f}", "–", "–", "–", "–",
             ifeval_cell(answer["base_ifeval"])]]
    for r in rows:
        e = r["equivalence"]
        label = "–" if r["label"] is None else (f"**{r['label']}** (pre-registered)" if r["arm"] == prereg.arm
                                                else r["label"])
        body.append([f"`{r['arm']}`", f"{r['learning_rate']:.3g}" if r["learning_rate"] else "–", str(len(r["values"])),
                     mean_sd_cell(list(r["values"].values()), ".4f"),
                     f"{e.mean:+.4f}" if e else "–",
                     f"[{e.ci90[0]:+.4f}, {e.ci90[1]:+.4f}]" if e else "–",
                     f"[{e.ci95[0]:+.4f}, {e.ci95[1]:+.4f}]" if e else "–", label, ifeval_cell(r["ifeval"])])
    md += markdown_table(header, body)
    if dec is not None:
        md += ["", f"Primary ({prereg.arm} − {prereg.reference}, {prereg.steps} steps, {prereg.n} pre-registered "
               f"seeds): **{dec['label']}**" + (f" ({dec['why']})" if dec["why"] else "")
               + (f"; {dec['deciding'].equivalence.text}" if dec["deciding"] is not None else "") + "."]
        if answer["diverged"]:
            md[-1] += f" Diverged runs counted as the base ({prereg.diverged_rule}): seeds {answer['diverged']}."
    if image:
        md += ["", f"![{prereg.arm} − {prereg.reference}, test loss per seed]({image})"]
    return "\n".join(md)


def plot_headline(rows: list[dict[str, Any]], path: Path, *, reference: str = "control", arm: str = "grit") -> Path:
    """Per run length: each seed's paired difference (dots), their mean and the verdict's interval (bar)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, row in enumerate(rows):
        a, b = row["values"][arm], row["values"][reference]
        seeds = sorted(set(a) & set(b))
        deltas = [a[s] - b[s] for s in seeds]
        offsets = np.linspace(-0.12, 0.12, len(deltas)) if len(deltas) > 1 else [0.0]
        ax.scatter([i - 0.2 + o for o in offsets], deltas, color="tab:gray", s=18, zorder=3,
                   label="one seed" if i == 0 else None)
        d = row["comparison"].diff
        if d is not None:
            ax.errorbar([i + 0.15], [d.mean], yerr=[[d.mean - d.lower], [d.upper - d.mean]], fmt="o",
                        color="tab:blue", capsize=5, zorder=3,
                        label="mean and interval" if i == 0 else None)
            ax.annotate(f"{100 * d.confidence:.4g}%", (i + 0.2, d.upper), fontsize=8)
    ax.axhline(0.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [f"{r['steps']} steps\n{r['comparison'].n} paired seeds" for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set(title=f"test loss, {arm} − {reference} (below 0: {arm} lower)", ylabel="difference in test loss")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_registered(answer: Mapping[str, Any], prereg, path: Path) -> Path:
    """Per arm: each seed's test-loss difference to the reference (dots), the mean with its 90% interval (the
    TOST's), and the pre-registered margin as a band."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in answer["rows"] if r["equivalence"] is not None]
    ref = next((r["values"] for r in answer["rows"] if r["arm"] == prereg.reference), {})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.axhspan(-prereg.margin, prereg.margin, color="tab:green", alpha=0.12, label=f"margin ±{prereg.margin:.3g}")
    for i, r in enumerate(rows):
        seeds = sorted(set(r["values"]) & set(ref))
        deltas = [r["values"][s] - ref[s] for s in seeds]
        offsets = np.linspace(-0.12, 0.12, len(deltas)) if len(deltas) > 1 else [0.0]
        ax.scatter([i - 0.2 + o for o in offsets], deltas, color="tab:gray", s=14, zorder=3,
                   label="one seed" if i == 0 else None)
        e = r["equivalence"]
        ax.errorbar([i + 0.15], [e.mean], yerr=[[e.mean - e.ci90[0]], [e.ci90[1] - e.mean]], fmt="o",
                    color="tab:blue", capsize=5, zorder=3, label="mean, 90% interval" if i == 0 else None)
    ax.axhline(0.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [f"{r['arm']}\n{len(r['values'])} seeds" for r in rows])
    ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
    ax.set(title=f"test loss − {prereg.reference}, {prereg.steps} steps (below 0: lower than the {prereg.reference})",
           ylabel="difference in test loss")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def is_registered(preset: str | None) -> bool:
    """Whether ``preset`` runs the registered (real-data) protocol, whose answer is ``registered_markdown``."""
    from .presets import resolve_preset
    from .sweep import REGISTERED, protocol_for

    return preset is not None and protocol_for(resolve_preset(preset)) is REGISTERED


def write_headline(logdir: str | os.PathLike, out_dir: str | os.PathLike, *, image_prefix: str | None = None,
                   preset: str | None = None) -> str:
    """README's answer block from the finished sweep runs under ``logdir`` (of ``preset``: its pre-registration,
    if final, decides the primary); the plot goes to ``out_dir``. ``image_prefix``: how the Markdown links the
    plot (default: ``out_dir`` as given)."""
    from .sweep import has_preregistration, verdict_preregistration, verdict_records

    records = verdict_records(logdir, preset)
    prereg = verdict_preregistration(preset)
    if prereg is not None and is_registered(preset):
        from .sweep import ifeval_results

        answer = registered_rows(records, prereg, ifeval=ifeval_results(logdir, preset))
        image = None
        if any(r["equivalence"] is not None for r in answer["rows"]):
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            plot_registered(answer, prereg, out / PLOT)
            image = (str(out_dir).rstrip("/") + "/" if image_prefix is None else image_prefix) + PLOT
        return registered_markdown(answer, prereg, image=image)
    rows = answer_rows(records, preregistration=prereg) if records else []
    image = None
    if rows:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_headline(rows, out / PLOT)
        prefix = str(out_dir).rstrip("/") + "/" if image_prefix is None else image_prefix
        image = f"{prefix}{PLOT}"
    note = None if prereg is not None else NOT_FINAL if has_preregistration(preset) else REANALYSIS
    return headline_markdown(rows, image=image, note=note)
