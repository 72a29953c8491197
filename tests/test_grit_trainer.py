"""GRIT inside real ``Trainer.train()`` runs: the natural gradient is applied, once per step, where it should be.

Every expectation is computed independently of ``grit``, on a copy of the model: per-token u (lora_B's
input) and ĝ (its gradient, by ``retain_grad()``) are recorded by ``grit_fixtures.BruteForce`` (not the
forward-hook-plus-tensor-hook mechanism grit captures with), the factors G = E[ĝĝᵀ], U = E[uuᵀ] built
densely in float64 over the non-padding positions, and the preconditioned gradients (G+λI)⁻¹∇A,
∇B(U+λI)⁻¹ solved in float64 (``grit_fixtures.dense_natural_gradient``) with the damping rule of
``GRITConfig`` (relative: λ = kfac_damping·tr(F)/r). The models are ``grit_fixtures.tiny_lora_model``
(random 2-layer Llamas) with LoRA on all 7 projections, r=4, alpha=8 (s = 2) or rsLoRA (s = alpha/√r),
so a missing or doubled s cannot hide.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from grit import GRITConfig, GRITManager, GRITScheduleWarning, GritCallback, GritOptimizer, GritTrainer
from grit.integrations.hf import GRIT_STATE_NAME
from grit_study.data import PadCollator
from grit_fixtures import VOCAB, BruteForce, dense_natural_gradient, lora_pairs, tiny_lora_model

PAD = 0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLLATE = PadCollator(pad_token_id=PAD)


# ----------------------------------------------------------------------------- builders

def tiny_model(seed: int = 0, *, r: int = 4, alpha: int = 8, rslora: bool = False):
    """fp32 (what the Trainer trains), LoRA on every projection; B is random so both factors carry curvature."""
    return tiny_lora_model(seed, r=r, alpha=alpha, rslora=rslora, dtype=torch.float32, targets=TARGETS)


def random_examples(n: int, seed: int = 0, min_len: int = 5, max_len: int = 14, prompt: int = 2) -> list[dict]:
    """Token rows of different lengths (so batches are padded), the first ``prompt`` tokens not in the loss."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def train_args(out, cls=TrainingArguments, **overrides):
    """Default: one optimizer step (2 micro-batches of 2) of plain SGD, lr 1, no momentum/decay/clip, constant
    schedule, data in order."""
    kw = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
              learning_rate=1.0, optim="sgd", weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
              max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
              train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
              remove_unused_columns=False)
    kw.update(overrides)
    return cls(**kw)


def grit_config(**overrides) -> GRITConfig:
    """Precondition from step 1 with that step's factors, no regularizers, relative damping 0.1, and no
    grafting (the exact natural gradient; test_grafting_* checks the grafted step)."""
    kw = dict(kfac_update_freq=1, kfac_min_samples=0, ng_warmup_steps=0, kfac_damping=0.1,
              kfac_damping_mode="relative", lambda_kfac=0.0, lambda_reproj=0.0, enable_reprojection=False,
              grafting=False)
    kw.update(overrides)
    return GRITConfig(**kw)


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def all_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- the independent reference

def backward_step(model, batches: list[dict], brute: BruteForce | None = None) -> None:
    """Backpropagate one optimizer step as the Trainer does: each micro-batch's token-summed cross entropy
    divided by the loss-token count of the whole step (``brute``, if given, is told each micro-batch's mask)."""
    n_loss_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        if brute is not None:
            brute.mask = b["attention_mask"]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
                             ignore_index=-100, reduction="sum")
        (ce / n_loss_tokens).backward()


def reference_step(model, batches: list[dict], adapter: str = "default") -> dict[str, dict]:
    """Gradients and K-FAC factors of one optimizer step over ``batches``, float64 on the CPU, without grit.

    The loss is what the Trainer backpropagates here: the token-summed cross entropy of each micro-batch
    divided by the number of loss tokens of the whole step. Returns per LoRA layer name:
    gA (r, d_in), gB (d_out, r), G (r, r) = E[ĝĝᵀ], U (r, r) = E[uuᵀ] (E over non-padding positions).
    """
    m = copy.deepcopy(model)
    # A deep copy keeps the module hooks, whose closures still point at the original's owners: a GRITManager
    # attached to ``model`` would record the reference's forwards as well.
    if any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules()):
        raise RuntimeError("reference_step: the model has module hooks (a GRITManager?); compute the reference "
                           "before attaching one, or close it first")
    m.train()
    brute = BruteForce(m, adapter)
    backward_step(m, batches, brute)
    factors = brute.factors()
    brute.close()
    return {name: {"gA": layer.lora_A[adapter].weight.grad.detach().cpu().double(),
                   "gB": layer.lora_B[adapter].weight.grad.detach().cpu().double(),
                   "U": factors[name]["U"], "G": factors[name]["G"]}
            for name, layer in lora_pairs(m, adapter)}


