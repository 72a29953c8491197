"""The sweep's statistics: learning-rate choice, paired differences, multiplicity, power, the verdict.

    choices = choose_learning_rates(records)           # tier 1: lowest final val loss per arm, edge flags
    d = paired_difference(grit_by_seed, control_by_seed)  # mean, sd, n, t-interval, p (paired by seed)
    h = holm([d1.p, d2.p, ...])                         # Holm-adjusted p + Bonferroni interval level
    b = paired_bootstrap_exact_match(preds_a, preds_b)  # EM difference, percentile interval over prompts
    m = minimum_detectable_effect(sd, n)                # smallest true difference with 80% power
    v = verdict(d, "test_loss")                        # "better" / "worse" / "no detectable difference"
    comps = compare_to_control(records, max_steps=60)  # all of the above for every arm vs control

Pure functions over plain Python data (numpy + scipy only, no torch, no grit import). A *record* is one
run's summary as a dict; ``normalize_record`` lists the keys read and ignores any others.

Conventions, fixed here for every table:
- A difference is always ``arm - reference`` (reference = ``control``), paired by training seed: the
  same seed gives both arms the same LoRA init and data order, so the seed is the unit of replication.
- Lower is better for ``test_loss``, ``val_loss``, ``retention_kl`` and ``drift``; higher is better for
  ``exact_match`` (``METRIC_DIRECTION``).
- The primary comparison (``grit`` vs ``control`` on test loss) is tested alone at alpha = 0.05 with a
  95% interval. Every other comparison (other arms on test loss; every arm on exact match, retention KL
  and drift) forms one family of m hypotheses: p-values are Holm-adjusted and intervals are Bonferroni
  (1 - 0.05/m) intervals. "better"/"worse" only when that interval excludes 0.

References: Student's paired t (e.g. Casella & Berger, Statistical Inference, 2nd ed., sec. 9.2);
Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6 (1979) 65-70;
Efron & Tibshirani, An Introduction to the Bootstrap (1993), ch. 13 (percentile interval);
power of the t-test through the noncentral t: Cohen, Statistical Power Analysis (1988), ch. 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize, stats

# +1: higher is better, -1: lower is better. An unknown metric is an error, never a guess.
METRIC_DIRECTION = {"test_loss": -1, "val_loss": -1, "retention_kl": -1, "drift": -1, "exact_match": +1}
METRICS = ("test_loss", "exact_match", "retention_kl", "drift")  # compared arm vs control, in table order
REQUIRED_KEYS = ("arm", "learning_rate", "seed", "max_steps", "tier", "val_loss")
OPTIONAL_KEYS = ("val_loss_curve", "test_loss", "exact_match", "exact_match_by_family", "predictions",
                 "retention_kl", "drift", "median_s_per_step")
NO_DIFFERENCE = "no detectable difference"


# ----------------------------------------------------------------------------- records

def normalize_record(record: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
    """A copy of ``record`` with the keys this module reads checked and typed; extra keys are kept.

    Required: ``arm`` (str), ``learning_rate`` (float), ``seed`` (int), ``max_steps`` (int), ``tier`` (1-3),
    ``val_loss`` (float, final). Optional (missing -> None): ``val_loss_curve`` ({step: loss}; JSON's
    string keys become ints), ``test_loss``, ``exact_match``, ``exact_match_by_family``, ``predictions``
    (list of {"id", "family", "correct"}), ``retention_kl``, ``drift``, ``median_s_per_step``.
    """
    where = f"record {index}" if index is not None else "record"
    missing = [k for k in REQUIRED_KEYS if record.get(k) is None]
    if missing:
        raise ValueError(f"{where} (arm {record.get('arm')!r}) lacks {missing}; every run record needs "
                         f"{list(REQUIRED_KEYS)} (see grit_study.stats.normalize_record)")
    out = dict(record)
    out["arm"] = str(record["arm"])
    out["learning_rate"] = float(record["learning_rate"])
    out["seed"] = int(record["seed"])
    out["max_steps"] = int(record["max_steps"])
    out["tier"] = int(record["tier"])
    if out["tier"] not in (1, 2, 3):
        raise ValueError(f"{where} (arm {out['arm']!r}): tier must be 1, 2 or 3, got {record['tier']!r}")
    out["val_loss"] = float(record["val_loss"])
    for k in OPTIONAL_KEYS:
        out.setdefault(k, None)
    for k in ("test_loss", "exact_match", "retention_kl", "drift", "median_s_per_step"):
        if out[k] is not None:
            out[k] = float(out[k])
    if out["val_loss_curve"] is not None:
        out["val_loss_curve"] = {int(s): float(v) for s, v in out["val_loss_curve"].items()}
    if out["exact_match_by_family"] is not None:
        out["exact_match_by_family"] = {str(f): float(v) for f, v in out["exact_match_by_family"].items()}
    if out["predictions"] is not None:
        bad = [p for p in out["predictions"] if not {"id", "family", "correct"} <= set(p)]
        if bad:
            raise ValueError(f"{where} (arm {out['arm']!r}, seed {out['seed']}): predictions need 'id', "
                             f"'family' and 'correct'; first bad entry: {bad[0]!r}")
    return out


def normalize_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [normalize_record(r, i) for i, r in enumerate(records)]


def _direction(metric: str) -> int:
    try:
        return METRIC_DIRECTION[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}: say whether higher or lower is better in "
                         f"METRIC_DIRECTION (known: {sorted(METRIC_DIRECTION)})") from None


# ----------------------------------------------------------------------------- 1. learning rates

@dataclass(frozen=True)
class LearningRateChoice:
    """Tier-1 outcome for one arm. ``val_loss[lr]`` is the final val loss (mean over seeds if several)."""

    arm: str
    grid: tuple[float, ...]  # learning rates tried, ascending
    val_loss: dict[float, float]
    best: float
    at_edge: str | None  # "low" / "high": the best is the smallest / largest rate tried; "both": one rate only
    next_point: float | None  # the point to add outward (ratio of the edge's grid step; x4 upward if one rate)

    @property
    def diverged(self) -> tuple[float, ...]:
        return tuple(lr for lr in self.grid if not math.isfinite(self.val_loss[lr]))


def choose_learning_rates(records: Iterable[Mapping[str, Any]],
                          arms: Sequence[str] | None = None) -> dict[str, LearningRateChoice]:
    """Per arm, the learning rate with the lowest final val loss among tier-1 runs.

    ``arms``: the arms to choose for (default: every arm with tier-1 runs); an arm named without a
    tier-1 run is an error. A non-finite final val loss (a diverged run) ranks last, it is not dropped.
    Several seeds at one rate are averaged. When the best rate is the lowest or highest one tried the
    choice is flagged (``at_edge``) with ``next_point`` = best / ratio or best * ratio, ratio being the
    grid's step at that edge (4 when only one rate was tried): the sweep adds that point and reruns.
    Ties go to the lower learning rate (the more conservative step size).
    """
    tier1 = [r for r in normalize_records(records) if r["tier"] == 1]
    wanted = list(arms) if arms is not None else list(dict.fromkeys(r["arm"] for r in tier1))
    out = {}
    for arm in wanted:
        runs = [r for r in tier1 if r["arm"] == arm]
        if not runs:
            raise ValueError(f"arm {arm!r} has no tier-1 (tuning) runs; run its learning-rate grid first")
        steps = sorted({r["max_steps"] for r in runs})
        if len(steps) > 1:
            raise ValueError(f"arm {arm!r}: tier-1 runs of different lengths {steps} cannot be ranked by "
                             "final val loss; tune at one max_steps")
        by_lr: dict[float, list[float]] = {}
        for r in runs:
            by_lr.setdefault(r["learning_rate"], []).append(r["val_loss"])
        val = {lr: (float(np.mean(v)) if all(math.isfinite(x) for x in v) else math.inf)
               for lr, v in by_lr.items()}
        grid = tuple(sorted(val))
        best = min(grid, key=lambda lr: (val[lr], lr))
        at_edge = next_point = None
        if best == grid[0]:
            at_edge = "low"
            next_point = best / (grid[1] / grid[0] if len(grid) > 1 else 4.0)
        if best == grid[-1]:
            at_edge = "high"
            next_point = best * (grid[-1] / grid[-2] if len(grid) > 1 else 4.0)
        if len(grid) == 1:
            at_edge = "both"
        out[arm] = LearningRateChoice(arm, grid, val, best, at_edge, next_point)
    return out


# ----------------------------------------------------------------------------- 2. paired comparison

@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` paired by seed, with a two-sided t-interval at ``confidence`` and the paired t-test p.

    mean = (1/n) Σ d_s,  sd = sqrt(Σ (d_s - mean)² / (n - 1)),  se = sd / sqrt(n),
    interval = mean ± t_{(1+confidence)/2, n-1} · se,  p = 2 · P(T_{n-1} > |mean / se|).
    """

    mean: float
    sd: float
    n: int
    lower: float
    upper: float
    p: float
    confidence: float
    seeds: tuple[int, ...]
    unpaired: tuple[int, ...] = ()  # seeds present in only one of the two arms (left out)

    @property
    def df(self) -> int:
        return self.n - 1


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *,
                      confidence: float = 0.95) -> PairedDifference:
    """Mean difference ``a[s] - b[s]`` over the seeds both dicts share, with t-interval and p-value.

    Needs at least 2 shared seeds (the sd of one difference is undefined): fewer raises ValueError.
    A non-finite value raises (a diverged seed must be looked at, not averaged). When every difference
    is identical (sd = 0) the interval is the point [mean, mean] and p is 0 (mean != 0) or 1 (mean = 0),
    where scipy.stats.ttest_rel would return nan for the latter.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = tuple(sorted(set(a) & set(b)))
    unpaired = tuple(sorted(set(a) ^ set(b)))
    if len(seeds) < 2:
        raise ValueError(f"a paired comparison needs >= 2 seeds run in both arms; shared seeds: {list(seeds)} "
                         f"(unpaired: {list(unpaired)}). Run more seeds or report the arm as descriptive.")
    d = np.array([float(a[s]) - float(b[s]) for s in seeds], dtype=np.float64)  # (n,)
    if not np.all(np.isfinite(d)):
        bad = [s for s, x in zip(seeds, d) if not math.isfinite(x)]
        raise ValueError(f"non-finite values at seeds {bad}: a diverged run cannot enter a mean; inspect it")
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se > 0:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    else:
        p = 0.0 if mean != 0 else 1.0
    return PairedDifference(mean, sd, n, mean - half, mean + half, p, confidence, seeds, unpaired)


@dataclass(frozen=True)
class HolmResult:
    """Holm-adjusted p-values (input order) and the Bonferroni level for the family's intervals."""

    adjusted: tuple[float, ...]
    interval_confidence: float  # 1 - alpha / m
    m: int

    def rejected(self, alpha: float = 0.05) -> tuple[bool, ...]:
        return tuple(p <= alpha for p in self.adjusted)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> HolmResult:
    """Holm-Bonferroni step-down adjustment of a family of m p-values (Holm 1979).

    With p_(1) <= ... <= p_(m) sorted ascending, the adjusted values are
        p~_(i) = max_{j <= i} min(1, (m - j + 1) · p_(j)),
    returned in the input order; rejecting p~ <= alpha controls the family-wise error at alpha.
    Holm has no matching interval, so the family's intervals are Bonferroni intervals at level
    1 - alpha / m (``interval_confidence``): each covers with probability >= 1 - alpha/m, so all m
    cover jointly with probability >= 1 - alpha. They are at least as wide as Holm is strict, so a
    verdict read off them (``verdict``) can be "no detectable difference" where the Holm p is < alpha,
    never the reverse: the verdict is the conservative one.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm takes a flat list of p-values, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must be finite and in [0, 1], got {list(pvalues)}")
    m = len(p)
    if m == 0:
        return HolmResult((), 1.0 - alpha, 0)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])  # (m - j + 1) p_(j), j = 1..m
    adjusted_sorted = np.maximum.accumulate(scaled)
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return HolmResult(tuple(float(x) for x in adjusted), 1.0 - alpha / m, m)


@dataclass(frozen=True)
class BootstrapDifference:
    """Exact-match difference ``a - b`` with a percentile bootstrap interval over test prompts."""

    mean: float
    lower: float
    upper: float
    se: float  # sd of the bootstrap distribution
    confidence: float
    n_prompts: int
    seeds: tuple[int, ...]
    n_boot: int
    rng_seed: int


def _correct_by_id(preds: Sequence[Mapping[str, Any]], what: str) -> dict[str, tuple[str, float]]:
    out = {}
    for p in preds:
        pid = str(p["id"])
        if pid in out:
            raise ValueError(f"{what}: prompt id {pid!r} appears twice; ids must be unique per run")
        out[pid] = (str(p["family"]), float(bool(p["correct"])))
    return out


def paired_bootstrap_exact_match(a: Mapping[int, Sequence[Mapping[str, Any]]],
                                 b: Mapping[int, Sequence[Mapping[str, Any]]], *,
                                 confidence: float = 0.95, n_boot: int = 10_000, rng_seed: int = 0,
                                 stratify: bool = True) -> BootstrapDifference:
    """Paired bootstrap over test prompts of the exact-match difference ``a - b``.

    ``a``, ``b``: seed -> that run's predictions (list of {"id", "family", "correct"}). Design:
    1. pool over the seeds both arms share: for prompt i, d_i = (1/k) Σ_s (correct_a(s,i) - correct_b(s,i));
       the EM difference is mean_i d_i (the mean over seeds of each seed's EM difference);
    2. resample prompt ids with replacement, the same ids for both arms and for every seed (a prompt's
       difficulty is shared by all seeds, so it is the prompt that is resampled, not (seed, prompt));
       with ``stratify`` (default) within each family, keeping the test set's fixed family mix;
    3. the interval is the (1-c)/2 and (1+c)/2 quantiles of the n_boot resampled means (percentile
       interval), from ``numpy.random.default_rng(rng_seed)``: the same inputs give the same interval.
    This measures uncertainty over prompts for these trained adapters; variation between training seeds
    enters only through the k seeds pooled, which the seed-paired t-test (``paired_difference``) covers.
    Every shared seed must have predictions on the same set of prompt ids in both arms, or it raises.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed has predictions in both arms (a: {sorted(a)}, b: {sorted(b)})")
    ids: list[str] | None = None
    families: dict[str, str] = {}
    diff_sum: dict[str, float] = {}
    for s in seeds:
        ca, cb = _correct_by_id(a[s], f"arm a seed {s}"), _correct_by_id(b[s], f"arm b seed {s}")
        if set(ca) != set(cb):
            raise ValueError(f"seed {s}: the arms were evaluated on different prompts "
                             f"({len(set(ca) ^ set(cb))} ids differ); a paired bootstrap needs the same test set")
        if ids is None:
            ids = sorted(ca)
        elif set(ca) != set(ids):
            raise ValueError(f"seed {s} was evaluated on a different prompt set than seed {seeds[0]}; "
                             "every seed must use the same test split (same data seed)")
        for pid, (fam, ok) in ca.items():
            families[pid] = fam
            diff_sum[pid] = diff_sum.get(pid, 0.0) + ok - cb[pid][1]
    assert ids is not None
    d = np.array([diff_sum[i] / len(seeds) for i in ids])  # (N,) per-prompt difference, pooled over seeds
    n = len(d)
    rng = np.random.default_rng(rng_seed)
    groups = ([np.array([j for j, i in enumerate(ids) if families[i] == f]) for f in sorted(set(families.values()))]
              if stratify else [np.arange(n)])
    total = np.zeros(n_boot)
    for g in groups:  # within-family resampling: Σ over families of the family's resampled sums
        pick = rng.integers(0, len(g), size=(n_boot, len(g)))  # (B, n_f)
        total += d[g][pick].sum(axis=1)
    boot = total / n  # (B,)
    lo, hi = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return BootstrapDifference(float(d.mean()), float(lo), float(hi), float(boot.std(ddof=1)), confidence, n,
                               seeds, n_boot, rng_seed)


# ----------------------------------------------------------------------------- 3. power

@dataclass(frozen=True)
class DetectableEffect:
    """Smallest true |mean difference| a paired t-test detects with the given power.

    ``exact``: solves power(δ) = target, where with df = n - 1, t_c = t_{1-α/2, df} and noncentrality
    λ = δ·sqrt(n)/sd, power(δ) = P(T'_{df,λ} > t_c) + P(T'_{df,λ} < -t_c) (T' noncentral t).
    ``approx``: (t_{1-α/2, df} + t_{power, df}) · sd / sqrt(n), the textbook shortcut (one tail, and the
    central t in place of the noncentral one); it is slightly below ``exact`` for small n.
    """

    exact: float
    approx: float
    sd: float
    n: int
    alpha: float
    power: float


def t_test_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample (paired) t-test at true mean ``delta`` (noncentral t)."""
    df = n - 1
    tc = stats.t.ppf(1 - alpha / 2, df)
    nc = delta * math.sqrt(n) / sd
    # P(T'_λ < -t_c) = P(T'_{-λ} > t_c): scipy's nct.cdf returns nan deep in the left tail, sf does not.
    power = float(stats.nct.sf(tc, df, nc) + stats.nct.sf(tc, df, -nc))
    if not math.isfinite(power):
        raise FloatingPointError(f"noncentral t power is {power} at delta={delta}, sd={sd}, n={n}, alpha={alpha}")
    return power


def minimum_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> DetectableEffect:
    """The minimum detectable effect (MDE) of a paired t design with n seeds and sd of the differences.

    The sd is the observed one, so this is the design's resolution given the noise measured, not a
    pre-registered power analysis. n < 2 raises; sd = 0 gives 0 (any difference is detectable).
    """
    if n < 2:
        raise ValueError(f"the MDE of a paired t design needs n >= 2 seeds, got {n}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha}, power={power}")
    if not math.isfinite(sd) or sd < 0:
        raise ValueError(f"sd must be finite and >= 0, got {sd}")
    df = n - 1
    approx = float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))
    if sd == 0:
        return DetectableEffect(0.0, 0.0, sd, n, alpha, power)
    # Solve in units of sd (effect size) so the bracket does not depend on the metric's scale.
    f = lambda es: t_test_power(es, 1.0, n, alpha) - power
    hi = max(2.0 * approx / sd, 1.0)
    while f(hi) < 0:
        hi *= 2
    es = optimize.brentq(f, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return DetectableEffect(float(es * sd), approx, sd, n, alpha, power)


# ----------------------------------------------------------------------------- 4. verdict

def label(lower: float, upper: float, metric: str) -> str:
    """"better" / "worse" when [lower, upper] (an interval for arm - reference) excludes 0, else
    "no detectable difference". Lower is better for losses, KL and drift; higher for exact match."""
    sign = _direction(metric)
    if lower > 0:
        return "better" if sign > 0 else "worse"
    if upper < 0:
        return "worse" if sign > 0 else "better"
    return NO_DIFFERENCE


@dataclass(frozen=True)
class Verdict:
    label: str  # "better" / "worse" / "no detectable difference"
    metric: str
    lower: float
    upper: float
    confidence: float
    mde: float | None  # smallest |difference| detectable with ``power`` at alpha = 1 - confidence
    power: float
    text: str


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


def verdict(diff: PairedDifference | BootstrapDifference, metric: str, *, power: float = 0.8) -> Verdict:
    """The computed verdict of one comparison (``diff`` is arm - reference at its own, possibly
    corrected, confidence level). The MDE uses alpha = 1 - diff.confidence: for a ``PairedDifference``
    the noncentral-t MDE (``minimum_detectable_effect``); for a ``BootstrapDifference`` the normal
    approximation (z_{1-α/2} + z_power) · se_boot."""
    lab = label(diff.lower, diff.upper, metric)
    alpha = 1.0 - diff.confidence
    if isinstance(diff, PairedDifference):
        mde = minimum_detectable_effect(diff.sd, diff.n, alpha=alpha, power=power).exact
    else:
        mde = float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * diff.se)
    interval = f"{100 * diff.confidence:.4g}% interval [{_fmt(diff.lower)}, {_fmt(diff.upper)}]"
    if lab == NO_DIFFERENCE:
        text = (f"{NO_DIFFERENCE}: {interval} contains 0; the design detects |difference| >= {mde:.3g} "
                f"with {100 * power:.0f}% power")
    else:
        text = f"{lab}: {interval} excludes 0"
    return Verdict(lab, metric, diff.lower, diff.upper, diff.confidence, mde, power, text)


# ----------------------------------------------------------------------------- all arms vs control

@dataclass(frozen=True)
class Comparison:
    """One row of the verdict table: ``arm`` vs ``reference`` on ``metric`` at ``max_steps``."""

    arm: str
    reference: str
    metric: str
    max_steps: int
    role: str  # "primary" (uncorrected), "secondary" (Holm p, Bonferroni interval) or "descriptive"
    method: str  # "paired t over seeds" or "paired bootstrap over prompts"
    n: int  # seeds paired
    diff: PairedDifference | BootstrapDifference | None = None
    p_adjusted: float | None = None  # Holm-adjusted (secondary), raw (primary), None (bootstrap)
    verdict: Verdict | None = None
    note: str = ""


@dataclass(frozen=True)
class FinalRuns:
    """The evaluated runs of one length: arm -> seed -> record, and each arm's learning rate."""

    max_steps: int
    by_arm: dict[str, dict[int, dict[str, Any]]]
    learning_rate: dict[str, float] = field(default_factory=dict)


def final_runs(records: Iterable[Mapping[str, Any]], *, max_steps: int | None = None,
               learning_rates: Mapping[str, float] | None = None) -> FinalRuns:
    """The runs with a test loss (final evaluation) at ``max_steps``, keyed arm -> seed.

    ``max_steps=None``: the only length present among evaluated runs, else an error naming them.
    ``learning_rates``: arm -> rate to keep (e.g. from ``choose_learning_rates``); without it an arm
    evaluated at more than one rate is an error. Two records for one (arm, rate, seed, steps) are an error.
    """
    recs = [r for r in normalize_records(records) if r["test_loss"] is not None]
    lengths = sorted({r["max_steps"] for r in recs})
    if max_steps is None:
        if len(lengths) != 1:
            raise ValueError(f"evaluated runs have lengths {lengths}; pass max_steps= to pick one")
        max_steps = lengths[0]
    recs = [r for r in recs if r["max_steps"] == max_steps]
    if not recs:
        raise ValueError(f"no evaluated runs (with test_loss) at max_steps={max_steps}; lengths present: {lengths}")
    if learning_rates is not None:
        recs = [r for r in recs if r["arm"] not in learning_rates
                or math.isclose(r["learning_rate"], learning_rates[r["arm"]], rel_tol=1e-9)]
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    lrs: dict[str, set[float]] = {}
    for r in recs:
        lrs.setdefault(r["arm"], set()).add(r["learning_rate"])
        seeds = by_arm.setdefault(r["arm"], {})
        if r["seed"] in seeds:
            raise ValueError(f"two evaluated runs of arm {r['arm']!r} at lr {r['learning_rate']:g}, seed {r['seed']}, "
                             f"{max_steps} steps; keep one (the newest) before comparing")
        seeds[r["seed"]] = r
    multi = {a: sorted(v) for a, v in lrs.items() if len(v) > 1}
    if multi:
        raise ValueError(f"arms evaluated at several learning rates at {max_steps} steps: {multi}; pass "
                         "learning_rates={arm: lr} (choose_learning_rates gives them)")
    return FinalRuns(max_steps, by_arm, {a: next(iter(v)) for a, v in lrs.items()})


def compare_to_control(records: Iterable[Mapping[str, Any]], *, reference: str = "control",
                       primary: tuple[str, str] | None = ("grit", "test_loss"),
                       metrics: Sequence[str] = METRICS, max_steps: int | None = None,
                       learning_rates: Mapping[str, float] | None = None, alpha: float = 0.05,
                       power: float = 0.8, bootstrap: bool = True, n_boot: int = 10_000,
                       rng_seed: int = 0) -> list[Comparison]:
    """Every arm vs ``reference`` on every metric, paired by seed, with the multiplicity the study fixed.

    1. ``primary`` (arm, metric): tested alone, 1 - alpha interval, raw p. ``None``: no primary (e.g.
       for the 200-step tier, whose comparisons are all secondary).
    2. every other (arm, metric) with >= 2 paired seeds: one family of m; Holm-adjusted p, Bonferroni
       1 - alpha/m intervals; the verdict reads the interval.
    3. with fewer than 2 paired seeds: role "descriptive", no interval, no verdict (said in ``note``).
    4. ``bootstrap``: for each arm whose exact match is in the family or primary, an extra row with the
       paired bootstrap over prompts (``paired_bootstrap_exact_match``) at the same confidence level as
       that arm's t-row; it is a second view of the same hypothesis, not counted in m.
    A metric that no run of an arm recorded gives no row. Rows come in (arm, metric) order.
    """
    runs = final_runs(records, max_steps=max_steps, learning_rates=learning_rates)
    if reference not in runs.by_arm:
        raise ValueError(f"reference arm {reference!r} has no evaluated runs at {runs.max_steps} steps; "
                         f"arms present: {sorted(runs.by_arm)}")
    for m in metrics:
        _direction(m)
    ref = runs.by_arm[reference]
    rows: list[dict[str, Any]] = []
    for arm, by_seed in runs.by_arm.items():
        if arm == reference:
            continue
        for metric in metrics:
            a = {s: r[metric] for s, r in by_seed.items() if r[metric] is not None}
            b = {s: r[metric] for s, r in ref.items() if r[metric] is not None}
            if not a:
                continue
            shared = sorted(set(a) & set(b))
            role = "primary" if (arm, metric) == primary else "secondary"
            if len(shared) < 2:
                role = "descriptive"
            rows.append({"arm": arm, "metric": metric, "a": a, "b": b, "n": len(shared), "role": role})
    family = [r for r in rows if r["role"] == "secondary"]
    m = len(family)
    for r in rows:
        if r["role"] != "descriptive":
            conf = 1 - alpha if r["role"] == "primary" else 1 - alpha / m
            r["diff"] = paired_difference(r["a"], r["b"], confidence=conf)
    h = holm([r["diff"].p for r in family], alpha)
    for r, p_adj in zip(family, h.adjusted):
        r["p_adjusted"] = p_adj
    out = []
    for r in rows:
        common = dict(arm=r["arm"], reference=reference, metric=r["metric"], max_steps=runs.max_steps,
                      role=r["role"], n=r["n"])
        if r["role"] == "descriptive":
            out.append(Comparison(method="paired t over seeds", **common,
                                  note=f"{r['n']} paired seed(s): descriptive only, no interval"))
            continue
        d = r["diff"]
        note = "uncorrected 95%" if r["role"] == "primary" else f"Holm p, Bonferroni {100 * d.confidence:.4g}% (m={m})"
        out.append(Comparison(method="paired t over seeds", **common, diff=d,
                              p_adjusted=r.get("p_adjusted", d.p), verdict=verdict(d, r["metric"], power=power),
                              note=note))
        if bootstrap and r["metric"] == "exact_match":
            pa = {s: rec["predictions"] for s, rec in runs.by_arm[r["arm"]].items() if rec["predictions"]}
            pb = {s: rec["predictions"] for s, rec in ref.items() if rec["predictions"]}
            if set(pa) & set(pb):
                bd = paired_bootstrap_exact_match(pa, pb, confidence=d.confidence, n_boot=n_boot, rng_seed=rng_seed)
                out.append(Comparison(method="paired bootstrap over prompts", **{**common, "n": len(bd.seeds)},
                                      diff=bd, verdict=verdict(bd, "exact_match", power=power),
                                      note=f"{bd.n_prompts} prompts x {len(bd.seeds)} seeds, {bd.n_boot} resamples, "
                                           f"rng seed {bd.rng_seed}; same level as the t-row"))
    return out
