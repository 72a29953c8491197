"""Rank-space K-FAC for PEFT LoRA: the math, as pure batched functions (no module state).

Convention (used everywhere in ``grit``)
----------------------------------------
PEFT computes, per LoRA layer and adapter,

    y = W0 x + s * B A x,      A: (r, d_in),  B: (d_out, r),  s = layer.scaling[adapter]

(s = alpha/r, or alpha/sqrt(r) with rsLoRA). Per token position t let

    u_t = A x_t                       (r,)  lora_A's output = lora_B's input
    ĝ_t = dL/du_t = s * Bᵀ dL/dy_t    (r,)  the gradient at lora_B's input; it already holds s

where L is the loss that is backpropagated (under gradient accumulation the sum of the
micro-batch losses as the trainer scales them). The two r x r statistics are

    U = E[u uᵀ],    G = E[ĝ ĝᵀ],

with E the mean over the non-padding positions of all micro-batches of an optimizer step
(prompt positions included), summed over micro-batches and data-parallel ranks and divided by the
global token count. They are the K-FAC factors of the LoRA layer with the d x d factors taken as
identity: U is the input-side factor of lora_B (a Linear r -> d_out whose input is u), and G is
the output-side factor of lora_A (a Linear d_in -> r whose output gradient is ĝ). K-FAC
(Martens & Grosse, 2015) then preconditions

    ∇A <- (G + λI)^-1 ∇A,      ∇B <- ∇B (U + λI)^-1                    (pairing="kfac")

The published GRIT code pairs the other way, with Σa = U and Σg = E[(Bᵀ dL/dy)(Bᵀ dL/dy)ᵀ] = G/s²:

    ∇A <- (Σa + λI)^-1 ∇A,     ∇B <- ∇B (Σg + λI)^-1                   (pairing="reference")

Scale: with a loss that averages N tokens, ĝ carries a factor 1/N, so G is the per-token empirical
Fisher factor divided by N² (curvlinops multiplies that back; we keep G as the backpropagated loss
defines it). Scaling a factor by c scales its relatively-damped inverse by 1/c: the preconditioned
direction is unchanged, its magnitude is not (Adam normalises it, gradient clipping bounds it).
The curvature regularizer therefore sees the G-side factor at mean eigenvalue 1 (``grit.regularizers``).

In both cases we call F_A the factor applied to ∇A from the left and F_B the factor applied to
∇B from the right; regularizers and projectors are built from the same F_A, F_B. Shapes below:
n = number of stacked modules (same r), all factors symmetric positive semi-definite.
"""

from __future__ import annotations

import torch


def rank_space_grams(u: torch.Tensor, g: torch.Tensor, keep: torch.Tensor | None):
    """Σ_t u_t u_tᵀ, Σ_t ĝ_t ĝ_tᵀ and the token count over kept positions, for k modules at once, in fp32.

    u, g: (k, N, r) (any float dtype); keep: bool (N, 1), the same positions for every module, or None (all).
    Returns UU (k, r, r), GG (k, r, r), count (0-dim fp32). ``torch.where`` (not a multiply) so that
    NaN/Inf at padding positions cannot leak in.
    """
    u, g = u.float(), g.float()
    if keep is None:
        count = u.new_full((), float(u.shape[1]))  # a fill kernel: torch.tensor(..., device=cuda) would sync
    else:
        u, g = torch.where(keep, u, 0.0), torch.where(keep, g, 0.0)
        count = keep.sum().float()
    return torch.bmm(u.transpose(1, 2), u), torch.bmm(g.transpose(1, 2), g), count


def damping(F: torch.Tensor, value: float, mode: str) -> torch.Tensor:
    """λ per factor, (n,). 'relative': value * tr(F)/r; 'absolute': value."""
    if mode == "absolute":
        return torch.full(F.shape[:-2], value, dtype=F.dtype, device=F.device)
    r = F.shape[-1]
    return value * torch.diagonal(F, dim1=-2, dim2=-1).sum(-1) / r


def factor_ok(F: torch.Tensor) -> torch.Tensor:
    """bool (n,): finite and with a positive trace (a zero factor, e.g. G while B = 0, carries no curvature)."""
    finite = torch.isfinite(F).all(dim=-1).all(dim=-1)
    trace = torch.diagonal(torch.nan_to_num(F), dim1=-2, dim2=-1).sum(-1)
    return finite & (trace > 0)


