"""GRIT configuration: one dataclass, checked on construction.

    cfg = GRITConfig(lora_rank=16, kfac_update_freq=10, pairing="kfac")

Defaults are the published GRIT code's settings, with four deliberate departures: the
Kronecker-factored pairing (``pairing="kfac"``; the published pairing is ``"reference"``), damping
relative to each factor's scale, layer-wise norm grafting (``grafting=True``; without it the
Trainer's global clip silences lora_B, see the field's help), and reprojection off by default (it is
the one GRIT action that writes weights, so ``precondition=False`` with both lambdas 0 is then a true
control).

When preconditioning happens (factor updates every ``kfac_update_freq`` steps, the first inversion
once ``kfac_min_samples`` statistics tokens were seen, no preconditioning during ``ng_warmup_steps``)
is stated once, in ``grit.schedule`` (``Schedule``, :func:`expected_preconditioned_steps`).

The choice fields are typed ``Literal[...]`` (``DampingMode``, ``StatUpdate``, ``Pairing``,
``InversionMethod``) and checked at run time too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional, get_args

from .schedule import expected_preconditioned_steps  # noqa: F401  (its home before grit.schedule)

DampingMode = Literal["relative", "absolute"]
StatUpdate = Literal["mean", "ema"]
Pairing = Literal["kfac", "reference"]
InversionMethod = Literal["cholesky", "eigh"]


@dataclass
class GRITConfig:
    lora_rank: Optional[int] = field(
        default=None,
        metadata={"help": "LoRA rank r. None takes it from the model; an int must equal every discovered "
                  "layer's rank (a mismatch means the config and the model disagree)."})
    kfac_update_freq: int = field(
        default=50,
        metadata={"help": "Update and invert the factors at optimizer steps n with n % kfac_update_freq == 0 "
                  "(published: 50). The first update comes after kfac_update_freq steps of statistics, not "
                  "at step 1, where B = 0 makes the A-side factor G exactly zero."})
    kfac_damping: float = field(
        default=0.1,
        metadata={"help": "Tikhonov damping λ added to each factor before inversion. Under the default "
                  "kfac_damping_mode='relative' λ = kfac_damping * tr(F)/r (a fraction of the mean "
                  "eigenvalue), which bounds cond(F + λI) by 1 + r/kfac_damping (161 for r=16) whatever "
                  "the factor's scale; G and U differ by orders of magnitude across modules, with the "
                  "adapter scale s and with the loss normalisation, so a single absolute λ (published: "
                  "1e-3) is a no-op for some modules and swamps others."})
    kfac_damping_mode: DampingMode = field(
        default="relative",
        metadata={"help": "'relative' (λ = kfac_damping * tr(F)/r, scale-free, default) or 'absolute' "
                  "(λ = kfac_damping)."})
    kfac_min_samples: int = field(
        default=64,
        metadata={"help": "Statistics tokens (global, non-padding) needed before the first inversion "
                  "(published: 64)."})
    ng_warmup_steps: int = field(
        default=0,
        metadata={"help": "No preconditioning at steps n <= ng_warmup_steps (statistics are still captured)."})
    stat_update: StatUpdate = field(
        default="mean",
        metadata={"help": "What U and G average over (S_j, N_j: the Gram sum and token count of optimizer step j, "
                  "n the update step). 'mean' (published): U = Σ_j S_j / Σ_j N_j, every statistics token since the "
                  "start of the run alike, so it mixes u = A x of early A with today's. 'ema': U = Σ_j d^(n-j) S_j / "
                  "Σ_j d^(n-j) N_j with d = stat_ema_decay per optimizer step: a step k steps old weighs d^k "
                  "(horizon about 1/(1-d) steps) whatever kfac_update_freq is; 'mean' is its d = 1 case. Both are "
                  "token-weighted and exact under data parallelism (grit.factors)."})
    stat_ema_decay: float = field(
        default=0.95,
        metadata={"help": "Decay d per optimizer step of stat_update='ema', in [0, 1): the statistics of a step k "
                  "steps old weigh d^k (0.95: a horizon of about 20 steps; 0: the last step alone)."})
    stat_micro_batch_stride: int = field(
        default=1,
        metadata={"help": "Capture U and G on every k-th micro-batch of an optimizer step only (the 1st, (k+1)-th, "
                  "...; counted from each manager.step()); 1 (default) captures every micro-batch. k > 1 cuts the "
                  "statistics' hook and Gram time about k-fold for an estimate from fewer tokens (the same "
                  "expectation: micro-batches are exchangeable); gradients, grafting and the regularizers still "
                  "see every micro-batch. Measured in benchmarks/step_overhead.py (--stat-stride)."})
    pairing: Pairing = field(
        default="kfac",
        metadata={"help": "'kfac': ∇A <- (G+λI)^-1 ∇A, ∇B <- ∇B (U+λI)^-1 (the Kronecker-factored Fisher). "
                  "'reference': the published pairing ∇A <- (Σa+λI)^-1 ∇A, ∇B <- ∇B (Σg+λI)^-1 with "
                  "Σa = U and Σg = G/s^2."})
    grafting: bool = field(
        default=True,
        metadata={"help": "Rescale each module's preconditioned ∇A and ∇B to the Frobenius norm of its raw "
                  "gradient (layer-wise grafting, as distributed Shampoo does): K-FAC's direction, the base "
                  "gradient's length. Rank-space K-FAC gives A and B one factor each, of different units, so "
                  "without it ∇A can outgrow ∇B by many orders of magnitude and a global clip (the Trainer's "
                  "max_grad_norm) then pushes ∇B below AdamW's eps: B stops learning (measured: "
                  "benchmarks/clipped_gradient_scale.py). False reproduces the published code, which did not graft."})
    lambda_kfac: float = field(
        default=1e-5,
        metadata={"help": "Weight of the curvature regularizer Σ tr(B F_B Bᵀ) + tr(Aᵀ F_A A) (published 1e-5); "
                  "0 turns it off."})
    lambda_reproj: float = field(
        default=1e-4,
        metadata={"help": "Weight of the reprojection regularizer Σ ||(I-P_A)A||² + ||B(I-P_B)||² "
                  "(published 1e-4); 0 turns it off."})
    enable_reprojection: bool = field(
        default=False,
        metadata={"help": "Project the weights A <- P_A A, B <- B P_B every reprojection_freq steps. The only "
                  "GRIT action that writes parameters, so off by default (published: on)."})
    reprojection_freq: int = field(
        default=50, metadata={"help": "Reproject at steps n with n % reprojection_freq == 0 (published: 50)."})
    reprojection_k: int = field(
        default=8,
        metadata={"help": "Projector rank k when rank adaptation is off (published: 8); clamped to r."})
    use_two_sided_reprojection: bool = field(
        default=True,
        metadata={"help": "True: A <- P_A A and B <- B P_B, each P from the factor paired with that matrix. "
                  "False: both use P_A, so the product B A becomes B P_A A."})
    enable_rank_adaptation: bool = field(
        default=True,
        metadata={"help": "Choose each projector's k as the smallest rank holding rank_adaptation_threshold "
                  "of the factor's eigenvalue energy (>= min_lora_rank). Shapes stay r x d: the effective "
                  "rank is a diagnostic, not a parameter reduction."})
    rank_adaptation_threshold: float = field(
        default=0.99, metadata={"help": "Energy fraction in (0, 1] kept by rank adaptation (published 0.99)."})
    min_lora_rank: int = field(
        default=4, metadata={"help": "Smallest k rank adaptation may choose (published: 4)."})
    inversion_method: InversionMethod = field(
        default="cholesky",
        metadata={"help": "'cholesky': damped Cholesky (cholesky_ex), eigh where it fails; 'eigh': always the "
                  "eigendecomposition (clamps negative eigenvalues to 0 before damping)."})
    precondition: bool = field(
        default=True,
        metadata={"help": "False: never modify gradients (statistics are still captured). With both lambdas 0 "
                  "and reprojection off, training is then bit-identical to training without GRIT."})
    adapter_name: Optional[str] = field(
        default=None, metadata={"help": "PEFT adapter to precondition; None = the model's active adapter."})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"GRITConfig.{name}={getattr(self, name)!r}: {why}")

        int_minimum = {"kfac_update_freq": 1, "reprojection_freq": 1, "reprojection_k": 1, "min_lora_rank": 1,
                       "kfac_min_samples": 0, "ng_warmup_steps": 0, "stat_micro_batch_stride": 1}
        for name, minimum in int_minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise bad(name, f"must be an int >= {minimum}")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
                                           or self.lora_rank < 1):
            raise bad("lora_rank", "must be None (take it from the model) or an int >= 1")
        if not (self.kfac_damping > 0 and self.kfac_damping < float("inf")):
            raise bad("kfac_damping", "must be a finite number > 0 (a zero damping cannot invert a "
                      "rank-deficient factor)")
        for name in ("lambda_kfac", "lambda_reproj"):
            if not (getattr(self, name) >= 0 and getattr(self, name) < float("inf")):
                raise bad(name, "must be a finite number >= 0 (0 turns the regularizer off)")
        if not 0.0 <= self.stat_ema_decay < 1.0:
            raise bad("stat_ema_decay", "must be in [0, 1)")
        if not 0.0 < self.rank_adaptation_threshold <= 1.0:
            raise bad("rank_adaptation_threshold", "must be in (0, 1]")
        choices = {"kfac_damping_mode": get_args(DampingMode), "stat_update": get_args(StatUpdate),
                   "pairing": get_args(Pairing), "inversion_method": get_args(InversionMethod)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {allowed}")
        if self.lora_rank is not None and self.min_lora_rank > self.lora_rank:
            raise bad("min_lora_rank", f"exceeds lora_rank={self.lora_rank}")
        if self.adapter_name is not None and (not isinstance(self.adapter_name, str) or not self.adapter_name):
            raise bad("adapter_name", "must be None or a non-empty adapter name")

    @property
    def regularized(self) -> bool:
        return self.lambda_kfac > 0 or self.lambda_reproj > 0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

