"""Launched by tests/test_grit_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank backpropagates its own micro-batch (unequal token counts), calls manager.step() once
(a factor update: one all-reduce) and saves its factors and inverses to OUT/rank<r>.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grit import GRITConfig, GRITManager  # noqa: E402
from grit_fixtures import batch  # noqa: E402
from test_grit_distributed import CONFIG, RANK_BATCHES, model_for_test  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = model_for_test()
    manager = GRITManager(model, GRITConfig(**CONFIG))
    model(**batch(**RANK_BATCHES[rank])).loss.backward()
    assert manager.step(), "the first update should invert and precondition"
    torch.save({"factors": manager.factors(), "metrics": manager.metrics()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
