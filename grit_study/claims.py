"""GRIT's other claims (issue 12) as the sweep's tier 4: fewer parameters from Fisher-guided rank
adaptation, and regularizers and statistics that act. Planned and run by ``make sweep`` (tier 4 runs
after tiers 1-2 have chosen the ``grit`` and ``control`` learning rates), reported by ``write_claims``.

Runs, at the chosen rates (``grit``'s for the GRIT arms, ``control``'s for the control's):

- ``grit_full`` at ``CLAIM_SEEDS`` seeds: the ``grit`` arm plus reprojection (registry). Its summary
  keeps GRIT's per-module effective ranks (``grit_ranks``: k = max(k_A, k_B), and min) and a
  secondary row, the projector truncation: A <- P_A A, B <- B P_B with the last inversion's
  energy-rank projectors, written at rank k and reloaded with PEFT (test loss only).
- ``grit_full_truncated`` / ``control_truncated`` (derived, nothing trained): the saved adapter of
  ``grit_full`` / of the tier-2 ``control`` at the same seed, cut by SVD (``grit_study.truncate``) to
  that seed's ``grit_full`` ranks, saved as a real PEFT adapter, loaded back with plain PEFT on a fresh
  base and given the full evaluation. A source adapter not on disk (adapters are not committed) is trained
  again from its seed first, and must reproduce the committed run's batch hashes and validation losses. The same process measures the parameter curve: test loss of the
  source cut to one global k for each k in ``CURVE_KS``.
- ``control_rk``: LoRA trained from the start with ``rank_pattern`` = that seed's ``grit_full`` ranks
  (lora_alpha as the preset's, so PEFT's scale is alpha / k per module, PEFT's default; the control's
  learning rate, not retuned): the parameter count of the cut adapters, trained low-rank.
- ``grit_reg_x100``, ``grit_reg_x10000`` and ``grit_ema`` at one seed: the regularizer weights at 100 and
  10,000 times the published ones, and the per-step EMA statistics; the published weights and the mean
  statistics are the tier-2 ``grit`` run of the same seed.

The claim "fewer parameters at no loss" holds only if cutting ``grit_full`` costs less test loss than
cutting the control to the same ranks and than training ``control_rk``: each a paired-by-seed
difference of losses with a 95% t-interval (``grit_study.stats``).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .tables import markdown_table, mean_sd_cell

CLAIM_SEEDS = 3
ONE_SEED_ARMS = ("grit_ema", "grit_reg_x100", "grit_reg_x10000")
CURVE_KS = (1, 2, 4, 8)
RANK_COMBINE = "max"  # k = max(k_A, k_B): neither side loses energy GRIT counted as kept (grit_ranks)


@dataclass(frozen=True)
class Derived:
    source_arm: str   # the arm whose saved adapter is cut
    description: str


DERIVED = {
    "grit_full_truncated": Derived("grit_full", "grit_full's adapter cut by SVD to its own GRIT ranks "
                                   "k = max(k_A, k_B) per module, reloaded with plain PEFT"),
    "control_truncated": Derived("control", "the control's tier-2 adapter (same seed) cut by SVD to grit_full's "
                                 "ranks, reloaded with plain PEFT"),
}
CONTROL_RK = "control_rk"


def control_rk_spec():
    """The ``control_rk`` arm: the control, trained with per-module ranks. Not in the registry: its ranks
    come from a trained ``grit_full`` run, so it exists only with a ``ranks_from`` run (the sweep's tier 4)."""
    from dataclasses import replace

    from .registry import get_arm

    return replace(get_arm("control"), name=CONTROL_RK, group="claims",
                   description="LoRA trained from the start with rank_pattern = grit_full's ranks at the same seed "
                   "(lora_alpha as the preset's: PEFT's scale alpha/k; the control's learning rate)")


# ----------------------------------------------------------------------------- the plan (tier 4)

def tier4_plan(records: Sequence[Mapping[str, Any]], chosen: Mapping[str, float | None], steps: int,
               planned_run: type, base_seed: int) -> tuple[list, list[str]]:
    """Tier-4 runs as far as finished runs determine them, and notes on what is still open."""
    lr_g, lr_c = chosen.get("grit"), chosen.get("control")
    if lr_g is None or lr_c is None:
        return [], ["tier 4 (GRIT's claims): once tier 1 has chosen the grit and control learning rates"]
    seeds = [base_seed + k for k in range(CLAIM_SEEDS)]
    out = [planned_run(4, "grit_full", lr_g, s, steps, "full") for s in seeds]
    notes = []
    finished = {(r["arm"], r["seed"], r["max_steps"]): r for r in records
                if r["test_loss"] is not None and (r["arm"] != "control" or math.isclose(r["learning_rate"], lr_c))
                and (r["arm"] != "grit_full" or math.isclose(r["learning_rate"], lr_g))}
    for s in seeds:
        full = planned_run(4, "grit_full", lr_g, s, steps, "full")
        if ("grit_full", s, steps) not in finished:
            notes.append(f"tier 4 seed {s}: truncations and control_rk once grit_full has run")
            continue
        control = planned_run(2, "control", lr_c, s, steps, "full")
        for source, arm, lr in ((full, "grit_full_truncated", lr_g), (control, "control_truncated", lr_c)):
            if (source.arm, s, steps) not in finished:
                notes.append(f"tier 4 {arm} seed {s}: once {source.name} is evaluated")
            else:  # a source adapter not on disk (adapters are not committed) is trained again first
                out.append(planned_run(4, arm, lr, s, steps, "full", source=source.name, ranks_from=full.name))
        out.append(planned_run(4, CONTROL_RK, lr_c, s, steps, "full", ranks_from=full.name))
    out += [planned_run(4, arm, lr_g, base_seed, steps, "full") for arm in ONE_SEED_ARMS]
    return out, notes


def definition_extra(run) -> dict[str, Any]:
    """What a tier-4 run adds to the sweep's definition of a run (nothing for the others)."""
    extra = {}
    if run.arm in DERIVED:
        extra["derived"] = {"from": run.source, "how": DERIVED[run.arm].description}
    if run.ranks_from is not None:
        extra["ranks_from"] = run.ranks_from
        extra["rank_combine"] = RANK_COMBINE
    return extra


def ranks_of(logdir: Path, run_name: str) -> dict[str, int]:
    """The per-module GRIT ranks a finished ``grit_full`` run recorded (``grit_ranks[RANK_COMBINE]``)."""
    from .files import SUMMARY_NAME, read_summary

    path = Path(logdir) / run_name / SUMMARY_NAME
    summary = read_summary(Path(logdir) / run_name, missing_ok=True)
    if summary is None:
        raise FileNotFoundError(f"{path} does not exist: run {run_name} first")
    ranks = summary.get("grit_ranks", {}).get(RANK_COMBINE)
    if not ranks:
        raise ValueError(f"{path} records no grit_ranks: it was not trained with a GRIT manager by this code; "
                         "delete the run directory and rerun the sweep")
    return {k: int(v) for k, v in ranks.items()}


def peft_rank_pattern(ranks: Mapping[str, int], prefix: str = "base_model.model.") -> dict[str, int]:
    """{module name as the PeftModel names it: k} -> LoraConfig.rank_pattern for ``get_peft_model`` on the
    base model (keys relative to it, regex-escaped: PEFT matches them as patterns)."""
    import re

    out = {}
    for name, k in ranks.items():
        if not name.startswith(prefix):
            raise ValueError(f"{name}: not a PeftModel module name (expected the prefix {prefix!r})")
        out[re.escape(name[len(prefix):])] = int(k)
    return out


# ----------------------------------------------------------------------------- in a training run

def training_figures(res, adapter_dir: Path) -> dict[str, Any]:
    """What a tier-4-relevant training run adds to its summary: the saved adapter's size on disk, GRIT's
    per-module ranks (runs with a GRIT manager), and for a reprojecting run the projector truncation."""
    from .truncate import ADAPTER_FILE, grit_ranks

    out: dict[str, Any] = {"adapter_bytes": (Path(adapter_dir) / ADAPTER_FILE).stat().st_size}
    manager = res.grit_manager
    if manager is not None and manager.ready:
        out["grit_ranks"] = {c: grit_ranks(manager, c) for c in ("max", "min")}
        if manager.config.enable_reprojection:
            out["projector_truncation"] = projector_truncation(res, Path(adapter_dir).parent / "projector")
    return out


def projector_truncation(res, out_dir: Path) -> dict[str, Any]:
    """The secondary row: ``project_and_cut`` of the trained model, reloaded with PEFT as a second adapter
    and evaluated on the test split (loss only)."""
    info = project_and_cut(res.model, res.grit_manager, out_dir)
    loss, tokens = _loss_with_adapter(res, out_dir, "projector")
    return {"parameters": info["parameters"], "bytes": info["bytes"], "test_loss": loss, "test_tokens": tokens}


def project_and_cut(model, manager, out_dir: Path, adapter: str = "default") -> dict[str, Any]:
    """Write the adapter projected as GRIT's reprojection projects it (A <- P_A A, B <- B P_B with the last
    inversion's energy-rank projectors; one-sided reprojection: P_A for both) at k = max(k_A, k_B) per module.
    The projected ΔW has rank <= min(k_A, k_B), so the cut at k is exact: the file holds s·B P_B P_A A.
    The model's weights are restored bit for bit afterwards. Returns ``truncate_adapter``'s figures."""
    import torch

    from .truncate import grit_ranks, truncate_adapter

    factors = manager.factors()
    two_sided = manager.config.use_two_sided_reprojection
    layers = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for name, f in factors.items():
                a, b = layers[name].lora_A[adapter].weight, layers[name].lora_B[adapter].weight
                saved[name] = (a.detach().clone(), b.detach().clone())
                # float64: the projection is part of what is measured, not a source of rounding.
                p_a = f["P_A"].to(a.device, torch.float64)
                p_b = (f["P_B"] if two_sided else f["P_A"]).to(b.device, torch.float64)
                a.copy_((p_a @ a.double()).to(a.dtype))
                b.copy_((b.double() @ p_b).to(b.dtype))
            return truncate_adapter(model, grit_ranks(manager, RANK_COMBINE), out_dir, adapter_name=adapter)
    finally:
        with torch.no_grad():
            for name, (a0, b0) in saved.items():
                layers[name].lora_A[adapter].weight.copy_(a0)
                layers[name].lora_B[adapter].weight.copy_(b0)


def _loss_with_adapter(res, adapter_dir: Path, name: str) -> tuple[float, int]:
    """Test loss of the adapter folder ``adapter_dir`` loaded with PEFT beside the model's own adapter."""
    from .evaluate import eval_loss

    model = res.model
    active = model.active_adapter
    model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    try:
        model.set_adapter(name)
        return eval_loss(model, res.data.test or res.data.val, res.shared_tokenizer.pad_token_id,
                         res.preset.eval_batch_size)
    finally:
        model.set_adapter(active)
        model.delete_adapter(name)


# ----------------------------------------------------------------------------- a derived run

def run_truncated(run, preset, logdir: Path, adapters: Path) -> Any:
    """Cut ``run.source``'s saved adapter to ``run.ranks_from``'s GRIT ranks, reload the cut adapter with
    plain PEFT on a fresh base, and return it as an ``ArmResult`` whose run directory holds a new summary
    (the sweep then gives it the full evaluation). Also measures the parameter curve of the source."""
    from . import arms
    from .files import SUMMARY_NAME, atomic_write_text
    from .registry import get_arm
    from .runs import SummaryFile
    from .truncate import ADAPTER_FILE, truncate_adapter

    target = Path(logdir) / run.name
    source_dir = Path(logdir) / run.source
    source_adapter = adapters / run.source / "adapter"
    spec = get_arm(DERIVED[run.arm].source_arm)
    ranks = ranks_of(logdir, run.ranks_from)

    if not (source_adapter / "adapter_config.json").is_file():
        retrain_source(preset, spec, SummaryFile(source_dir).info, source_adapter)
    full = arms.reload_arm(preset, spec, source_adapter, source_dir)  # refuses a source trained on other data
    source = full.recorder.info  # read only: nothing here writes to the source's summary
    cut_dir = adapters / run.name / "adapter"
    if cut_dir.exists():
        shutil.rmtree(cut_dir)
    info = truncate_adapter(full.model, ranks, cut_dir)
    curve = parameter_curve(full, CURVE_KS)
    del full

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    keep = ("preset", "model_id", "data_source", "learning_rate", "seed", "data_seed", "max_steps", "optimizer",
            "compute_dtype", "preset_fields", "data", "train_fingerprint", "val_fingerprint", "test_fingerprint",
            "stack", "steps", "grit_config")
    summary = {k: source[k] for k in keep if k in source}
    summary.update(
        arm=run.arm, description=DERIVED[run.arm].description, run_dir=str(target), source_run=run.source,
        ranks_from=run.ranks_from, trainable_parameters=info["parameters"], adapter_bytes=info["bytes"],
        truncation={"parameters": info["parameters"], "full_parameters": info["full_parameters"],
                    "bytes": info["bytes"], "source_bytes": (source_adapter / ADAPTER_FILE).stat().st_size,
                    "ranks": info["ranks"], "rank_combine": RANK_COMBINE,
                    "mean_relative_error": float(np.mean(list(info["relative_error"].values())))},
        source_test_loss=source.get("test_loss"), parameter_curve=curve)
    atomic_write_text(target / SUMMARY_NAME, json.dumps(summary, indent=2, default=str))
    cut = arms.load_saved_adapter(preset, spec, cut_dir)
    return arms.ArmResult(run.arm, preset, cut.model, cut.tokenizer, None, SummaryFile(target), cut.data, target,
                          shared_tokenizer=cut.tokenizer)


def retrain_source(preset, spec, source: Mapping[str, Any], adapter_dir: Path) -> None:
    """Train a finished run again, from its seed, to get back its adapter (adapters are not committed), and
    check it is the same run: its batch hashes and validation losses must equal the committed summary's."""
    from . import arms

    if source.get("learning_rate") != preset.learning_rate or source.get("seed") != preset.seed \
            or source.get("max_steps") != preset.max_steps:
        raise ValueError(f"{source.get('run_dir')}: its rate/seed/steps differ from the preset given to retrain it")
    print(f"[claims] the adapter of {source.get('run_dir')} is not on disk: training it again from seed "
          f"{preset.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="grit_retrain_") as tmp:
        res = arms.run_hf(preset, spec, logdir=tmp, output_dir=str(Path(tmp) / "trainer"), run_name="source")
        again = res.summary
        for key in ("batch_hashes", "eval_loss"):
            a, b = again.get(key), source.get(key)
            same = a == b if key == "batch_hashes" else (
                a is not None and b is not None and set(a) == set(b)
                and all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in a))
            if not same:
                raise RuntimeError(f"retraining {source.get('run_dir')} did not reproduce its {key}; the committed "
                                   "run came from other code or another machine: delete its run directory so the "
                                   "sweep trains and evaluates it again")
        res.model.save_pretrained(str(adapter_dir))


def parameter_curve(res, ks: Iterable[int]) -> list[dict[str, Any]]:
    """Test loss of ``res.model``'s adapter cut to one global k, for each k: [{k, parameters, bytes, test_loss}]."""
    from .truncate import truncate_adapter

    out = []
    with tempfile.TemporaryDirectory(prefix="grit_curve_") as tmp:
        for k in ks:
            d = Path(tmp) / f"k{k}"
            info = truncate_adapter(res.model, int(k), d)
            loss, _ = _loss_with_adapter(res, d, f"k{k}")
            out.append({"k": int(k), "parameters": info["parameters"], "bytes": info["bytes"], "test_loss": loss})
    return out


# ----------------------------------------------------------------------------- the report

CLAIM_ROWS = (  # (row label, arm, what)
    ("grit", "grit", "tier 2, seeds shared with grit_full"),
    ("grit_full (full)", "grit_full", "r = preset rank, reprojection on"),
    ("grit_full (truncated to GRIT's k)", "grit_full_truncated", "SVD cut, plain PEFT reload"),
    ("control (full)", "control", "tier 2, same seeds"),
    ("control (truncated to GRIT's k)", "control_truncated", "SVD cut to grit_full's k at the same seed"),
    ("control_rk", CONTROL_RK, "trained with rank_pattern = grit_full's k"),
)
CLAIM_COLUMNS = (("parameters", "parameters", ",.0f"), ("adapter_bytes", "adapter bytes", ",.0f"),
                 ("test_loss", "test loss", ".4f"), ("exact_match", "exact match", ".3f"),
                 ("retention_kl", "retention KL", ".4g"), ("drift", "drift", ".4g"))


def _select(records, arm: str, seeds: Sequence[int], steps: int, lr: float | None) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["arm"] == arm and r["seed"] in seeds and r["max_steps"] == steps
            and (lr is None or math.isclose(r["learning_rate"], lr, rel_tol=1e-9))}