def batched_damped_inverse(F: torch.Tensor, lam: torch.Tensor, method: str = "cholesky"):
    """(F + λI)^-1 for a stack of symmetric PSD factors, on F's device, without host syncs.

    F: (n, r, r) fp32, lam: (n,). Rows of F that are not finite must be masked by the caller
    (they are replaced by I here so that no decomposition sees NaN).
    Returns (inverse (n, r, r), eigvals (n, r) ascending, eigvecs (n, r, r), cholesky_failed bool (n,)).
    The eigendecomposition is always computed: projectors, condition numbers and the fallback
    need it, and at r x r it costs next to nothing.
    """
    n, r, _ = F.shape
    eye = torch.eye(r, dtype=F.dtype, device=F.device).expand(n, r, r)
    ok = torch.isfinite(F).all(dim=-1).all(dim=-1) & torch.isfinite(lam)
    F = torch.where(ok[:, None, None], 0.5 * (F + F.transpose(-1, -2)), eye)
    lam = torch.where(ok, lam, torch.ones_like(lam))
    evals, evecs = torch.linalg.eigh(F)
    # eigh path: negative round-off eigenvalues are clamped to 0 before damping.
    inv_eigh = (evecs / (evals.clamp_min(0) + lam[:, None])[:, None, :]) @ evecs.transpose(-1, -2)
    if method == "eigh":
        return inv_eigh, evals, evecs, torch.zeros(n, dtype=torch.bool, device=F.device)
    L, info = torch.linalg.cholesky_ex(F + lam[:, None, None] * eye)
    failed = info != 0
    L = torch.where(failed[:, None, None], eye, L)
    inv = torch.cholesky_inverse(L)
    inv = torch.where(failed[:, None, None], inv_eigh, 0.5 * (inv + inv.transpose(-1, -2)))
    return inv, evals, evecs, failed


def energy_rank(evals: torch.Tensor, threshold: float, min_rank: int) -> torch.Tensor:
    """Smallest k whose top-k eigenvalues hold ``threshold`` of the energy, clamped to [min_rank, r]. (n,) long.

    evals: (n, r) ascending (as eigh returns them); negative round-off counts as 0.
    """
    r = evals.shape[-1]
    desc = evals.clamp_min(0).flip(-1)
    total = desc.sum(-1, keepdim=True).clamp_min(torch.finfo(desc.dtype).tiny)
    k = (torch.cumsum(desc, -1) / total < threshold).sum(-1) + 1
    return k.clamp(min=min(min_rank, r), max=r)


def top_k_projector(evecs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """P = V_k V_kᵀ onto the top-k eigenvectors, per factor. evecs: (n, r, r) ascending; k: (n,) -> (n, r, r)."""
    r = evecs.shape[-1]
    keep = torch.arange(r, device=evecs.device)[None, :] >= (r - k)[:, None]  # (n, r): the k largest
    return (evecs * keep[:, None, :].to(evecs.dtype)) @ evecs.transpose(-1, -2)


def condition_numbers(evals: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """cond(F + λI) = (w_max + λ) / (max(w_min, 0) + λ), (n,)."""
    return (evals[:, -1].clamp_min(0) + lam) / (evals[:, 0].clamp_min(0) + lam)


def precondition_A(inv_FA: torch.Tensor, grad_A: torch.Tensor) -> torch.Tensor:
    """(F_A + λI)^-1 ∇A. inv_FA: (n, r, r); grad_A: (n, r, d_in) -> (n, r, d_in)."""
    return torch.bmm(inv_FA, grad_A)


def precondition_B(grad_B: torch.Tensor, inv_FB: torch.Tensor) -> torch.Tensor:
    """∇B (F_B + λI)^-1. grad_B: (n, d_out, r); inv_FB: (n, r, r) -> (n, d_out, r)."""
    return torch.bmm(grad_B, inv_FB)


def graft_norm(preconditioned: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Each module's preconditioned gradient rescaled to the Frobenius norm of its raw gradient.

    Layer-wise grafting (Agarwal et al., 2020, "Disentangling adaptive gradient methods from learning
    rates"; the grafting of distributed Shampoo): the direction comes from the preconditioner, the
    magnitude from the base gradient. Needed here because rank-space K-FAC preconditions ∇A and ∇B with
    one factor each, of different units ((G + λI)^-1 grows without bound as B, and so G, shrinks), so the
    two sides' step lengths are not comparable and a global gradient clip over both would silence the
    smaller one. Shapes (n, a, b) -> (n, a, b); a module whose preconditioned gradient is 0 stays 0.
    """
    dims = tuple(range(1, preconditioned.dim()))
    pre_norm = preconditioned.pow(2).sum(dims, keepdim=True).sqrt()
    raw_norm = raw.float().pow(2).sum(dims, keepdim=True).sqrt()
    return preconditioned * torch.where(pre_norm > 0, raw_norm / pre_norm, 0.0)
