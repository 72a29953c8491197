"""The offline models: SmolLM2-135M converted once from its GGUF, the tiny test model, both loadable."""

import time

import pytest
import torch

from grit_study.models import load_peft_model, load_tokenizer, smollm2_dir, tiny_dir
from grit_study.presets import resolve_preset


@pytest.mark.slow
def test_smollm2_preset_loads_offline_in_4bit_and_answers():
    folder = smollm2_dir()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    assert smollm2_dir() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp  # cached, not redone
    assert time.time() - t0 < 1.0

    preset = resolve_preset("smollm2-135m")
    model = load_peft_model(preset)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())  # really 4-bit NF4 through bitsandbytes
    tok = load_tokenizer(preset.model_id)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tiny_model_is_a_small_llama_with_smollm2_tokenizer():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir())
    tok = load_tokenizer("builtin:tiny")
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.hidden_size == 64
    assert config.vocab_size == len(tok) == 49152
    assert config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def _lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_4bit_gradients_unchanged_by_an_evaluation_forward():
    # bitsandbytes repacks CPU 4-bit weights on the first eval no-grad forward unless told not to;
    # afterwards backward was wrong. The loaded model must give the same gradients before and after.
    model = load_peft_model(resolve_preset("tiny"))
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 12))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    for p in model.parameters():  # a non-zero B, so lora_A's gradient is not trivially zero
        if p.requires_grad and p.dim() == 2 and p.shape[1] == resolve_preset("tiny").lora_r:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    after = _lora_grads(model, batch)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7, msg=name)