def claims_markdown(records: Sequence[Mapping[str, Any]], *, steps: int, lr_grit: float, lr_control: float,
                    base_seed: int, image_prefix: str, curve_plot: str | None) -> str:
    """The README section "GRIT's claims" from the finished runs (``grit_study.sweep.finished_records``: tier 4
    and the tier-2 grit/control runs); runs without a test evaluation are left out."""
    from .stats import paired_difference, verdict

    records = [r for r in records if r.get("test_loss") is not None]

    seeds = [base_seed + k for k in range(CLAIM_SEEDS)]
    lrs = {"grit": lr_grit, "grit_full": lr_grit, "grit_full_truncated": lr_grit, "control": lr_control,
           "control_truncated": lr_control, CONTROL_RK: lr_control}
    by = {arm: _select(records, arm, seeds, steps, lrs[arm]) for _, arm, _ in CLAIM_ROWS}
    # The tier-2 runs were trained before adapter_bytes was recorded: their adapter has the control's shape,
    # whose size the control's cut records as source_bytes (grit_full's as the one of grit_full).
    for arm, src in (("control", "control_truncated"), ("grit", "control_truncated"),
                     ("grit_full", "grit_full_truncated")):
        for s, r in by[arm].items():
            if r.get("adapter_bytes") is None and s in by[src]:
                r["adapter_bytes"] = by[src][s]["truncation"]["source_bytes"]
    md = ["### GRIT's claims, measured", "",
          f"{steps} steps, seeds {seeds} (mean ± sd over the seeds present); grit arms at lr {lr_grit:.3g}, control "
          f"arms at {lr_control:.3g}. Parameters are counted from the saved tensors, bytes are the size of "
          "`adapter_model.safetensors`. A cut adapter is reloaded with plain PEFT before it is evaluated. "
          "k per module is max(k_A, k_B) of GRIT's 99%-energy ranks at its last factor inversion.", ""]
    header = ["row", "seeds"] + [t for _, t, _ in CLAIM_COLUMNS] + ["what"]
    body = []
    for label, arm, what in CLAIM_ROWS:
        rs = list(by[arm].values())
        cells = [mean_sd_cell([r[key] for r in rs if r.get(key) is not None], spec)
                 for key, _, spec in CLAIM_COLUMNS]
        body.append([label, str(len(rs))] + cells + [what])
    proj = [r["projector_truncation"] for r in by["grit_full"].values() if r.get("projector_truncation")]
    if proj:
        body.append(["grit_full (projector truncation, secondary)", str(len(proj)),
                     mean_sd_cell([p["parameters"] for p in proj], ",.0f"),
                     mean_sd_cell([p["bytes"] for p in proj], ",.0f"),
                     mean_sd_cell([p["test_loss"] for p in proj], ".4f"), "–", "–", "–",
                     "weights projected by P_A, P_B as reprojection does, test loss only"])
    md += markdown_table(header, body) + [""]

    # The claim: the cut costs grit_full less than cutting the control or training control_rk. The added loss
    # alone favours grit_full: reprojection has already projected its weights onto rank-k subspaces during
    # training, so part of the cut's price is paid before the cut; the test loss at the same parameter count
    # (and grit_full against grit, reprojection's own price) is what does not.
    cost = {"grit_full": _cost(by["grit_full_truncated"], by["grit_full"]),
            "control": _cost(by["control_truncated"], by["control"]),
            CONTROL_RK: _cost(by[CONTROL_RK], by["control"])}
    loss = {arm: {s: r["test_loss"] for s, r in by[arm].items()} for arm in by}
    md += ["GRIT's claim holds only if its cut is better than the others on both measures, paired by seed (95% "
           "t-interval of the difference, verdicts computed). *Added loss*: grit_full cut − grit_full; control cut − "
           "control; control_rk − control. It alone favours grit_full, whose reprojection already projects the "
           "weights onto rank-k subspaces while it trains, so *test loss* at the same parameter count is compared "
           "too, and grit_full against grit shows what reprojection itself costs:", ""]
    comparisons = (("grit_full cut vs control cut to the same k", "added loss", cost["grit_full"], cost["control"]),
                   ("grit_full cut vs control_rk (same parameters)", "added loss", cost["grit_full"], cost[CONTROL_RK]),
                   ("grit_full cut vs control cut to the same k", "test loss", loss["grit_full_truncated"],
                    loss["control_truncated"]),
                   ("grit_full cut vs control_rk (same parameters)", "test loss", loss["grit_full_truncated"],
                    loss[CONTROL_RK]),
                   ("grit_full (full) vs grit", "test loss", loss["grit_full"], loss["grit"]))
    rows = []
    for what, measure, ours, other in comparisons:
        try:
            d = paired_difference(ours, other)
        except ValueError as e:
            rows.append([what, measure, "–", "–", f"open: {e}"])
            continue
        v = verdict(d, "test_loss")
        rows.append([what, measure, str(d.n), f"{d.mean:+.4f} [{d.lower:+.4f}, {d.upper:+.4f}]", v.text])
    md += markdown_table(["comparison", "measure", "seeds", "Δ (first − second)", "verdict"], rows) + [""]

    md += _ablation_markdown(records, steps, lr_grit, base_seed)
    if curve_plot:
        md += [f"![parameter curve]({image_prefix}{curve_plot})", ""]
    return "\n".join(md)


