"""The sweep's statistics: learning-rate choice, paired differences, multiplicity, power, the verdict.

    choices = choose_learning_rates(records)           # tier 1: lowest final val loss per arm, edge flags
    d = paired_difference(grit_by_seed, control_by_seed)  # mean, sd, n, t-interval, p (paired by seed)
    h = holm([d1.p, d2.p, ...])                         # Holm-adjusted p + Bonferroni interval level
    c = crossed_bootstrap(grit_prompts, control_prompts)  # seeds x prompts, token-weighted (per-prompt data)
    m = minimum_detectable_effect(sd, n)                # smallest true difference with 80% power
    u = sd_upper_bound(sd, n)                           # one-sided 95% upper bound of the paired sd (chi-square)
    e = tost_paired(grit_by_seed, control_by_seed, margin=0.02, metric="test_loss")  # the pre-registered primary
    w = tost_power(n=10, sd=0.02, margin=0.02)          # power of that equivalence test (issue 22 chooses n)
    v = verdict(d, "test_loss")                        # "better" / "worse" / "no detectable difference"
    comps = compare_to_control(records, max_steps=60)  # all of the above for every arm vs control

Pure functions over plain Python data (numpy + scipy only, no torch, no grit import). A *record* is one
run's summary as a dict; ``normalize_record`` lists the keys read and ignores any others.

Conventions, fixed here for every table:
- A difference is always ``arm - reference`` (reference = ``control``; ``grit_sgd`` is also compared with
  ``control_sgd``), paired by training seed: the same seed gives both arms the same LoRA init and data
  order, so the seed is the unit of replication.
- Lower is better for ``test_loss``, ``val_loss``, ``retention_kl`` and ``drift``; higher is better for
  ``exact_match`` (``METRIC_DIRECTION``).
- The primary comparison (``grit`` vs ``control`` on test loss) is tested alone at alpha = 0.05: with a
  pre-registered margin (``grit_study.prereg``) as an equivalence test (TOST, ``tost_decision``), without one
  with a 95% interval. The other comparisons of *tuned* arms (learning rate chosen on val) on test loss,
  exact match and retention KL form one family of m hypotheses: p-values are Holm-adjusted and intervals are
  Bonferroni (1 - 0.05/m) intervals; "better"/"worse" only when that interval excludes 0. Untuned arms (run
  at a rate not chosen on val) and drift (a size, not a quality) are descriptive: an uncorrected 95%
  interval, no label, outside the family.
- Where a metric has per-prompt data (test loss from ``per_prompt.jsonl``, exact match from the saved
  predictions) a crossed bootstrap over seeds and prompts is shown beside the paired t at the same level.
  Where exactly one of the two excludes 0 the row says so (``DISAGREE``) and neither label is taken.

Per-prompt test losses (the format ``grit_study.sweep.read_per_prompt`` reads): ``per_prompt.jsonl`` in the
run directory, next to ``run_summary.json``, one JSON object per test prompt,
``{"id": str, "nll_sum": float, "tokens": int}``: the summed negative log-likelihood of the prompt's response
tokens and their count, so that Σ nll_sum / Σ tokens is the run's token-weighted test loss.

References: Student's paired t (e.g. Casella & Berger, Statistical Inference, 2nd ed., sec. 9.2);
Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6 (1979) 65-70;
Efron & Tibshirani, An Introduction to the Bootstrap (1993), ch. 13 (percentile interval);
power of the t-test through the noncentral t: Cohen, Statistical Power Analysis (1988), ch. 2;
two one-sided tests: Schuirmann, J. Pharmacokin. Biopharm. 15 (1987) 657-680; their power: Owen,
Biometrika 52 (1965) 437-446; the chi-square bound on a normal sd: Casella & Berger, ex. 9.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize, stats

# +1: higher is better, -1: lower is better. An unknown metric is an error, never a guess.
METRIC_DIRECTION = {"test_loss": -1, "val_loss": -1, "retention_kl": -1, "drift": -1, "exact_match": +1}
METRICS = ("test_loss", "exact_match", "retention_kl", "drift")  # compared arm vs control, in table order
REQUIRED_KEYS = ("arm", "learning_rate", "seed", "max_steps", "tier", "val_loss")
OPTIONAL_KEYS = ("val_loss_curve", "test_loss", "exact_match", "exact_match_by_family", "predictions",
                 "retention_kl", "drift", "median_s_per_step", "per_prompt")
NO_DIFFERENCE = "no detectable difference"


# ----------------------------------------------------------------------------- records

def normalize_record(record: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
    """A copy of ``record`` with the keys this module reads checked and typed; extra keys are kept.

    Required: ``arm`` (str), ``learning_rate`` (float), ``seed`` (int), ``max_steps`` (int), ``tier`` (1-3),
    ``val_loss`` (float, final). Optional (missing -> None): ``val_loss_curve`` ({step: loss}; JSON's
    string keys become ints), ``test_loss``, ``exact_match``, ``exact_match_by_family``, ``predictions``
    (list of {"id", "family", "correct"}), ``retention_kl``, ``drift``, ``median_s_per_step``,
    ``per_prompt`` (per-prompt test losses: the lines of ``per_prompt.jsonl`` as a list of
    {"id", "nll_sum", "tokens"} (and "family"), or already {id: (nll_sum, tokens)}; kept as the latter, the
    families as ``per_prompt_strata``, {id: family}, when every line names one).
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
    if isinstance(out["per_prompt"], list):
        out.setdefault("per_prompt_strata", per_prompt_strata(out["per_prompt"]))
        out["per_prompt"] = parse_per_prompt(out["per_prompt"],
                                             f"{where} (arm {out['arm']!r}, seed {out['seed']}) per_prompt")
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
    """Paired bootstrap over test prompts of the exact-match difference ``a - b`` (prompts only, seeds pooled).

    Since issue 21 the report uses ``crossed_bootstrap`` instead, which resamples the seeds too; this one
    measures the prompts' part of the uncertainty alone.

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


# ----------------------------------------------------------------------------- 2b. crossed bootstrap

DISAGREE = "t and bootstrap disagree"


def parse_per_prompt(rows: Iterable[Mapping[str, Any]], where: str = "per_prompt") -> dict[str, tuple[float, int]]:
    """Per-prompt test losses (``per_prompt.jsonl``: ``{"id": str, "nll_sum": float, "tokens": int}`` per line,
    other keys such as "family" ignored here) as {id: (nll_sum, tokens)}, checked: a missing key, a negative or
    non-finite ``nll_sum``, ``tokens`` < 0 (0: a response cut away entirely) or a repeated id raises
    ValueError naming ``where`` and the line (1-based)."""
    out: dict[str, tuple[float, int]] = {}
    for line, row in enumerate(rows, 1):
        missing = [k for k in ("id", "nll_sum", "tokens") if k not in row]
        if missing:
            raise ValueError(f"{where} line {line}: lacks {missing}; each line is "
                             '{"id": str, "nll_sum": float, "tokens": int}')
        pid, nll, tokens = str(row["id"]), float(row["nll_sum"]), row["tokens"]
        if not (math.isfinite(nll) and nll >= 0):
            raise ValueError(f"{where} line {line} (id {pid!r}): nll_sum must be finite and >= 0, got {row['nll_sum']!r}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"{where} line {line} (id {pid!r}): tokens must be an integer >= 0, got {tokens!r}")
        if pid in out:
            raise ValueError(f"{where} line {line}: prompt id {pid!r} appears twice; ids must be unique per run")
        out[pid] = (nll, tokens)
    return out


def per_prompt_strata(rows: Iterable[Mapping[str, Any]]) -> dict[str, str] | None:
    """{id: family} from per-prompt lines that all carry a non-null "family" (the synthetic set), else None."""
    rows = list(rows)
    if not rows or any(r.get("family") is None for r in rows):
        return None
    return {str(r["id"]): str(r["family"]) for r in rows}


def per_prompt_exact_match(preds: Sequence[Mapping[str, Any]], what: str = "predictions"
                           ) -> tuple[dict[str, tuple[float, int]], dict[str, str]]:
    """A run's saved predictions as crossed-bootstrap data: {id: (1.0 or 0.0, 1)} (exact match is the
    unweighted mean of ``correct``) and {id: family} (the strata)."""
    by_id = _correct_by_id(preds, what)
    return {i: (ok, 1) for i, (_, ok) in by_id.items()}, {i: fam for i, (fam, _) in by_id.items()}


@dataclass(frozen=True, eq=False)
class CrossedBootstrap:
    """``a - b`` with a percentile interval from resampling seeds and, crossed with them, prompts.

    ``draws``: the ``n_boot`` resampled differences (``interval`` reads other levels off them)."""

    mean: float
    lower: float
    upper: float
    se: float  # sd (ddof=1) of the resampled differences
    confidence: float
    n_prompts: int
    seeds: tuple[int, ...]
    n_boot: int
    rng_seed: int
    stratified: bool
    draws: np.ndarray = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def interval(self, confidence: float) -> tuple[float, float]:
        """The percentile interval at another level, from the same resamples."""
        lo, hi = np.quantile(self.draws, [0.5 - confidence / 2, 0.5 + confidence / 2])
        return float(lo), float(hi)


def _prompt_matrix(runs: Mapping[int, Mapping[str, tuple[float, float]]], seeds: Sequence[int], ids: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([[float(runs[s][i][0]) for s in seeds] for i in ids])   # (N, k)
    weights = np.array([[float(runs[s][i][1]) for s in seeds] for i in ids])  # (N, k)
    return values, weights


def crossed_bootstrap(a: Mapping[int, Mapping[str, tuple[float, float]]],
                      b: Mapping[int, Mapping[str, tuple[float, float]]], *, confidence: float = 0.95,
                      n_boot: int = 10_000, rng_seed: int = 0, strata: Mapping[str, str] | None = None,
                      chunk: int = 1000) -> CrossedBootstrap:
    """Bootstrap of the paired difference ``a - b`` resampling seeds and, crossed with them, prompts.

    ``a``, ``b``: seed -> {prompt id: (value sum, weight)} per run: (summed NLL, tokens) for test loss,
    (correct, 1) for exact match. For run (arm x, seed s) over a multiset I of prompts, the metric is the
    weighted mean  M_x(s, I) = Σ_{i∈I} v_x(s,i) / Σ_{i∈I} w_x(s,i)  (token-weighted loss), and the paired
    difference is  d(s, I) = M_a(s, I) - M_b(s, I). Point estimate: mean over the k shared seeds of d(s, all).

    One resample, in this order of draws from ``numpy.random.default_rng(rng_seed)``:
    1. prompts: I* = N draws with replacement from the N prompt ids (sorted), one common multiset for every
       seed and both arms (a prompt's difficulty is shared by all runs); with ``strata`` (id -> stratum,
       e.g. the family) n_f draws within each stratum f, strata in sorted order, keeping the fixed mix;
       each draw is ``rng.integers(0, n_f, size=n_f)``;
    2. seeds: k draws with replacement from the k shared seeds, ``rng.integers(0, k, size=k)`` (paired: a
       drawn seed brings both arms' runs);
    3. the statistic: (1/k) Σ over the drawn seeds s* of d(s*, I*).
    The interval is the (1-c)/2 and (1+c)/2 quantiles of ``n_boot`` resamples (percentile interval), ``se``
    their sd. Seeds carry the training noise the paired t measures, prompts the test set's sampling,
    which the t over per-seed means treats as fixed. Needs >= 2 shared seeds and the same prompt ids in
    every shared run of both arms (else ValueError). ``chunk``: resamples per matrix product (memory only;
    the draws and the result do not depend on it).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = tuple(sorted(set(a) & set(b)))
    if len(seeds) < 2:
        raise ValueError(f"a crossed bootstrap needs >= 2 seeds with per-prompt data in both arms; shared: "
                         f"{list(seeds)} (a: {sorted(a)}, b: {sorted(b)})")
    ids = sorted(a[seeds[0]])
    for s in seeds:
        for arm, runs in (("a", a), ("b", b)):
            if set(runs[s]) != set(ids):
                raise ValueError(f"arm {arm} seed {s} has per-prompt data on a different prompt set than arm a seed "
                                 f"{seeds[0]} ({len(set(runs[s]) ^ set(ids))} ids differ); every run must be "
                                 "evaluated on the same test split")
    va, wa = _prompt_matrix(a, seeds, ids)
    vb, wb = _prompt_matrix(b, seeds, ids)
    if np.any(wa < 0) or np.any(wb < 0) or np.any(wa.sum(0) <= 0) or np.any(wb.sum(0) <= 0):
        raise ValueError("per-prompt weights (tokens) must be >= 0, with a positive total in every run")
    n, k = len(ids), len(seeds)
    if strata is not None:
        missing = [i for i in ids if i not in strata]
        if missing:
            raise ValueError(f"strata lack {len(missing)} prompt ids, e.g. {missing[0]!r}")
        names = sorted({strata[i] for i in ids})
        groups = [np.array([j for j, i in enumerate(ids) if strata[i] == f]) for f in names]
    else:
        groups = [np.arange(n)]
    point = float(np.mean(va.sum(0) / wa.sum(0) - vb.sum(0) / wb.sum(0)))
    rng = np.random.default_rng(rng_seed)
    draws = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        counts = np.zeros((rows, n))  # how often each prompt is in I*
        picks = np.empty((rows, k), dtype=np.int64)  # the drawn seeds (column indices)
        for r in range(rows):
            for g in groups:
                counts[r] += np.bincount(g[rng.integers(0, len(g), size=len(g))], minlength=n)
            picks[r] = rng.integers(0, k, size=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = (counts @ va) / (counts @ wa) - (counts @ vb) / (counts @ wb)  # (rows, k): d(s, I*) for every seed
        draws[start:start + rows] = np.take_along_axis(d, picks, axis=1).mean(axis=1)
    if not np.all(np.isfinite(draws)):
        raise ValueError("a resample drew only prompts without tokens; too few prompts carry response tokens")
    lo, hi = np.quantile(draws, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return CrossedBootstrap(point, float(lo), float(hi), float(draws.std(ddof=1)), confidence, n, seeds, n_boot,
                            rng_seed, strata is not None, draws)


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


def sd_upper_bound(sd: float, n: int, *, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of the sd of normal paired differences (chi-square bound).

    With (n - 1) s² / σ² ~ χ²_{n-1}:  σ <= s · sqrt((n - 1) / χ²_{1-confidence, n-1})  with probability
    ``confidence``, χ²_{q, df} the lower q-quantile. The MDE at this sd (``Verdict.mde_upper``) is the
    resolution the design has if the noise is as large as the data still allow."""
    if n < 2:
        raise ValueError(f"an sd bound needs n >= 2, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - confidence, n - 1)))


# ----------------------------------------------------------------------------- 3b. equivalence (TOST)

EQUIVALENT = "equivalent within the margin"
INCONCLUSIVE = "inconclusive"


def tost_decision(ci90: tuple[float, float], ci95: tuple[float, float], margin: float, metric: str) -> str:
    """The pre-registered primary's decision from two intervals of ``arm - reference`` (alpha = 0.05).

    Rules, in this order (the first that holds):
    1. "equivalent within the margin": the 90% interval lies strictly inside (-margin, +margin). This is
       TOST at alpha = 0.05: both one-sided tests (H0: diff <= -margin, H0: diff >= +margin) reject at 5%.
       It holds even when the 95% interval excludes 0 (a real difference smaller than the margin).
    2. "better" / "worse": not equivalent, and the 95% interval excludes 0: entirely on the better side
       (below 0 for a loss, above 0 for exact match) is "better", on the other side "worse".
    3. "inconclusive": neither (the 90% interval reaches past a margin and the 95% interval contains 0).
    """
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"the equivalence margin must be a positive number, got {margin}")
    (l90, u90), (l95, u95) = ci90, ci95
    if -margin < l90 and u90 < margin:
        return EQUIVALENT
    lab = label(l95, u95, metric)
    return INCONCLUSIVE if lab == NO_DIFFERENCE else lab


@dataclass(frozen=True)
class Equivalence:
    """The TOST result of one comparison: ``label`` per ``tost_decision``, both intervals, and for the paired t
    the two one-sided p-values (TOST p = their max; equivalent at 5% iff p < 0.05)."""

    label: str
    metric: str
    method: str  # "paired t over seeds" or "crossed bootstrap"
    margin: float
    mean: float
    ci90: tuple[float, float]
    ci95: tuple[float, float]
    p_lower: float | None  # H0: diff <= -margin
    p_upper: float | None  # H0: diff >= +margin
    alpha: float = 0.05

    @property
    def p(self) -> float | None:
        return None if self.p_lower is None else max(self.p_lower, self.p_upper)

    @property
    def text(self) -> str:
        return (f"{self.label}: margin ±{self.margin:.4g}, 90% interval [{self.ci90[0]:+.4g}, {self.ci90[1]:+.4g}], "
                f"95% interval [{self.ci95[0]:+.4g}, {self.ci95[1]:+.4g}] ({self.method})")


def tost_paired(a: Mapping[int, float], b: Mapping[int, float], *, margin: float, metric: str,
                alpha: float = 0.05) -> Equivalence:
    """TOST of ``a - b`` paired by seed (``paired_difference``'s t) against ±``margin``.

    With mean d̄, se = s/sqrt(n), df = n - 1:  p_lower = P(T_df > (d̄ + margin)/se),
    p_upper = P(T_df < (d̄ - margin)/se); the intervals are the t-intervals at 1 - 2α (90%) and 1 - α (95%).
    se = 0 gives p = 0 or 1 by which side of each bound d̄ lies."""
    d90 = paired_difference(a, b, confidence=1 - 2 * alpha)
    d95 = paired_difference(a, b, confidence=1 - alpha)
    se = d90.sd / math.sqrt(d90.n)
    if se > 0:
        p_lower = float(stats.t.sf((d90.mean + margin) / se, d90.df))
        p_upper = float(stats.t.cdf((d90.mean - margin) / se, d90.df))
    else:
        p_lower, p_upper = float(d90.mean <= -margin), float(d90.mean >= margin)
    lab = tost_decision((d90.lower, d90.upper), (d95.lower, d95.upper), margin, metric)
    return Equivalence(lab, metric, "paired t over seeds", margin, d90.mean, (d90.lower, d90.upper),
                       (d95.lower, d95.upper), p_lower, p_upper, alpha)


def tost_bootstrap(boot: CrossedBootstrap, *, margin: float, metric: str, alpha: float = 0.05) -> Equivalence:
    """TOST read off a crossed bootstrap: its percentile intervals at 1 - 2α and 1 - α (no p-values)."""
    ci90, ci95 = boot.interval(1 - 2 * alpha), boot.interval(1 - alpha)
    return Equivalence(tost_decision(ci90, ci95, margin, metric), metric, "crossed bootstrap", margin, boot.mean,
                       ci90, ci95, None, None, alpha)


def tost_power(n: int, sd: float, margin: float, *, delta: float = 0.0, alpha: float = 0.05) -> float:
    """Probability that the paired TOST at level ``alpha`` declares equivalence within ±``margin`` with n seeds,
    true mean difference ``delta`` and true sd ``sd`` of the differences (normal), computed exactly.

    TOST rejects iff  -margin + t_c·S/√n < D̄ < margin - t_c·S/√n,  t_c = t_{1-α, n-1}. Given S, D̄ ~
    N(delta, sd²/n), so with U = (n-1) S²/sd² ~ χ²_{n-1} (independent of D̄) and s(U) = sd·sqrt(U/(n-1)):
        power = ∫ [Φ((margin - t_c s(u)/√n - delta)·√n/sd) - Φ((-margin + t_c s(u)/√n - delta)·√n/sd)]⁺ f_χ²(u) du,
    the bracket being 0 once t_c s(u)/√n >= margin, i.e. u >= (n-1)(margin·√n/(t_c·sd))² (Owen 1965)."""
    if n < 2:
        raise ValueError(f"TOST power needs n >= 2, got {n}")
    if not (sd > 0 and margin > 0 and 0 < alpha < 0.5):
        raise ValueError(f"need sd > 0, margin > 0 and 0 < alpha < 0.5; got sd={sd}, margin={margin}, alpha={alpha}")
    from scipy import integrate

    df = n - 1
    tc = float(stats.t.ppf(1 - alpha, df))
    root_n = math.sqrt(n)
    u_max = df * (margin * root_n / (tc * sd)) ** 2

    def integrand(u: float) -> float:
        half = margin - tc * sd * math.sqrt(u / df) / root_n
        upper = stats.norm.cdf((half - delta) * root_n / sd)
        lower = stats.norm.cdf((-half - delta) * root_n / sd)
        return max(0.0, upper - lower) * stats.chi2.pdf(u, df)

    mode = max(df - 2.0, 0.0)
    points = [p for p in (mode, df) if 0 < p < u_max]
    value, _ = integrate.quad(integrand, 0.0, u_max, points=points or None, limit=200, epsabs=1e-11, epsrel=1e-10)
    return float(min(1.0, max(0.0, value)))


def tost_sample_size(sd: float, margin: float, *, power: float = 0.8, delta: float = 0.0, alpha: float = 0.05,
                     n_max: int = 1000) -> int:
    """The smallest number of paired seeds n >= 2 whose TOST power (``tost_power``) reaches ``power``."""
    for n in range(2, n_max + 1):
        if tost_power(n, sd, margin, delta=delta, alpha=alpha) >= power:
            return n
    raise ValueError(f"TOST power stays below {power} up to n = {n_max} (sd={sd}, margin={margin}, delta={delta})")


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
    label: str  # "better" / "worse" / "no detectable difference" (or DISAGREE, set by compare_to_control)
    metric: str
    lower: float
    upper: float
    confidence: float
    mde: float | None  # smallest |difference| detectable with ``power`` at alpha = 1 - confidence
    power: float
    text: str
    mde_upper: float | None = None  # the MDE at the sd's one-sided 95% upper bound (paired t only)


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


def verdict(diff: PairedDifference | BootstrapDifference | CrossedBootstrap, metric: str, *,
            power: float = 0.8) -> Verdict:
    """The computed verdict of one comparison (``diff`` is arm - reference at its own, possibly
    corrected, confidence level). The MDE uses alpha = 1 - diff.confidence: for a ``PairedDifference``
    the noncentral-t MDE (``minimum_detectable_effect``) at the observed sd and (``mde_upper``) at its
    one-sided 95% upper bound (``sd_upper_bound``); for a bootstrap the normal approximation
    (z_{1-α/2} + z_power) · se_boot."""
    lab = label(diff.lower, diff.upper, metric)
    alpha = 1.0 - diff.confidence
    mde_upper = None
    if isinstance(diff, PairedDifference):
        mde = minimum_detectable_effect(diff.sd, diff.n, alpha=alpha, power=power).exact
        mde_upper = minimum_detectable_effect(sd_upper_bound(diff.sd, diff.n), diff.n, alpha=alpha, power=power).exact
    else:
        mde = float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * diff.se)
    interval = f"{100 * diff.confidence:.4g}% interval [{_fmt(diff.lower)}, {_fmt(diff.upper)}]"
    if lab == NO_DIFFERENCE:
        text = (f"{NO_DIFFERENCE}: {interval} contains 0; the design detects |difference| >= {mde:.3g} "
                f"with {100 * power:.0f}% power")
    else:
        text = f"{lab}: {interval} excludes 0"
    return Verdict(lab, metric, diff.lower, diff.upper, diff.confidence, mde, power, text, mde_upper)


# ----------------------------------------------------------------------------- all arms vs control

PAIRED_T = "paired t over seeds"
CROSSED = "crossed bootstrap (seeds x prompts)"
UNLABELLED_METRICS = ("drift",)  # a size, not a quality: reported with an interval, never better/worse


@dataclass(frozen=True)
class Comparison:
    """One row of the verdict table: ``arm`` vs ``reference`` on ``metric`` at ``max_steps``."""

    arm: str
    reference: str
    metric: str
    max_steps: int
    role: str  # "primary" (uncorrected), "secondary" (Holm p, Bonferroni interval) or "descriptive" (no label)
    method: str  # PAIRED_T or CROSSED
    n: int  # seeds paired
    diff: PairedDifference | BootstrapDifference | CrossedBootstrap | None = None
    p_adjusted: float | None = None  # Holm-adjusted (secondary), raw (primary), None (bootstrap, descriptive)
    verdict: Verdict | None = None  # None for descriptive rows
    note: str = ""
    equivalence: Equivalence | None = None  # the primary's TOST with this row's method (with a margin)


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


def _prompt_data(by_seed: Mapping[int, Mapping[str, Any]], metric: str
                 ) -> tuple[dict[int, dict[str, tuple[float, float]]], dict[str, str] | None]:
    """seed -> per-prompt (value sum, weight) for ``metric`` (test loss: ``per_prompt``, stratified by family
    when its lines name one; exact match: ``predictions``, stratified by family), and the strata; {} when the
    runs hold none."""
    out: dict[int, dict[str, tuple[float, float]]] = {}
    strata: dict[str, str] | None = None
    for s, r in by_seed.items():
        if metric == "test_loss" and r.get("per_prompt"):
            out[s] = dict(r["per_prompt"])
            if r.get("per_prompt_strata"):
                strata = {**(strata or {}), **r["per_prompt_strata"]}
        elif metric == "exact_match" and r.get("predictions"):
            out[s], fam = per_prompt_exact_match(r["predictions"], f"arm {r['arm']} seed {s}")
            strata = {**(strata or {}), **fam}
    return out, strata


def _disagree(t: Verdict, boot: Verdict) -> tuple[Verdict, Verdict] | None:
    """Both verdicts relabelled ``DISAGREE`` when exactly one of the two intervals excludes 0, else None."""
    if (t.label == NO_DIFFERENCE) == (boot.label == NO_DIFFERENCE):
        return None
    text = (f"{DISAGREE}: the paired t says {t.label} ({100 * t.confidence:.4g}% [{_fmt(t.lower)}, {_fmt(t.upper)}]), "
            f"the crossed bootstrap {boot.label} ([{_fmt(boot.lower)}, {_fmt(boot.upper)}]); neither is taken")
    return replace(t, label=DISAGREE, text=text), replace(boot, label=DISAGREE, text=text)


def compare_to_control(records: Iterable[Mapping[str, Any]], *, reference: str = "control",
                       primary: tuple[str, str] | None = ("grit", "test_loss"),
                       metrics: Sequence[str] = METRICS, max_steps: int | None = None,
                       learning_rates: Mapping[str, float] | None = None, alpha: float = 0.05,
                       power: float = 0.8, bootstrap: bool = True, n_boot: int = 10_000,
                       rng_seed: int = 0, tuned: Iterable[str] | None = None,
                       pairs: Sequence[tuple[str, str]] = (), unlabelled: Sequence[str] = UNLABELLED_METRICS,
                       margin: float | None = None) -> list[Comparison]:
    """Every arm vs ``reference`` (and each (arm, other reference) in ``pairs``, e.g. grit_sgd vs control_sgd)
    on every metric, paired by seed, with the multiplicity the study fixed.

    1. ``primary`` (arm, metric) vs ``reference``: tested alone, 1 - alpha interval, raw p; with ``margin``
       also the TOST (``tost_paired``; ``tost_bootstrap`` on its crossed-bootstrap row). ``None``: no
       primary (e.g. the 200-step tier, whose comparisons are all secondary).
    2. "secondary": every other (arm, reference, metric) with >= 2 paired seeds whose two arms are both in
       ``tuned`` (None: every arm counts as tuned) and whose metric is not in ``unlabelled``: one family of
       m; Holm-adjusted p, Bonferroni 1 - alpha/m intervals; the verdict reads the interval.
    3. "descriptive": an untuned arm (its rate not chosen on val), an ``unlabelled`` metric (drift) or fewer
       than 2 paired seeds: outside the family, no label; with >= 2 seeds an uncorrected 1 - alpha interval.
    4. ``bootstrap``: for each labelled row whose metric has per-prompt data (test loss: ``per_prompt``;
       exact match: ``predictions``) in >= 2 shared seeds, a ``crossed_bootstrap`` row at the t-row's level,
       a second view of the same hypothesis, not counted in m. Where exactly one of the two intervals
       excludes 0, both rows' label becomes ``DISAGREE``: neither is taken.
    A metric that no run of an arm recorded gives no row. Rows come in (arm, reference, metric) order.
    """
    runs = final_runs(records, max_steps=max_steps, learning_rates=learning_rates)
    if reference not in runs.by_arm:
        raise ValueError(f"reference arm {reference!r} has no evaluated runs at {runs.max_steps} steps; "
                         f"arms present: {sorted(runs.by_arm)}")
    for m in metrics:
        _direction(m)
    tuned_set = None if tuned is None else set(tuned)
    targets = [(arm, reference) for arm in runs.by_arm if arm != reference]
    targets += [(a, r) for a, r in pairs if a in runs.by_arm and r in runs.by_arm and (a, r) not in targets]
    rows: list[dict[str, Any]] = []
    for arm, ref in targets:
        for metric in metrics:
            a = {s: r[metric] for s, r in runs.by_arm[arm].items() if r[metric] is not None}
            b = {s: r[metric] for s, r in runs.by_arm[ref].items() if r[metric] is not None}
            if not a:
                continue
            n = len(set(a) & set(b))
            untuned = tuned_set is not None and not {arm, ref} <= tuned_set
            if (arm, metric) == primary and ref == reference:
                role, why = "primary", ""
            elif untuned:
                role, why = "descriptive", "untuned (learning rate not chosen on val): descriptive, outside the family"
            elif metric in unlabelled:
                role, why = "descriptive", f"{metric} is a size, not a quality: no better/worse, outside the family"
            else:
                role, why = "secondary", ""
            if n < 2:
                role, why = "descriptive", f"{n} paired seed(s): descriptive only, no interval"
            rows.append({"arm": arm, "ref": ref, "metric": metric, "a": a, "b": b, "n": n, "role": role, "why": why})
    family = [r for r in rows if r["role"] == "secondary"]
    m = len(family)
    for r in rows:
        if r["n"] >= 2:
            conf = 1 - alpha / m if r["role"] == "secondary" else 1 - alpha
            r["diff"] = paired_difference(r["a"], r["b"], confidence=conf)
    h = holm([r["diff"].p for r in family], alpha)
    for r, p_adj in zip(family, h.adjusted):
        r["p_adjusted"] = p_adj
    out = []
    for r in rows:
        common = dict(arm=r["arm"], reference=r["ref"], metric=r["metric"], max_steps=runs.max_steps, role=r["role"])
        d = r.get("diff")
        if r["role"] == "descriptive":
            note = r["why"] + (f"; uncorrected {100 * (1 - alpha):.4g}% interval" if d is not None else "")
            out.append(Comparison(method=PAIRED_T, n=r["n"], diff=d, **common, note=note))
            continue
        is_primary = r["role"] == "primary"
        note = f"uncorrected {100 * (1 - alpha):.4g}%" if is_primary else \
            f"Holm p, Bonferroni {100 * d.confidence:.4g}% (m={m})"
        t_row = Comparison(method=PAIRED_T, n=r["n"], diff=d, **common, p_adjusted=r.get("p_adjusted", d.p),
                           verdict=verdict(d, r["metric"], power=power), note=note,
                           equivalence=tost_paired(r["a"], r["b"], margin=margin, metric=r["metric"], alpha=alpha)
                           if is_primary and margin is not None else None)
        boot_row = None
        pa, strata = _prompt_data(runs.by_arm[r["arm"]], r["metric"]) if bootstrap else ({}, None)
        pb, strata_b = _prompt_data(runs.by_arm[r["ref"]], r["metric"]) if bootstrap else ({}, None)
        if len(set(pa) & set(pb)) >= 2:
            bd = crossed_bootstrap(pa, pb, confidence=d.confidence, n_boot=n_boot, rng_seed=rng_seed,
                                   strata={**(strata_b or {}), **strata} if strata else None)
            bnote = (f"{bd.n_prompts} prompts x {bd.n} seeds{', stratified by family' if bd.stratified else ''}, "
                     f"{bd.n_boot} resamples, rng seed {bd.rng_seed}; same level as the t-row")
            boot_row = Comparison(method=CROSSED, n=bd.n, diff=bd, **common, verdict=verdict(bd, r["metric"], power=power),
                                  note=bnote, equivalence=tost_bootstrap(bd, margin=margin, metric=r["metric"], alpha=alpha)
                                  if is_primary and margin is not None else None)
            both = _disagree(t_row.verdict, boot_row.verdict)
            if both is not None:
                extra = "; the t-row and the bootstrap row disagree (one interval excludes 0): neither label is taken"
                t_row = replace(t_row, verdict=both[0], note=t_row.note + extra)
                boot_row = replace(boot_row, verdict=both[1], note=boot_row.note + extra)
        out.append(t_row)
        if boot_row is not None:
            out.append(boot_row)
    return out
