"""GRITManager: preconditioned gradients against dense float64 solves, schedule, state, robustness.

Dense references use the brute-force factors of tests/grit_fixtures.BruteForce (float64, from
per-token u and ĝ), never the manager's own factors.
"""

import copy
import io
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from grit import GRITConfig, GRITManager, GRITScheduleWarning, expected_preconditioned_steps
from grit_fixtures import (DEVICE, BruteForce, batch, dense_natural_gradient, host, lora_pairs, reference_terms,
                           tiny_lora_model)

NG = dict(kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.0, lambda_reproj=0.0)


def grads_of(model, adapter="default"):
    return {name: (host(layer.lora_A[adapter].weight.grad),
                   host(layer.lora_B[adapter].weight.grad))
            for name, layer in lora_pairs(model, adapter)}


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("grafting", [False, True])
@pytest.mark.parametrize("pairing,rslora,mode,damping", [
    ("kfac", False, "relative", 0.1), ("kfac", True, "absolute", 1e-3),
    ("reference", False, "relative", 0.05), ("reference", True, "absolute", 1e-4)])
def test_preconditioned_grads_equal_dense_solve_and_not_the_swapped_one(pairing, rslora, mode, damping, grafting):
    model = tiny_lora_model(seed=5, rslora=rslora, alpha=12)
    brute = BruteForce(model)
    cfg = GRITConfig(pairing=pairing, kfac_damping=damping, kfac_damping_mode=mode, grafting=grafting, **NG)
    manager = GRITManager(model, cfg)
    for b in (batch(20, pad_lengths=(0, 4, 2)), batch(21, pad_lengths=(3, 0, 0))):
        brute.mask = b["attention_mask"]
        (model(**b).loss / 2).backward()
    raw = grads_of(model)
    assert manager.step() is True
    got = grads_of(model)
    factors = brute.factors()
    want = dense_natural_gradient(raw, factors, model, pairing, damping, mode, grafting=grafting)
    swapped = dense_natural_gradient(raw, factors, model, pairing, damping, mode, swap=True, grafting=grafting)
    for name in want:
        for side in (0, 1):
            assert rel(got[name][side], want[name][side]) < 1e-4, (name, "AB"[side])
            # The swapped pairing is far away, so this test fails if the factors are exchanged.
            assert rel(swapped[name][side], want[name][side]) > 0.05, (name, "AB"[side])
            # An absolute λ far above the factor makes (F + λI)^-1 ≈ I/λ, and grafting undoes the 1/λ.
            if not (grafting and mode == "absolute"):
                assert rel(raw[name][side], want[name][side]) > 0.05, "preconditioning must change the gradient"
            if grafting:  # the raw gradient's length, K-FAC's direction
                assert float(got[name][side].norm()) == pytest.approx(float(raw[name][side].norm()), rel=1e-5)
    assert manager.preconditioned_steps == 1
    m = manager.metrics()
    expected_norm = torch.sqrt(sum(w.pow(2).sum() for pair in want.values() for w in pair))
    assert m["grit/ng_grad_norm"] == pytest.approx(float(expected_norm), rel=1e-4)
    assert m["grit/cond_min"] >= 1.0 and m["grit/skipped_modules"] == 0
    manager.close()


def test_any_adapter_name_and_only_lora_grads_touched():
    model = tiny_lora_model(seed=6, adapter="task", targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    for p in model.parameters():  # a non-LoRA trainable parameter must be left alone
        p.requires_grad_(True)
    manager = GRITManager(model, GRITConfig(**NG))
    assert manager.adapter_name == "task" and len(manager.lora_modules) == 2 * 4
    model(**batch(0)).loss.backward()
    other = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert manager.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.grad, other[n]), n
    with pytest.raises(ValueError, match="adapter"):
        GRITManager(model, GRITConfig(adapter_name="nope"))
    with pytest.raises(ValueError, match="lora_rank"):
        GRITManager(model, GRITConfig(lora_rank=8))


