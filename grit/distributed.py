"""Data-parallel helpers: every rank must apply the same preconditioner.

The statistics are r x r sums, so one all-reduce of all of them (stacked into one flat buffer)
per factor update is the whole communication cost; no worker assignment is needed.
Without an initialised process group (or with one process) these are no-ops.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def maybe_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all ranks and return it; returns ``t`` untouched without torch.distributed.

    Sums (not means): the statistics are token-weighted sums and the counts are reduced with them,
    so ranks with unequal token counts are weighted correctly when the caller divides.
    """
    if world_size() == 1:
        return t
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t
