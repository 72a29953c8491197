"""Memory on a small card (issue 23 item 2), simulated on the CPU: the settings every arm shares on a card under
24 GiB, the longest micro-batch of the run's schedule, the estimate and the stop before training
(grit_study.memory)."""

from __future__ import annotations

import dataclasses
import json
import os
import types
from pathlib import Path

import pytest
import torch

from grit_study import arms, memory, runs  # noqa: F401  (runs imports transformers' Trainer before a card is pretended)
from grit_study.data import PadCollator, train_schedule, trainer_dataset
from grit_study.presets import PRESETS, resolve_preset
from grit_study.registry import get_arm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_grit_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("GRIT_") and k != "GRIT_CACHE_DIR"]:
        monkeypatch.delenv(k)


def _pretend_card(monkeypatch, gib: float, capability=(7, 5), name="Tesla T4"):
    """A CUDA device as torch's queries describe it (no GPU here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(name=name, total_memory=int(gib * 2**30)))


# ----------------------------------------------------------------------------- the model

def test_estimate_reproduces_the_two_measurements():
    for source in memory.MEASURED_SOURCES:
        result = json.loads((ROOT / source).read_text())
        run = result["runs"][0]
        tokens = result["args"]["batch"] * run["seq"]
        measured = run["peak_bytes"]["control"]
        assert memory.estimate_gib(tokens) * 2**30 == pytest.approx(measured, rel=1e-9)
        # One line serves every HF arm: GRIT's peak is within 0.05 GiB of the control's.
        assert abs(run["peak_bytes"]["grit"] - measured) < 0.05 * 2**30
        # The benchmark ran the study's preparation (fp32 embeddings and head) at LoRA r=16.
        assert result["args"]["lora_r"] == PRESETS["llama3-8b"].lora_r
    # 16-bit embeddings and head: 2 x 128,256 x 4,096 x 2 bytes less.
    assert memory.estimate_gib(1000) - memory.estimate_gib(1000, fp32_embeddings=False) == pytest.approx(1.957, abs=1e-3)
    # A T4 (14.57 GiB reported) at 2 rows a micro-batch: rows up to ~1,500 tokens, as seen there.
    assert 1450 <= memory.max_tokens(memory.usable_gib(14.57)) / 2 <= 1550


# ----------------------------------------------------------------------------- the shared settings

def _small_data_preset(**kw):
    return arms.study_preset("llama3-8b", data="synthetic", num_examples=200, val_size=16, test_size=16, max_steps=10,
                             **kw)


def test_small_card_gives_every_arm_the_same_settings(monkeypatch, tmp_path, capsys):
    _pretend_card(monkeypatch, 15.0)
    # Notebook 01 (baseline) and 02 (HF arms) each resolve the preset from the same parameters on the same card.
    baseline, hf = _small_data_preset(), _small_data_preset()
    assert baseline == hf
    assert (hf.per_device_train_batch_size, hf.gradient_accumulation_steps) == (1, 8)  # not 2 x 4
    assert hf.fp32_embeddings is True and hf.compute_dtype == "float16"
    base = PRESETS["llama3-8b"]
    assert hf.per_device_train_batch_size * hf.gradient_accumulation_steps == \
        base.per_device_train_batch_size * base.gradient_accumulation_steps  # the same sequences per step
    flags = arms.training_arguments(hf, str(tmp_path))
    assert (flags["per_device_train_batch_size"], flags["gradient_accumulation_steps"]) == (1, 8)

    tokenizer = arms.load_tokenizer("builtin:tiny")
    data = arms.study_data(hf, tokenizer)
    out = capsys.readouterr().out
    assert "memory plan: Tesla T4 15.00 GiB" in out and "per_device_train_batch_size 1 x gradient_accumulation_steps 8" in out
    plans = {}
    for arm in ("baseline", "control", "grit"):
        recorder = arms.run_recorder(hf, get_arm(arm), data, torch.nn.Linear(2, 2), tokenizer, str(tmp_path / "logs"))
        plans[arm] = recorder.info["memory_plan"]
        assert recorder.info["preset_fields"]["per_device_train_batch_size"] == 1
    assert plans["baseline"]["settings"] == plans["control"]["settings"] == plans["grit"]["settings"] == {
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "fp32_embeddings": True}
    p = plans["control"]
    assert p["card_gib"] == 15.0 and p["small_card"] and p["arm_kind"] == "hf" and plans["baseline"]["arm_kind"] == "baseline"
    assert p["longest_micro_batch_tokens"] == memory.longest_micro_batch(data.train, hf)["tokens"]
    assert p["longest_micro_batch"]["rows"] == 1 and p["padded_micro_batch_tokens"] == hf.max_seq_length
    assert p["estimate_gib"] == pytest.approx(memory.estimate_gib(p["longest_micro_batch_tokens"]), abs=0.01)
    assert plans["baseline"]["estimate_gib"] < p["estimate_gib"]


def test_explicit_batch_settings_stay_and_smaller_cards_keep_embeddings_16bit(monkeypatch):
    monkeypatch.setattr(memory, "card_total_gib", lambda: 15.0)
    p = resolve_preset("llama3-8b", per_device_train_batch_size=2)
    # The batch stays as given; the embeddings go 16-bit so that 2 x 2,048 tokens fit (13.7 GiB of 14 usable).
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps, p.fp32_embeddings) == (2, 4, False)
    monkeypatch.setenv("GRIT_GRADIENT_ACCUMULATION_STEPS", "4")
    assert resolve_preset("llama3-8b").per_device_train_batch_size == 2
    monkeypatch.delenv("GRIT_GRADIENT_ACCUMULATION_STEPS")
    # 12 GiB: one row of 2,048 tokens needs 11.7 GiB with fp32 embeddings, 9.7 without.
    monkeypatch.setattr(memory, "card_total_gib", lambda: 12.0)
    p = resolve_preset("llama3-8b")
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps, p.fp32_embeddings) == (1, 8, False)


@pytest.mark.parametrize("gib", [80.0, 24.0, None])
def test_big_cards_and_cpu_keep_the_preset(monkeypatch, gib):
    monkeypatch.setattr(memory, "card_total_gib", lambda: gib)
    assert resolve_preset("llama3-8b") == PRESETS["llama3-8b"]
    monkeypatch.setattr(memory, "card_total_gib", lambda: 15.0)
    for name in ("smollm2-135m", "alpaca-smollm2", "tiny"):  # CPU presets, whatever the card
        assert resolve_preset(name) == PRESETS[name]


def test_embeddings_and_head_cast_back_to_the_compute_dtype():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    preset = dataclasses.replace(PRESETS["llama3-8b"], compute_dtype="float16")
    assert memory.apply_embedding_dtype(model, preset) is False  # fp32_embeddings=True: untouched
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert memory.apply_embedding_dtype(model, dataclasses.replace(preset, fp32_embeddings=False)) is True
    assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == torch.float16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- the longest micro-batch

class _Recorder(torch.nn.Module):
    """A model that records what the Trainer feeds it: row ids (first token) and padded shapes."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[list[int], tuple[int, int]]] = []

    def forward(self, input_ids=None, labels=None, attention_mask=None, **kwargs):
        self.seen.append((input_ids[:, 0].tolist(), tuple(input_ids.shape)))
        return {"loss": (self.w ** 2).sum() + 1.0}


