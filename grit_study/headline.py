"""README's answer: GRIT vs its control on test loss, one small table and one plot, from the sweep's logs.

    md = write_headline("tensorboard_logs/sweep", "readme_files/sweep")   # writes headline.png, returns Markdown

``python -m grit_study.sweep --report DIR`` splices the Markdown into README.md between ``ANSWER_MARKERS``.
The numbers are the verdict's own: the same records (``grit_study.sweep.finished_records``, tiers 1-3), the
same primary length (the shortest at which both arms were evaluated, as ``grit_study.report.write_report``
picks it) and the same ``grit_study.stats.compare_to_control`` call, so each row equals the ``grit`` /
``test loss`` row of the verdict table (docs/verdict.md). Only the exact-match bootstrap rows are skipped:
they are not part of the Holm family, so the t-rows do not depend on them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .stats import METRICS, compare_to_control, final_runs, normalize_records
from .tables import markdown_table, mean_sd_cell

ANSWER_MARKERS = ("<!-- answer:start -->", "<!-- answer:end -->")
PLOT = "headline.png"


def answer_rows(records: Iterable[Mapping[str, Any]], *, reference: str = "control", arm: str = "grit",
                metric: str = "test_loss") -> list[dict[str, Any]]:
    """One row per run length at which both ``arm`` and ``reference`` were evaluated: the verdict's
    comparison of ``metric`` (a ``grit_study.stats.Comparison``), each arm's values per seed and its rate."""
    recs = normalize_records(records)
    lengths = sorted({r["max_steps"] for r in recs if r["test_loss"] is not None})
    groups = [final_runs(recs, max_steps=s) for s in lengths]
    both = [g for g in groups if {reference, arm} <= set(g.by_arm)]
    primary_steps = both[0].max_steps if both else None
    rows = []
    for g in both:
        primary = (arm, metric) if g.max_steps == primary_steps else None
        comps = compare_to_control(recs, reference=reference, primary=primary, metrics=METRICS,
                                   max_steps=g.max_steps, bootstrap=False)
        comp = next(c for c in comps if c.arm == arm and c.metric == metric)
        family = sum(1 for c in comps if c.role == "secondary")  # the Holm family's m (bootstrap rows are not in it)
        values = {a: {s: r[metric] for s, r in g.by_arm[a].items() if r[metric] is not None} for a in (reference, arm)}
        n_prompts = {len(r["predictions"]) for a in (reference, arm) for r in g.by_arm[a].values() if r["predictions"]}
        rows.append({"steps": g.max_steps, "comparison": comp, "values": values,
                     "learning_rate": {a: g.learning_rate[a] for a in (reference, arm)},
                     "prompts": n_prompts.pop() if len(n_prompts) == 1 else None, "family": family})
    return rows


def headline_markdown(rows: list[dict[str, Any]], *, image: str | None, reference: str = "control",
                      arm: str = "grit") -> str:
    """The answer block: a sentence on what is compared, the table, the primary verdict's text, the plot."""
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
            label = f"**{v.label}**" if c.role == "primary" else v.label
            cells += [f"{d.mean:+.4g}", f"[{d.lower:+.4g}, {d.upper:+.4g}] ({level})", f"{label} (MDE {v.mde:.3g})"]
        body.append(cells)
    md += markdown_table(header, body)
    primary = next((r for r in rows if r["comparison"].role == "primary"), None)
    if primary is not None:
        v = primary["comparison"].verdict
        ref_mean = float(np.mean(list(primary["values"][reference].values())))
        md += ["", f"Primary comparison, {primary['steps']} steps: {v.text} (the MDE is "
               f"{100 * v.mde / ref_mean:.0f}% of the {reference}'s mean test loss)."]
    if image:
        md += ["", f"![{arm} − {reference}, test loss per seed]({image})"]
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


def write_headline(logdir: str | os.PathLike, out_dir: str | os.PathLike, *, image_prefix: str | None = None) -> str:
    """README's answer block from the finished sweep runs under ``logdir``; the plot goes to ``out_dir``.
    ``image_prefix``: how the Markdown links the plot (default: ``out_dir`` as given)."""
    from .sweep import VERDICT_TIERS, finished_records

    records = [r for r in finished_records(Path(logdir)) if r["tier"] in VERDICT_TIERS]
    rows = answer_rows(records) if records else []
    image = None
    if rows:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_headline(rows, out / PLOT)
        prefix = str(out_dir).rstrip("/") + "/" if image_prefix is None else image_prefix
        image = f"{prefix}{PLOT}"
    return headline_markdown(rows, image=image)
