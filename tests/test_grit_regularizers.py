"""The GRIT regularizers and the reprojection against a direct per-module autograd computation.

The reference builds each module's terms from the float64 brute-force factors, projectors from
torch.linalg.eigh with k chosen by a plain loop over the sorted eigenvalues, and differentiates
them with autograd; the manager adds analytic gradients to .grad in batched form.
"""

import copy

import pytest
import torch

from grit import GRITConfig, GRITManager
from grit_fixtures import BruteForce, batch, host, lora_pairs, projector, reference_terms, tiny_lora_model


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("pairing,adapt,rslora", [("kfac", True, False), ("reference", False, True)])
def test_regularizer_terms_and_gradients_equal_autograd(pairing, adapt, rslora):
    cfg = GRITConfig(pairing=pairing, precondition=False, kfac_update_freq=1, kfac_min_samples=1,
                     lambda_kfac=0.3, lambda_reproj=0.2, enable_rank_adaptation=adapt,
                     rank_adaptation_threshold=0.9, min_lora_rank=1, reprojection_k=2)
    model = tiny_lora_model(seed=30, rslora=rslora)
    brute = BruteForce(model)
    manager = GRITManager(model, cfg)
    b = batch(30, pad_lengths=(2, 0, 5))
    brute.mask = b["attention_mask"]
    model(**b).loss.backward()
    raw = {n: (host(l.lora_A["default"].weight.grad), host(l.lora_B["default"].weight.grad))
           for n, l in lora_pairs(model)}
    assert manager.step() is False  # regularizers only
    want_k, want_r, want_grads = reference_terms(model, brute.factors(), cfg)
    m = manager.metrics()
    assert m["grit/reg_kfac"] == pytest.approx(want_k, rel=1e-4)
    assert m["grit/reg_reproj"] == pytest.approx(want_r, rel=1e-3)
    assert want_r > 0.01 * want_k, "the reprojection term must be non-trivial for the test to mean anything"
    for name, layer in lora_pairs(model):
        for side, w in enumerate((layer.lora_A["default"].weight, layer.lora_B["default"].weight)):
            added = host(w.grad) - raw[name][side]
            assert rel(added, want_grads[name][side]) < 1e-3, (name, "AB"[side])
    manager.close()


def test_regularizer_gradients_are_added_before_preconditioning():
    cfg = GRITConfig(kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.5, lambda_reproj=0.0, grafting=False)
    model = tiny_lora_model(seed=31)
    brute = BruteForce(model)
    manager = GRITManager(model, cfg)
    b = batch(31)
    brute.mask = b["attention_mask"]
    model(**b).loss.backward()
    raw = {n: (host(l.lora_A["default"].weight.grad), host(l.lora_B["default"].weight.grad))
           for n, l in lora_pairs(model)}
    assert manager.step() is True
    factors = brute.factors()
    _, _, reg = reference_terms(model, factors, cfg)
    for name, layer in lora_pairs(model):
        G, U = factors[name]["G"], factors[name]["U"]
        dA = G + 0.1 * torch.trace(G) / 4 * torch.eye(4, dtype=G.dtype)
        dB = U + 0.1 * torch.trace(U) / 4 * torch.eye(4, dtype=U.dtype)
        want_A = torch.linalg.solve(dA, raw[name][0] + reg[name][0])
        want_B = torch.linalg.solve(dB, (raw[name][1] + reg[name][1]).T).T
        assert rel(host(layer.lora_A["default"].weight.grad), want_A) < 1e-4
        assert rel(host(layer.lora_B["default"].weight.grad), want_B) < 1e-4


@pytest.mark.parametrize("two_sided", [True, False])
def test_reprojection_projects_weights_with_the_paired_projectors(two_sided):
    cfg = GRITConfig(kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.0, lambda_reproj=0.0,
                     enable_reprojection=True, reprojection_freq=1, enable_rank_adaptation=False,
                     reprojection_k=2, use_two_sided_reprojection=two_sided, precondition=False)
    model = tiny_lora_model(seed=32)
    brute = BruteForce(model)
    manager = GRITManager(model, cfg)
    before = {n: (host(l.lora_A["default"].weight),
                  host(l.lora_B["default"].weight)) for n, l in lora_pairs(model)}
    b = batch(32)
    brute.mask = b["attention_mask"]
    model(**b).loss.backward()
    manager.step()
    factors = brute.factors()
    for name, layer in lora_pairs(model):
        P_A, P_B = projector(factors[name]["G"], 2), projector(factors[name]["U"], 2)
        A0, B0 = before[name]
        want_B = B0 @ (P_B if two_sided else P_A)
        assert rel(host(layer.lora_A["default"].weight), P_A @ A0) < 1e-4
        assert rel(host(layer.lora_B["default"].weight), want_B) < 1e-4
        assert rel(P_A @ A0, A0) > 0.01  # the projection is not the identity


def _added_regularizer_gradients(model, cfg, b):
    """The gradients one step of a fresh manager adds to .grad (preconditioning off), float64 per module, and its
    logged terms."""
    manager = GRITManager(model, cfg)
    model(**b).loss.backward()
    raw = {n: (host(l.lora_A["default"].weight.grad), host(l.lora_B["default"].weight.grad))
           for n, l in lora_pairs(model)}
    assert manager.step() is False
    added = {n: (host(l.lora_A["default"].weight.grad) - raw[n][0], host(l.lora_B["default"].weight.grad) - raw[n][1])
             for n, l in lora_pairs(model)}
    m = manager.metrics()
    manager.close()
    return added, m["grit/reg_kfac"], m["grit/reg_reproj"]


@pytest.mark.parametrize("term", ["curvature", "reprojection"])
@pytest.mark.parametrize("pairing", ["kfac", "reference"])
def test_regularizer_strength_does_not_depend_on_the_batch(pairing, term):
    """Every sequence of the step twice in the batch: the same data, so the same regularizer. The loss averages
    twice as many tokens, which halves ĝ and quarters G; the G-side factor is normalised inside the regularizer, so
    every gradient it adds and the logged term stay as they were. One term at a time, so neither hides the other."""
    lambdas = {"lambda_kfac": 0.3, "lambda_reproj": 0.0} if term == "curvature" else \
        {"lambda_kfac": 0.0, "lambda_reproj": 0.2}
    cfg = GRITConfig(pairing=pairing, precondition=False, kfac_update_freq=1, kfac_min_samples=1,
                     enable_rank_adaptation=False, reprojection_k=2, **lambdas)
    base = tiny_lora_model(seed=33)
    b = batch(33, pad_lengths=(2, 0, 5))
    twice = {k: torch.cat([v, v]) for k, v in b.items()}
    once, k1, r1 = _added_regularizer_gradients(copy.deepcopy(base), cfg, b)
    doubled, k2, r2 = _added_regularizer_gradients(copy.deepcopy(base), cfg, twice)
    for name in once:
        for side in (0, 1):
            assert rel(doubled[name][side], once[name][side]) < 1e-5, (name, "AB"[side])
    value1, value2 = (k1, k2) if term == "curvature" else (r1, r2)
    assert value1 > 0 and value2 == pytest.approx(value1, rel=1e-5)