def natural_gradient(model, ref: dict, damping: float = 0.1, swap: bool = False,
                     grafting: bool = False) -> dict[str, torch.Tensor]:
    """{"<layer>.lora_A": (G+λI)⁻¹∇A, "<layer>.lora_B": ∇B(U+λI)⁻¹} (``dense_natural_gradient``, kfac);
    ``swap=True`` pairs A with U and B with G; ``grafting=True`` rescales each to its raw gradient's norm."""
    raw = {name: (r["gA"], r["gB"]) for name, r in ref.items()}
    dense = dense_natural_gradient(raw, ref, model, "kfac", damping, "relative", swap=swap, grafting=grafting)
    out = {}
    for name, (nA, nB) in dense.items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = nA, nB
    return out


def updates(before: dict, after: dict, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{"<layer>.lora_A"/"<layer>.lora_B": after - before} in float64, keyed like natural_gradient."""
    return {n.replace(f".{adapter}.weight", ""): after[n].double() - p.double() for n, p in before.items()}


def global_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def first_step_batches(examples: list[dict], batch: int = 2, accum: int = 2) -> list[dict]:
    """The micro-batches of optimizer step 1 under train_sampling_strategy='sequential'."""
    return [COLLATE(examples[i * batch:(i + 1) * batch]) for i in range(accum)]


def assert_update(actual: dict, expected: dict, before: dict, wrong: dict | None = None) -> None:
    """actual Δθ (fp32 after - before) == expected (float64) up to fp32 round-off of θ and of the solve."""
    assert set(actual) == set(expected) and len(expected) == 2 * 2 * len(TARGETS)
    theta = {n.replace(".default.weight", ""): float(p.abs().max()) for n, p in before.items()}
    for k, exp in expected.items():
        atol = 2e-5 * float(exp.abs().max()) + 4 * torch.finfo(torch.float32).eps * theta[k]
        torch.testing.assert_close(actual[k], exp, rtol=2e-4, atol=atol, msg=lambda s, k=k: f"{k}: {s}")
    if wrong is not None:  # the check can tell the pairings apart
        worst = max(float((actual[k] - wrong[k]).abs().max() / wrong[k].abs().max()) for k in wrong)
        assert worst > 0.1, "expected and swapped-factor updates are too close for this test to discriminate"


def scaled(d: dict, c: float) -> dict:
    return {k: c * v for k, v in d.items()}


def make_trainer(path: str, model, args, examples, manager, max_grad_norm=None):
    """A trainer wired through ``path``: 'trainer' (GritTrainer), 'callback' (Trainer + GritCallback) or
    'optimizer' (Trainer given a GritOptimizer around SGD, re-clipping to args.max_grad_norm)."""
    if path == "trainer":
        return GritTrainer(model=model, args=args, train_dataset=examples, data_collator=COLLATE,
                           grit_manager=manager)
    if path == "callback":
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=COLLATE)
        GritCallback(manager, max_grad_norm=max_grad_norm).install(trainer)
        return trainer
    if path == "optimizer":
        assert args.optim == "sgd" and args.weight_decay == 0
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
        opt = GritOptimizer(sgd, manager, max_grad_norm=args.max_grad_norm)
        assert opt is sgd  # a hook on the user's optimizer, not a wrapper around it
        return Trainer(model=model, args=args, train_dataset=examples, data_collator=COLLATE, optimizers=(opt, None))
    raise ValueError(path)


# ----------------------------------------------------------------------------- one exact step

@pytest.mark.parametrize("rslora", [False, True], ids=["alpha8-r4", "rslora-alpha6"])
def test_grit_trainer_sgd_step_is_the_natural_gradient(tmp_path, rslora):
    model = tiny_model(0, alpha=6 if rslora else 8, rslora=rslora)
    examples = random_examples(4, seed=1)
    before = lora_params(model)
    ref = reference_step(model, first_step_batches(examples))
    manager = GRITManager(model, grit_config())
    trainer = make_trainer("trainer", model, train_args(tmp_path), examples, manager)
    trainer.train()

    assert manager.preconditioned_steps == 1 and manager.optimizer_steps == 1
    # SGD with lr 1: Δθ = -(preconditioned gradient), and the pairing is the K-FAC one, not the swapped one.
    assert_update(updates(before, lora_params(model)), scaled(natural_gradient(model, ref), -1.0), before,
                  wrong=scaled(natural_gradient(model, ref, swap=True), -1.0))
    # With max_grad_norm=0 the Trainer logs the norm of what it applied: the natural gradient's.
    ng_norm = global_norm(natural_gradient(model, ref).values())
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(ng_norm, rel=1e-4)
    assert ng_norm > 10 * global_norm([r[k] for r in ref.values() for k in ("gA", "gB")])


@pytest.mark.slow
def test_sft_trainer_with_callback_sgd_step_is_the_natural_gradient(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from grit_study.models import load_tokenizer

    class CPUSFTTrainer(SFTTrainer):
        """TRL 1.15 computes -Σlog p / num_items_in_batch with a Triton kernel that needs a GPU driver; on CPU
        the model's own loss with the same num_items_in_batch is the same quantity. Everything else is SFTTrainer."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            assert return_outputs is False
            return model(**inputs, num_items_in_batch=num_items_in_batch).loss

    model = tiny_model(0)
    examples = random_examples(4, seed=1)
    before = lora_params(model)
    ref = reference_step(model, first_step_batches(examples))
    manager = GRITManager(model, grit_config())
    # SFTConfig turns gradient checkpointing on by default: the hooks must count each position once under it.
    args = train_args(tmp_path, cls=SFTConfig, max_length=None, packing=False, bf16=False)
    assert args.gradient_checkpointing
    trainer = CPUSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), data_collator=COLLATE,
                            processing_class=load_tokenizer("builtin:tiny"))
    # TRL keeps a pre-tokenized dataset as is (no re-tokenization, same rows in the same order).
    assert [trainer.train_dataset[i]["input_ids"] for i in range(4)] == [e["input_ids"] for e in examples]
    assert [trainer.train_dataset[i]["labels"] for i in range(4)] == [e["labels"] for e in examples]
    GritCallback(manager).install(trainer)
    trainer.train()

    assert manager.preconditioned_steps == 1 and manager.optimizer_steps == 1
    assert_update(updates(before, lora_params(model)), scaled(natural_gradient(model, ref), -1.0), before,
                  wrong=scaled(natural_gradient(model, ref, swap=True), -1.0))
    assert trainer.state.log_history[0]["grit/preconditioned_steps"] == 1.0


