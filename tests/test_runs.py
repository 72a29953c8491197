"""RunRecorder against independent computations: token-weighted CE from logits, batches captured by
the test itself, and TensorBoard's own event reader."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ce_sum(model, batch) -> tuple[float, int]:
    """Summed next-token CE over labels != -100, computed here from the logits (float64)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    return float(ce), int((labels != -100).sum())


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """Two optimizer steps of a real HF Trainer (tiny 4-bit Llama, rsLoRA, alpha != r) with lr = 0, so the
    model the test evaluates afterwards is the one every step saw."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from grit_study import arms
    from grit_study.data import PadCollator, as_hf_dataset
    from grit_study.evaluate import eval_loss
    from grit_study.models import load_peft_model, load_tokenizer
    from grit_study.runs import RunRecorder

    tmp = tmp_path_factory.mktemp("run")
    preset = arms.study_preset("tiny", use_rslora=True, lora_alpha=8, max_steps=2, learning_rate=0.0,
                               warmup_steps=0, gradient_accumulation_steps=3, eval_steps=1)
    tok = load_tokenizer(preset.model_id)
    data = arms.study_data(preset, tok)
    model = load_peft_model(preset)
    captured: list[dict] = []
    pad = PadCollator(tok.pad_token_id)

    def collate(features):  # the test's own record of what the trainer was fed
        batch = pad(features)
        captured.append({k: v.clone() for k, v in batch.items()})
        return batch

    class InjectGrit(TrainerCallback):  # stands in for GritTrainer merging manager.metrics() into the logs
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs["grit/probe"] = float(state.global_step) + 0.5

    args = TrainingArguments(**arms.training_arguments(preset, str(tmp / "out")))
    trainer = Trainer(model=model, args=args, train_dataset=as_hf_dataset(data.train), data_collator=collate,
                      callbacks=[InjectGrit()])
    rec = RunRecorder(tmp / "logs" / "control_x", info={"arm": "control", "train_fingerprint": data.train_fingerprint,
                                                        "val_fingerprint": data.val_fingerprint},
                      eval_steps=1, evaluate=lambda m: eval_loss(m, data.val, tok.pad_token_id, 5))
    rec.attach(trainer)
    trainer.train()
    rec.close()
    return dict(model=model, data=data, captured=captured, run_dir=rec.run_dir, preset=preset,
                summary=json.loads((rec.run_dir / "run_summary.json").read_text()))


@pytest.mark.slow
def test_train_loss_is_token_weighted_ce_over_the_steps_micro_batches(recorded_run):
    from grit_study.compare import read_scalars

    r = recorded_run
    accum = r["preset"].gradient_accumulation_steps
    # The dataloader may collate one batch ahead of the last step; the first 2 * accum are the steps'.
    assert len(r["captured"]) >= 2 * accum
    r = {**r, "captured": r["captured"][:2 * accum]}
    logged = {step: value for step, _, value in read_scalars(r["run_dir"])["train/loss"]}
    for step in (1, 2):
        micro = r["captured"][(step - 1) * accum: step * accum]
        sums = [_ce_sum(r["model"], b) for b in micro]
        expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
        mean_of_means = sum(s / n for s, n in sums) / len(sums)
        # The micro-batches hold different token counts, so the wrong (per-micro-batch) average differs.
        assert abs(mean_of_means - expected) > 1e-4
        assert logged[step] == pytest.approx(expected, rel=1e-5)
    tokens = sum(int((b["labels"] != -100).sum()) for b in r["captured"])
    assert r["summary"]["response_tokens_seen"] == tokens
    assert r["summary"]["total_tokens_seen"] == sum(int(b["attention_mask"].sum()) for b in r["captured"])
    assert r["summary"]["num_items_mismatches"] == 0


@pytest.mark.slow
def test_eval_loss_is_token_weighted_ce_over_the_validation_set(recorded_run):
    from grit_study.compare import read_scalars
    from grit_study.data import PadCollator

    r = recorded_run
    pad = PadCollator(0)
    total = count = 0
    for i in range(0, len(r["data"].val), 3):  # other batch size than the recorder's: must not matter
        s, n = _ce_sum(r["model"].eval(), pad(r["data"].val[i:i + 3]))
        total, count = total + s, count + n
    evals = {step: v for step, _, v in read_scalars(r["run_dir"])["eval/loss"]}
    assert sorted(evals) == [0, 1, 2]
    for v in evals.values():  # lr = 0: the model never moved
        assert v == pytest.approx(total / count, rel=1e-5)
    assert r["summary"]["eval_tokens"] == count


@pytest.mark.slow
def test_batch_hashes_are_of_what_the_trainer_received(recorded_run):
    r = recorded_run
    accum = r["preset"].gradient_accumulation_steps
    assert len(r["summary"]["batch_hashes"]) == 2
    expected = []
    for step in range(2):
        h = hashlib.sha256()
        for b in r["captured"][step * accum:(step + 1) * accum]:
            for t in (b["input_ids"], b["labels"]):
                h.update(repr(tuple(t.shape)).encode())
                h.update(t.to(torch.int64).numpy().tobytes())
        expected.append(h.hexdigest()[:16])
    assert r["summary"]["batch_hashes"] == expected
    assert expected[0] != expected[1]


@pytest.mark.slow
def test_scalar_names_read_back_by_tensorboard(recorded_run):
    from grit_study.compare import read_scalars

    scalars = read_scalars(recorded_run["run_dir"])
    for tag in ("train/loss", "eval/loss", "train/grad_norm", "train/learning_rate", "train/step_time_s",
                "train/peak_memory_mb", "grit/probe"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert not any(t.startswith("train/grit") for t in scalars)
    assert [(s, v) for s, _, v in scalars["grit/probe"]] == [(1, 1.5), (2, 2.5)]
    assert all(v == 0.0 for _, _, v in scalars["train/learning_rate"])
    s = recorded_run["summary"]
    assert s["steps"] == 2 and s["preconditioned_steps"] == 0
    assert all(math.isfinite(x) for x in s["train_loss_per_step"])
    assert s["median_s_per_step"] > 0 and s["peak_memory_mb"] > 0
    assert s["package_versions"]["torch"] == torch.__version__


def test_parameters_explicit_then_environment_then_default(monkeypatch):
    from grit_study.arms import param

    monkeypatch.setenv("GRIT_LAMBDA_KFAC", "3e-4")
    monkeypatch.setenv("GRIT_PRECONDITION", "false")
    assert param("LAMBDA_KFAC", 1e-2, None, float) == 1e-2
    assert param("LAMBDA_KFAC", None, None, float) == 3e-4
    assert param("PRECONDITION", None, True) is False
    assert param("LOGDIR", None, "tensorboard_logs") == "tensorboard_logs"
    monkeypatch.setenv("GRIT_PRECONDITION", "maybe")
    with pytest.raises(ValueError, match="GRIT_PRECONDITION"):
        param("PRECONDITION", None, True)


def test_every_arm_is_defined_once_and_builds_what_it_says():
    from grit import GRITConfig
    from grit_study.arms import grit_config
    from grit_study.presets import resolve_preset
    from grit_study.registry import ARMS, PUBLISHED_GRIT, get_arm

    preset = resolve_preset("tiny")
    assert {"baseline", "control", "grit", "grit_published", "control_sgd", "grit_sgd", "riemannian",
            "loraplus"} <= set(ARMS)
    # No GRIT object for the arms without GRIT; the rest get GRITConfig's defaults plus their own fields,
    # and the preset's update frequency (it belongs to the run length).
    for name in ("control", "control_sgd", "riemannian", "loraplus"):
        assert grit_config(preset, get_arm(name)) is None
    grit = grit_config(preset, get_arm("grit"))
    assert grit.to_dict() == GRITConfig(lora_rank=preset.lora_r, kfac_update_freq=preset.kfac_update_freq).to_dict()
    published = grit_config(preset, get_arm("grit_published"))
    assert {k: getattr(published, k) for k in PUBLISHED_GRIT} == PUBLISHED_GRIT
    assert grit_config(preset, get_arm("grit_sgd")).grafting is True
    assert get_arm("grit_sgd").optimizer == get_arm("control_sgd").optimizer == "sgd"
    reg_only = grit_config(preset, get_arm("reg_only"))
    assert not reg_only.precondition and reg_only.regularized
    with pytest.raises(ValueError, match="unknown arm"):
        get_arm("gritt")


def test_sgd_arms_get_momentum_and_peers_wrap_the_controls_optimizer(tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments

    from grit_study import arms
    from grit_study.models import load_peft_model
    from grit_study.registry import SGD_MOMENTUM, get_arm

    preset = arms.study_preset("tiny")
    sgd = TrainingArguments(**arms.training_arguments(preset, str(tmp_path), optimizer="sgd"))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(sgd, None)
    assert cls is torch.optim.SGD and kwargs["momentum"] == SGD_MOMENTUM
    args = TrainingArguments(**arms.training_arguments(preset, str(tmp_path)))
    model = load_peft_model(preset)
    control_cls, _ = Trainer.get_optimizer_cls_and_kwargs(args, model)
    for name in ("riemannian", "loraplus"):
        opt = arms.peer_optimizer(get_arm(name), args, model)
        assert isinstance(opt, control_cls), name  # PEFT's factory around the control's exact class
        assert {g["weight_decay"] for g in opt.param_groups if g["params"]} == {preset.weight_decay}
    plus = arms.peer_optimizer(get_arm("loraplus"), args, model)
    lrs = {round(g["lr"] / preset.learning_rate, 6) for g in plus.param_groups if g["params"]}
    assert lrs == {1.0, 16.0}