@pytest.mark.parametrize("freq,warmup,min_samples,max_steps,expected", [
    (1, 0, 1, 6, 6),     # inverted at step 1, preconditioned from step 1
    (3, 0, 1, 10, 8),    # first update at step 3: steps 3..10
    (3, 4, 1, 10, 6),    # warm-up wins: steps 5..10
    (2, 0, 60, 9, 6),    # 21 tokens/step: 42 < 60 at step 2, 84 at step 4: steps 4..9
    (5, 0, 1, 4, 0),     # no update within the run
])
def test_number_of_preconditioned_steps_follows_the_documented_rule(freq, warmup, min_samples, max_steps, expected):
    model = tiny_lora_model(seed=7, targets=("v_proj",))
    cfg = GRITConfig(kfac_update_freq=freq, ng_warmup_steps=warmup, kfac_min_samples=min_samples,
                     lambda_kfac=0.0, lambda_reproj=0.0)
    manager = GRITManager(model, cfg)
    flags = []
    for step in range(max_steps):
        model(**batch(step, pad_lengths=(0, 3, 6))).loss.backward()  # 21 tokens per step
        flags.append(manager.step())
        model.zero_grad()
    assert manager.preconditioned_steps == sum(flags) == expected  # `expected` is worked out by hand above
    assert expected_preconditioned_steps(cfg, max_steps, 21) == expected
    assert manager.optimizer_steps == max_steps


def test_precondition_off_and_no_regularizers_is_bit_identical():
    control = tiny_lora_model(seed=8, dtype=torch.float32)
    grit_model = copy.deepcopy(control)
    manager = GRITManager(grit_model, GRITConfig(precondition=False, lambda_kfac=0.0, lambda_reproj=0.0,
                                                 kfac_update_freq=2, kfac_min_samples=1))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (control, grit_model)]
    for step in range(4):
        for model, opt in zip((control, grit_model), opts):
            model(**batch(step)).loss.backward()
            if model is grit_model:
                assert manager.step() is False
            opt.step()
            opt.zero_grad()
    for (n, a), b in zip(control.named_parameters(), grit_model.parameters()):
        assert torch.equal(a, b), n
    m = manager.metrics()
    assert m["grit/stat_tokens"] > 0 and m["grit/inversions"] == 2 and m["grit/preconditioned_steps"] == 0


def test_state_dict_round_trip_resumes_identically():
    cfg = GRITConfig(kfac_update_freq=2, kfac_min_samples=1, lambda_kfac=1e-3, lambda_reproj=1e-3,
                     stat_update="ema", stat_ema_decay=0.5)
    model = tiny_lora_model(seed=9, dtype=torch.float32)
    manager = GRITManager(model, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train(model, manager, opt, steps):
        for step in steps:
            model(**batch(step)).loss.backward()
            manager.step()
            opt.step()
            opt.zero_grad()

    train(model, manager, opt, range(5))  # 2 inversions, and pending statistics of step 5
    buffer = io.BytesIO()
    torch.save({"grit": manager.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed_model = tiny_lora_model(seed=123, dtype=torch.float32)  # other weights, overwritten below
    resumed_model.load_state_dict(saved["model"])
    resumed = GRITManager(resumed_model, cfg)
    resumed.load_state_dict(saved["grit"])
    assert (resumed.optimizer_steps, resumed.preconditioned_steps, resumed.inversions) == (5, 4, 2)
    for name, f in manager.factors().items():
        for key, value in f.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.factors()[name][key])), (name, key)
    resumed_opt = torch.optim.SGD([p for p in resumed_model.parameters() if p.requires_grad], lr=1e-3)
    train(model, manager, opt, range(5, 8))
    train(resumed_model, resumed, resumed_opt, range(5, 8))
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), n
    assert manager.metrics()["grit/preconditioned_steps"] == resumed.metrics()["grit/preconditioned_steps"] == 7


