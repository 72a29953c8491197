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
    # The per-step EMA (GRITConfig.stat_update): (d·S_1 + S_2) / (d·N_1 + N_2), S = the step's Gram sum.
    want = {}
    for n in per_step[0]:
        (f1, f2), (c1, c2) = (per_step[0][n], per_step[1][n]), (per_step[0][n]["tokens"], per_step[1][n]["tokens"])
        want[n] = {k: (0.7 * c1 * f1[k] + c2 * f2[k]) / (0.7 * c1 + c2) for k in ("U", "G")} | {"tokens": c1 + c2}
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


def _per_step_factors(freq, d, steps):
    """A fresh same-seed model under stat_update='ema' (update every ``freq`` steps, no training): the manager's
    factors after ``steps`` steps, and the float64 brute-force factors of every step (1 or 2 micro-batches)."""
    model = tiny_lora_model(seed=12, rslora=True)
    brute = BruteForce(model)
    manager = GRITManager(model, GRITConfig(**{**OBSERVE, "kfac_update_freq": freq, "stat_update": "ema",
                                               "stat_ema_decay": d}))
    per_step = []
    for j in range(steps):
        brute.clear()
        micro = [batch(60 + 2 * j + m, pad_lengths=((j + m) % 4, 2 * m, 5 - j % 3)) for m in range(1 + j % 2)]
        backward_micro_batches(model, micro, brute)
        per_step.append(brute.factors())
        manager.step()
        model.zero_grad()
    got = manager.factors()
    manager.close()
    return got, per_step


def test_ema_decays_per_step_whatever_the_update_frequency():
    """stat_update='ema' equals the per-step recursion S <- d·S + S_j, N <- d·N + N_j, U = S/N (S_j, N_j: step j's
    Gram sum and token count, float64 from per-token u and ĝ), with updates every 2 steps and every 3 steps alike:
    the estimate's horizon is counted in optimizer steps, not in factor updates."""
    d, steps = 0.8, 6
    results = {freq: _per_step_factors(freq, d, steps) for freq in (2, 3)}
    per_step = results[2][1]
    want = {}
    for name in per_step[0]:
        S = {"U": 0.0, "G": 0.0}
        N = 0.0
        for f in per_step:
            for key in S:
                S[key] = d * S[key] + f[name][key] * f[name]["tokens"]
            N = d * N + f[name]["tokens"]
        want[name] = {key: S[key] / N for key in S} | {"tokens": sum(f[name]["tokens"] for f in per_step)}
    for freq, (got, _) in results.items():
        assert_factors_close(got, want)

    # An EMA over factor updates (F <- d·F + (1-d)·the update's mean) depends on the frequency and is far from the
    # per-step one, so this test tells them apart.
    for freq in (2, 3):
        worst = 0.0
        for name in per_step[0]:
            F = None
            for start in range(0, steps, freq):
                block = per_step[start:start + freq]
                mean = sum(f[name]["G"] * f[name]["tokens"] for f in block) / sum(f[name]["tokens"] for f in block)
                F = mean if F is None else d * F + (1 - d) * mean
            worst = max(worst, float(torch.linalg.norm(F - want[name]["G"]) / torch.linalg.norm(want[name]["G"])))
        assert worst > 0.05, freq


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


# ----------------------------------------------------------------------------- the factor state on its own

def _grams(gen, k, r, n_tokens):
    """k modules' Σuuᵀ, Σĝĝᵀ over n_tokens random positions, float64."""
    u = torch.randn(k, n_tokens, r, generator=gen, dtype=torch.float64)
    g = torch.randn(k, n_tokens, r, generator=gen, dtype=torch.float64) * 1e-2
    return u.transpose(1, 2) @ u, g.transpose(1, 2) @ g


def _state(scales, ranks, **cfg):
    from grit.factors import FactorState, ModuleSpec

    specs = [ModuleSpec(f"m{i}", r, torch.device("cpu"), lambda s=s: s) for i, (s, r) in enumerate(zip(scales, ranks))]
    return FactorState(specs, GRITConfig(**{**OBSERVE, **cfg}))