def _cost(cut: Mapping[int, Mapping], full: Mapping[int, Mapping]) -> dict[int, float]:
    return {s: cut[s]["test_loss"] - full[s]["test_loss"] for s in cut if s in full}


def _ablation_markdown(records, steps: int, lr_grit: float, seed: int) -> list[str]:
    rows = (("grit (published λ, mean statistics)", "grit"), ("grit, λ × 100", "grit_reg_x100"),
            ("grit, λ × 10,000", "grit_reg_x10000"), ("grit, EMA statistics (per-step decay)", "grit_ema"))
    out = [f"Regularizers and statistics, one seed ({seed}), grit's learning rate (descriptive: one seed "
           "cannot give an interval):", ""]
    header = ["run", "λ_kfac", "λ_reproj", "stat_update", "test loss", "exact match", "retention KL", "drift",
              "reg_kfac", "reg_reproj"]
    body = []
    for label, arm in rows:
        r = _select(records, arm, [seed], steps, lr_grit).get(seed)
        if r is None:
            body.append([label, "–", "–", "–", "not run yet"] + [""] * 5)
            continue
        cfg, gm = r.get("grit_config") or {}, r.get("grit_metrics") or {}

        def f(x, spec=".4g"):
            return "–" if x is None else format(x, spec)
        body.append([label, f(cfg.get("lambda_kfac")), f(cfg.get("lambda_reproj")), str(cfg.get("stat_update", "–")),
                     f(r["test_loss"], ".4f"), f(r.get("exact_match"), ".3f"), f(r.get("retention_kl")),
                     f(r.get("drift")), f(gm.get("grit/reg_kfac")), f(gm.get("grit/reg_reproj"))])
    return out + markdown_table(header, body) + [""]


