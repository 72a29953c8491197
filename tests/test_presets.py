"""Preset selection and precedence: explicit parameter > GRIT_* environment variable > preset default; the
shipped Alpaca-GPT4-style sample behind the CPU default."""

import dataclasses
import hashlib

import pytest

from grit_study import presets
from grit_study.presets import PRESETS, resolve_preset

SAMPLE_SHA256 = "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"


def test_seed_protocol_is_exact():
    p = PRESETS["llama3-8b"]
    assert (p.load_in_4bit, p.compute_dtype, p.lora_r, p.lora_alpha, p.lora_dropout) == (True, "bfloat16", 16, 16, 0.0)
    assert set(p.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps, p.warmup_steps, p.max_steps) == (2, 4, 5, 200)
    assert (p.learning_rate, p.weight_decay, p.lr_scheduler_type, p.seed, p.max_seq_length) == (2e-4, 0.01, "linear", 3407, 2048)
    assert p.baseline_model_id == "unsloth/llama-3-8b-bnb-4bit" and p.optim == "adamw_8bit"
    assert p.data == "hub:vicgalle/alpaca-gpt4"


def test_cpu_presets_never_name_the_hub():
    for name in ("smollm2-135m", "alpaca-smollm2", "tiny"):
        p = PRESETS[name]
        assert p.device == "cpu" and p.compute_dtype == "float32" and not p.data.startswith("hub:")
        assert p.model_id.startswith("builtin:")
    assert PRESETS["smollm2-135m"].data == PRESETS["tiny"].data == "synthetic"
    assert PRESETS["tiny"].lora_alpha != PRESETS["tiny"].lora_r  # s != 1 in every test


def test_auto_selection(monkeypatch):
    monkeypatch.delenv("GRIT_PRESET", raising=False)
    monkeypatch.setattr(presets, "cuda_available", lambda: True)
    assert resolve_preset().name == "llama3-8b"
    monkeypatch.setattr(presets, "cuda_available", lambda: False)
    assert resolve_preset().name == "alpaca-smollm2"
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




def test_the_shipped_sample_is_the_documented_file_found_from_any_directory(tmp_path, monkeypatch):
    from grit_study.data import REPO_ROOT, source_path

    p = PRESETS["alpaca-smollm2"]
    assert p.data == "repo:data/alpaca-sample/alpaca_en_demo.json"
    monkeypatch.chdir(tmp_path)  # resolved against the repository, not the working directory
    path = source_path(p.data)
    assert path == REPO_ROOT / "data" / "alpaca-sample" / "alpaca_en_demo.json" and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE_SHA256
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert SAMPLE_SHA256 in readme and "Alpaca-GPT4-style sample" in readme
    assert "hiyouga/LLaMA-Factory" in readme and "CC BY-NC 4.0" in readme


def test_alpaca_preset_fields():
    p = PRESETS["alpaca-smollm2"]
    assert (p.model_id, p.baseline_model_id) == ("builtin:smollm2-135m",) * 2
    assert (p.template, p.max_seq_length, p.val_size, p.test_size, p.max_steps) == ("chat", 512, 100, 200, 60)
    assert p.kfac_update_freq < p.max_steps  # GRIT preconditions within the run
    assert p.preregistration == "docs/preregistration/alpaca-smollm2.json"


def test_new_fields_are_neutral_on_the_presets_that_existed_before_them():
    # The sweep's run definition omits a field that holds its default: a new field must not move old runs.
    defaults = {f.name: f.default for f in dataclasses.fields(presets.Preset)}
    assert defaults["preregistration"] is None
    for name in ("llama3-8b", "smollm2-135m", "tiny"):
        assert PRESETS[name].preregistration is None


@pytest.mark.slow
def test_the_chat_template_is_smollm2_instructs_own():
    from grit_study.data import format_prompt
    from grit_study.models import load_tokenizer

    tok = load_tokenizer(PRESETS["alpaca-smollm2"].model_id)
    assert tok.eos_token == "<|im_end|>"
    assert format_prompt({"instruction": "Hi", "input": ""}, tok, "chat") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