@pytest.mark.parametrize("path", ["trainer", "callback", "optimizer"])
def test_clipping_bounds_the_natural_gradient_step(tmp_path, path):
    """Δθ = -lr · c · P/‖P‖ with P the natural gradient: GritTrainer clips after preconditioning; the callback
    and the optimizer wrapper see the Trainer's clipped gradient (P is linear, so the direction is the same) and
    re-clip. Without the re-clip their step would be ‖P(clipped ∇)‖ ≫ c."""
    c, lr = 0.05, 0.5
    model = tiny_model(0)
    examples = random_examples(4, seed=1)
    before = lora_params(model)
    ref = reference_step(model, first_step_batches(examples))
    ng = natural_gradient(model, ref)
    manager = GRITManager(model, grit_config())
    trainer = make_trainer(path, model, train_args(tmp_path, max_grad_norm=c, learning_rate=lr), examples, manager)
    trainer.train()

    assert manager.preconditioned_steps == 1 and manager.optimizer_steps == 1
    delta = updates(before, lora_params(model))
    assert global_norm(delta.values()) <= lr * c * (1 + 1e-5)
    assert_update(delta, scaled(ng, -lr * c / global_norm(ng.values())), before)


def test_grit_optimizer_is_a_step_hook_on_the_users_optimizer_and_can_be_removed():
    """A hand-written loop. GritOptimizer returns the SGD it was given, whose step is then the natural
    gradient (lr 1: Δθ = -(G+λI)⁻¹∇A, -∇B(U+λI)⁻¹); after ``opt.grit_hook.remove()`` the same SGD steps
    with the raw gradient and the manager no longer steps."""
    model = tiny_model(0)
    examples = random_examples(8, seed=1)
    first = first_step_batches(examples[:4])
    before = lora_params(model)
    ref = reference_step(model, first)
    manager = GRITManager(model, grit_config())
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt = GritOptimizer(sgd, manager)
    assert opt is sgd and type(opt) is torch.optim.SGD

    backward_step(model, first)
    opt.step()
    opt.zero_grad()
    assert manager.optimizer_steps == 1 and manager.preconditioned_steps == 1
    assert_update(updates(before, lora_params(model)), scaled(natural_gradient(model, ref), -1.0), before,
                  wrong=scaled(natural_gradient(model, ref, swap=True), -1.0))

    opt.grit_hook.remove()
    assert not hasattr(opt, "grit_hook")
    manager.close()  # its statistics hooks would see the reference's forwards (reference_step refuses them)
    second = first_step_batches(examples[4:])
    before = lora_params(model)
    ref = reference_step(model, second)
    backward_step(model, second)
    opt.step()
    raw = {}
    for name, r in ref.items():
        raw[f"{name}.lora_A"], raw[f"{name}.lora_B"] = -r["gA"], -r["gB"]
    assert_update(updates(before, lora_params(model)), raw, before,
                  wrong=scaled(natural_gradient(model, ref), -1.0))
    assert manager.optimizer_steps == 1


