"""The two GRIT regularizers and the reprojection, batched over same-shaped modules.

With F_A, F_B the factors paired with A and B (``grit.kfac_math``: pairing "kfac": F_A = G, F_B = U;
"reference": F_A = Σa = U, F_B = Σg = G/s²), detached, and P_A, P_B the projectors on their top-k
eigenvectors, per module

    curvature     λ_k (tr(B F̂_B Bᵀ) + tr(Aᵀ F̂_A A))      gradient: 2λ_k F̂_A A,        2λ_k B F̂_B
    reprojection  λ_r (||(I-P_A) A||² + ||B (I-P_B)||²)    gradient: 2λ_r (I-P_A) A,    2λ_r B (I-P_B)

(F symmetric, P a symmetric idempotent), where F̂ is the factor as the curvature term sees it:

    the factor built from G (F_A under "kfac", F_B under "reference") is normalised to mean
    eigenvalue 1, F̂ = r F / tr(F) (0 while tr(F) = 0); the factor built from U is used as is.

Why the G-side factor is normalised, and by its trace. ĝ = dL/du carries the loss normaliser: with
a loss averaged over N tokens G scales with 1/N², so without it the same data in a batch twice as
large would regularize A (under "kfac"; B under "reference") four times less, and the term's weight
would depend on batch size, gradient accumulation, the world size, the loss reduction and, through
ĝ = s Bᵀ dL/dy, on s² and on the size of B. U = E[uuᵀ] is a per-token mean with none of these, so
it is left alone. N² would undo only the first of them, and the manager does not know the N of the
loss (it counts statistics positions, prompts included, not the loss's tokens, and frameworks divide
by global or per-rank counts); the trace removes every constant factor whatever its origin. It is
the same scale the relative damping uses (λ = kfac_damping·tr(F)/r), so the regularizer weighs
directions by their curvature relative to the factor's mean, as the damped preconditioner does.
G and the preconditioner themselves are not normalised.

The manager adds these gradients to ``.grad`` once per optimizer step instead of adding the terms
to the loss: ``train/loss`` stays the task loss, no autograd graph is built, and the result equals
adding the terms to every micro-batch's loss that the trainer then divides by the accumulation steps.
Shapes: A (n, r, d_in), B (n, d_out, r), F and P (n, r, r).
"""

from __future__ import annotations

import torch


def trace_normalized(F: torch.Tensor) -> torch.Tensor:
    """r F / tr(F) per factor (mean eigenvalue 1), 0 where tr(F) <= 0 (a factor without curvature yet). (n, r, r)."""
    r = F.shape[-1]
    trace = torch.diagonal(F, dim1=-2, dim2=-1).sum(-1)
    return F * torch.where(trace > 0, r / trace, 0.0)[:, None, None]


def regularize_A(A: torch.Tensor, F_A: torch.Tensor, P_A: torch.Tensor, lambda_kfac: float,
                 lambda_reproj: float, normalize: bool = False):
    """Gradient (n, r, d_in) of both terms w.r.t. A, and the two term values (0-dim tensors).

    ``normalize``: F_A is the G-side factor, used as ``trace_normalized(F_A)`` (module docstring).
    """
    grad = None  # not a zeros tensor plus the terms: one allocation and one add fewer per step
    curv = reproj = A.new_zeros(())
    if lambda_kfac > 0:
        FA = torch.bmm(trace_normalized(F_A) if normalize else F_A, A)
        curv = lambda_kfac * (A * FA).sum()
        grad = (2 * lambda_kfac) * FA
    if lambda_reproj > 0:
        residual = A - torch.bmm(P_A, A)
        reproj = lambda_reproj * residual.pow(2).sum()
        term = (2 * lambda_reproj) * residual
        grad = term if grad is None else grad + term
    return (torch.zeros_like(A) if grad is None else grad), curv, reproj


def regularize_B(B: torch.Tensor, F_B: torch.Tensor, P_B: torch.Tensor, lambda_kfac: float,
                 lambda_reproj: float, normalize: bool = False):
    """Gradient (n, d_out, r) of both terms w.r.t. B, and the two term values (0-dim tensors).

    For symmetric F_B and P_B, tr(B F_B Bᵀ) and ||B (I-P_B)||² are the A-side terms of Bᵀ.
    """
    grad, curv, reproj = regularize_A(B.transpose(-1, -2), F_B, P_B, lambda_kfac, lambda_reproj, normalize)
    return grad.transpose(-1, -2), curv, reproj


def reproject_A(A: torch.Tensor, P_A: torch.Tensor) -> torch.Tensor:
    """A <- P_A A: (n, r, d_in)."""
    return torch.bmm(P_A, A)


def reproject_B(B: torch.Tensor, P_B: torch.Tensor) -> torch.Tensor:
    """B <- B P_B: (n, d_out, r)."""
    return torch.bmm(B, P_B)