def _all_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_batch_after_first_inversion_keeps_parameters_finite():
    model = tiny_lora_model(seed=10, dtype=torch.float32)
    manager = GRITManager(model, GRITConfig(kfac_min_samples=1, kfac_update_freq=1, lambda_kfac=1e-4,
                                            lambda_reproj=1e-4))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(**batch(0)).loss.backward()
    assert manager.step()
    opt.step()
    opt.zero_grad()
    before = manager.factors()
    poisoned = batch(1)
    embeds = model.get_input_embeddings()(poisoned.pop("input_ids")).detach()
    embeds[1, 2] = float("nan")
    embeds[0, 0, 0] = float("inf")
    loss = model(inputs_embeds=embeds, **poisoned).loss
    assert not torch.isfinite(loss)
    loss.backward()
    assert manager.step()
    opt.step()
    opt.zero_grad()
    assert _all_finite(model)
    m = manager.metrics()
    assert m["grit/skipped_modules"] == len(manager.lora_modules)  # every module's statistics were rejected
    assert m["grit/nonfinite_grads"] > 0
    after = manager.factors()
    for name in before:  # the factors and inverses of the first inversion were kept
        assert torch.equal(before[name]["inv_A"], after[name]["inv_A"])
        assert torch.equal(before[name]["U"], after[name]["U"])
    model(**batch(2)).loss.backward()  # and training goes on normally
    assert manager.step()
    opt.step()
    assert _all_finite(model) and manager.metrics()["grit/skipped_modules"] == len(manager.lora_modules)


