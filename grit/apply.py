"""What ``GRITManager.step()`` does to the LoRA gradients (and, with reprojection, to the weights).

The LoRA weights are laid out once (:func:`layout`) in :class:`ParamGroup` s: the same-shaped lora_A
(or lora_B) weights of one factor group, whose gradients are stacked for one batched kernel. Per
step and param group, :func:`grad_stacks` stacks the gradients (a :class:`GradStack`), and the
manager's phases transform the stack in turn:

* :func:`regularize`: add the regularizers' gradients (``grit.regularizers``; under a GradScaler
  multiplied by the loss scale, as the raw gradient is still scaled);
* :func:`precondition_and_graft`: ∇A <- F_A^-1 ∇A or ∇B <- ∇B F_B^-1 (``grit.kfac_math``), then
  with ``grafting`` rescaled to the raw gradient's Frobenius norm;
* :func:`mask_nonfinite`: a module gradient that is NaN/Inf (a corrupted batch) is zeroed and
  counted, so no parameter receives NaN through GRIT (under a GradScaler it is left for the scaler,
  which then skips the step); the squared norms of the rest are summed for ``grit/ng_grad_norm``;
* :meth:`GradStack.write_back` copies the result into ``.grad``.

Sums are kept per factor group (:class:`StepSums`, on that group's device) and summed on the host by
``grit.metrics``: groups may live on several devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from . import kfac_math as km
from .config import GRITConfig
from .factors import FactorGroup, FactorState
from .regularizers import regularize_A, regularize_B, reproject_A, reproject_B


@dataclass
class LoraModule:
    name: str
    layer: nn.Module          # the PEFT LoRA layer
    lora_A: nn.Linear         # (r, d_in) weight
    lora_B: nn.Linear         # (d_out, r) weight
    adapter: str


class ParamGroup:
    """Same-shaped lora_A (or lora_B) weights of one factor group: grads stacked for one bmm.

    Holds the nn.Linear modules, not their weights: the weights are read at each step, so a model whose
    parameters were replaced before training (``to_empty``, ``load_state_dict(assign=True)``) is followed.
    The factors, projectors and inverses of its modules are gathered once per inversion (``gathered``),
    not at every step: they only change when the factor state is inverted or loaded.
    """

    def __init__(self, side: str, fgroup: FactorGroup, gi: int, modules: list, rows: list):
        self.side, self.fgroup, self.gi, self.modules, self.rows = side, fgroup, gi, modules, rows
        self.index = torch.tensor(rows, device=fgroup.device)
        self._gathered = None  # (factor state version, F, P, inv)

    def weights(self) -> list:
        return [m.weight for m in self.modules]

    def factor_side(self):
        return self.fgroup.A if self.side == "A" else self.fgroup.B

    def gathered(self, version: int):
        """(F, P, inv) of all its modules, (n, r, r) each, as of factor state ``version``."""
        if self._gathered is None or self._gathered[0] != version:
            side = self.factor_side()
            self._gathered = (version, side.F[self.index], side.P[self.index], side.inv[self.index])
        return self._gathered[1:]


class GroupCounters:
    """The manager's per-factor-group counters, on that group's device (summed on the host by grit.metrics)."""

    def __init__(self, device: torch.device):
        self.nonfinite_grads = torch.zeros((), dtype=torch.long, device=device)  # zeroed (module, step) grads
        self.ng_sq = None        # squared norm of the last preconditioned step's gradients of this group
        self.reg_kfac = None     # last regularized step's terms of this group
        self.reg_reproj = None


def layout(modules: list, factor_state: FactorState) -> tuple:
    """([ParamGroup], [GroupCounters]): the LoRA weights grouped by factor group, side and (shape, dtype,
    device), and one counter set per factor group."""
    param_groups = []
    for gi, g in enumerate(factor_state.groups):
        members = [(m, row) for m, (mg, row) in zip(modules, factor_state.slots) if mg == gi]
        for side in ("A", "B"):
            by_shape: dict = {}
            for m, row in members:
                lin = m.lora_A if side == "A" else m.lora_B
                w = lin.weight
                by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append((lin, row))
            param_groups += [ParamGroup(side, g, gi, [lin for lin, _ in ms], [row for _, row in ms])
                             for ms in by_shape.values()]
    return param_groups, [GroupCounters(g.device) for g in factor_state.groups]


class StepSums:
    """One step's per-factor-group sums (device tensors, None where a group contributed nothing)."""

    def __init__(self, n_groups: int):
        self.sq_norm: list = [None] * n_groups
        self.curv: list = [None] * n_groups
        self.reproj: list = [None] * n_groups

    @staticmethod
    def add(sums: list, gi: int, value: torch.Tensor) -> None:
        sums[gi] = value if sums[gi] is None else sums[gi] + value