def test_grafting_keeps_lora_B_alive_under_the_global_clip(tmp_path):
    """With grafting each module's step has its raw gradient's length, so the Trainer's global clip scales by
    the same coefficient as in the control (‖raw‖ > c) and lora_B keeps its share; without grafting the
    preconditioned ∇A dominates the global norm and the clip shrinks lora_B's step by orders of magnitude."""
    c, lr = 0.05, 0.5
    examples = random_examples(4, seed=1)
    model = tiny_model(0)
    for name, layer in lora_pairs(model):  # B = 0 would make G = 0; a small B is where GRIT starts after step 1
        w = layer.lora_B["default"].weight
        w.data.copy_(1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(len(name))))
    before = lora_params(model)
    ref = reference_step(model, first_step_batches(examples))
    raw_norm = global_norm([r[k] for r in ref.values() for k in ("gA", "gB")])
    assert raw_norm > c  # the clip binds in both runs
    steps = {}
    for grafting in (True, False):
        m = copy.deepcopy(model)
        manager = GRITManager(m, grit_config(grafting=grafting))
        make_trainer("trainer", m, train_args(tmp_path / str(grafting), max_grad_norm=c, learning_rate=lr),
                     examples, manager).train()
        assert manager.preconditioned_steps == 1
        steps[grafting] = updates(before, lora_params(m))
    grafted = natural_gradient(model, ref, grafting=True)
    assert_update(steps[True], scaled(grafted, -lr * c / raw_norm), before,
                  wrong=scaled(natural_gradient(model, ref, swap=True, grafting=True), -lr * c / raw_norm))

    def b_share(delta):
        return global_norm([v for k, v in delta.items() if k.endswith("lora_B")]) / global_norm(delta.values())

    raw_b_share = global_norm([r["gB"] for r in ref.values()]) / raw_norm
    assert b_share(steps[True]) == pytest.approx(raw_b_share, rel=1e-3)
    assert b_share(steps[False]) < 1e-2 * raw_b_share


# ----------------------------------------------------------------------------- the schedule, counted

def _tokens(examples) -> int:
    return sum(len(e["input_ids"]) for e in examples)


