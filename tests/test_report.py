"""grit_study.report on a synthetic sweep whose effects are known by construction."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from grit_study import report, stats

FAMILIES = ("json_pair", "arith", "reverse", "sort")


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _predictions(rng, p):
    return [{"id": f"{f}-{i}", "family": f, "correct": bool(rng.random() < p)} for f in FAMILIES for i in range(32)]


def _run(rng, arm, lr, seed, *, tier, steps=60, final=None, offset=0.0, evaluated=None):
    """A record with a val curve from 2.5 (base model) down to ``final``; evaluated runs (tiers 2/3 by
    default, and the tier-1 run reused as a seed) get test metrics."""
    eval_steps = range(0, steps + 1, 25 if steps > 60 else 20)
    final = 1.2 + offset + rng.normal(0, 0.01) if final is None else final
    curve = {s: 2.5 - (2.5 - final) * s / steps for s in eval_steps}
    curve[steps] = final
    rec = {"arm": arm, "learning_rate": lr, "seed": seed, "max_steps": steps, "tier": tier, "val_loss": final,
           "val_loss_curve": {str(k): v for k, v in curve.items()},  # JSON keys, as run_summary.json has them
           "test_loss": None, "exact_match": None, "exact_match_by_family": {}, "predictions": None,
           "retention_kl": 0.05 + 0.1 * (2.5 - final) if tier == 1 else None, "drift": None,
           "median_s_per_step": 0.5, "batch_hashes": ["ignored"]}
    if tier > 1 if evaluated is None else evaluated:
        preds = _predictions(rng, 0.5 - offset)
        rec.update(test_loss=final + 0.02, exact_match=float(np.mean([p["correct"] for p in preds])),
                   exact_match_by_family={f: float(np.mean([p["correct"] for p in preds if p["family"] == f]))
                                          for f in FAMILIES},
                   predictions=preds, retention_kl=0.2 + offset + rng.normal(0, 0.005), drift=3.0 + rng.normal(0, 0.1))
    return rec


def _sweep():
    rng = np.random.default_rng(0)
    recs = []
    # tier 1: control best in the middle; grit best at the high edge. The run at the chosen rate is
    # evaluated on test and reused as seed 0 of tier 2.
    for arm, losses, chosen, off in (("control", (1.4, 1.2, 1.3), 2e-4, 0.0), ("grit", (1.5, 1.4, 1.3), 8e-4, 0.1)):
        for lr, v in zip((5e-5, 2e-4, 8e-4), losses):
            recs.append(_run(rng, arm, lr, 0, tier=1, final=v, offset=off, evaluated=lr == chosen))
    # tier 2: seeds 1-4 at the chosen rates; grit is clearly worse on loss by construction (+0.1)
    ctrl = {s: 1.2 + 0.05 * s for s in range(1, 5)}
    for s in range(1, 5):
        recs.append(_run(rng, "control", 2e-4, s, tier=2, final=ctrl[s]))
        recs.append(_run(rng, "grit", 8e-4, s, tier=2, final=ctrl[s] + 0.1 + rng.normal(0, 0.003), offset=0.1))
    recs.append(_run(rng, "grit_published", 2e-5, 1, tier=2, offset=0.2))
    # tier 3: 200 steps, 3 seeds
    for s in range(1, 4):
        recs.append(_run(rng, "control", 2e-4, s, tier=3, steps=200, final=1.0 + 0.05 * s))
        recs.append(_run(rng, "grit", 8e-4, s, tier=3, steps=200, final=1.0 + 0.05 * s + rng.normal(0, 0.05)))
    return recs


def _table_after(md, heading, intro):
    """The rows (as lists of cells) of the first table after ``intro`` inside section ``heading``."""
    section = md.split(heading, 1)[1]
    lines = (section.split(intro, 1)[1] if intro else section).strip().splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_write_report_writes_plots_and_the_right_rows(tmp_path):
    recs = _sweep()
    md = report.write_report(recs, tmp_path / "figs", learning_rates={"control": 2e-4, "grit": 8e-4},
                             n_boot=500)
    for name in report.PLOTS:
        w, h = _png_size(tmp_path / "figs" / name)
        assert w > 300 and h > 200
        assert f"({tmp_path / 'figs' / name})" in md

    summary60 = _table_after(md, "### 60 steps", "Per arm, mean ± sd over seeds (sd with n − 1):")
    assert [r[0] for r in summary60] == ["control", "grit", "grit_published"]
    assert [r[2] for r in summary60] == ["5", "5", "1"]  # seed 0 is the evaluated tier-1 run
    ctrl_mean = np.mean([r["test_loss"] for r in recs if r["arm"] == "control" and r["test_loss"] and r["max_steps"] == 60])
    ctrl_sd = np.std([r["test_loss"] for r in recs if r["arm"] == "control" and r["test_loss"] and r["max_steps"] == 60],
                     ddof=1)
    assert summary60[0][3] == f"{ctrl_mean:.4f} ± {ctrl_sd:.4f}"

    comps60 = _table_after(md, "### 60 steps", "Each arm vs control:")
    keyed = {(r[0], r[1], r[2]): r for r in comps60}
    primary = keyed[("grit", "test loss (primary)", "paired t over seeds")]
    assert primary[7] == "**worse**" and "(95%)" in primary[5]
    assert keyed[("grit_published", "test loss", "paired t over seeds")][7] == "descriptive"
    assert ("grit", "exact match", stats.CROSSED) in keyed  # seeds x prompts (was: prompts only, issue 21)
    # secondary family at 60 steps: grit x {exact match, retention KL} = 2 -> 97.5% intervals; drift is
    # descriptive since issue 21 (a size, not a quality): an uncorrected 95% interval and no label.
    assert "(97.5%)" in keyed[("grit", "retention KL", "paired t over seeds")][5]
    drift = keyed[("grit", "drift", "paired t over seeds")]
    assert drift[7] == "descriptive" and "(95%)" in drift[5] and drift[6] == "–"
    # Not pre-registered: the block says it is a re-analysis.
    assert report.REANALYSIS_NOTE in md

    comps200 = _table_after(md, "### 200 steps", "Each arm vs control:")
    assert {r[1] for r in comps200 if r[0] == "grit"} >= {"test loss"}  # no primary at 200 steps
    assert not any("primary" in r[1] for r in comps200)

    tuning = _table_after(md, "### Tuning (tier 1, final val loss)", "")
    assert [(r[0], r[2], r[3]) for r in tuning] == [("control", "0.0002", "–"), ("grit", "0.0008", "high edge: add 0.0032")]


def test_the_report_numbers_are_the_stats_numbers(tmp_path):
    recs = _sweep()
    md = report.write_report(recs, tmp_path, learning_rates={"control": 2e-4, "grit": 8e-4}, n_boot=500)
    by_seed = lambda arm: {r["seed"]: r["test_loss"] for r in recs
                           if r["arm"] == arm and r["max_steps"] == 60 and r["test_loss"] is not None}
    d = stats.paired_difference(by_seed("grit"), by_seed("control"))
    row = next(r for r in _table_after(md, "### 60 steps", "Each arm vs control:") if r[1] == "test loss (primary)")
    assert row[4] == f"{d.mean:+.4g}" and row[5] == f"[{d.lower:+.4g}, {d.upper:+.4g}] (95%)"
    assert row[6] == f"{d.p:.3g}"


def test_a_sweep_with_only_tuning_runs_reports_no_verdict_and_its_tuning(tmp_path):
    rng = np.random.default_rng(1)
    recs = [_run(rng, "control", lr, 0, tier=1, final=v) for lr, v in zip((5e-5, 2e-4, 8e-4), (1.4, 1.2, 1.3))]
    md = report.write_report(recs, tmp_path)
    assert "No verdict yet" in md and "| better |" not in md and "| worse |" not in md
    assert "Each arm vs control" not in md  # no comparison table without test losses
    assert "Tuning (tier 1" in md and (tmp_path / "lr_sweep.png").is_file()
    assert not (tmp_path / "val_loss_by_step.png").exists()


# ----------------------------------------------------------------------------- pre-registered primary (issue 21)

def _prereg(seeds, decides="paired_t", margin=0.05, diverged="base_loss"):
    from grit_study.prereg import parse_preregistration

    return parse_preregistration({
        "schema_version": 1, "preset": "p", "base_test_loss": 2.0,
        "primary": {"arm": "grit", "reference": "control", "metric": "test_loss", "steps": 60, "test": "tost",
                    "alpha": 0.05, "decides": decides},
        "margin": {"rule": "absolute", "value": margin, "justification": "test"},
        "seeds": list(seeds), "n": len(seeds), "tuning_seed": 0,
        "diverged_runs": {"rule": diverged, "justification": "test"}}, "docs/preregistration/p.json")


def _prereg_sweep(gap=0.004, diverged_seed=None):
    """Tier-1 control/grit at seed 0, then seeds 1-4 evaluated with per-prompt losses; grit - control = gap."""
    rng = np.random.default_rng(5)
    recs = [_run(rng, arm, lr, 0, tier=1, final=v) for arm in ("control", "grit")
            for lr, v in zip((5e-5, 2e-4, 8e-4), (1.4, 1.2, 1.3))]
    difficulty = rng.gamma(2.0, 0.5, size=30)
    for s in range(1, 5):
        seed_effect = 0.01 * rng.normal()
        for arm, shift in (("control", 0.0), ("grit", gap)):
            rec = _run(rng, arm, 2e-4, s, tier=2, final=1.2)
            nll = difficulty + 1.0 + seed_effect + shift + 0.002 * rng.normal(size=30)
            rec["per_prompt"] = [{"id": f"p{i}", "nll_sum": float(3 * nll[i]), "tokens": 3} for i in range(30)]
            rec["test_loss"] = float(nll.mean())
            if arm == "grit" and s == diverged_seed:
                rec["test_loss"] = float("nan")
            recs.append(rec)
    return recs


def test_a_preregistered_primary_is_an_equivalence_test(tmp_path):
    recs = _prereg_sweep()
    md = report.write_report(recs, tmp_path, preregistration=_prereg((1, 2, 3, 4)), n_boot=2000)
    assert report.REANALYSIS_NOTE not in md and "pre-registered in `docs/preregistration/p.json`" in md
    line = next(x for x in md.splitlines() if x.startswith("**Pre-registered primary**"))
    assert f"**{stats.EQUIVALENT}**" in line and "Deciding analysis: equivalent within the margin" in line
    assert "paired t over seeds" in line and "crossed bootstrap" in line and "TOST p = " in line
    # The deciding TOST is the stats module's, on the same seeds.
    by_seed = lambda arm: {r["seed"]: r["test_loss"] for r in recs if r["arm"] == arm and r["tier"] == 2}
    e = stats.tost_paired(by_seed("grit"), by_seed("control"), margin=0.05, metric="test_loss")
    assert f"90% interval [{e.ci90[0]:+.4g}, {e.ci90[1]:+.4g}]" in line
    rows = _table_after(md, "### 60 steps", "Each arm vs control:")
    assert {r[2] for r in rows if r[1] == "test loss (primary)"} == {stats.PAIRED_T, stats.CROSSED}
    # Seeds that are not the pre-registered ones: no decision.
    md = report.write_report(recs, tmp_path, preregistration=_prereg((1, 2, 3, 4, 5)), n_boot=500)
    assert "**incomplete** (the primary's seeds differ from the pre-registered [1, 2, 3, 4, 5] (missing [5]" in md
    # A margin the data cannot meet: inconclusive, by the bootstrap when the pre-registration says so.
    md = report.write_report(recs, tmp_path, preregistration=_prereg((1, 2, 3, 4), "crossed_bootstrap", 0.001),
                             n_boot=500)
    line = next(x for x in md.splitlines() if x.startswith("**Pre-registered primary**"))
    assert "Deciding analysis: " in line and line.index("(crossed bootstrap)") < line.index("Beside it")


def test_the_diverged_rule_and_the_answer_follow_the_preregistration(tmp_path):
    from grit_study import headline

    recs = _prereg_sweep(diverged_seed=2)
    p = _prereg((1, 2, 3, 4))
    md = report.write_report(recs, tmp_path, preregistration=p, n_boot=500)
    assert "Diverged runs: base_loss (seeds [2])." in md
    row = next(r for r in _table_after(md, "### 60 steps", "Per arm, mean ± sd over seeds (sd with n − 1):")
               if r[0] == "grit")
    assert row[2] == "4"  # none dropped: the diverged one counts as the base model's loss
    rows = headline.answer_rows(recs, preregistration=p)
    assert rows[0]["decision"]["label"] == stats.INCONCLUSIVE  # a loss of 2.0 at one seed widens the interval
    answer = headline.headline_markdown(rows, image=None)
    assert f"**{stats.INCONCLUSIVE}** (TOST)" in answer and "pre-registered as an equivalence test" in answer


def test_the_report_names_the_untuned_arms_it_holds(tmp_path):
    """The descriptive rows' explanation lists the arms evaluated without tier-1 runs of their own: here
    grit_published (the synthetic protocol's reason given); with every arm tuned (the registered protocol),
    none."""
    recs = _sweep()
    md = report.write_report(recs, tmp_path / "a", n_boot=200)
    assert "not tuned on val (grit_published at the published rate)" in md
    rng = np.random.default_rng(1)
    tuned = [r for r in recs if r["arm"] != "grit_published"] + [
        _run(rng, "riemannian", lr, 0, tier=1, final=v) for lr, v in ((5e-5, 1.4), (2e-4, 1.25), (8e-4, 1.3))]
    tuned += [_run(rng, "riemannian", 2e-4, s, tier=2) for s in range(1, 4)]
    md = report.write_report(tuned, tmp_path / "b", n_boot=200)
    assert "not tuned on val (none here)" in md and "loraplus" not in md


def test_the_registered_answer_gives_each_arm_its_intervals_and_decision_against_the_margin(tmp_path):
    """README's real-data answer: per arm the paired difference to the control with its 90% and 95% t-intervals
    (checked against scipy's t-interval on the differences computed here), grit's decision the pre-registered
    one, a peer's the same rule unadjusted, the base row, IFEval means; "incomplete" while grit lacks a
    pre-registered seed."""
    from scipy import stats as sps

    from grit_study import headline

    recs = _prereg_sweep()
    rng = np.random.default_rng(9)
    recs += [_run(rng, "riemannian", lr, 0, tier=1, final=v) for lr, v in ((5e-5, 1.4), (2e-4, 1.25), (8e-4, 1.3))]
    ctrl = {r["seed"]: r["test_loss"] for r in recs if r["arm"] == "control" and r["tier"] == 2}
    for s in (1, 2, 3):  # riemannian clearly worse than the margin
        rec = _run(rng, "riemannian", 2e-4, s, tier=2, final=1.3)
        rec["test_loss"] = ctrl[s] + 0.2 + 0.01 * rng.normal()
        recs.append(rec)
    ifeval = [{"arm": None, "ifeval_strict_mean": 0.30}, {"arm": "grit", "ifeval_strict_mean": 0.32},
              {"arm": "grit", "ifeval_strict_mean": 0.34}, {"arm": "control", "ifeval_strict_mean": 0.31},
              {"arm": "control", "ifeval_strict_mean": 0.5, "complete": False}]  # a smoke run: left out
    p = _prereg((1, 2, 3, 4))
    answer = headline.registered_rows(recs, p, ifeval=ifeval)
    rows = {r["arm"]: r for r in answer["rows"]}
    assert list(rows) == ["control", "grit", "riemannian"]
    grit = {r["seed"]: r["test_loss"] for r in recs if r["arm"] == "grit" and r["tier"] == 2}
    d = np.array([grit[s] - ctrl[s] for s in sorted(grit)])
    for level, got in ((0.90, rows["grit"]["equivalence"].ci90), (0.95, rows["grit"]["equivalence"].ci95)):
        lo, hi = sps.t.interval(level, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(len(d)))
        assert got == pytest.approx((lo, hi), rel=1e-9)
    assert rows["grit"]["label"] == stats.EQUIVALENT and rows["riemannian"]["label"] == "worse"
    assert rows["control"]["equivalence"] is None and rows["grit"]["ifeval"] == [0.32, 0.34]
    assert rows["control"]["ifeval"] == [0.31] and answer["base_ifeval"] == [0.30]
    md = headline.registered_markdown(answer, p, image="x/headline.png")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[4:8] == ["− control", "90% interval", "95% interval", "vs ±0.05"]
    assert table[1].startswith("| base (untuned) | – | – | 2.0000 |") and table[1].endswith("| 0.300 |")
    assert "**equivalent within the margin** (pre-registered)" in table[3] and "| 0.330 ± 0.014 |" in table[3]
    assert f"[{rows['grit']['equivalence'].ci90[0]:+.4f}, " in table[3]
    assert "Primary (grit − control, 60 steps, 4 pre-registered seeds): **equivalent within the margin**" in md
    assert md.endswith("![grit − control, test loss per seed](x/headline.png)")
    headline.plot_registered(answer, p, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    # A pre-registered seed still missing: grit's decision is "incomplete", the peers' readings stay.
    answer = headline.registered_rows(recs, _prereg((1, 2, 3, 4, 5)))
    rows = {r["arm"]: r for r in answer["rows"]}
    assert rows["grit"]["label"] == "incomplete" and rows["riemannian"]["label"] == "worse"
    assert headline.is_registered("alpaca-smollm2") and not headline.is_registered("smollm2-135m")
