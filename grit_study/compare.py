"""Read the runs of one log directory, refuse unfair comparisons, plot, and write the results table.

    runs = load_runs("tensorboard_logs")        # latest run of each arm, TensorBoard's own reader
    check_fingerprints(runs)                    # raises FingerprintMismatch: never compare different data
    paths = plot_all(runs, "readme_files")      # PNGs
    write_results(runs, "readme_files/results.md")

Scalars are read with ``tensorboard.backend.event_processing.event_accumulator.EventAccumulator``,
so what is plotted is what TensorBoard shows. A ``LOSS_ON_PADDING`` run (``loss_on_padding`` in its
summary) is drawn in its own labelled panel next to the arm it departs from, never on the same axes
as the fair arms: its loss counts padding tokens and is not the same quantity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .files import SUMMARY_NAME, read_summary
from .registry import ARMS
from .tables import cell, markdown_table


ARM_ORDER = tuple(ARMS)  # the registry's order: baseline, control, grit, then the sweep's and the ablations' arms
METRICS = (  # (tag, title, y label, file stem)
    ("train/loss", "train loss (response tokens)", "cross-entropy", "train_loss"),
    ("train/grad_norm", "gradient norm before clipping (GRIT: after preconditioning)", "L2 norm", "grad_norm"),
    ("train/learning_rate", "learning rate", "lr", "learning_rate"),
    ("train/step_time_s", "time per optimizer step", "seconds", "step_time"),
    ("train/peak_memory_mb", "peak memory", "MiB", "peak_memory"),
)


class FingerprintMismatch(ValueError):
    """Runs trained or evaluated on different data: they must not share a comparison."""


@dataclass
class Run:
    name: str
    path: Path
    summary: dict[str, Any]
    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # tag -> (step, wall, value)

    @property
    def arm(self) -> str:
        return self.summary.get("arm", self.name.rsplit("_", 1)[0])

    def _field(self, name: str) -> Any:
        return self.summary.get(name, self.summary.get("preset_fields", {}).get(name))

    @property
    def key(self) -> tuple:
        """(arm, learning rate, seed, steps): what tells two runs of the study apart."""
        return (self.arm, self._field("learning_rate"), self._field("seed"), self._field("max_steps"))

    @property
    def batch_group(self) -> tuple:
        """Runs with the same (seed, steps) must have trained on identical batches."""
        return (self._field("seed"), self._field("max_steps"))

    @property
    def is_padding_artifact(self) -> bool:
        return bool(self.summary.get("loss_on_padding"))

    def series(self, tag: str) -> tuple[list[int], list[float], list[float]]:
        points = self.scalars.get(tag, [])
        return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of a run directory's event files: tag -> [(step, wall_time, value)] sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag: sorted((e.step, e.wall_time, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def load_runs(logdir: str | os.PathLike, *, latest_per_key: bool = True, recursive: bool = False,
              **filters: Any) -> list[Run]:
    """The finished runs under ``logdir`` (those with a run_summary.json), in ARM_ORDER.

    ``filters``: summary fields that must match (e.g. ``preset="smollm2-135m"``); ``None`` ignores one.
    ``latest_per_key``: keep only the newest run of each (arm, learning rate, seed, steps) (names end in a
    sortable timestamp, or the run directories sort by their key). ``recursive``: look in subfolders too
    (the sweep's ``tensorboard_logs/sweep/<preset>/<arm>/<run>``).
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"log directory {logdir} does not exist; run notebooks 01 and 02 first "
                                "(or point LOGDIR at the committed tensorboard_logs/)")
    found = logdir.rglob(SUMMARY_NAME) if recursive else (p / SUMMARY_NAME for p in logdir.iterdir())
    runs = []
    for f in sorted(f for f in found if f.is_file()):
        run = Run(f.parent.name, f.parent, read_summary(f.parent))
        if any(v is not None and run._field(k) != v for k, v in filters.items()):
            continue
        runs.append(run)
    if latest_per_key:
        newest: dict[tuple, Run] = {}
        for r in runs:  # sorted by path: <arm>_<timestamp>, so the last one wins
            newest[r.key] = r
        runs = list(newest.values())
    if not runs:
        raise FileNotFoundError(f"no finished runs (directories with {SUMMARY_NAME}) in {logdir} matching {filters}")
    for r in runs:
        r.scalars = read_scalars(r.path)
    rank = {a: i for i, a in enumerate(ARM_ORDER)}
    return sorted(runs, key=lambda r: (rank.get(r.arm, len(rank)), str(r.key), r.name))