def test_longest_micro_batch_is_the_one_the_trainer_draws(tmp_path):
    from transformers import Trainer, TrainingArguments

    # 23 rows of 3 in a micro-batch, 3 per step: 8 micro-batches an epoch (the last of 2 rows), 3 steps (the last
    # of 2 micro-batches); 8 steps run into a third epoch. Row i starts with token i, so the ids say which row.
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(5, 60, (23,), generator=gen).tolist()
    train = [{"input_ids": [i] + [100] * (n - 1), "labels": [i] + [100] * (n - 1)} for i, n in enumerate(lengths)]
    preset = resolve_preset("tiny", per_device_train_batch_size=3, gradient_accumulation_steps=3, max_steps=8,
                            seed=11, logging_steps=100)
    model = _Recorder()
    trainer = Trainer(model=model, args=TrainingArguments(**arms.training_arguments(preset, str(tmp_path))),
                      train_dataset=trainer_dataset(train), data_collator=PadCollator(0))
    trainer.train()

    # Brute force: every micro-batch the Trainer's own loop drew, padded.
    assert len(model.seen) == 3 + 3 + 3 + 3 + 3 + 3 + 3 + 3 - 1 - 1  # steps 3 and 6 end their epoch with 2
    brute = max(shape[0] * shape[1] for _, shape in model.seen)
    drawn = [ids for ids, _ in model.seen]
    schedule = train_schedule(len(train), batch_size=3, accumulation=3, max_steps=8, seed=11)
    assert [rows for step in schedule for rows in step] == drawn
    longest = memory.longest_micro_batch(train, preset)
    assert longest["tokens"] == brute
    assert longest["upper_bound_tokens"] == 3 * max(lengths) >= brute
    assert memory.longest_micro_batch(train, preset, pad_to=96)["tokens"] == 3 * 96
    # Another training seed draws another order (the schedule really follows the seed).
    assert train_schedule(len(train), batch_size=3, accumulation=3, max_steps=8, seed=12) != schedule


