"""The two GRIT regularizers and the reprojection, batched over same-shaped modules.

With F_A, F_B the factors paired with A and B (``grit.math``: pairing "kfac": F_A = G, F_B = U;
"reference": F_A = Σa = U, F_B = Σg = G/s²), detached, and P_A, P_B the projectors on their top-k
eigenvectors, per module

    curvature     λ_k (tr(B F_B Bᵀ) + tr(Aᵀ F_A A))        gradient: 2λ_k F_A A,        2λ_k B F_B
    reprojection  λ_r (||(I-P_A) A||² + ||B (I-P_B)||²)    gradient: 2λ_r (I-P_A) A,    2λ_r B (I-P_B)

(F symmetric, P a symmetric idempotent). The manager adds these gradients to ``.grad`` once per
optimizer step instead of adding the terms to the loss: ``train/loss`` stays the task loss, no
autograd graph is built, and the result equals the published code's, which added the terms to
every micro-batch's loss that the trainer then divides by the accumulation steps.
Shapes: A (n, r, d_in), B (n, d_out, r), F and P (n, r, r).
"""

from __future__ import annotations

import torch


def regularize_A(A: torch.Tensor, F_A: torch.Tensor, P_A: torch.Tensor, lambda_kfac: float,
                 lambda_reproj: float):
    """Gradient (n, r, d_in) of both terms w.r.t. A, and the two term values (0-dim tensors)."""
    grad = torch.zeros_like(A)
    curv = reproj = A.new_zeros(())
    if lambda_kfac > 0:
        FA = torch.bmm(F_A, A)
        curv = lambda_kfac * (A * FA).sum()
        grad = grad + (2 * lambda_kfac) * FA
    if lambda_reproj > 0:
        residual = A - torch.bmm(P_A, A)
        reproj = lambda_reproj * residual.pow(2).sum()
        grad = grad + (2 * lambda_reproj) * residual
    return grad, curv, reproj


def regularize_B(B: torch.Tensor, F_B: torch.Tensor, P_B: torch.Tensor, lambda_kfac: float,
                 lambda_reproj: float):
    """Gradient (n, d_out, r) of both terms w.r.t. B, and the two term values (0-dim tensors).

    For symmetric F_B and P_B, tr(B F_B Bᵀ) and ||B (I-P_B)||² are the A-side terms of Bᵀ.
    """
    grad, curv, reproj = regularize_A(B.transpose(-1, -2), F_B, P_B, lambda_kfac, lambda_reproj)
    return grad.transpose(-1, -2), curv, reproj


def reproject_A(A: torch.Tensor, P_A: torch.Tensor) -> torch.Tensor:
    """A <- P_A A: (n, r, d_in)."""
    return torch.bmm(P_A, A)


def reproject_B(B: torch.Tensor, P_B: torch.Tensor) -> torch.Tensor:
    """B <- B P_B: (n, d_out, r)."""
    return torch.bmm(B, P_B)