@pytest.mark.parametrize("case", ["min-samples-binds", "warmup-binds"])
def test_preconditioned_steps_follow_the_schedule(tmp_path, case):
    steps, freq = 12, 3
    examples = random_examples(4 * steps, seed=2)
    per_step = [_tokens(examples[4 * i:4 * i + 4]) for i in range(steps)]  # sequential sampler, 2 x 2 per step
    if case == "min-samples-binds":  # not enough tokens at step 3: the first inversion waits for step 6
        warmup, min_samples = 2, sum(per_step[:3]) + 1
    else:
        warmup, min_samples = 7, 0
    # The documented rule: factors invert at n % freq == 0 once >= min_samples tokens were seen (m* the first
    # such n); step n is preconditioned iff n > warmup and n >= m*.
    m_star = next(n for n in range(freq, steps + 1, freq) if sum(per_step[:n]) >= min_samples)
    expected = [n > warmup and n >= m_star for n in range(1, steps + 1)]
    assert sum(expected) == (7 if case == "min-samples-binds" else 5)  # the case does what its name says

    model = tiny_model(0)
    manager = GRITManager(model, grit_config(kfac_update_freq=freq, kfac_min_samples=min_samples,
                                             ng_warmup_steps=warmup))
    trainer = make_trainer("trainer", model, train_args(tmp_path, max_steps=steps, learning_rate=1e-2,
                                                         max_grad_norm=1.0), examples, manager)
    trainer.train()

    logged = [h["grit/preconditioned_steps"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [float(sum(expected[:n])) for n in range(1, steps + 1)]
    assert manager.preconditioned_steps == sum(expected)
    assert manager.optimizer_steps == steps


@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_a_schedule_that_cannot_precondition_is_refused_before_the_first_step(tmp_path, path):
    """The published default kfac_update_freq=50 in a 12-step run would precondition nothing: refused before step 1
    (no parameter moves); so is a warm-up as long as the run. precondition=False (a control) is not refused."""
    examples = random_examples(48, seed=7)
    args = dict(max_steps=12, learning_rate=1e-2, max_grad_norm=1.0)
    for overrides, match in (({"kfac_update_freq": 50}, "first factor update is at step 50 .*max_steps=12"),
                             ({"kfac_update_freq": 4, "ng_warmup_steps": 12}, r"warm-up \(ng_warmup_steps=12\)")):
        model = tiny_model(0)
        before = all_params(model)
        manager = GRITManager(model, grit_config(**overrides))
        trainer = make_trainer(path, model, train_args(tmp_path / str(len(overrides)), **args), examples, manager)
        with pytest.raises(ValueError, match=match):
            trainer.train()
        assert manager.optimizer_steps == 0 and trainer.state.global_step == 0
        after = all_params(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(kfac_update_freq=50, precondition=False))
    make_trainer(path, model, train_args(tmp_path / "control", **args), examples, manager).train()
    assert manager.optimizer_steps == 12 and manager.preconditioned_steps == 0


@pytest.mark.parametrize("path", ["trainer", "callback", "optimizer"])
def test_the_glue_tells_the_manager_the_run_length(tmp_path, path):
    """GritTrainer and GritCallback check the schedule against the Trainer's max_steps through the manager's own
    check (GRITManager.set_max_steps), so the manager does not also warn at step 1 that preconditioning starts
    late; GritOptimizer (a step hook, which knows no run length) leaves it to the manager, which warns."""
    examples = random_examples(12, seed=9)
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(kfac_update_freq=3))
    trainer = make_trainer(path, model, train_args(tmp_path, max_steps=3, learning_rate=1e-2), examples, manager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    late = [w for w in caught if issubclass(w.category, GRITScheduleWarning)]
    assert manager.preconditioned_steps == 1  # step 3, the first factor update
    if path == "optimizer":
        assert manager.max_steps is None and len(late) == 1
        assert "optimizer step 3 at the earliest" in str(late[0].message)
    else:
        assert manager.max_steps == 3 and late == []


@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_a_run_that_preconditioned_nothing_ends_with_an_error(tmp_path, path):
    """kfac_min_samples never reached: the schedule could precondition (updates at steps 2 and 4 of 4), the data
    never allows it. The run completes (GritTrainer: after Trainer.train() returned, its final log written;
    GritCallback: in on_train_end) and then fails, saying why."""
    examples = random_examples(16, seed=8)
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(kfac_update_freq=2, kfac_min_samples=10**9))
    trainer = make_trainer(path, model, train_args(tmp_path, max_steps=4, learning_rate=1e-2), examples, manager)
    with pytest.raises(RuntimeError, match="preconditioned 0 of the 4 optimizer steps.*kfac_min_samples=1000000000"):
        trainer.train()
    assert trainer.state.global_step == 4 and manager.optimizer_steps == 4 and manager.inversions == 0
    if path == "trainer":
        assert "train_loss" in trainer.state.log_history[-1]  # raised after training had finished
    # The same run with samples enough: no error.
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(kfac_update_freq=2, kfac_min_samples=1))
    make_trainer(path, model, train_args(tmp_path / "ok", max_steps=4, learning_rate=1e-2), examples, manager).train()
    assert manager.preconditioned_steps == 3


