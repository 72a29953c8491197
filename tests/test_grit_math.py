"""grit.kfac_math, grit.config and the package surface, against float64 linear algebra written out here."""

import subprocess
import sys

import pytest
import torch

from grit import GRITConfig, expected_preconditioned_steps
from grit import kfac_math as gm
from grit.distributed import maybe_all_reduce


def random_psd(n, r, rank, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, r, rank, generator=g, dtype=torch.float64)
    return X @ X.transpose(-1, -2) * torch.logspace(-6, 2, n, dtype=torch.float64)[:, None, None]


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
@pytest.mark.parametrize("mode,value", [("relative", 0.1), ("absolute", 1e-3)])
def test_batched_damped_inverse_equals_dense_inverse(method, mode, value):
    F = torch.cat([random_psd(3, 6, 6, 0), random_psd(3, 6, 1, 1)])  # full rank and rank 1, 8 decades of scale
    lam = gm.damping(F.float(), value, mode)
    inv, evals, evecs, failed = gm.batched_damped_inverse(F.float(), lam, method)
    for i in range(F.shape[0]):
        lam_i = value * torch.trace(F[i]) / 6 if mode == "relative" else value
        damped = F[i] + lam_i * torch.eye(6, dtype=torch.float64)
        want = torch.linalg.inv(damped)
        err = torch.linalg.norm(inv[i].double() - want) / torch.linalg.norm(want)
        # fp32 inversion: the error bound grows with cond (one reason the default damping is relative).
        bound = max(1e-4, torch.finfo(torch.float32).eps * float(torch.linalg.cond(damped)))
        assert err < bound, (i, float(err), bound)
        assert torch.allclose(evals[i].double(), torch.linalg.eigvalsh(F[i]), rtol=1e-4,
                              atol=1e-5 * float(evals[i].abs().max()))
    assert not failed.any()


def test_cholesky_failure_falls_back_to_clamped_eigh():
    F = torch.tensor([[[1.0, 0.0], [0.0, -0.5]], [[2.0, 0.5], [0.5, 1.0]]])  # the first is indefinite
    lam = torch.tensor([1e-3, 1e-3])
    inv, _, _, failed = gm.batched_damped_inverse(F, lam, "cholesky")
    assert failed.tolist() == [True, False]
    assert torch.allclose(inv[0], torch.diag(torch.tensor([1 / (1 + 1e-3), 1 / 1e-3])))
    assert torch.allclose(inv[1], torch.linalg.inv(F[1] + 1e-3 * torch.eye(2)))


def test_non_finite_factors_are_flagged_and_do_not_poison_the_batch():
    F = random_psd(3, 4, 4, 2).float()
    F[1, 0, 0] = float("nan")
    F[2, 1, 2] = float("inf")
    ok = gm.factor_ok(F)
    assert ok.tolist() == [True, False, False]
    assert not gm.factor_ok(torch.zeros(1, 4, 4)).any()  # a zero factor (B = 0) is not invertible curvature
    inv, _, _, _ = gm.batched_damped_inverse(F, gm.damping(F, 0.1, "relative"))
    assert torch.isfinite(inv[0]).all()
    want = torch.linalg.inv(F[0].double() + 0.1 * torch.trace(F[0].double()) / 4 * torch.eye(4, dtype=torch.float64))
    assert torch.allclose(inv[0].double(), want, rtol=1e-3)


def test_energy_rank_and_projectors():
    evals = torch.tensor([[0.0, 0.01, 0.09, 0.9], [0.25, 0.25, 0.25, 0.25], [-1e-9, 0.0, 0.0, 1.0]])
    # Top eigenvalues 0.9 | 0.9+0.09=0.99 | ... : 0.95 needs 2; uniform needs 4 (0.75 < 0.95); one spike needs 1.
    assert gm.energy_rank(evals, 0.95, 1).tolist() == [2, 4, 1]
    assert gm.energy_rank(evals, 0.95, 2).tolist() == [2, 4, 2]
    F = random_psd(1, 5, 5, 3)[0]
    w, V = torch.linalg.eigh(F)
    P = gm.top_k_projector(V[None], torch.tensor([2]))[0]
    assert torch.allclose(P, V[:, 3:] @ V[:, 3:].T)
    assert torch.allclose(P @ P, P, atol=1e-10) and round(float(torch.trace(P))) == 2


