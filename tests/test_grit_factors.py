"""The captured factors U = E[uuᵀ] and G = E[ĝĝᵀ] against independent computations.

Reference 1: a float64 brute force from per-token u and ĝ = u.grad collected with retain_grad()
on lora_B's input (tests/grit_fixtures.BruteForce), on a model without checkpointing.
Reference 2: curvlinops-for-pytorch's KFACLinearOperator (empirical Fisher, KFAC-expand).
Every model has s != 1 (lora_alpha != r, and rsLoRA), so a missing or extra s shows.
"""

import copy

import pytest
import torch

from grit import GRITConfig, GRITManager
from grit_fixtures import DEVICE, BruteForce, batch, lora_pairs, tiny_lora_model

OBSERVE = dict(kfac_update_freq=1, kfac_min_samples=1, precondition=False, lambda_kfac=0.0, lambda_reproj=0.0)


def backward_micro_batches(model, batches, brute=None):
    """Gradient accumulation as HF does it: each micro-batch's mean loss divided by the number of micro-batches."""
    for b in batches:
        if brute is not None:
            brute.mask = b["attention_mask"]
        (model(**b).loss / len(batches)).backward()


def assert_factors_close(got, want, rtol=2e-5):
    assert set(got) == set(want)
    for name in want:
        for key in ("U", "G"):
            w, g = want[name][key], got[name][key].double()
            assert torch.linalg.norm(w) > 0, f"{name} {key} is zero: the comparison would be vacuous"
            err = torch.linalg.norm(g - w) / torch.linalg.norm(w)
            assert err < rtol, f"{name} {key}: relative error {err:.2e}"
        assert got[name]["tokens"] == want[name]["tokens"], name


@pytest.mark.parametrize("rslora", [False, True])
def test_factors_equal_brute_force_with_padding_and_accumulation(rslora):
    model = tiny_lora_model(seed=1, rslora=rslora)
    brute = BruteForce(model)
    manager = GRITManager(model, GRITConfig(**OBSERVE))
    batches = [batch(0, pad_lengths=(0, 3, 6)), batch(1, pad_lengths=(5, 0, 2))]
    backward_micro_batches(model, batches, brute)
    manager.step()
    want = brute.factors()
    assert_factors_close(manager.factors(), want)
    # The padding really was excluded: 3*10 - 9 and 3*10 - 7 tokens.
    assert all(w["tokens"] == 21 + 23 for w in want.values())
    manager.close()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_each_position_once(reentrant):
    reference = tiny_lora_model(seed=2)
    model = copy.deepcopy(reference)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    base.enable_input_require_grads()  # what prepare_model_for_kbit_training does for reentrant checkpointing
    model.train()
    assert base.model.gradient_checkpointing
    brute = BruteForce(reference)
    manager = GRITManager(model, GRITConfig(**OBSERVE))
    batches = [batch(2, pad_lengths=(4, 0, 1)), batch(3, pad_lengths=(0, 0, 7))]
    backward_micro_batches(reference, batches, brute)
    backward_micro_batches(model, batches)
    manager.step()
    assert_factors_close(manager.factors(), brute.factors())


def test_running_mean_and_ema_across_updates():
    model = tiny_lora_model(seed=3, rslora=True)
    brute = BruteForce(model)
    ema = GRITManager(model, GRITConfig(**{**OBSERVE, "stat_update": "ema", "stat_ema_decay": 0.7}))
    per_step = []
    for step in range(2):
        brute.clear()
        backward_micro_batches(model, [batch(10 + step, pad_lengths=(step, 2, 0))], brute)
        per_step.append(brute.factors())
        ema.step()
        model.zero_grad()
    ema.close()
    want = {n: {k: 0.7 * per_step[0][n][k] + 0.3 * per_step[1][n][k] for k in ("U", "G")}
            | {"tokens": per_step[0][n]["tokens"] + per_step[1][n]["tokens"]} for n in per_step[0]}
    assert_factors_close(ema.factors(), want)

    # Running mean over two steps folded at one update (kfac_update_freq=2): token-weighted.
    model = tiny_lora_model(seed=3, rslora=True)
    brute = BruteForce(model)
    mean = GRITManager(model, GRITConfig(**{**OBSERVE, "kfac_update_freq": 2}))
    for step in range(2):
        backward_micro_batches(model, [batch(10 + step, pad_lengths=(step, 2, 0))], brute)
        mean.step()
        model.zero_grad()
    assert_factors_close(mean.factors(), brute.factors())


class _LogitsForCurvlinops(torch.nn.Module):
    """curvlinops wants model(X) -> output with classes in dim 1 for CrossEntropyLoss: (B, C, T)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits.transpose(1, 2)


def test_factors_match_curvlinops_kfac_empirical():
    """U is the input-side KFAC factor of lora_B, G the output-side factor of lora_A.

    curvlinops conventions (KFACLinearOperator, fisher_type="empirical", kfac_approx="expand",
    CrossEntropyLoss(reduction="mean") on (B, C, T) logits, data = two batches of B sequences):
    the input covariance is Σ_t u uᵀ / (N_data * T) (a mean over all N_data*T tokens, like ours);
    the gradient covariance undoes the mean reduction, i.e. uses per-token gradients: with our ĝ the
    gradient of the backpropagated loss (each batch's mean loss / 2, as under accumulation),
    G_curvlinops = (N_data * T)^2 * G_grit. No padding here: curvlinops has no mask.
    """
    from curvlinops import KFACLinearOperator

    model = tiny_lora_model(seed=4, alpha=10)
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(2):
        ids = torch.randint(1, 96, (3, 9), generator=g)
        data.append((ids, torch.randint(1, 96, (3, 9), generator=g)))
    wrapped = _LogitsForCurvlinops(model)
    loss_func = torch.nn.CrossEntropyLoss()
    pairs = lora_pairs(model)
    params = [p for _, layer in pairs for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    op = KFACLinearOperator(wrapped, loss_func, params, data, fisher_type="empirical", kfac_approx="expand",
                            check_deterministic=False)
    op.compute_kronecker_factors()
    state = op.state_dict()
    inputs, grads = state["input_covariances"], state["gradient_covariances"]

    manager = GRITManager(model, GRITConfig(**OBSERVE))
    for X, y in data:
        (loss_func(wrapped(X.to(DEVICE)), y.to(DEVICE)) / len(data)).backward()
    manager.step()
    got = manager.factors()
    n_terms = 2 * 3 * 9
    for name, layer in pairs:
        U_peer = inputs[f"model.{name}.lora_B.default"].cpu()
        G_peer = grads[f"model.{name}.lora_A.default"].cpu() / n_terms**2
        for mine, peer in ((got[name]["U"], U_peer), (got[name]["G"], G_peer)):
            err = torch.linalg.norm(mine.double() - peer) / torch.linalg.norm(peer)
            assert err < 2e-5, f"{name}: relative error {err:.2e} against curvlinops"
        # And they are not the same matrix up to scale (the pairing test relies on it).
        U, G = got[name]["U"].double(), got[name]["G"].double()
        cos = (U * G).sum() / (U.norm() * G.norm())
        assert cos < 0.99
    manager.close()
