"""Preset selection and precedence: explicit parameter > GRIT_* environment variable > preset default."""


import pytest

from grit_study import presets
from grit_study.presets import PRESETS, resolve_preset


def test_seed_protocol_is_exact():
    p = PRESETS["llama3-8b"]
    assert (p.load_in_4bit, p.compute_dtype, p.lora_r, p.lora_alpha, p.lora_dropout) == (True, "bfloat16", 16, 16, 0.0)
    assert set(p.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps, p.warmup_steps, p.max_steps) == (2, 4, 5, 200)
    assert (p.learning_rate, p.weight_decay, p.lr_scheduler_type, p.seed, p.max_seq_length) == (2e-4, 0.01, "linear", 3407, 2048)
    assert p.baseline_model_id == "unsloth/llama-3-8b-bnb-4bit" and p.optim == "adamw_8bit"
    assert p.data == "hub:vicgalle/alpaca-gpt4"


def test_cpu_presets_never_name_the_hub():
    for name in ("smollm2-135m", "tiny"):
        p = PRESETS[name]
        assert p.device == "cpu" and p.compute_dtype == "float32" and p.data == "synthetic"
        assert p.model_id.startswith("builtin:")
    assert PRESETS["tiny"].lora_alpha != PRESETS["tiny"].lora_r  # s != 1 in every test


def test_auto_selection(monkeypatch):
    monkeypatch.delenv("GRIT_PRESET", raising=False)
    monkeypatch.setattr(presets, "cuda_available", lambda: True)
    assert resolve_preset().name == "llama3-8b"
    monkeypatch.setattr(presets, "cuda_available", lambda: False)
    assert resolve_preset().name == "smollm2-135m"
    monkeypatch.setenv("GRIT_PRESET", "tiny")
    assert resolve_preset().name == "tiny"
    assert resolve_preset("smollm2-135m").name == "smollm2-135m"


def test_precedence_parameter_over_env_over_preset(monkeypatch):
    monkeypatch.delenv("GRIT_MAX_STEPS", raising=False)
    assert resolve_preset("tiny").max_steps == PRESETS["tiny"].max_steps
    monkeypatch.setenv("GRIT_MAX_STEPS", "17")
    monkeypatch.setenv("GRIT_LEARNING_RATE", "0.5")
    monkeypatch.setenv("GRIT_GRADIENT_CHECKPOINTING", "true")
    monkeypatch.setenv("GRIT_LORA_TARGETS", "q_proj, v_proj")
    p = resolve_preset("tiny")
    assert (p.max_steps, p.learning_rate, p.gradient_checkpointing, p.lora_targets) == (17, 0.5, True, ("q_proj", "v_proj"))
    assert resolve_preset("tiny", max_steps=3).max_steps == 3
    assert resolve_preset("tiny", max_steps=None).max_steps == 17  # None means "not given"


def test_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("GRIT_MAX_STEPS", "many")
    with pytest.raises(ValueError, match="GRIT_MAX_STEPS='many'.*max_steps"):
        resolve_preset("tiny")
    monkeypatch.delenv("GRIT_MAX_STEPS")
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        resolve_preset("gpt5")
    with pytest.raises(ValueError, match=r"unknown preset field\(s\) \['max_stpes'\]"):
        resolve_preset("tiny", max_stpes=3)
    with pytest.raises(ValueError, match="template must be"):
        resolve_preset("tiny", template="vicuna")
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        resolve_preset("tiny", max_steps=0)