def test_rank_space_grams_ignore_non_finite_padding():
    u = torch.randn(3, 6, 4, dtype=torch.float64)
    g = torch.randn(3, 6, 4, dtype=torch.float64)
    keep = torch.tensor([1, 1, 0, 1, 0, 0]).reshape(-1, 1) != 0
    u[:, 2] = float("nan")
    g[1, 4] = float("inf")
    UU, GG, count = gm.rank_space_grams(u.to(torch.bfloat16), g, keep)
    rows = [0, 1, 3]
    assert float(count) == 3.0 and UU.dtype == GG.dtype == torch.float32
    for i in range(3):
        uk = u[i, rows].to(torch.bfloat16).double()  # the bf16 input, summed exactly
        assert torch.allclose(UU[i].double(), uk.T @ uk, rtol=1e-5)
        assert torch.allclose(GG[i].double(), g[i, rows].T @ g[i, rows], rtol=1e-5)
    UU, GG, count = gm.rank_space_grams(u[:, :2], g[:, :2], None)
    assert float(count) == 2.0 and torch.allclose(UU[2].double(), u[2, :2].T @ u[2, :2], rtol=1e-5)


def test_condition_numbers():
    evals = torch.tensor([[1.0, 3.0], [-1e-7, 4.0]])
    assert torch.allclose(gm.condition_numbers(evals, torch.tensor([1.0, 1.0])), torch.tensor([2.0, 5.0]))


@pytest.mark.parametrize("field,value", [
    ("kfac_update_freq", 0), ("kfac_damping", 0.0), ("kfac_damping", float("nan")), ("kfac_damping_mode", "auto"),
    ("kfac_min_samples", -1), ("ng_warmup_steps", 1.5), ("stat_update", "median"), ("stat_ema_decay", 1.0),
    ("pairing", "swapped"), ("lambda_kfac", -1e-5), ("lambda_reproj", float("inf")), ("reprojection_freq", 0),
    ("reprojection_k", 0), ("rank_adaptation_threshold", 0.0), ("min_lora_rank", 0), ("inversion_method", "qr"),
    ("lora_rank", 0), ("adapter_name", ""), ("kfac_update_freq", True)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GRITConfig(**{field: value})


def test_config_cross_field_check_and_defaults():
    with pytest.raises(ValueError, match="min_lora_rank"):
        GRITConfig(lora_rank=4, min_lora_rank=8)
    cfg = GRITConfig()
    assert (cfg.pairing, cfg.kfac_damping_mode, cfg.precondition, cfg.enable_reprojection) == \
        ("kfac", "relative", True, False)


def test_expected_preconditioned_steps_by_hand():
    cfg = GRITConfig(kfac_update_freq=4, kfac_min_samples=100, ng_warmup_steps=0)
    # 30 tokens/step: 120 >= 100 at step 4 -> steps 4..10 = 7.
    assert expected_preconditioned_steps(cfg, 10, 30) == 7
    # Uneven tokens: cumulative 10, 20, 30, 40 at step 4 (< 100); 50, 60, 170, 180 at step 8 -> steps 8..10 = 3.
    assert expected_preconditioned_steps(cfg, 10, [10, 10, 10, 10, 10, 10, 110, 10, 10, 10]) == 3
    assert expected_preconditioned_steps(GRITConfig(kfac_update_freq=4, ng_warmup_steps=9), 10, 30) == 1
    assert expected_preconditioned_steps(GRITConfig(precondition=False), 10, 30) == 0


def test_all_reduce_is_a_no_op_without_torch_distributed():
    t = torch.arange(3.0)
    assert maybe_all_reduce(t) is t and t.tolist() == [0.0, 1.0, 2.0]


def test_import_grit_does_not_import_transformers():
    code = ("import sys, grit; assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert set(grit.__all__) >= {'GRITConfig', 'GRITManager', 'GritOptimizer', 'GritTrainer', 'GritCallback'}")
    subprocess.run([sys.executable, "-c", code], check=True)