def test_precondition_off_is_bit_identical_to_control(tmp_path):
    examples = random_examples(12, seed=3)
    kw = dict(max_steps=3, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=1.0,
              train_sampling_strategy="random")
    control = tiny_model(0)
    Trainer(model=control, args=train_args(tmp_path / "c", **kw), train_dataset=examples,
            data_collator=COLLATE).train()
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(precondition=False))
    trainer = make_trainer("trainer", model, train_args(tmp_path / "g", **kw), examples, manager)
    trainer.train()

    a, b = all_params(control), all_params(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], lora_params(tiny_model(0))[k]) for k in lora_params(model))  # it trained
    assert manager.preconditioned_steps == 0 and manager.optimizer_steps == 3
    # The manager really was attached: its statistics saw every non-padding token of the 12 examples (one epoch).
    assert manager.metrics()["grit/stat_tokens"] == _tokens(examples) > 0


# ----------------------------------------------------------------------------- logging

def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for root, _, files in os.walk(logdir):
        for f in files:
            if f.startswith("events.out.tfevents"):
                acc = EventAccumulator(os.path.join(root, f))
                acc.Reload()
                for tag in acc.Tags()["scalars"]:
                    out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_metrics_reach_tensorboard_and_loss_is_the_task_loss(tmp_path, path):
    examples = random_examples(12, seed=4)
    kw = dict(max_steps=3, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=1.0, report_to="tensorboard")
    control = Trainer(model=tiny_model(0), args=train_args(tmp_path / "c", **kw), train_dataset=examples,
                      data_collator=COLLATE)
    control.train()
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(lambda_kfac=1e-2, lambda_reproj=1e-2))  # regularizers on
    trainer = make_trainer(path, model, train_args(tmp_path / "g", **kw),
                           examples, manager)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["grit/preconditioned_steps"] == h["grit/optimizer_steps"] == h["step"]
        assert h["grit/reg_kfac"] > 0 and h["grit/reg_reproj"] >= 0 and math.isfinite(h["grit/ng_grad_norm"])
    # Same first forward, so the same loss: the regularizers act on .grad and never enter the reported loss.
    first_control = next(h["loss"] for h in control.state.log_history if "loss" in h)
    assert logs[0]["loss"] == first_control
    scalars = _tensorboard_scalars(tmp_path / "g")  # the TensorBoard callback writes under output_dir/runs/
    for tag in ("train/loss", "train/grit/preconditioned_steps", "train/grit/reg_kfac", "train/grit/cond_max",
                "train/grit/damping"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    assert scalars["train/loss"][0][1] == pytest.approx(first_control, rel=1e-6)
    assert [v for _, v in scalars["train/grit/preconditioned_steps"]] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_metrics_every_logs_device_metrics_every_nth_log_step_and_at_the_last(tmp_path, path):
    """metrics_every=2 over 5 logged steps: manager.metrics() at log steps 2, 4 and the last (5), the host-side
    manager.counters() alone at 1 and 3, and the counters are right at every one."""
    examples = random_examples(20, seed=4)
    model = tiny_model(0)
    manager = GRITManager(model, grit_config(kfac_update_freq=2))  # inversions at 2, 4; preconditioned from 2
    args = train_args(tmp_path, max_steps=5, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=1.0)
    if path == "trainer":
        trainer = GritTrainer(model=model, args=args, train_dataset=examples, data_collator=COLLATE,
                              grit_manager=manager, grit_metrics_every=2)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=COLLATE)
        GritCallback(manager, metrics_every=2).install(trainer)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4, 5]
    counters, full = set(manager.counters()), set(manager.metrics())
    assert counters < full and "grit/cond_max" in full
    for h in logs:
        n = h["step"]
        assert {k for k in h if k.startswith("grit/")} == (full if n in (2, 4, 5) else counters), n
        assert (h["grit/optimizer_steps"], h["grit/inversions"], h["grit/preconditioned_steps"]) == \
            (n, n // 2, max(0, n - 1)), n
    assert manager.metrics()["grit/cond_max"] == logs[-1]["grit/cond_max"]  # the last step's are the final ones


# ----------------------------------------------------------------------------- checkpoints and failures

@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_resume_reaches_the_uninterrupted_parameters(tmp_path, path):
    examples = random_examples(24, seed=5)
    kw = dict(max_steps=6, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=1.0,
              train_sampling_strategy="random", save_strategy="steps", save_steps=5, logging_steps=1)
    cfg = grit_config(kfac_update_freq=2, lambda_kfac=1e-3, lambda_reproj=1e-3)  # inversions at steps 2, 4, 6
    full = tiny_model(0)
    full_manager = GRITManager(full, cfg)
    make_trainer(path, full, train_args(tmp_path / "run", **kw), examples, full_manager).train()
    checkpoint = tmp_path / "run" / "checkpoint-5"
    assert (checkpoint / GRIT_STATE_NAME).is_file()
    assert torch.load(checkpoint / GRIT_STATE_NAME, weights_only=True)["inversions"] == 2

    resumed = tiny_model(0)
    manager = GRITManager(resumed, cfg)
    # The callback finds output_dir/checkpoint-<step> itself; GritTrainer is given the path by train().
    trainer = make_trainer(path, resumed, train_args(tmp_path / "run", **kw), examples, manager)
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert manager.optimizer_steps == 6 and manager.inversions == 3 and manager.preconditioned_steps == 5
    a, b = lora_params(full), lora_params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_without_grit_state_refuses(tmp_path):
    examples = random_examples(24, seed=5)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=5, learning_rate=1e-2)
    Trainer(model=tiny_model(0), args=train_args(tmp_path / "plain", **kw), train_dataset=examples,
            data_collator=COLLATE).train()
    model = tiny_model(0)
    trainer = make_trainer("trainer", model, train_args(tmp_path / "g", **kw), examples,
                           GRITManager(model, grit_config()))
    with pytest.raises(FileNotFoundError, match=GRIT_STATE_NAME):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-5"))


