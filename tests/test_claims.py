"""Tier 4 (issue 12, GRIT's claims): the plan, the projector truncation, control_rk's ranks and the report,
each checked against an independent computation (numpy, eigh projectors, scipy's t-interval)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from grit_study import claims, sweep
from grit_fixtures import batch, energy_k, projector, tiny_lora_model

R, ALPHA = 4, 12  # s = 3: a dropped or doubled scale moves ΔW by x3


def _rec(arm, lr, seed, tier=4, test=None, steps=60, **extra):
    return {"arm": arm, "learning_rate": lr, "seed": seed, "max_steps": steps, "tier": tier, "val_loss": 1.0,
            "test_loss": test, **extra}


def _tier1(control_lr=2e-4, grit_lr=8e-4):
    """Tier-1 records in which control chooses control_lr and grit chooses grit_lr (the others mid-grid)."""
    recs = []
    for arm in sweep.TIER1_ARMS:
        grid = sweep.GRIDS["sgd" if arm.endswith("_sgd") else "adamw"]
        best = {"control": control_lr, "grit": grit_lr}.get(arm, grid[1])
        rates = list(grid) + ([grid[-1] * sweep.GRID_FACTOR] if best == grid[-1] else [])  # the edge rule's point
        recs += [_rec(arm, lr, sweep.BASE_SEED, tier=1) | {"val_loss": 0.5 if lr == best else 0.9} for lr in rates]
    return recs


def test_tier4_plan_follows_grit_full_and_the_control_runs():
    seeds = [sweep.BASE_SEED + k for k in range(claims.CLAIM_SEEDS)]
    runs, notes = sweep.plan([], 60, published_lr=2e-4, tiers=(4,))
    assert runs == [] and any("tier 4" in n for n in notes)

    recs = _tier1()
    runs, notes = sweep.plan(recs, 60, published_lr=2e-4, tiers=(4,))
    assert sorted((r.arm, r.seed) for r in runs) == sorted(
        [("grit_full", s) for s in seeds] + [(a, sweep.BASE_SEED) for a in claims.ONE_SEED_ARMS])
    assert {r.learning_rate for r in runs} == {8e-4}  # every GRIT run of tier 4 at grit's chosen rate
    assert sum("once grit_full has run" in n for n in notes) == claims.CLAIM_SEEDS

    # grit_full seed 0 done and the control's seed-0 run evaluated.
    s0 = seeds[0]
    recs += [_rec("grit_full", 8e-4, s0, test=1.0), _rec("control", 2e-4, s0, tier=2, test=1.1)]
    full = "grit_full/lr8e-04_seed3407_steps60"
    runs, notes = sweep.plan(recs, 60, published_lr=2e-4, tiers=(4,))
    derived = {r.arm: r for r in runs if r.seed == s0 and r.arm != "grit_full" and r.arm not in claims.ONE_SEED_ARMS}
    assert set(derived) == {"grit_full_truncated", "control_truncated", claims.CONTROL_RK}
    assert derived["grit_full_truncated"].source == full and derived["grit_full_truncated"].ranks_from == full
    assert derived[claims.CONTROL_RK].ranks_from == full and derived[claims.CONTROL_RK].source is None
    assert derived[claims.CONTROL_RK].learning_rate == 2e-4
    cut = next(r for r in runs if r.arm == "control_truncated")  # its adapter is trained again by the run
    assert cut.source == "control/lr2e-04_seed3407_steps60" and cut.ranks_from == full and cut.learning_rate == 2e-4
    assert sweep.run_kind(cut) == "derived"
    assert len({r.name for r in runs}) == len(runs)
    # A cut run's definition names what it cuts and whose ranks: another source makes it another run.
    d = sweep.definition(cut, "tiny")
    assert d["derived"]["from"] == cut.source and d["ranks_from"] == full and d["arm"]["name"] == "control"
    other = sweep.definition(sweep.PlannedRun(**{**cut.__dict__, "source": "control/other"}), "tiny")
    assert other != d
    # Tier 4 added fields to PlannedRun: a tier-1..3 run's definition must not change, or every finished run
    # of the sweep would turn stale.
    run = sweep.PlannedRun(1, "grit", 8e-4, sweep.BASE_SEED, 4, "val")
    assert set(sweep.definition(run, "tiny")) == {"arm", "preset", "learning_rate", "seed", "steps"}


def _trained_reprojecting_manager(two_sided=True):
    from grit import GRITConfig, GRITManager

    model = tiny_lora_model(seed=5, r=R, alpha=ALPHA)
    cfg = GRITConfig(lora_rank=R, kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.0, lambda_reproj=0.0,
                     min_lora_rank=1, rank_adaptation_threshold=0.8, enable_reprojection=False,
                     use_two_sided_reprojection=two_sided)
    manager = GRITManager(model, cfg)
    model(**batch(2, bsz=3, seq=12, pad_lengths=(0, 2, 5))).loss.backward()
    manager.step()
    assert manager.ready
    return model, manager


@pytest.mark.parametrize("two_sided", [True, False])
def test_projector_truncation_writes_the_projected_delta_w(tmp_path, two_sided):
    from peft import PeftModel

    from grit_fixtures import lora_pairs
    from test_truncate import delta_w

    model, manager = _trained_reprojecting_manager(two_sided)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    factors = manager.factors()
    info = claims.project_and_cut(model, manager, tmp_path / "proj")
    # Weights untouched, bit for bit.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)

    loaded = PeftModel.from_pretrained(copy.deepcopy(model).unload(), str(tmp_path / "proj"))
    got = delta_w(loaded)
    expected_params = 0
    ks_seen = []
    for name, m in lora_pairs(model):
        f = factors[name]
        F_A, F_B = f["F_A"].double(), f["F_B"].double()
        k_a, k_b = energy_k(F_A, 0.8, 1), energy_k(F_B, 0.8, 1)
        p_a = projector(F_A, k_a).numpy()
        p_b = projector(F_B, k_b).numpy() if two_sided else p_a
        a = m.lora_A["default"].weight.detach().double().numpy()
        b = m.lora_B["default"].weight.detach().double().numpy()
        want = float(m.scaling["default"]) * (b @ p_b @ p_a @ a)
        # The manager keeps its projectors in float32; a wrong side or scale is off by O(1).
        assert np.linalg.norm(got[name] - want) <= 1e-5 * np.linalg.norm(want), name
        k = max(k_a, k_b)
        ks_seen.append((k_a, k_b))
        expected_params += k * (a.shape[1] + b.shape[0])
    assert info["parameters"] == expected_params < sum(before[n].numel() for n in before)
    assert any(ka < R or kb < R for ka, kb in ks_seen)  # the cut is exercised
    manager.close()


def test_control_rk_rank_pattern_trains_the_cut_parameter_count():
    from peft import LoraConfig, get_peft_model

    from grit_fixtures import lora_pairs

    model, manager = _trained_reprojecting_manager()
    from grit_study.truncate import grit_ranks

    ranks = grit_ranks(manager, claims.RANK_COMBINE)
    pattern = claims.peft_rank_pattern(ranks)
    base = copy.deepcopy(model).unload()
    rk = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"],
                                         rank_pattern=pattern, task_type="CAUSAL_LM"))
    by_name = dict(lora_pairs(rk))
    expected = 0
    for name, m in lora_pairs(model):
        k = ranks[name]
        d_in, d_out = m.lora_A["default"].weight.shape[1], m.lora_B["default"].weight.shape[0]
        expected += k * (d_in + d_out)
        assert by_name[name].lora_A["default"].weight.shape == (k, d_in), name
        # PEFT's default with a rank pattern and no alpha pattern: scale alpha / k.
        assert math.isclose(by_name[name].scaling["default"], ALPHA / k)
    assert sum(p.numel() for p in rk.parameters() if p.requires_grad) == expected
    with pytest.raises(ValueError, match="prefix"):
        claims.peft_rank_pattern({"model.layers.0.q_proj": 2})
    manager.close()


def test_the_claims_report_computes_its_verdict_from_paired_costs(tmp_path):
    from scipy import stats

    lr_g, lr_c = 8e-4, 2e-4
    seeds = [sweep.BASE_SEED + k for k in range(claims.CLAIM_SEEDS)]
    rng = np.random.default_rng(0)
    recs, costs_g, costs_c, costs_rk = [], [], [], []
    for s in seeds:
        full_g, full_c = 1.0 + rng.normal(0, 0.01), 1.05 + rng.normal(0, 0.01)
        cg, cc, crk = 0.01 + rng.normal(0, 0.002), 0.05 + rng.normal(0, 0.002), 0.02 + rng.normal(0, 0.01)
        costs_g.append(cg), costs_c.append(cc), costs_rk.append(crk)
        recs += [_rec("grit", lr_g, s, tier=2, test=full_g + 0.002, parameters=1000, adapter_bytes=5000),
                 _rec("grit_full", lr_g, s, test=full_g, parameters=1000,
                      projector_truncation={"parameters": 400, "bytes": 2100, "test_loss": full_g + 0.3}),
                 _rec("grit_full_truncated", lr_g, s, test=full_g + cg, parameters=400, adapter_bytes=2000,
                      truncation={"parameters": 400, "full_parameters": 1000, "source_bytes": 5000},
                      source_test_loss=full_g,
                      parameter_curve=[{"k": k, "parameters": 100 * k, "test_loss": 1.5 - 0.05 * k} for k in (1, 2)]),
                 _rec("control", lr_c, s, tier=2, test=full_c, parameters=1000),
                 _rec("control_truncated", lr_c, s, test=full_c + cc, parameters=400, adapter_bytes=2000,
                      truncation={"parameters": 400, "source_bytes": 5000},
                      parameter_curve=[{"k": k, "parameters": 100 * k, "test_loss": 1.6 - 0.05 * k} for k in (1, 2)]),
                 _rec(claims.CONTROL_RK, lr_c, s, test=full_c + crk, parameters=400, adapter_bytes=2000)]
    recs.append(_rec("control", 8e-4, seeds[0], tier=1, test=9.0))  # another rate: must be left out
    md = claims.write_claims(recs, tmp_path, chosen={"grit": lr_g, "control": lr_c}, steps=60,
                             base_seed=sweep.BASE_SEED, image_prefix="figs/")
    assert (tmp_path / "parameter_curve.png").is_file() and "figs/parameter_curve.png" in md
    for other, name in ((costs_c, "control cut to the same k"), (costs_rk, "control_rk (same parameters)")):
        d = np.array(costs_g) - np.array(other)
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        line = next(x for x in md.splitlines() if f"vs {name} | added loss" in x)
        assert f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in line, line
    assert "better: 95% interval" in next(x for x in md.splitlines() if "vs control cut to the same k | added" in x)
    # The absolute test loss at the same parameter count, and reprojection's own price (grit_full vs grit).
    # Each arm at its own chosen rate, so the stray tier-1 control at grit's rate cannot slip into any entry.
    rate = {arm: lr_g if arm.startswith("grit") else lr_c for arm in {r["arm"] for r in recs}}
    by = {arm: np.array([r["test_loss"] for r in recs if r["arm"] == arm and r["seed"] in seeds
                         and r["learning_rate"] == rate[arm]]) for arm in rate}
    assert all(len(v) == len(seeds) for v in by.values()), {a: len(v) for a, v in by.items()}
    for name, ours, other in (("grit_full cut vs control cut to the same k", "grit_full_truncated", "control_truncated"),
                              ("grit_full cut vs control_rk (same parameters)", "grit_full_truncated", claims.CONTROL_RK),
                              ("grit_full (full) vs grit", "grit_full", "grit")):
        d = by[ours] - by[other]
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} | test loss"))
        assert f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in line, line
    control_row = next(x for x in md.splitlines() if x.startswith("| control (full)"))
    mean = np.mean([r["test_loss"] for r in recs if r["arm"] == "control" and r["learning_rate"] == lr_c])
    assert f"{mean:.4f}" in control_row and "5,000" in control_row  # bytes from the cut's source_bytes
    assert "projector truncation" in md and "not run yet" in md  # the one-seed ablation rows are open


def test_the_verdict_leaves_tier4_out(tmp_path):
    import json

    from grit_study.files import SUMMARY_NAME

    logdir = tmp_path / "logs"
    for arm, seed, tier, loss in (("control", 3407, 2, 1.0), ("control", 3408, 2, 1.1), ("grit", 3407, 2, 0.9),
                                  ("grit", 3408, 2, 1.0), ("control_rk", 3407, 4, 2.0), ("control_rk", 3408, 4, 2.1)):
        d = logdir / arm / f"lr2e-04_seed{seed}_steps60"
        d.mkdir(parents=True)
        (d / SUMMARY_NAME).write_text(json.dumps({
            "arm": arm, "learning_rate": 2e-4, "seed": seed, "max_steps": 60, "eval_loss": {"0": 2.0, "60": loss},
            "test_loss": loss, "sweep": {"tier": tier}}))
    md = sweep.write_verdict(logdir, tmp_path / "out")
    assert "| grit" in md and "control_rk" not in md


@pytest.mark.slow
def test_tier4_end_to_end_on_the_tiny_preset(tmp_path):
    """grit_full and the control trained, both cut to grit_full's ranks and reloaded with plain PEFT, and
    control_rk trained with those ranks: the counts, the k = r point of the curve and the drift are checked
    against the saved tensors and the source runs."""
    import json
    import shutil
    from dataclasses import asdict

    from safetensors import safe_open

    from grit_study.files import SUMMARY_NAME
    from grit_study.truncate import ADAPTER_FILE

    logdir, adapters = tmp_path / "logs", tmp_path / "adapters"
    common = ["--preset", "tiny", "--logdir", str(logdir), "--adapters", str(adapters)]
    logdir, adapters = logdir / "tiny", adapters / "tiny"  # the preset's own folders under the roots
    lr, seed, steps = 2e-4, sweep.BASE_SEED, 4
    full = sweep.PlannedRun(4, "grit_full", lr, seed, steps, "full")
    control = sweep.PlannedRun(2, "control", lr, seed, steps, "full")
    cut_g = sweep.PlannedRun(4, "grit_full_truncated", lr, seed, steps, "full", source=full.name, ranks_from=full.name)
    cut_c = sweep.PlannedRun(4, "control_truncated", lr, seed, steps, "full", source=control.name,
                             ranks_from=full.name)
    rk = sweep.PlannedRun(4, claims.CONTROL_RK, lr, seed, steps, "full", ranks_from=full.name)
    for run in (full, control, cut_g, cut_c, rk):
        if run is cut_c:  # adapters are not committed: a missing source adapter is trained again, and checked
            shutil.rmtree(adapters / control.name / "adapter")
        assert sweep.main(["--one", json.dumps(asdict(run)), *common]) == 0
        assert sweep.status(logdir, run, "tiny") == "done", run.name
    summary = {r.arm: json.loads((logdir / r.name / SUMMARY_NAME).read_text()) for r in (full, control, cut_g, cut_c, rk)}

    g = summary["grit_full"]
    ranks = g["grit_ranks"]["max"]
    assert set(ranks) and all(1 <= k <= 4 for k in ranks.values())
    assert g["adapter_bytes"] == (adapters / full.name / "adapter" / ADAPTER_FILE).stat().st_size
    assert 0 < g["projector_truncation"]["parameters"] <= g["trainable_parameters"]

    def shapes(name):  # {module: (d_in, d_out)} from the source adapter file on disk
        out = {}
        with safe_open(str(adapters / name / "adapter" / ADAPTER_FILE), framework="pt") as f:
            for key in f.keys():
                module = "base_model.model." + key.split("base_model.model.", 1)[1].split(".lora_")[0]
                d_in_or_out = f.get_slice(key).get_shape()
                entry = out.setdefault(module, [None, None])
                if ".lora_A" in key:
                    entry[0] = d_in_or_out[1]
                else:
                    entry[1] = d_in_or_out[0]
        return out

    for cut, source in (("grit_full_truncated", full), ("control_truncated", control)):
        s, src = summary[cut], summary[source.arm]
        dims = shapes(source.name)
        assert set(dims) == set(ranks)
        expected = sum(ranks[m] * (d_in + d_out) for m, (d_in, d_out) in dims.items())
        assert s["truncation"]["parameters"] == s["trainable_parameters"] == expected
        assert s["truncation"]["full_parameters"] == src["trainable_parameters"]
        assert s["adapter_bytes"] == (adapters / cut / f"lr2e-04_seed{seed}_steps4" / "adapter" / ADAPTER_FILE
                                      ).stat().st_size
        # Cut to k >= r the adapter is the source: the curve's k = 4 = r point reproduces its test loss.
        at_r = next(p for p in s["parameter_curve"] if p["k"] == 4)
        assert at_r["test_loss"] == pytest.approx(src["test_loss"], rel=1e-5)
        assert at_r["parameters"] == src["trainable_parameters"]
        # Eckart-Young: a cut never grows ||ΔW||_F, module by module, so the drift cannot grow.
        assert s["drift"] <= src["drift"] * (1 + 1e-6)
        assert s["test_loss"] > 0 and s["exact_match_n"] > 0 and s["retention_kl"] >= 0
        assert s["source_run"] == source.name and s["train_fingerprint"] == src["train_fingerprint"]
    assert summary[claims.CONTROL_RK]["trainable_parameters"] == summary["control_truncated"]["trainable_parameters"]
    assert summary[claims.CONTROL_RK]["rank_pattern"] == claims.peft_rank_pattern(ranks)

    md = claims.write_claims(sweep.finished_records(logdir), tmp_path / "fig", chosen={"grit": lr, "control": lr},
                             steps=steps, base_seed=seed)
    row = next(x for x in md.splitlines() if x.startswith("| control_rk"))
    assert f"{summary[claims.CONTROL_RK]['test_loss']:.4f}" in row