@dataclass
class GradStack:
    """One param group's gradients of this step, stacked in fp32 (``G``), with the factors of its modules."""

    group: ParamGroup
    params: list              # the weights that have a gradient this step
    grads: list               # their .grad tensors
    G: torch.Tensor           # (n, r, d_in) or (n, d_out, r)
    F: torch.Tensor           # (n, r, r) each: factors, projectors, damped inverses of those modules
    P: torch.Tensor
    inv: torch.Tensor

    def write_back(self) -> None:
        torch._foreach_copy_(self.grads, list(self.G.unbind(0)))


def grad_stacks(param_groups: list, version: int) -> Iterator[GradStack]:
    """Per param group with any gradient this step: its gradients stacked (one group at a time, so only one
    stack is alive at once), with (F, P, inv) as of factor state ``version``."""
    for pg in param_groups:
        weights = pg.weights()
        params = [p for p in weights if p.grad is not None]
        if not params:
            continue
        if len(params) == len(weights):
            F, P, inv = pg.gathered(version)
        else:  # some modules got no gradient this step: gather the rows of those that did
            index = torch.tensor([row for row, p in zip(pg.rows, weights) if p.grad is not None],
                                 device=pg.fgroup.device)
            side = pg.factor_side()
            F, P, inv = side.F[index], side.P[index], side.inv[index]
        grads = [p.grad for p in params]
        yield GradStack(pg, params, grads, torch.stack(grads).float(), F, P, inv)


def regularize(stack: GradStack, cfg: GRITConfig, scale: Optional[torch.Tensor], sums: StepSums) -> None:
    """Add the regularizers' gradients to ``stack.G`` and their terms to ``sums``."""
    pg = stack.group
    W = torch.stack([p.detach() for p in stack.params]).float()
    reg = regularize_A if pg.side == "A" else regularize_B
    # The factor built from G is normalised inside the regularizer (grit.regularizers).
    g_side = (pg.side == "A") == (cfg.pairing == "kfac")
    extra, curv, reproj = reg(W, stack.F, stack.P, cfg.lambda_kfac, cfg.lambda_reproj, normalize=g_side)
    stack.G = stack.G + (extra if scale is None else extra * scale.to(extra.device))
    StepSums.add(sums.curv, pg.gi, curv)
    StepSums.add(sums.reproj, pg.gi, reproj)


def precondition_and_graft(stack: GradStack, cfg: GRITConfig) -> None:
    """``stack.G`` <- its natural gradient; with ``cfg.grafting`` at the Frobenius norm of the raw one."""
    raw = stack.G
    G = km.precondition_A(stack.inv, raw) if stack.group.side == "A" else km.precondition_B(raw, stack.inv)
    stack.G = km.graft_norm(G, raw) if cfg.grafting else G


def mask_nonfinite(stack: GradStack, counters: GroupCounters, scale: Optional[torch.Tensor], sums: StepSums) -> None:
    """Zero (and count) the module gradients of ``stack.G`` that are not finite; add the others' squared norms.

    A non-finite gradient (a NaN/Inf batch) would make the parameter NaN. The per-module squared norm is
    needed for ng_grad_norm anyway and is finite iff G is (up to elements > 1e19, which are no usable
    gradient either). Under a GradScaler (``scale``) the overflow must reach the scaler, so that it skips
    the step: the gradient is counted but not zeroed.
    """
    G = stack.G
    sq = G.pow(2).sum((1, 2))                       # (n,)
    bad = ~torch.isfinite(sq)
    counters.nonfinite_grads += bad.sum()
    if scale is None:
        G.masked_fill_(bad[:, None, None], 0.0)
    StepSums.add(sums.sq_norm, stack.group.gi, torch.where(bad, 0.0, sq).sum())


def reproject(param_groups: list, two_sided: bool) -> None:
    """Project the LoRA weights in place: A <- P_A A, B <- B P_B (one-sided: B <- B P_A)."""
    for pg in param_groups:
        weights = pg.weights()
        W = torch.stack([p.detach() for p in weights])
        if pg.side == "A" or two_sided:
            P = pg.factor_side().P[pg.index]
        else:
            P = pg.fgroup.A.P[pg.index]  # one-sided: B uses P_A
        new = reproject_A(W.float(), P) if pg.side == "A" else reproject_B(W.float(), P)
        torch._foreach_copy_([p.data for p in weights], list(new.unbind(0)))