class _PoisonMicroBatch(TrainerCallback):
    """Makes the embedding output NaN for one micro-batch (counting forwards in training mode)."""

    def __init__(self, model, at_forward: int):
        self.calls, self.at = 0, at_forward
        emb = model.get_base_model().model.embed_tokens
        self.handle = emb.register_forward_hook(self.hook)

    def hook(self, module, inputs, out):
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                return out * float("nan")
        return out


@pytest.mark.parametrize("path", ["trainer", "callback"])
def test_nan_micro_batch_after_first_inversion_leaves_parameters_finite(tmp_path, path):
    examples = random_examples(16, seed=6)
    model = tiny_model(0)
    manager = GRITManager(model, grit_config())
    poison = _PoisonMicroBatch(model, at_forward=5)  # step 3's first micro-batch; inversions at steps 1 and 2
    trainer = make_trainer(path, model, train_args(tmp_path, max_steps=4, optim="adamw_torch", learning_rate=1e-2,
                                                   max_grad_norm=1.0), examples, manager)
    trainer.train()
    poison.handle.remove()

    assert poison.calls == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    m = manager.metrics()
    assert m["grit/nonfinite_grads"] >= 1 and m["grit/skipped_modules"] >= 1  # counted, and logged
    assert manager.inversions >= 3  # training went on with GRIT after the bad batch


# ----------------------------------------------------------------------------- the study's 4-bit stack

