"""grit_study.stats against scipy, hand computations and Monte Carlo simulation (fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from grit_study import stats


def _rec(arm, lr, seed, val, *, tier=1, steps=60, **extra):
    return {"arm": arm, "learning_rate": lr, "seed": seed, "max_steps": steps, "tier": tier, "val_loss": val, **extra}


# ----------------------------------------------------------------------------- learning rates

def test_choose_learning_rates_picks_the_minimum_and_flags_edges():
    recs = [
        # control: best in the middle of a x4 grid
        _rec("control", 5e-5, 0, 1.30), _rec("control", 2e-4, 0, 1.10), _rec("control", 8e-4, 0, 1.20),
        # grit: best at the high edge -> add 8e-4 * 4
        _rec("grit", 5e-5, 0, 1.50), _rec("grit", 2e-4, 0, 1.40), _rec("grit", 8e-4, 0, 1.35),
        # grit_sgd: the top rate diverged (nan ranks last, not dropped), best at the low edge of a x2 grid
        _rec("grit_sgd", 1e-2, 0, 1.60), _rec("grit_sgd", 2e-2, 0, 1.70), _rec("grit_sgd", 4e-2, 0, float("nan")),
        # a tier-2 run with a lower val loss must not take part in tuning
        _rec("control", 8e-4, 1, 0.50, tier=2, test_loss=0.6),
        _rec("control", 8e-4, 0, 9.0, extra_key="ignored"),  # a second seed at 8e-4: averaged with 1.20
    ]
    ch = stats.choose_learning_rates(recs, ["control", "grit", "grit_sgd"])
    assert ch["control"].best == 2e-4 and ch["control"].at_edge is None and ch["control"].next_point is None
    assert ch["control"].grid == (5e-5, 2e-4, 8e-4)
    assert ch["control"].val_loss[8e-4] == pytest.approx((1.20 + 9.0) / 2)
    assert ch["grit"].best == 8e-4 and ch["grit"].at_edge == "high"
    assert ch["grit"].next_point == pytest.approx(3.2e-3)
    assert ch["grit_sgd"].best == 1e-2 and ch["grit_sgd"].at_edge == "low"
    assert ch["grit_sgd"].next_point == pytest.approx(5e-3)
    assert ch["grit_sgd"].diverged == (4e-2,)
    with pytest.raises(ValueError, match="no tier-1"):
        stats.choose_learning_rates(recs, ["riemannian"])


def test_choose_learning_rates_refuses_a_record_without_val_loss():
    with pytest.raises(ValueError, match="val_loss"):
        stats.choose_learning_rates([{"arm": "control", "learning_rate": 2e-4, "seed": 0, "max_steps": 60, "tier": 1}])


# ----------------------------------------------------------------------------- paired t

def test_paired_difference_matches_scipy_and_a_hand_computation():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 9: 7.0}  # seed 9 has no partner: left out
    b = {0: 0.5, 1: 1.0, 2: 2.5, 3: 3.0}
    d = stats.paired_difference(a, b)
    # Hand: differences 0.5, 1.0, 0.5, 1.0 -> mean 0.75, sd sqrt(4 * 0.25^2 / 3) = 0.288675, se 0.144338,
    # t = 5.196152 on 3 df; t_{0.975,3} = 3.182446 (t table) -> 0.75 ± 3.182446 * 0.1443376 = 0.75 ± 0.4593466.
    assert d.n == 4 and d.seeds == (0, 1, 2, 3) and d.unpaired == (9,)
    assert d.mean == pytest.approx(0.75, abs=1e-12)
    assert d.sd == pytest.approx(math.sqrt(0.25 / 3), abs=1e-12)
    assert (d.lower, d.upper) == pytest.approx((0.75 - 0.4593466, 0.75 + 0.4593466), abs=2e-6)
    ref = sps.ttest_rel([1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.5, 3.0])
    assert d.p == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (d.lower, d.upper) == pytest.approx((ci.low, ci.high), rel=1e-10)
    # A wider level gives scipy's wider interval too.
    d99 = stats.paired_difference(a, b, confidence=0.99)
    ci99 = ref.confidence_interval(0.99)
    assert (d99.lower, d99.upper) == pytest.approx((ci99.low, ci99.high), rel=1e-10)


def test_paired_difference_random_cases_match_scipy():
    rng = np.random.default_rng(7)
    for n in (2, 3, 5, 9):
        x, y = rng.normal(size=n), rng.normal(size=n)
        d = stats.paired_difference(dict(enumerate(x)), dict(enumerate(y)), confidence=1 - 0.05 / 6)
        ref = sps.ttest_rel(x, y)
        ci = ref.confidence_interval(1 - 0.05 / 6)
        assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert (d.lower, d.upper) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_paired_difference_needs_two_shared_seeds_and_finite_values():
    with pytest.raises(ValueError, match=">= 2 seeds"):
        stats.paired_difference({0: 1.0, 1: 2.0}, {1: 1.5, 2: 3.0})
    with pytest.raises(ValueError, match="non-finite"):
        stats.paired_difference({0: 1.0, 1: float("nan")}, {0: 1.5, 1: 3.0})
    same = stats.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.p == 1.0 and same.lower == same.upper == 0.0  # scipy would give nan here


# ----------------------------------------------------------------------------- Holm

def test_holm_worked_example():
    # m = 4, sorted p: 0.005 (#4), 0.01 (#1), 0.03 (#3), 0.04 (#2)
    # scaled: 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, 1*0.04 = 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    h = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert h.adjusted == pytest.approx((0.03, 0.06, 0.06, 0.02), abs=1e-15)
    assert h.m == 4 and h.interval_confidence == pytest.approx(1 - 0.05 / 4)
    assert h.rejected(0.05) == (True, False, False, True)
    # capped at 1, ties keep the same adjusted value
    assert stats.holm([0.5, 0.6]).adjusted == (1.0, 1.0)
    assert stats.holm([0.02, 0.02, 0.5]).adjusted == pytest.approx((0.06, 0.06, 0.5))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        stats.holm([0.1, 1.2])


# ----------------------------------------------------------------------------- bootstrap

def _synthetic_predictions(rng, p_a, p_b, families, per_family, seeds):
    """Per prompt a latent success probability (its difficulty, shared by every seed and, shifted by the
    family's gap p_a - p_b, by both arms), then one Bernoulli draw per (arm, seed, prompt)."""
    out_a, out_b = {s: [] for s in seeds}, {s: [] for s in seeds}
    for f, fam in enumerate(families):
        qa = np.clip(p_a[f] + rng.normal(0, 0.15, size=per_family), 0, 1)  # difficulty varies within a family
        qb = np.clip(qa - (p_a[f] - p_b[f]), 0, 1)
        for s in seeds:
            ca, cb = rng.random(per_family) < qa, rng.random(per_family) < qb
            for i in range(per_family):
                out_a[s].append({"id": f"{fam}-{i}", "family": fam, "correct": bool(ca[i])})
                out_b[s].append({"id": f"{fam}-{i}", "family": fam, "correct": bool(cb[i])})
    return out_a, out_b


def test_bootstrap_point_estimate_is_the_pooled_exact_match_difference():
    a = {0: [{"id": "x", "family": "f", "correct": True}, {"id": "y", "family": "g", "correct": True}],
         1: [{"id": "x", "family": "f", "correct": False}, {"id": "y", "family": "g", "correct": True}]}
    b = {0: [{"id": "x", "family": "f", "correct": False}, {"id": "y", "family": "g", "correct": True}],
         1: [{"id": "y", "family": "g", "correct": False}, {"id": "x", "family": "f", "correct": False}]}
    bd = stats.paired_bootstrap_exact_match(a, b, n_boot=200)
    # EM: a = (1.0 + 0.5)/2, b = (0.5 + 0.0)/2 -> 0.75 - 0.25 = 0.5 (ids matched, order irrelevant)
    assert bd.mean == pytest.approx(0.5) and bd.n_prompts == 2 and bd.seeds == (0, 1)


def test_bootstrap_interval_covers_the_true_difference_and_is_reproducible():
    families = ["a", "b", "c", "d", "e", "f", "g", "h"]
    p_a = np.linspace(0.3, 0.8, 8)
    p_b = p_a - np.array([0.0, 0.05, 0.1, 0.15, 0.1, 0.05, 0.1, 0.25])  # mean gap over families = 0.1
    true = float(np.mean(p_a - p_b))
    rng = np.random.default_rng(123)
    covered, widths = 0, []
    for _ in range(100):
        pa, pb = _synthetic_predictions(rng, p_a, p_b, families, 32, seeds=(0, 1, 2))
        bd = stats.paired_bootstrap_exact_match(pa, pb, n_boot=2000, rng_seed=5)
        covered += bd.lower <= true <= bd.upper
        widths.append(bd.upper - bd.lower)
    # Nominal 95%; 100 data sets: a binomial(100, .95) lies in [88, 100] with prob > 0.999.
    assert 88 <= covered <= 100
    # Not trivially wide: with 256 prompts x 3 seeds the interval is a few points of EM.
    assert 0.02 < np.mean(widths) < 0.15
    again = stats.paired_bootstrap_exact_match(pa, pb, n_boot=2000, rng_seed=5)
    assert (again.lower, again.upper) == (bd.lower, bd.upper)
    other = stats.paired_bootstrap_exact_match(pa, pb, n_boot=2000, rng_seed=6)
    assert (other.lower, other.upper) != (bd.lower, bd.upper)


def test_bootstrap_se_is_the_analytic_se_of_the_paired_mean():
    # Resampling prompts within families, the bootstrap variance of mean_i d_i is exactly
    # Σ_f n_f σ_f² / N² (σ_f² the plug-in variance of the per-prompt differences in family f): an
    # independent formula. Resampling the two arms independently (unpaired) would give a larger se here,
    # since a prompt's difficulty is shared by both arms; ignoring the families would add the variance
    # between the families' gaps (0 and 0.4 here).
    families = ["a", "b", "c", "d"]
    p_a = np.array([0.3, 0.5, 0.6, 0.8])
    gaps = np.array([0.0, 0.4, 0.0, 0.4])
    pa, pb = _synthetic_predictions(np.random.default_rng(9), p_a, p_a - gaps, families, 40, seeds=(0, 1))
    d = {}
    for s in (0, 1):
        for x, y in zip(pa[s], pb[s]):
            d.setdefault(x["id"], []).append(float(x["correct"]) - float(y["correct"]))
    per_prompt = {i: np.mean(v) for i, v in d.items()}
    var = sum(np.var([v for i, v in per_prompt.items() if i.startswith(f + "-")]) * 40 for f in families)
    bd = stats.paired_bootstrap_exact_match(pa, pb, n_boot=40_000, rng_seed=1)
    # Monte Carlo relative error of an sd from 40k resamples: about 1/sqrt(2 * 40k) = 0.35%.
    assert bd.se == pytest.approx(math.sqrt(var) / 160, rel=0.02)
    assert bd.mean == pytest.approx(np.mean(list(per_prompt.values())), abs=1e-12)


def test_bootstrap_refuses_different_prompt_sets():
    a = {0: [{"id": "x", "family": "f", "correct": True}]}
    b = {0: [{"id": "z", "family": "f", "correct": True}]}
    with pytest.raises(ValueError, match="different prompts"):
        stats.paired_bootstrap_exact_match(a, b)


# ----------------------------------------------------------------------------- MDE

def _mc_power(delta, sd, n, alpha, reps=40_000, seed=11):
    x = np.random.default_rng(seed).normal(delta, sd, size=(reps, n))
    return float(np.mean(sps.ttest_1samp(x, 0.0, axis=1).pvalue < alpha))


@pytest.mark.parametrize("sd,n,alpha", [(0.7, 5, 0.05), (0.02, 3, 0.05), (1.0, 5, 0.05 / 6)])
def test_mde_has_80_percent_power_by_simulation(sd, n, alpha):
    m = stats.minimum_detectable_effect(sd, n, alpha=alpha, power=0.8)
    # Monte Carlo se of a power near 0.8 with 40k reps: 0.002; tolerance 0.01 is 5 se.
    assert _mc_power(m.exact, sd, n, alpha) == pytest.approx(0.8, abs=0.01)
    # ... and it is the smallest such effect: 15% less is clearly under-powered.
    assert _mc_power(0.85 * m.exact, sd, n, alpha) < 0.75


def test_mde_approximate_formula_against_t_tables():
    # n = 5, sd = 1: t_{0.975,4} = 2.7764, t_{0.80,4} = 0.9410 (t table) -> 3.7174 / sqrt(5) = 1.6625
    m = stats.minimum_detectable_effect(1.0, 5)
    assert m.approx == pytest.approx(3.7174 / math.sqrt(5), abs=2e-4)
    assert m.exact > m.approx  # the shortcut uses the central t for the power quantile
    with pytest.raises(ValueError, match="n >= 2"):
        stats.minimum_detectable_effect(1.0, 1)


# ----------------------------------------------------------------------------- verdict

def _seeds(values):
    return dict(enumerate(values))


CONTROL = [2.00, 2.10, 1.90, 2.05, 1.95]
NOISE = [0.004, -0.003, 0.002, -0.004, 0.001]


def test_verdict_clear_better_and_clear_worse_on_loss():
    better = stats.paired_difference(_seeds([c - 0.1 + e for c, e in zip(CONTROL, NOISE)]), _seeds(CONTROL))
    worse = stats.paired_difference(_seeds([c + 0.1 + e for c, e in zip(CONTROL, NOISE)]), _seeds(CONTROL))
    assert stats.verdict(better, "test_loss").label == "better"
    assert stats.verdict(worse, "test_loss").label == "worse"
    assert stats.verdict(worse, "drift").label == "worse"
    # Higher is better for exact match: the same positive difference is "better" there.
    assert stats.verdict(worse, "exact_match").label == "better"
    with pytest.raises(ValueError, match="unknown metric"):
        stats.verdict(worse, "accuracy")


def test_verdict_null_with_five_seeds_reports_interval_and_mde():
    rng = np.random.default_rng(3)
    arm = [c + 0.005 + e for c, e in zip(CONTROL, rng.normal(0, 0.05, size=5))]
    d = stats.paired_difference(_seeds(arm), _seeds(CONTROL))
    v = stats.verdict(d, "test_loss")
    assert v.label == "no detectable difference"
    assert v.lower < 0 < v.upper
    assert v.mde == pytest.approx(stats.minimum_detectable_effect(d.sd, 5).exact)
    assert v.mde > abs(d.mean)
    assert f"{v.mde:.3g}" in v.text and f"{v.lower:+.4g}" in v.text


def _final(arm, seed, test_loss, em, kl, steps=60):
    return _rec(arm, 2e-4, seed, test_loss + 0.01, tier=2, steps=steps, test_loss=test_loss, exact_match=em,
                retention_kl=kl, drift=None)


def test_compare_to_control_corrects_the_secondary_family_only():
    recs = []
    for s, c in enumerate(CONTROL):
        recs.append(_final("control", s, c, 0.40 + 0.01 * s, 0.10))
        recs.append(_final("grit", s, c + 0.1 + NOISE[s], 0.38 + 0.01 * s + NOISE[s], 0.08 + NOISE[s]))
    for s in range(3):
        recs.append(_final("riemannian", s, CONTROL[s] - 0.1 + NOISE[s], 0.41 + 0.01 * s, 0.11 + NOISE[s]))
    recs.append(_final("grit_published", 0, 2.3, 0.3, 0.2))
    comps = stats.compare_to_control(recs, bootstrap=False)
    by = {(c.arm, c.metric): c for c in comps}
    # drift is None everywhere: no row. grit_published has one seed: descriptive.
    assert ("grit", "drift") not in by
    assert by[("grit_published", "test_loss")].role == "descriptive" and by[("grit_published", "test_loss")].diff is None
    primary = by[("grit", "test_loss")]
    assert primary.role == "primary" and primary.diff.confidence == 0.95 and primary.verdict.label == "worse"
    # family: riemannian test loss + {grit, riemannian} x {exact match, retention KL} = 5
    family = [c for c in comps if c.role == "secondary"]
    assert len(family) == 5
    assert all(c.diff.confidence == pytest.approx(1 - 0.05 / 5) for c in family)
    raw = [c.diff.p for c in family]
    assert [c.p_adjusted for c in family] == pytest.approx(list(stats.holm(raw).adjusted))
    assert by[("riemannian", "test_loss")].verdict.label == "better"


# ----------------------------------------------------------------------------- crossed bootstrap (issue 21)

def _prompt_runs(rng, seeds, n_prompts, shift=0.0, seed_noise=0.0):
    """seed -> {id: (nll_sum, tokens)}: per prompt a difficulty shared by every run, tokens 1-12, a per-seed
    offset of the mean NLL per token (the training seed's effect) and per-run noise."""
    difficulty = rng.gamma(2.0, 0.5, size=n_prompts)
    tokens = rng.integers(1, 13, size=n_prompts)
    out = {}
    for s in seeds:
        offset = shift + seed_noise * rng.normal()
        per_token = np.maximum(difficulty + offset + 0.05 * rng.normal(size=n_prompts), 0.01)
        out[s] = {f"p{i}": (float(per_token[i] * tokens[i]), int(tokens[i])) for i in range(n_prompts)}
    return out


def test_crossed_bootstrap_equals_an_explicit_loop_over_the_same_draws():
    """The same draws (prompts, then seeds, per resample) summed by index in a plain loop, independently of the
    count-matrix products: every resample agrees, with and without strata, whatever the chunk size."""
    rng = np.random.default_rng(4)
    a, b = _prompt_runs(rng, (11, 12, 13, 14), 23, shift=0.1), _prompt_runs(rng, (11, 12, 13, 14, 99), 23)
    strata = {f"p{i}": "xy"[i % 2] for i in range(23)}
    for st in (None, strata):
        c = stats.crossed_bootstrap(a, b, n_boot=700, rng_seed=9, strata=st, chunk=64)
        seeds, ids = (11, 12, 13, 14), sorted(a[11])
        groups = ([np.array([j for j, i in enumerate(ids) if strata[i] == f]) for f in ("x", "y")] if st
                  else [np.arange(len(ids))])
        draws = np.random.default_rng(9)
        loop = []
        for _ in range(700):
            picked = np.concatenate([g[draws.integers(0, len(g), size=len(g))] for g in groups])
            seed_picks = draws.integers(0, len(seeds), size=len(seeds))
            diffs = []
            for j in seed_picks:
                s = seeds[j]
                ma = sum(a[s][ids[i]][0] for i in picked) / sum(a[s][ids[i]][1] for i in picked)
                mb = sum(b[s][ids[i]][0] for i in picked) / sum(b[s][ids[i]][1] for i in picked)
                diffs.append(ma - mb)
            loop.append(np.mean(diffs))
        assert c.draws == pytest.approx(np.array(loop), rel=1e-12, abs=1e-14)
        lo, hi = np.quantile(loop, [0.025, 0.975])
        assert (c.lower, c.upper) == pytest.approx((lo, hi), rel=1e-12)
        assert c.se == pytest.approx(np.std(loop, ddof=1), rel=1e-12)
        assert c.seeds == seeds and c.n_prompts == 23 and c.stratified == (st is not None)
    # The point estimate is the paired mean of the token-weighted test losses (what the paired t averages).
    loss = lambda runs, s: sum(v for v, _ in runs[s].values()) / sum(t for _, t in runs[s].values())
    d = stats.paired_difference({s: loss(a, s) for s in a}, {s: loss(b, s) for s in b})
    assert c.mean == pytest.approx(d.mean, rel=1e-12)


def test_crossed_bootstrap_variance_is_the_analytic_one_in_two_limits():
    """(1) Prompt-free: every prompt of a run has the same loss, so d(s, I) = c_s for any I and only the seed
    resampling acts: Var = (1/k) · (1/k) Σ (c_s - c̄)² (plug-in variance over k seeds). (2) Seed-free: every
    seed identical, one token per prompt: the statistic is the mean of N resampled d_i, Var = σ̂²_d / N."""
    k, n = 6, 40
    c = np.array([0.3, -0.1, 0.25, 0.05, 0.4, -0.2])
    a = {s: {f"p{i}": (1.0 + c[s], 1) for i in range(n)} for s in range(k)}
    b = {s: {f"p{i}": (1.0, 1) for i in range(n)} for s in range(k)}
    boot = stats.crossed_bootstrap(a, b, n_boot=40_000, rng_seed=2)
    # Monte Carlo relative error of an sd from 40k resamples: about 0.4%; 2% is 5 of them.
    assert boot.se == pytest.approx(math.sqrt(np.var(c) / k), rel=0.02)
    d = np.random.default_rng(5).normal(0.0, 0.3, size=n)
    a = {s: {f"p{i}": (1.0 + d[i], 1) for i in range(n)} for s in range(k)}
    boot = stats.crossed_bootstrap(a, b, n_boot=40_000, rng_seed=3)
    assert boot.se == pytest.approx(math.sqrt(np.var(d) / n), rel=0.02)
    assert boot.mean == pytest.approx(d.mean(), abs=1e-12)


def test_crossed_bootstrap_refuses_what_it_cannot_pair():
    a = {0: {"x": (1.0, 2)}, 1: {"x": (1.0, 2)}}
    with pytest.raises(ValueError, match=">= 2 seeds"):
        stats.crossed_bootstrap(a, {0: {"x": (1.0, 2)}})
    with pytest.raises(ValueError, match="different prompt set"):
        stats.crossed_bootstrap(a, {0: {"x": (1.0, 2)}, 1: {"y": (1.0, 2)}})


def test_per_prompt_lines_are_checked():
    rows = [{"id": "a", "nll_sum": 3.5, "tokens": 7, "family": "f"}, {"id": "b", "nll_sum": 0.0, "tokens": 0}]
    assert stats.parse_per_prompt(rows) == {"a": (3.5, 7), "b": (0.0, 0)}  # 0 tokens: a response cut away
    assert stats.per_prompt_strata(rows) is None and stats.per_prompt_strata(rows[:1]) == {"a": "f"}
    for bad, match in (({"id": "c", "nll_sum": 1.0}, "lacks \\['tokens'\\]"), ({"id": "c", "nll_sum": -1, "tokens": 2},
                       "nll_sum"), ({"id": "c", "nll_sum": 1.0, "tokens": -1}, "tokens"),
                       ({"id": "a", "nll_sum": 1.0, "tokens": 2}, "twice")):
        with pytest.raises(ValueError, match=f"line 3.*{match}|{match}"):
            stats.parse_per_prompt([*rows, bad], "per_prompt.jsonl")


# ----------------------------------------------------------------------------- sd bound, TOST, power

def test_sd_upper_bound_against_chi_square_tables_and_by_simulation():
    # χ²_{0.05, 4} = 0.7107 and χ²_{0.05, 9} = 3.325 (tables): sqrt(4 / 0.7107) = 2.3724, sqrt(9 / 3.325) = 1.6452
    assert stats.sd_upper_bound(1.0, 5) == pytest.approx(2.3724, abs=2e-4)
    assert stats.sd_upper_bound(0.5, 10) == pytest.approx(0.5 * 1.6452, abs=2e-4)
    x = np.random.default_rng(8).normal(0, 2.0, size=(40_000, 4))
    bounds = np.array([stats.sd_upper_bound(s, 4) for s in x.std(axis=1, ddof=1)])
    assert np.mean(bounds >= 2.0) == pytest.approx(0.95, abs=0.006)  # binomial se 0.0011
    # The verdict's second MDE is the MDE at that bound.
    d = stats.paired_difference({0: 1.0, 1: 1.2, 2: 0.9, 3: 1.05}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    v = stats.verdict(d, "test_loss")
    assert v.mde_upper == pytest.approx(stats.minimum_detectable_effect(stats.sd_upper_bound(d.sd, 4), 4).exact)
    assert v.mde_upper > v.mde


@pytest.mark.parametrize("ci90,ci95,metric,expected", [
    ((-0.01, 0.02), (-0.015, 0.025), "test_loss", stats.EQUIVALENT),   # inside ±0.03, contains 0
    ((-0.025, -0.005), (-0.028, -0.002), "test_loss", stats.EQUIVALENT),  # inside ±0.03, excludes 0: still equivalent
    ((-0.06, -0.01), (-0.07, -0.001), "test_loss", "better"),       # reaches past -0.03, 95% below 0 (loss)
    ((0.01, 0.06), (0.001, 0.07), "test_loss", "worse"),
    ((0.01, 0.06), (0.001, 0.07), "exact_match", "better"),          # higher is better for exact match
    ((-0.04, 0.02), (-0.05, 0.03), "test_loss", stats.INCONCLUSIVE),  # past the margin, 95% contains 0
    ((-0.03, 0.01), (-0.035, 0.015), "test_loss", stats.INCONCLUSIVE),  # touching -margin is not inside
])
def test_tost_decision_every_branch(ci90, ci95, metric, expected):
    assert stats.tost_decision(ci90, ci95, 0.03, metric) == expected


def test_tost_paired_matches_two_one_sided_t_tests():
    # d = (0.010, -0.004, 0.006, 0.002, 0.001): mean 0.003, squared deviations (49+49+9+1+4)e-6 = 112e-6,
    # sd = sqrt(112e-6 / 4) = 0.0052915, se = 0.0023664, df 4.
    a = {1: 1.010, 2: 0.996, 3: 1.006, 4: 1.002, 5: 1.001}
    b = {s: 1.0 for s in a}
    d = np.array([a[s] - b[s] for s in sorted(a)])
    e = stats.tost_paired(a, b, margin=0.01, metric="test_loss")
    assert e.mean == pytest.approx(0.003, abs=1e-12)
    assert e.p_lower == pytest.approx(sps.ttest_1samp(d, -0.01, alternative="greater").pvalue, rel=1e-9)
    assert e.p_upper == pytest.approx(sps.ttest_1samp(d, 0.01, alternative="less").pvalue, rel=1e-9)
    ci90 = sps.ttest_1samp(d, 0.0).confidence_interval(0.90)
    assert e.ci90 == pytest.approx((ci90.low, ci90.high), rel=1e-9)
    # Hand: t_{0.95,4} = 2.1318 -> 0.003 ± 2.1318 · 0.0023664 = 0.003 ± 0.0050448 = [-0.002045, +0.008045],
    # inside ±0.01.
    assert e.ci90 == pytest.approx((-0.002045, 0.008045), abs=2e-6)
    assert e.label == stats.EQUIVALENT and e.p < 0.05
    # Equivalence at 5% is exactly the 90% interval inside the margin: at a margin just above the upper
    # bound p_upper is just below 0.05.
    tight = stats.tost_paired(a, b, margin=e.ci90[1] * 1.001, metric="test_loss")
    assert tight.label == stats.EQUIVALENT and 0.045 < tight.p < 0.05
    assert stats.tost_paired(a, b, margin=e.ci90[1] * 0.999, metric="test_loss").label == stats.INCONCLUSIVE


def _mc_tost_power(n, sd, margin, delta, reps=200_000, seed=21):
    x = np.random.default_rng(seed).normal(delta, sd, size=(reps, n))
    mean, se = x.mean(axis=1), x.std(axis=1, ddof=1) / math.sqrt(n)
    tc = sps.t.ppf(0.95, n - 1)
    return float(np.mean((mean - tc * se > -margin) & (mean + tc * se < margin)))


@pytest.mark.parametrize("n,sd,margin,delta", [(10, 0.02, 0.02, 0.0), (5, 1.0, 1.0, 0.0), (12, 0.03, 0.025, 0.005),
                                               (3, 1.0, 2.0, 0.5)])
def test_tost_power_against_monte_carlo(n, sd, margin, delta):
    p = stats.tost_power(n, sd, margin, delta=delta)
    # Monte Carlo se with 200k reps is at most 0.0011; 0.005 is over 4 of them.
    assert p == pytest.approx(_mc_tost_power(n, sd, margin, delta), abs=0.005)


def test_tost_sample_size_is_the_smallest_n_with_the_power():
    n = stats.tost_sample_size(0.02, 0.02, power=0.8)
    assert stats.tost_power(n, 0.02, 0.02) >= 0.8 > stats.tost_power(n - 1, 0.02, 0.02)
    assert n == 11  # power 0.795 at n = 10 (checked by Monte Carlo in the test above)


# ----------------------------------------------------------------------------- the family (issue 21)

def test_untuned_arms_drift_and_the_sgd_pair_in_compare_to_control():
    """Untuned arms and drift are descriptive (uncorrected 95%, no label, outside the family); grit_sgd is
    also compared with control_sgd, inside the family; with a margin the primary carries its TOST."""
    rng = np.random.default_rng(12)
    recs = []
    for arm, shift in (("control", 0.0), ("grit", 0.002), ("loraplus", 0.3), ("control_sgd", 0.1), ("grit_sgd", 0.2)):
        for s in range(4):
            recs.append(_rec(arm, 2e-4, s, 1.0, tier=2, test_loss=1.0 + shift + 0.01 * s + 0.003 * rng.normal(),
                             exact_match=0.5 - shift + 0.01 * rng.normal(), retention_kl=0.1, drift=1.0 + shift))
    comps = stats.compare_to_control(recs, bootstrap=False, tuned={"control", "grit", "control_sgd", "grit_sgd"},
                                     pairs=[("grit_sgd", "control_sgd")], margin=0.02)
    by = {(c.arm, c.reference, c.metric): c for c in comps}
    family = [c for c in comps if c.role == "secondary"]
    # grit {EM, KL} + control_sgd {loss, EM, KL} + grit_sgd {loss, EM, KL} vs control + the same 3 vs control_sgd
    assert len(family) == 11 and all(c.diff.confidence == pytest.approx(1 - 0.05 / 11) for c in family)
    assert [c.p_adjusted for c in family] == pytest.approx(list(stats.holm([c.diff.p for c in family]).adjusted))
    for key in (("loraplus", "control", "test_loss"), ("grit", "control", "drift"), ("grit_sgd", "control_sgd", "drift")):
        c = by[key]
        assert c.role == "descriptive" and c.verdict is None and c.p_adjusted is None and c.diff.confidence == 0.95
    pair = by[("grit_sgd", "control_sgd", "test_loss")]
    a = {r["seed"]: r["test_loss"] for r in recs if r["arm"] == "grit_sgd"}
    b = {r["seed"]: r["test_loss"] for r in recs if r["arm"] == "control_sgd"}
    assert pair.diff.mean == pytest.approx(stats.paired_difference(a, b).mean) and pair.role == "secondary"
    primary = by[("grit", "control", "test_loss")]
    assert primary.role == "primary" and primary.equivalence is not None
    g = {r["seed"]: r["test_loss"] for r in recs if r["arm"] == "grit"}
    c0 = {r["seed"]: r["test_loss"] for r in recs if r["arm"] == "control"}
    assert primary.equivalence == stats.tost_paired(g, c0, margin=0.02, metric="test_loss")
    assert by[("grit", "control", "exact_match")].equivalence is None


def test_t_and_bootstrap_that_disagree_are_both_relabelled():
    """Seeds that agree closely and prompts that vary a lot: the t over 3 seeds is narrow and excludes 0, the
    crossed bootstrap (which adds the prompts' sampling) does not; neither label is taken."""
    rng = np.random.default_rng(3)
    n = 40
    per_prompt_gap = rng.normal(0.02, 0.3, size=n)
    recs = []
    for s in range(3):
        base = rng.gamma(2.0, 0.5, size=n) + 1.0
        for arm, gap in (("control", 0.0), ("grit", 1.0)):
            nll = base + gap * per_prompt_gap + 0.0005 * s
            rows = [{"id": f"p{i}", "nll_sum": float(nll[i]), "tokens": 1} for i in range(n)]
            recs.append(_rec(arm, 2e-4, s, 1.0, tier=2, test_loss=float(nll.mean()), per_prompt=rows))
    comps = stats.compare_to_control(recs, metrics=("test_loss",), n_boot=4000)
    t_row, boot_row = comps
    assert (t_row.method, boot_row.method) == (stats.PAIRED_T, stats.CROSSED)
    assert t_row.diff.lower > 0 or t_row.diff.upper < 0  # the t excludes 0 ...
    assert boot_row.diff.lower < 0 < boot_row.diff.upper  # ... the bootstrap does not
    assert t_row.verdict.label == boot_row.verdict.label == stats.DISAGREE
    assert "neither" in t_row.verdict.text and "disagree" in t_row.note and "disagree" in boot_row.note