def plot_parameter_curve(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Test loss vs total parameters of the source adapters cut to global k (mean over seeds, min-max
    band), with the per-module GRIT-k cuts as points."""
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for r in records:
        if r["arm"] in DERIVED and r.get("parameter_curve"):
            src = DERIVED[r["arm"]].source_arm
            for p in r["parameter_curve"]:
                curves.setdefault(src, {}).setdefault(p["k"], []).append((p["parameters"], p["test_loss"]))
            if r.get("truncation") and r.get("source_test_loss") is not None:  # the uncut source, k = r
                curves[src].setdefault(math.inf, []).append((r["truncation"]["full_parameters"], r["source_test_loss"]))
    if not curves:
        return None
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (src, by_k) in enumerate(sorted(curves.items())):
        ks = sorted(by_k)
        x = [by_k[k][0][0] for k in ks]
        ys = [[v for _, v in by_k[k]] for k in ks]
        color = plt.get_cmap("tab10")(i)
        named = [k for k in ks if k != math.inf]
        ax.plot(x, [np.mean(y) for y in ys], marker="o", color=color,
                label=f"{src} cut to global k {named}" + (" and uncut" if math.inf in by_k else ""))
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)
        cut = [(r["truncation"]["parameters"], r["test_loss"]) for r in records
               if r["arm"] in DERIVED and DERIVED[r["arm"]].source_arm == src and r.get("truncation")]
        if cut:
            ax.scatter(*zip(*cut), marker="*", s=120, color=color, label=f"{src} cut to GRIT's per-module k")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters (from the saved tensors)")
    ax.set_ylabel("test loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_claims(records: Sequence[Mapping[str, Any]], out_dir: str | Path, *, chosen: Mapping[str, float | None],
                 steps: int, base_seed: int, image_prefix: str = "") -> str:
    """The "GRIT's claims" Markdown (and its plot in ``out_dir``) from the finished runs."""
    lr_g, lr_c = chosen.get("grit"), chosen.get("control")
    if lr_g is None or lr_c is None:
        return ("### GRIT's claims, measured\n\nNot measured yet: tier 4 runs once tier 1 has chosen the grit and "
                "control learning rates.\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_parameter_curve(records, out / "parameter_curve.png")
    return claims_markdown(records, steps=steps, lr_grit=lr_g, lr_control=lr_c, base_seed=base_seed,
                           image_prefix=image_prefix, curve_plot=plot.name if plot else None)