@pytest.mark.parametrize("stat_update", ["mean", "ema"])
def test_factor_state_accumulate_fold_and_named_sides_by_hand(stat_update):
    """Grams handed over by accumulate() are folded as GRITConfig says (token-weighted mean over updates, or
    the per-step EMA, each fold ending one step), and the A and B sides hold the factors of the pairing
    ('reference': F_A = U, F_B = G/s²) and their damped inverses: all against float64 arithmetic written out here."""
    d = 0.6
    scales, ranks = [2.0, 0.5, 3.0], [3, 3, 2]     # two factor groups: r = 3 (modules 0, 1) and r = 2 (module 2)
    fs = _state(scales, ranks, stat_update=stat_update, stat_ema_decay=d, pairing="reference", kfac_damping=0.1)
    assert len(fs.groups) == 2 and fs.bucket(0) == fs.bucket(1) != fs.bucket(2)
    gen = torch.Generator().manual_seed(0)
    sums = {i: [] for i in range(3)}               # per update: (ΣUU, ΣGG, tokens) of each module
    for update, tokens in enumerate(((5, 7), (11,))):
        per = {i: [0.0, 0.0, 0] for i in range(3)}
        for n_tok in tokens:                       # micro-batches of one update
            for modules in ([0, 1], [2]):
                UU, GG = _grams(gen, len(modules), ranks[modules[0]], n_tok)
                fs.accumulate(modules, UU.float(), GG.float(), torch.tensor(float(n_tok)))
                for j, i in enumerate(modules):
                    per[i][0], per[i][1], per[i][2] = per[i][0] + UU[j], per[i][1] + GG[j], per[i][2] + n_tok
        for i in range(3):
            sums[i].append(per[i])
        fs.fold()
    fs.invert()
    got = fs.module_factors()
    for i in range(3):
        (U1, G1, c1), (U2, G2, c2) = sums[i]
        if stat_update == "mean":
            U, G = (U1 + U2) / (c1 + c2), (G1 + G2) / (c1 + c2)
        else:  # each fold ends one step: the first update's sums decay by d once
            U, G = (d * U1 + U2) / (d * c1 + c2), (d * G1 + G2) / (d * c1 + c2)
        f = got[f"m{i}"]
        assert f["tokens"] == c1 + c2
        F_A, F_B = U, G / scales[i] ** 2
        r = ranks[i]
        for key, want in (("U", U), ("G", G), ("F_A", F_A), ("F_B", F_B)):
            assert torch.linalg.norm(f[key].double() - want) / torch.linalg.norm(want) < 1e-6, (i, key)
        for key, Fm in (("inv_A", F_A), ("inv_B", F_B)):
            want = torch.linalg.inv(Fm + 0.1 * torch.trace(Fm) / r * torch.eye(r, dtype=torch.float64))
            assert torch.linalg.norm(f[key].double() - want) / torch.linalg.norm(want) < 1e-5, (i, key)
    # The named sides are the two halves of the group's stack, views that follow every in-place write.
    g = fs.groups[0]
    assert torch.equal(g.A.F, g.F[:g.n]) and torch.equal(g.B.inv, g.inv[g.n:])
    assert g.A.F.data_ptr() == g.F.data_ptr() and bool(g.valid.all())
    with pytest.raises(ValueError, match="span factor groups"):
        fs.accumulate([0, 2], torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), torch.tensor(1.0))


def test_factor_state_round_trip_and_refusal_of_other_modules():
    fs = _state([2.0, 0.5], [3, 3])
    gen = torch.Generator().manual_seed(1)
    UU, GG = _grams(gen, 2, 3, 6)
    fs.accumulate([0, 1], UU.float(), GG.float(), torch.tensor(6.0))
    fs.fold()
    fs.invert()
    UU, GG = _grams(gen, 2, 3, 4)
    fs.accumulate([0, 1], UU.float(), GG.float(), torch.tensor(4.0))  # pending at save time
    saved = fs.state_dict()
    other = _state([2.0, 0.5], [3, 3])
    other.load_state_dict(saved)
    for name, f in fs.module_factors().items():
        for key, value in f.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other.module_factors()[name][key])), key
    fs.fold()
    other.fold()
    assert torch.equal(fs.groups[0].U, other.groups[0].U) and fs.module_factors()["m0"]["tokens"] == 10
    with pytest.raises(ValueError, match="other LoRA modules"):
        _state([2.0], [3]).load_state_dict(saved)


def test_micro_batch_stride_captures_every_kth_micro_batch_of_each_step():
    """stat_micro_batch_stride=2: the factors are the brute force of micro-batches 0, 2 of every step (the count
    restarts at each manager.step()), while every micro-batch still reaches the gradients."""
    model = tiny_lora_model(seed=4)
    reference = copy.deepcopy(model)
    brute = BruteForce(model)
    manager = GRITManager(model, GRITConfig(**OBSERVE, stat_micro_batch_stride=2))
    kept = {name: [] for name in brute.records}
    for step, n_micro in enumerate((4, 3)):
        micro = [batch(30 + 10 * step + m, pad_lengths=(m, 2, 0)) for m in range(n_micro)]
        backward_micro_batches(model, micro, brute)
        with torch.no_grad():  # an evaluation forward inside a step is not a micro-batch
            model(**micro[0])
        manager.step()
        for name, recs in brute.records.items():
            kept[name] += recs[0:n_micro:2]
        backward_micro_batches(reference, micro)
        brute.clear()
    brute.records = kept
    assert_factors_close(manager.factors(), brute.factors())
    # The gradients are those of every micro-batch (precondition=False: the raw accumulated gradient).
    for (_, p), (_, q) in zip(lora_pairs(model), lora_pairs(reference)):
        assert torch.equal(p.lora_A["default"].weight.grad, q.lora_A["default"].weight.grad)
    with pytest.raises(ValueError, match="stat_micro_batch_stride"):
        GRITConfig(stat_micro_batch_stride=0)
    manager.close()