# ----------------------------------------------------------------------------- the stop before training

def _long_rows_file(tmp_path: Path, words: int) -> str:
    rows = [{"instruction": f"Repeat the word {i} times.", "input": "", "output": "word " * words} for i in range(12)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_a_micro_batch_too_long_for_the_card_stops_before_training(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "card_total_gib", lambda: 15.0)
    source = _long_rows_file(tmp_path, 7000)
    tokenizer = arms.load_tokenizer("builtin:tiny")
    preset = arms.study_preset("llama3-8b", data=source, max_seq_length=8192, val_size=2, test_size=0, max_steps=2)
    # Even the small-card settings cannot hold 8,192 tokens: both are chosen, and the data decides.
    assert (preset.per_device_train_batch_size, preset.gradient_accumulation_steps, preset.fp32_embeddings) == (1, 8, False)
    with pytest.raises(memory.MemoryPlanError) as e:
        arms.study_data(preset, tokenizer)
    msg = str(e.value)
    fit = memory.max_tokens(14.0, fp32_embeddings=False)
    assert "stopped before training" in msg and "15.00 GiB" in msg and f"max_seq_length <= {fit}" in msg
    assert "GiB for the HF arms" in msg and "1 x 7,0" in msg  # the ~7,000-token row, and what it needs

    # What the message says to set fits.
    preset = arms.study_preset("llama3-8b", data=source, max_seq_length=fit, val_size=2, test_size=0, max_steps=2)
    data = arms.study_data(preset, tokenizer)
    assert memory.plan(preset, data.train)["estimate_gib"] <= 14.0


def test_no_plan_on_cpu_or_for_another_model(monkeypatch):
    train = [{"input_ids": [1] * 10, "labels": [1] * 10}]
    monkeypatch.setattr(memory, "card_total_gib", lambda: None)
    assert memory.plan(PRESETS["llama3-8b"], train) is None and memory.check(PRESETS["llama3-8b"], train) is None
    monkeypatch.setattr(memory, "card_total_gib", lambda: 15.0)
    assert memory.plan(PRESETS["tiny"], train) is None
    other = dataclasses.replace(PRESETS["llama3-8b"], model_id="mistralai/Mistral-7B-v0.1")
    assert memory.plan(other, train) is None and memory.fit_to_card(other) == other