def test_nan_injected_into_a_factor_is_skipped_counted_and_replaced():
    model = tiny_lora_model(seed=11, dtype=torch.float32)
    manager = GRITManager(model, GRITConfig(kfac_min_samples=1, kfac_update_freq=1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(**batch(0)).loss.backward()
    manager.step()
    opt.step()
    opt.zero_grad()
    first = manager.lora_module_names[0]
    fs = manager.factor_state
    (g0, row0), (g1, row1) = fs.slots[0], fs.slots[1]
    fs.groups[g0].G[row0, 0, 1] = float("nan")   # module 0: a corrupted stored factor
    fs.groups[g1].pend_U[row1, 2, 2] = float("inf")  # module 1: a corrupted pending statistic
    model(**batch(1)).loss.backward()
    assert manager.step()
    opt.step()
    assert _all_finite(model)
    assert manager.metrics()["grit/skipped_modules"] == 2
    f = manager.factors()
    assert all(torch.isfinite(t).all() for v in f.values() for t in v.values() if isinstance(t, torch.Tensor))
    assert f[first]["tokens"] == 21  # the corrupted factor was forgotten and rebuilt from the new batch alone
    names = manager.lora_module_names
    assert f[names[1]]["tokens"] == 21  # its corrupted new statistics were rejected, its history kept
    assert f[names[2]]["tokens"] == 42  # an untouched module folded both batches


@pytest.mark.slow
def test_4bit_bitsandbytes_model_is_found_and_preconditioned():
    from bitsandbytes.nn import Linear4bit

    from grit_study.models import load_peft_model, load_tokenizer
    from grit_study.presets import resolve_preset

    preset = resolve_preset("tiny")
    model = load_peft_model(preset)
    layers = [layer for layer in model.modules() if hasattr(layer, "lora_A") and "default" in layer.lora_A]
    assert layers and all(isinstance(layer.base_layer, Linear4bit) for layer in layers)
    g = torch.Generator().manual_seed(0)
    for layer in layers:  # PEFT starts with B = 0, where G = 0 and ∇A = 0: move B so both sides are non-trivial
        w = layer.lora_B["default"].weight
        w.data.copy_(0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype))
    brute = BruteForce(model)
    manager = GRITManager(model, GRITConfig(lora_rank=preset.lora_r, **NG))
    assert len(manager.lora_modules) == len(layers) == 2 * len(preset.lora_targets)
    tok = load_tokenizer(preset.model_id)
    enc = tok(["Name a primary color. Red.", "Hi"], return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    brute.mask = enc["attention_mask"]
    model.train()
    model(**enc).loss.backward()
    raw = grads_of(model)
    assert manager.step() and manager.preconditioned_steps == 1
    got = grads_of(model)
    want = dense_natural_gradient(raw, brute.factors(), model, "kfac", 0.1, "relative", grafting=True)  # the default
    for name in want:
        for side in (0, 1):
            assert rel(got[name][side], want[name][side]) < 1e-3, (name, side)
    manager.close()


def test_fp16_grad_scaler_gives_the_unscaled_statistics_and_update():
    """A loss scaled by 2^12 under an attached GradScaler: the factors equal the brute-force ones of the
    unscaled loss (per-token u and ĝ recorded independently, ĝ divided by the scale here), the regularizer
    terms equal their autograd reference, and after the scaler's unscale the gradients equal a float64 dense
    solve of (raw + regularizer gradient), grafted. Without attaching, G is off by the scale squared."""
    S = 2.0**12
    cfg = GRITConfig(kfac_update_freq=1, kfac_min_samples=1, lambda_kfac=0.5, lambda_reproj=0.5,
                     enable_rank_adaptation=False, reprojection_k=2)  # k < r, so the reprojection term is not 0
    b = batch(40)
    base = tiny_lora_model(seed=8)
    model = copy.deepcopy(base)
    brute = BruteForce(model)
    brute.mask = b["attention_mask"]
    manager = GRITManager(model, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    manager.attach_grad_scaler(scaler)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scaler.scale(model(**b).loss).backward()
    raw = {name: (gA / S, gB / S) for name, (gA, gB) in grads_of(model).items()}
    assert manager.step() is True
    scaler.unscale_(opt)
    got = grads_of(model)

    factors = {name: {"U": f["U"], "G": f["G"] / S**2} for name, f in brute.factors().items()}
    mine = manager.factors()
    for name in factors:
        for key in ("U", "G"):
            assert rel(mine[name][key], factors[name][key]) < 1e-5, (name, key)
    total_k, total_r, reg = reference_terms(model, factors, cfg)
    with_reg = {name: (raw[name][0] + reg[name][0], raw[name][1] + reg[name][1]) for name in raw}
    want = dense_natural_gradient(with_reg, factors, model, "kfac", 0.1, "relative", grafting=True)
    # 1e-3, the bound of test_grit_regularizers: the manager's fp32 projectors against float64 eigh ones.
    for name in want:
        for side in (0, 1):
            assert rel(got[name][side], want[name][side]) < 1e-3, (name, "AB"[side])
    m = manager.metrics()
    assert m["grit/reg_kfac"] == pytest.approx(total_k, rel=1e-3) and total_k > 0
    assert m["grit/reg_reproj"] == pytest.approx(total_r, rel=1e-3) and total_r > 0
    expected_norm = torch.sqrt(sum(w.pow(2).sum() for pair in want.values() for w in pair))
    assert m["grit/ng_grad_norm"] == pytest.approx(float(expected_norm), rel=1e-3)

    unaware = copy.deepcopy(base)
    unaware_manager = GRITManager(unaware, cfg)
    torch.amp.GradScaler("cpu", init_scale=S).scale(unaware(**b).loss).backward()
    unaware_manager.step()
    for name, f in unaware_manager.factors().items():
        assert rel(f["G"], factors[name]["G"]) > 1e6  # the scale squared, had it not been divided out


def test_fp16_overflow_reaches_the_grad_scaler():
    """An inf gradient under a GradScaler is left non-finite (and counted), so the scaler skips the step and
    lowers the scale, as it does without GRIT; without a scaler the manager zeroes it instead (tested above)."""
    model = tiny_lora_model(seed=9)
    manager = GRITManager(model, GRITConfig(kfac_update_freq=1, kfac_min_samples=1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    manager.attach_grad_scaler(scaler)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scaler.scale(model(**batch(42)).loss).backward()
    poisoned = lora_pairs(model)[1][1].lora_B["default"].weight
    poisoned.grad[0, 0] = float("inf")
    manager.step()
    assert manager.metrics()["grit/nonfinite_grads"] == 1
    assert not torch.isfinite(poisoned.grad).all()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11  # overflow seen: step skipped, scale halved
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n
    with pytest.raises(TypeError, match="GradScaler"):
        manager.attach_grad_scaler(object())


@pytest.mark.parametrize("stat_update", ["mean", "ema"])
def test_fp16_overflow_step_statistics_are_dropped_not_folded(stat_update):
    """One overflowing step under a GradScaler (the scaler skips it) must not cost the window: the first update,
    one step later, inverts, and U, G are exactly the brute-force factors of the clean step alone (G unscaled
    by that step's loss scale, which the overflow halved). Folded, the overflow would make the whole window
    non-finite and the fold would reject it: no inversion until the next update."""
    S = 2.0**12
    cfg = GRITConfig(kfac_update_freq=2, kfac_min_samples=1, stat_update=stat_update, stat_ema_decay=0.5,
                     lambda_kfac=0.0, lambda_reproj=0.0)
    model = tiny_lora_model(seed=11)
    manager = GRITManager(model, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    manager.attach_grad_scaler(scaler)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    # Step 1 overflows: every gradient, and so every ĝ, is non-finite (an fp16 loss scale that is too high).
    (scaler.scale(model(**batch(50)).loss) * float("inf")).backward()
    assert manager.step() is False
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == S / 2  # the scaler saw the overflow and skipped the step
    opt.zero_grad()
    # Step 2 is clean; only its micro-batch is recorded by the independent reference.
    brute = BruteForce(model)
    b = batch(51)
    brute.mask = b["attention_mask"]
    scaler.scale(model(**b).loss).backward()
    manager.step()
    assert manager.inversions == 1
    mine = manager.factors()
    want = brute.factors()
    for name, f in want.items():
        assert rel(mine[name]["U"], f["U"]) < 1e-5, name
        assert rel(mine[name]["G"], f["G"] / (S / 2) ** 2) < 1e-5, name
    assert manager.metrics()["grit/skipped_modules"] == len(lora_pairs(model))  # one dropped step per module


# ----------------------------------------------------------------------------- nothing silently

def fused_lora_forward(self, x, *args, **kwargs):
    """A PEFT LoRA Linear forward as a fused LoRA kernel computes it (Unsloth's on CUDA): the same function, with
    the LoRA weights read directly, so gradients reach lora_A and lora_B but their modules are never called."""
    result = self.base_layer(x, *args, **kwargs)
    for adapter in self.active_adapters:
        if adapter in self.lora_A:
            A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            result = result + F.linear(F.linear(x.to(A.dtype), A), B) * self.scaling[adapter]
    return result


@pytest.mark.parametrize("freq", [1, 3, 50])
def test_lora_gradients_without_statistics_are_refused_at_the_first_step(monkeypatch, freq):
    """A forward that bypasses PEFT's lora_A/lora_B modules (the LoRA output computed from the weights directly,
    as a fused kernel does) is refused at step 1, whatever kfac_update_freq is: not only at the first factor
    update (step freq), after which freq - 1 steps would already have trained as the control."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = tiny_lora_model(seed=13)
    b = batch(13)
    normal_loss = model(**b).loss.detach()
    monkeypatch.setattr(LoraLinear, "forward", fused_lora_forward)
    manager = GRITManager(model, GRITConfig(kfac_update_freq=freq, kfac_min_samples=1))
    loss = model(**b).loss
    assert torch.allclose(loss.detach(), normal_loss, rtol=1e-12)  # the fused forward computes the same function
    loss.backward()
    grads = [layer.lora_A["default"].weight.grad for _, layer in lora_pairs(model)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)  # LoRA is trained, the hooks saw nothing
    with pytest.raises(RuntimeError, match="no statistics for 6 of the 6 LoRA modules") as err:
        manager.step()
    for words in ("fused LoRA kernel", "Unsloth", "lora_A/lora_B", "plain PEFT forward", "transformers + peft",
                  "optimizer step 1"):
        assert words in str(err.value), words
    assert "grit_study" not in str(err.value)  # the library's errors speak library terms
    assert manager.optimizer_steps == 1

    # Only one module bypassed (its forward fused): refused too, and named.
    monkeypatch.undo()
    model = tiny_lora_model(seed=13)
    name, layer = lora_pairs(model)[4]
    layer.forward = types.MethodType(fused_lora_forward, layer)
    manager = GRITManager(model, GRITConfig(kfac_update_freq=freq, kfac_min_samples=1))
    model(**b).loss.backward()
    with pytest.raises(RuntimeError, match=f"1 of the 6 LoRA modules .*{name}"):
        manager.step()

    # The plain PEFT forward, the same steps: no error, and it preconditions from the first update on. With
    # stat_micro_batch_stride=2 only the 1st and 3rd of 3 micro-batches are captured: still no error at step 1.
    for stride in (1, 2):
        model = tiny_lora_model(seed=13)
        manager = GRITManager(model, GRITConfig(kfac_update_freq=min(freq, 3), kfac_min_samples=1,
                                                stat_micro_batch_stride=stride))
        for _ in range(min(freq, 3)):
            for _ in range(3):
                model(**b).loss.backward()
            preconditioned = manager.step()
            model.zero_grad()
        assert preconditioned and manager.preconditioned_steps == 1
    # A step without any backward (nothing trained) is not the bypass either: no error, nothing done; the check
    # waits for the first step with gradients.
    model = tiny_lora_model(seed=13)
    idle = GRITManager(model, GRITConfig(kfac_update_freq=1, kfac_min_samples=1))
    assert idle.step() is False and not idle.ready
    layer = lora_pairs(model)[4][1]
    layer.forward = types.MethodType(fused_lora_forward, layer)
    model(**b).loss.backward()
    with pytest.raises(RuntimeError, match="1 of the 6 LoRA modules"):
        idle.step()


def test_a_plain_loop_that_cannot_precondition_yet_is_warned_at_step_1():
    """GRITConfig() defaults (kfac_update_freq=50) in a 30-step plain loop: the first step() warns, naming step 50
    (worked out by hand: the first multiple of 50), once; the run then preconditions nothing, as warned."""
    model = tiny_lora_model(seed=14, targets=("v_proj",))
    manager = GRITManager(model, GRITConfig())
    with pytest.warns(GRITScheduleWarning, match="optimizer step 50 at the earliest") as record:
        model(**batch(0)).loss.backward()
        manager.step()
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's step() line
    assert "kfac_update_freq=50" in str(record[0].message) and "max_steps" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        for step in range(1, 30):
            model.zero_grad()
            model(**batch(step)).loss.backward()
            assert manager.step() is False
    assert manager.preconditioned_steps == 0

    manager.close()

    def first_step(cfg, **kw):
        model.zero_grad(set_to_none=True)
        other = GRITManager(model, cfg, **kw)
        model(**batch(0)).loss.backward()
        other.step()
        other.close()

    # A warm-up behind the first update: the warm-up's end is named. Preconditioning from step 1: no warning.
    with pytest.warns(GRITScheduleWarning, match="optimizer step 8 at the earliest"):
        first_step(GRITConfig(kfac_update_freq=2, ng_warmup_steps=7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first_step(GRITConfig(kfac_update_freq=1))
        first_step(GRITConfig(precondition=False))  # a control: nothing to warn about
        first_step(GRITConfig(kfac_update_freq=10), max_steps=30)  # told the run's length, and checked: no warning


def test_max_steps_refuses_a_schedule_that_cannot_precondition_up_front():
    model = tiny_lora_model(seed=15, targets=("v_proj",))
    with pytest.raises(ValueError, match=r"first factor update is at step 50 \(kfac_update_freq=50\).*max_steps=30.*"
                                         r"Set kfac_update_freq <= 30"):
        GRITManager(model, GRITConfig(), max_steps=30)
    with pytest.raises(ValueError, match=r"warm-up \(ng_warmup_steps=30\)"):
        GRITManager(model, GRITConfig(kfac_update_freq=5, ng_warmup_steps=30), max_steps=30)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            GRITManager(model, GRITConfig(), max_steps=bad)
    assert not any(m._forward_hooks for m in model.modules())  # refused before anything was hooked
    # Just long enough (step 50 is the last), a control, and a schedule that starts at once: accepted.
    assert GRITManager(model, GRITConfig(), max_steps=50).max_steps == 50
    GRITManager(model, GRITConfig(precondition=False), max_steps=30)
    GRITManager(model, GRITConfig(kfac_update_freq=1), max_steps=1)


def test_repr_lists_the_hyperparameters():
    model = tiny_lora_model(seed=16, adapter="task")
    cfg = GRITConfig(kfac_update_freq=7, kfac_min_samples=11, kfac_damping=0.25, kfac_damping_mode="absolute",
                     pairing="reference", grafting=False, stat_update="ema", ng_warmup_steps=3, lambda_kfac=0.5,
                     lambda_reproj=0.0, precondition=True)
    text = repr(GRITManager(model, cfg, max_steps=40))
    assert text.startswith("GRITManager(")
    for part in ("lora_modules=6", "adapter='task'", "max_steps=40", "kfac_update_freq=7", "kfac_min_samples=11",
                 "kfac_damping=0.25", "kfac_damping_mode='absolute'", "pairing='reference'", "grafting=False",
                 "stat_update='ema'", "ng_warmup_steps=3", "lambda_kfac=0.5", "lambda_reproj=0.0",
                 "enable_reprojection=False", "precondition=True"):
        assert part in text, part


def test_manager_class_reads_in_one_sitting():
    """GRITManager's class body stays under 250 lines (helpers live in grit.apply, grit.metrics, grit.schedule)."""
    import ast
    import inspect

    import grit.manager

    tree = ast.parse(inspect.getsource(grit.manager))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GRITManager"]
    assert cls.end_lineno - cls.lineno + 1 < 250


# ----------------------------------------------------------------------------- the manager follows the model

def test_manager_built_before_the_model_is_materialised_follows_its_device_and_dtype():
    """README's order is manager first, then a Trainer that moves the model. Here the manager is built on a model
    that exists only on the ``meta`` device in float64; the model is then materialised (``to_empty``, which
    replaces every parameter object), loaded from a same-seed float32 model and cast to float32. The factors and
    the preconditioned gradients must be those of the loaded model (float64 brute force and dense solve).
    A multi-GPU ``device_map`` (factor groups on several devices, counters summed on the host) cannot be tested
    on this project's CPU machines; ``GRIT_TEST_DEVICE=cuda`` runs this test with the model moved to a GPU."""
    source = tiny_lora_model(seed=14, dtype=torch.float32)
    model = tiny_lora_model(seed=14, dtype=torch.float64, meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    manager = GRITManager(model, GRITConfig(**NG))
    old_params = [p for p in model.parameters()]
    model.to_empty(device=DEVICE)
    model.load_state_dict(source.state_dict())
    for (name, buf), (_, src) in zip(model.named_buffers(), source.named_buffers()):
        buf.copy_(src)  # non-persistent buffers (rotary inv_freq) are not in the state dict
    model.to(torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in model.parameters())
    assert not any(p is q for p, q in zip(model.parameters(), old_params))  # the parameter objects were replaced

    brute = BruteForce(model)
    for b in (batch(50, pad_lengths=(0, 4, 2)), batch(51, pad_lengths=(3, 0, 0))):
        brute.mask = b["attention_mask"]
        (model(**b).loss / 2).backward()
    raw = grads_of(model)
    assert manager.step() is True
    want = brute.factors()
    got = manager.factors()
    for name in want:
        assert got[name]["tokens"] == want[name]["tokens"] == 24 + 27
        for key in ("U", "G"):
            assert rel(got[name][key].double(), want[name][key]) < 2e-5, (name, key)
    natural = dense_natural_gradient(raw, want, model, "kfac", 0.1, "relative", grafting=True)  # the defaults
    after = grads_of(model)
    for name in natural:
        for side in (0, 1):
            assert rel(after[name][side], natural[name][side]) < 1e-4, (name, "AB"[side])
    m = manager.metrics()
    assert m["grit/stat_tokens"] == 51 and m["grit/skipped_modules"] == 0 and m["grit/nonfinite_grads"] == 0
    assert m["grit/ng_grad_norm"] == pytest.approx(
        float(torch.sqrt(sum(w.pow(2).sum() for pair in natural.values() for w in pair))), rel=1e-4)


def test_moving_the_model_after_the_factor_state_was_used_is_refused():
    """The factor state is placed at its first use; a model that moves afterwards is refused with what to do."""
    source = tiny_lora_model(seed=15, dtype=torch.float32)
    model = tiny_lora_model(seed=15, dtype=torch.float32, meta=True)
    manager = GRITManager(model, GRITConfig(**NG))
    assert manager.factor_state.groups[0].device.type == "meta"  # a first use while the model is still there
    model.to_empty(device=DEVICE)
    model.load_state_dict(source.state_dict())
    for (_, buf), (_, src) in zip(model.named_buffers(), source.named_buffers()):
        buf.copy_(src)
    model(**batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="allocated on meta.*Move the model to its training device before"):
        manager.step()