def check_fingerprints(runs: Sequence[Run]) -> str:
    """Raise ``FingerprintMismatch`` unless every run has the same train, validation and test fingerprints."""
    seen: dict[tuple, list[str]] = {}
    for r in runs:
        key = (r.summary.get("train_fingerprint"), r.summary.get("val_fingerprint"))
        if None in key:
            raise FingerprintMismatch(f"run {r.name} records no data fingerprints; it was not written by "
                                      "grit_study.runs and cannot be compared")
        seen.setdefault(key + (r.summary.get("test_fingerprint"),), []).append(r.name)
    if len(seen) > 1:
        detail = "; ".join(f"train={t} val={v} test={te}: {', '.join(names)}" for (t, v, te), names in seen.items())
        raise FingerprintMismatch(
            f"REFUSING to compare runs trained or evaluated on different data ({detail}). Rerun them with the "
            "same PRESET, DATA, data_seed and max_seq_length, or compare them in separate log directories.")
    ((train, val, test),) = seen
    return f"train {train}, val {val}" + (f", test {test}" if test else "")


def batch_hash_agreement(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """For each run against the first fair run of its (seed, steps) group: steps compared and steps whose
    batch hashes agree. Runs of another seed train on another order by design and are not compared."""
    out = {}
    for r in runs:
        fair = [x for x in runs if not x.is_padding_artifact and x.batch_group == r.batch_group]
        if not fair:
            continue
        ref = fair[0]
        ref_hashes = ref.summary.get("batch_hashes", [])
        hashes = r.summary.get("batch_hashes", [])
        n = min(len(hashes), len(ref_hashes))
        out[r.name] = {"reference": ref.name, "compared": n,
                       "equal": sum(a == b for a, b in zip(hashes[:n], ref_hashes[:n]))}
    return out


def check_batch_hashes(runs: Sequence[Run]) -> None:
    """Raise unless the fair (non-padding) runs saw identical batches at every step they share."""
    for name, a in batch_hash_agreement([r for r in runs if not r.is_padding_artifact]).items():
        if a["equal"] != a["compared"]:
            raise FingerprintMismatch(f"run {name} saw different batches than {a['reference']} at "
                                      f"{a['compared'] - a['equal']} of {a['compared']} steps")


# ----------------------------------------------------------------------------- plots

def _label(r: Run) -> str:
    lr, seed = r._field("learning_rate"), r._field("seed")
    return f"{r.arm} ({r.summary.get('stack', '?')}, lr {lr:g}, seed {seed})" if lr is not None else \
        f"{r.arm} ({r.summary.get('stack', '?')})"


def _departed(r: Run, runs: Sequence[Run]) -> Run | None:
    target = r.summary.get("departs_from")
    return next((x for x in runs if x.arm == target and not x.is_padding_artifact), None)


def _figure(runs: Sequence[Run], n_main: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pads = [r for r in runs if r.is_padding_artifact]
    fig, axes = plt.subplots(1, n_main + len(pads), figsize=(6.4 * (n_main + len(pads)), 4.2), squeeze=False)
    return fig, list(axes[0]), pads


def _padding_panel(ax, pad: Run, runs: Sequence[Run], tag: str, x: str = "step") -> None:
    base = _departed(pad, runs)
    for r, style in ((base, "-"), (pad, "--")):
        if r is None:
            continue
        steps, walls, values = r.series(tag)
        xs = steps if x == "step" else [w - walls[0] for w in walls] if walls else []
        ax.plot(xs, values, style, marker=".", label=_label(r) + (" LOSS_ON_PADDING" if r is pad else ""))
    note = {"train/loss": "its train loss also counts prompt and EOS-padding tokens",
            "eval/loss": "eval loss: response tokens only, the same metric as every arm"}.get(tag, "same metric")
    ax.set_title(f"LOSS_ON_PADDING artifact vs {pad.summary.get('departs_from')}\n({note})", fontsize=9)
    ax.legend(fontsize=8)


def plot_metric(runs: Sequence[Run], tag: str, title: str, ylabel: str, path: Path) -> Path:
    fig, axes, pads = _figure(runs)
    ax = axes[0]
    for r in runs:
        if r.is_padding_artifact:
            continue
        steps, _, values = r.series(tag)
        if values:
            ax.plot(steps, values, marker="." if len(values) < 80 else None, label=_label(r))
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.legend(fontsize=8)
    for pax, pad in zip(axes[1:], pads):
        _padding_panel(pax, pad, runs, tag)
        pax.set(xlabel="optimizer step", ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_eval(runs: Sequence[Run], path: Path) -> Path:
    """Eval loss against optimizer step and against wall-clock seconds since the run's first event."""
    fig, axes, pads = _figure(runs, n_main=2)
    for r in runs:
        if r.is_padding_artifact:
            continue
        steps, walls, values = r.series("eval/loss")
        if not values:
            continue
        # Wall-clock from the step-0 evaluation, so model loading is excluded alike for every arm.
        axes[0].plot(steps, values, marker="o", label=_label(r))
        axes[1].plot([w - walls[0] for w in walls], values, marker="o", label=_label(r))
    axes[0].set(title="validation loss (response tokens)", xlabel="optimizer step", ylabel="cross-entropy")
    axes[1].set(title="validation loss against wall-clock", xlabel="seconds since the step-0 evaluation",
                ylabel="cross-entropy")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for pax, pad in zip(axes[2:], pads):
        _padding_panel(pax, pad, runs, "eval/loss")
        pax.set(xlabel="optimizer step", ylabel="cross-entropy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_all(runs: Sequence[Run], out_dir: str | os.PathLike) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_metric(runs, tag, title, ylabel, out / f"{stem}.png") for tag, title, ylabel, stem in METRICS]
    paths.insert(1, plot_eval(runs, out / "eval_loss.png"))
    return paths


# ----------------------------------------------------------------------------- table

def results_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        s = r.summary
        evals = s.get("eval_loss", {})
        last = max(evals, key=int) if evals else None
        export = s.get("export") or {}
        rows.append({
            "arm": r.arm, "stack": s.get("stack"), "lr": r._field("learning_rate"), "seed": r._field("seed"),
            "steps": s.get("steps"),
            "preconditioned": s.get("preconditioned_steps"), "final train loss": s.get("final_train_loss"),
            "eval loss step 0": evals.get("0"), "final eval loss": evals.get(last) if last else None,
            # The final evaluation (grit_study.arms.final_evaluation): on test, or val where a run has no test split.
            "test loss": s.get("test_loss"), "retention KL": s.get("retention_kl"), "drift": s.get("drift"),
            "exact match": s.get("exact_match"), "base exact match": s.get("base_exact_match"),
            "median s/step": s.get("median_s_per_step"), "mean s/step": s.get("mean_s_per_step"),
            "tokens/s": s.get("tokens_per_s"), "peak MiB": s.get("peak_memory_mb"),
            "merged eval loss": export.get("eval_loss_merged"), "GGUF eval loss": export.get("eval_loss_gguf"),
        })
    return rows


def _final_splits(runs: Sequence[Run]) -> str:
    """The split the final evaluation used: test, or val for a preset without a test split (``final_split``)."""
    by_split: dict[str, list[str]] = {}
    for r in runs:
        if r.summary.get("test_loss") is not None:
            by_split.setdefault(r.summary.get("final_split", "test"), []).append(r.arm)
    if len(by_split) <= 1:
        return next(iter(by_split), "test")
    return "; ".join(f"{split} for {', '.join(arms)}" for split, arms in sorted(by_split.items()))


def results_markdown(runs: Sequence[Run]) -> str:
    """The results table plus the facts a reader needs next to every number (hardware, preset, data)."""
    rows = results_rows(runs)
    cols = [c for c in rows[0] if any(row[c] is not None for row in rows)]
    specs = {"lr": ".0e", "seed": "d", "preconditioned": "d", "steps": "d", "tokens/s": ".0f", "peak MiB": ".0f", "exact match": ".3f",
             "base exact match": ".3f", "median s/step": ".2f", "mean s/step": ".2f", "drift": ".1f"}
    lines = markdown_table(cols, [[cell(row[c], specs.get(c, ".4f")) for c in cols] for row in rows])
    first = runs[0].summary
    hw = first.get("hardware", {})
    device = hw.get("gpu") or f"{hw.get('cpu_count')}-core CPU ({hw.get('machine')})"
    p = first.get("preset_fields", {})
    agreement = batch_hash_agreement(runs)
    notes = [
        "",
        f"Preset `{first.get('preset')}` (model `{first.get('model_id')}`, data `{first.get('data_source')}`, "
        f"seq {p.get('max_seq_length')}, batch {p.get('per_device_train_batch_size')} x accum "
        f"{p.get('gradient_accumulation_steps')}, data seed {p.get('data_seed')}) on {device}, torch {first.get('package_versions', {}).get('torch')}.",
        f"Data fingerprints: {check_fingerprints(runs)}. Batch hashes: "
        + ", ".join(f"{n.rsplit('_', 1)[0]} {a['equal']}/{a['compared']}" for n, a in agreement.items())
        + " steps equal to the first fair run of the same (seed, steps).",
        "Losses are token-weighted cross-entropy over response tokens; step 0 is the untuned base model. "
        f"Eval losses are on val, test loss and exact match on {_final_splits(runs)}; retention KL is KL(base || tuned) "
        "on the fixed texts sampled from the untuned base, drift the sum of ||s B A||_F over LoRA modules. "
        "Times exclude evaluation; peak memory is the process RSS on CPU and peak allocated CUDA memory on GPU.",
    ]
    if any(r.is_padding_artifact for r in runs):
        notes.append("The `padding_artifact` row trained as the published pipeline did (pad to max length with EOS, "
                     "labels = input_ids): its train loss counts prompt and padding tokens and is not comparable "
                     "to the other rows; its eval loss is the same response-token metric as every row.")
    return "\n".join(lines + notes) + "\n"


def write_results(runs: Sequence[Run], path: str | os.PathLike) -> Path:
    check_fingerprints(runs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results_markdown(runs))
    return path