@pytest.mark.slow
def test_study_4bit_model_trains_with_preconditioning(tmp_path):
    from peft.tuners.lora.bnb import Linear4bit

    from grit_study import resolve_preset
    from grit_study.data import build_study_data
    from grit_study.models import load_peft_model, load_tokenizer

    preset = resolve_preset("tiny")
    model = load_peft_model(preset)
    tok = load_tokenizer(preset.model_id)
    data = build_study_data(tok, source="synthetic", template=preset.template, max_seq_length=preset.max_seq_length,
                            val_size=4, num_examples=16, data_seed=0)
    manager = GRITManager(model, GRITConfig(lora_rank=preset.lora_r, kfac_update_freq=1, kfac_min_samples=0))
    assert len(manager.lora_modules) == 2 * 7 and all(isinstance(m, Linear4bit) for m in manager.lora_modules)
    before = lora_params(model)
    args = train_args(tmp_path, max_steps=3, optim="adamw_torch", learning_rate=1e-3, max_grad_norm=1.0)
    trainer = GritTrainer(model=model, args=args, train_dataset=data.train,
                          data_collator=PadCollator(pad_token_id=tok.pad_token_id), grit_manager=manager)
    trainer.train()

    assert manager.preconditioned_steps == 3 == manager.optimizer_steps
    after = lora_params(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


# ----------------------------------------------------------------------------- argument checks

def test_glue_rejects_bad_arguments(tmp_path):
    model = tiny_model(0)
    manager = GRITManager(model, grit_config())

    def sgd():
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    with pytest.raises(ValueError, match="grit_manager"):
        GritTrainer(model=model, args=train_args(tmp_path), train_dataset=random_examples(4), data_collator=COLLATE)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GritOptimizer(sgd(), manager, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        GritCallback(manager, max_grad_norm=float("nan"))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="metrics_every"):
            GritCallback(manager, metrics_every=bad)
        with pytest.raises(ValueError, match="metrics_every"):
            GritTrainer(model=model, args=train_args(tmp_path), train_dataset=random_examples(4),
                        data_collator=COLLATE, grit_manager=manager, grit_metrics_every=bad)
    with pytest.raises(ValueError, match="closure"):
        GritOptimizer(sgd(), manager).step(closure=lambda: 0.0)
    assert manager.optimizer_steps == 0  # refused before the manager stepped
    with pytest.raises(TypeError):
        GritOptimizer(object(), manager)
    twice = GritOptimizer(sgd(), manager)
    with pytest.raises(ValueError, match="already runs GRIT"):
        GritOptimizer(twice, manager)
    # Two glue paths on one trainer would precondition twice per step.
    with pytest.raises(ValueError, match="not a GritOptimizer"):
        GritTrainer(model=model, args=train_args(tmp_path), train_dataset=random_examples(4), data_collator=COLLATE,
                    grit_manager=manager, optimizers=(GritOptimizer(sgd(), manager), None))
    trainer = GritTrainer(model=model, args=train_args(tmp_path), train_dataset=random_examples(4),
                          data_collator=COLLATE, grit_manager=manager)
    with pytest.raises(ValueError, match="GritCallback"):
        GritCallback(manager).install(trainer)


def test_grit_trainer_fp16_step_is_the_natural_gradient(tmp_path):
    """fp16=True (T4-class GPUs): the accelerator's GradScaler scales the loss by 2^16 before every backward;
    GritTrainer hands it to the manager, so the factors and the SGD update are those of the fp32 reference up
    to fp16 autocast round-off, not off by the scale."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(0).to(device)
    examples = random_examples(4, seed=1)
    before = lora_params(model)
    batches = [{k: v.to(device) for k, v in b.items()} for b in first_step_batches(examples)]
    ref = reference_step(model, batches)
    manager = GRITManager(model, grit_config())
    args = train_args(tmp_path, fp16=True, use_cpu=device == "cpu")
    trainer = make_trainer("trainer", model, args, examples, manager)
    scaler = trainer.accelerator.scaler
    if device == "cuda":  # on the CPU accelerate autocasts without loss scaling: nothing to hand over
        assert scaler is not None and scaler.is_enabled() and manager._scaler is scaler
    else:
        assert scaler is None and manager._scaler is None
    trainer.train()

    assert manager.preconditioned_steps == 1
    if scaler is not None:
        assert scaler.get_scale() >= 2.0**15  # the loss really was scaled, and no overflow skipped the step
    for name, r in ref.items():
        f = manager.factors()[name]
        assert rel_err(f["G"], r["G"]) < 2e-2 and rel_err(f["U"], r["U"]) < 2e-2, name
    actual = {k: v.cpu() for k, v in updates(before, lora_params(model)).items()}
    expected = scaled(natural_gradient(model, ref), -1.0)
    wrong = scaled(natural_gradient(model, ref, swap=True), -1.0)
    for k in expected:
        assert rel_err(actual[k], expected[k]) < 2e-2, k
    assert max(rel_err(wrong[k], expected[k]) for k in expected) > 0.1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double().cpu() - b.double().cpu()) / torch.linalg.norm(b.double().cpu()))
