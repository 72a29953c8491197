"""Launched by tests/test_grit_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank backpropagates its own micro-batch (unequal token counts), calls manager.step() once
(a factor update: one all-reduce) and saves its factors and inverses to OUT/rank<r>.pt.

Then the capture check (GRITManager raises at the first step() when LoRA gradients arrive without
statistics), decided on all-reduced counts: with a fused LoRA forward on rank 0 only, no rank raises
(rank 1's statistics are everyone's); with it on both ranks, both raise. A rank-local decision would
raise on one rank only and leave the other waiting in the next collective.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grit import GRITConfig, GRITManager  # noqa: E402
from grit_fixtures import batch  # noqa: E402
from test_grit_distributed import CONFIG, RANK_BATCHES, model_for_test  # noqa: E402
from test_grit_manager import fused_lora_forward  # noqa: E402


def capture_outcome(fused: bool) -> dict:
    """One first update with (or without) a fused LoRA forward on this rank: did it raise, and the tokens seen."""
    import types

    from grit_fixtures import lora_pairs

    model = model_for_test()
    if fused:
        for _, layer in lora_pairs(model):
            layer.forward = types.MethodType(fused_lora_forward, layer)
    manager = GRITManager(model, GRITConfig(**CONFIG))
    model(**batch(**RANK_BATCHES[dist.get_rank()])).loss.backward()
    try:
        manager.step()
    except RuntimeError as err:
        return {"raised": "no statistics" in str(err)}
    return {"raised": False, "tokens": [f["tokens"] for f in manager.factors().values()]}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = model_for_test()
    manager = GRITManager(model, GRITConfig(**CONFIG))
    model(**batch(**RANK_BATCHES[rank])).loss.backward()
    assert manager.step(), "the first update should invert and precondition"
    result = {"factors": manager.factors(), "metrics": manager.metrics()}
    result["fused_on_rank0"] = capture_outcome(fused=rank == 0)
    dist.barrier()
    result["fused_everywhere"] = capture_outcome(fused=True)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
