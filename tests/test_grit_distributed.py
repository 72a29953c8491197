"""DDP: two CPU processes under torchrun (gloo) with unequal token counts give the factors of one
process that sees both micro-batches (each backpropagated with its own rank's loss, as DDP does),
and decide the missing-statistics check together (tests/ddp_factors_worker.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grit_fixtures import batch, tiny_lora_model

CONFIG = dict(kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.0, lambda_reproj=0.0)
# Rank 0: 3 sequences, 27 tokens; rank 1: 2 sequences, 8 tokens. A mean of per-rank means would be wrong.
RANK_BATCHES = [dict(seed=40, bsz=3, pad_lengths=(0, 1, 2)), dict(seed=41, bsz=2, pad_lengths=(7, 5))]


def model_for_test():
    return tiny_lora_model(seed=40, dtype=torch.float32, rslora=True)


@pytest.mark.slow
def test_two_rank_factors_equal_single_process(tmp_path):
    from grit import GRITConfig, GRITManager

    tests = Path(__file__).resolve().parent
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(tests / "ddp_factors_worker.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    model = model_for_test()
    manager = GRITManager(model, GRITConfig(**CONFIG))
    for spec in RANK_BATCHES:
        model(**batch(**spec)).loss.backward()
    manager.step()
    single = manager.factors()
    for name, want in single.items():
        assert want["tokens"] == 27 + 8
        for r in range(2):
            got = ranks[r]["factors"][name]
            assert got["tokens"] == want["tokens"]
            for key in ("U", "G", "inv_A", "inv_B"):
                err = torch.linalg.norm(got[key] - want[key]) / torch.linalg.norm(want[key])
                assert err < 1e-5, (name, key, r, float(err))
        # Every rank applies the same preconditioner, bit for bit.
        assert torch.equal(ranks[0]["factors"][name]["inv_A"], ranks[1]["factors"][name]["inv_A"])
        assert torch.equal(ranks[0]["factors"][name]["inv_B"], ranks[1]["factors"][name]["inv_B"])
    assert ranks[0]["metrics"]["grit/stat_tokens"] == 35
    # The capture check is decided on all-reduced counts: a fused forward on rank 0 alone is no error (rank 1's
    # 8 tokens reach every rank), a fused forward everywhere is an error on both ranks.
    for r in range(2):
        assert ranks[r]["fused_on_rank0"] == {"raised": False, "tokens": [8.0] * len(single)}, r
        assert ranks[r]["fused_everywhere"] == {"raised": True}, r
