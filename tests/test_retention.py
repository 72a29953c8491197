"""Retention: the sampled texts come from the base, KL(base || tuned) equals an independent float64
computation on a copy of the model whose B factors are zeroed, EOS is never scored, and the drift equals
a dense numpy Σ‖s·B·A‖_F.

The model is a tiny random Llama in fp32 with SmolLM2's tokenizer; its lm_head carries a bias that makes
EOS likely (about 1 in 7 per token), so sampling stops at EOS on some texts and runs to T on others.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grit_study.models import load_tokenizer
from grit_study.retention import (GENERIC_PROMPTS, build_retention_set, lora_drift, retention_kl,
                                  sequence_seed)

HEADER = ("Below are some instructions that describe some tasks. Write responses that appropriately "
          "complete each request.")
ADAPTER = "study"  # not 'default': the code must read the adapter's name
T = 8


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny")


def tiny_lora_model(tok, *, perturb: bool, alpha=12, r=4, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 9.0
    model.lm_head = head
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora, adapter_name=ADAPTER)
    if perturb:
        perturb_b(model, seed)
    return model.eval()


def perturb_b(model, seed, scale=0.3, only=None):
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and (only is None or only in name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def zeroed_copy(model):
    """The base by another route than disable_adapter(): a deep copy with every B set to zero."""
    base = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_()
    return base


def rendered_ids(tok, prompt):
    return tok(f"{HEADER}\n\n### Instruction:\n{prompt}\n\n### Response:\n")["input_ids"]


@pytest.fixture(scope="module")
def tuned(tok):
    return tiny_lora_model(tok, perturb=True)


@pytest.fixture(scope="module")
def rset(tuned, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("retention") / "set.json"
    return build_retention_set(tuned, tok, model_id="test:tiny", prompts=GENERIC_PROMPTS[:8], num_tokens=T, seed=0,
                               cache_file=path)


def test_texts_are_sampled_from_the_base_at_temperature_one(tuned, tok, rset):
    base = zeroed_copy(tuned)
    eos = tok.eos_token_id
    expected = []
    with torch.no_grad():
        for i, prompt in enumerate(GENERIC_PROMPTS[:8]):
            ids = rendered_ids(tok, prompt)
            assert rset.prompt_ids[i] == ids
            g = torch.Generator().manual_seed(sequence_seed(0, i))
            out = []
            for _ in range(T):  # no KV cache, full vocabulary, temperature 1
                logits = base(input_ids=torch.tensor([ids + out])).logits[0, -1]
                out.append(int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g)))
                if out[-1] == eos:
                    break
            expected.append(out)
    assert rset.continuation_ids == expected
    stopped = [c[-1] == eos for c in expected]
    assert any(stopped) and not all(stopped)  # both endings are exercised
    assert all(len(c) == T for c, s in zip(expected, stopped) if not s)
    assert rset.scored_tokens == sum(len(c) - s for c, s in zip(expected, stopped))
    # The tuned model (B != 0) would have sampled other texts: the set really is the base's.
    with torch.no_grad():
        tuned_logits = tuned(input_ids=torch.tensor([rset.prompt_ids[0]])).logits[0, -1]
        base_logits = base(input_ids=torch.tensor([rset.prompt_ids[0]])).logits[0, -1]
    assert (tuned_logits - base_logits).abs().max() > 1e-2


def independent_kl(tuned, rset, eos, *, include_eos=False):
    base = zeroed_copy(tuned)
    total, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(rset.prompt_ids, rset.continuation_ids):
            ids = torch.tensor([p + c])
            log_q = torch.log_softmax(tuned(input_ids=ids).logits[0].double(), -1)
            log_p = torch.log_softmax(base(input_ids=ids).logits[0].double(), -1)
            for t, token in enumerate(c):
                if token == eos and not include_eos:
                    continue
                j = len(p) - 1 + t  # the position whose next token is c[t]
                total += float(F.kl_div(log_q[j], log_p[j], log_target=True, reduction="sum"))
                n += 1
    return total / n, n


def test_kl_equals_an_independent_float64_computation(tuned, tok, rset):
    got = retention_kl(tuned, rset, batch_size=3, chunk_positions=5)
    want, n = independent_kl(tuned, rset, tok.eos_token_id)
    assert got["tokens"] == n == rset.scored_tokens
    assert got["kl"] > 1e-3 and got["kl"] == pytest.approx(want, rel=1e-8)
    assert got["fingerprint"] == rset.fingerprint
    # EOS positions are excluded: scoring them too would give another value.
    with_eos, _ = independent_kl(tuned, rset, tok.eos_token_id, include_eos=True)
    assert with_eos != pytest.approx(want, rel=1e-4)


def test_per_text_kl_sums_are_each_texts_independent_kl(tuned, tok, rset):
    eos = tok.eos_token_id
    got = retention_kl(tuned, rset, batch_size=3, chunk_positions=5)
    want = []
    for p, c in zip(rset.prompt_ids, rset.continuation_ids):  # one text at a time, through independent_kl
        if all(t == eos for t in c):  # EOS at once: nothing scored
            want.append((0.0, 0))
            continue
        one = copy.deepcopy(rset)
        one.prompt_ids, one.continuation_ids = [p], [c]
        kl, n = independent_kl(tuned, one, eos)
        want.append((kl * n, n))
    assert [t["tokens"] for t in got["per_text"]] == [n for _, n in want]
    assert [t["kl_sum"] for t in got["per_text"]] == pytest.approx([k for k, _ in want], rel=1e-8)
    assert sum(t["kl_sum"] for t in got["per_text"]) / got["tokens"] == pytest.approx(got["kl"], rel=1e-12)


def test_eos_is_never_scored(tuned, tok, rset):
    # Append EOS to a text that ran to T: one more position, predicting EOS; nothing scored may change.
    i = next(k for k, c in enumerate(rset.continuation_ids) if c[-1] != tok.eos_token_id)
    longer = copy.deepcopy(rset)
    longer.continuation_ids[i] = longer.continuation_ids[i] + [tok.eos_token_id]
    a, b = retention_kl(tuned, rset), retention_kl(tuned, longer)
    assert b["tokens"] == a["tokens"] and b["kl"] == pytest.approx(a["kl"], rel=1e-12)


def test_kl_is_zero_for_an_untrained_adapter_and_positive_after_moving_b(tok, rset):
    fresh = tiny_lora_model(tok, perturb=False)
    assert retention_kl(fresh, rset)["kl"] == 0.0
    perturb_b(fresh, 3, scale=0.05, only="layers.1.mlp.down_proj")
    assert retention_kl(fresh, rset)["kl"] > 0.0


def test_the_set_is_cached_by_key(tuned, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    kwargs = dict(model_id="test:tiny", prompts=GENERIC_PROMPTS[:3], num_tokens=4, seed=7)
    first = build_retention_set(tuned, tok, **kwargs)
    files = list((tmp_path / "retention").iterdir())
    assert not first.cached and len(files) == 1
    perturb_b(tuned, 99)  # the adapters change; the cached base texts must not
    try:
        again = build_retention_set(tuned, tok, **kwargs)
    finally:
        perturb_b(tuned, 0)  # restore the module fixture's B exactly
    assert again.cached and again == first
    other = build_retention_set(tuned, tok, **{**kwargs, "seed": 8})
    assert other.fingerprint != first.fingerprint and len(list((tmp_path / "retention").iterdir())) == 2
    stored = json.loads(files[0].read_text())
    stored["key"]["num_tokens"] = 5
    files[0].write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="another key"):
        build_retention_set(tuned, tok, **kwargs)


def dense_drift(model, adapter):
    total = 0.0
    for _, m in model.named_modules():
        if hasattr(m, "lora_A") and adapter in m.lora_A:
            a = m.lora_A[adapter].weight.detach().numpy().astype(np.float64)
            b = m.lora_B[adapter].weight.detach().numpy().astype(np.float64)
            total += np.linalg.norm(m.scaling[adapter] * (b @ a), "fro")
    return total


def test_drift_is_the_sum_of_frobenius_norms_of_the_updates(tok):
    from peft import LoraConfig

    model = tiny_lora_model(tok, perturb=True, alpha=12, r=4)   # s = 3
    # A second adapter on fewer modules, with another scale: only the active one may be read.
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=7, target_modules=["q_proj", "v_proj"]))
    perturb_b(model, 5, only="other")
    got = lora_drift(model)
    assert got["adapter"] == ADAPTER and got["modules"] == 2 * 7
    assert got["drift"] == pytest.approx(dense_drift(model, ADAPTER), rel=1e-10)
    model.set_adapter("other")
    other = lora_drift(model)
    assert other["adapter"] == "other" and other["modules"] == 2 * 2
    assert other["drift"] == pytest.approx(dense_drift(model, "other"), rel=1e-10)
    assert lora_drift(model, ADAPTER)["drift"] == pytest.approx(got["drift"], rel=1e-12)
    fresh = tiny_lora_model(tok, perturb=False)
    assert lora_drift(fresh)["drift"] == 0.0


@pytest.mark.slow
def test_retention_summary_on_the_tiny_4bit_preset(tmp_path, monkeypatch):
    from grit_study.models import load_peft_model
    from grit_study.presets import resolve_preset
    from grit_study.retention import retention_summary

    monkeypatch.setenv("GRIT_CACHE_DIR", str(tmp_path))
    preset = resolve_preset("tiny")
    model, tok = load_peft_model(preset), load_tokenizer(preset.model_id)
    kwargs = dict(model_id=preset.model_id, template=preset.template, num_tokens=4,
                  key_extra={"load_in_4bit": preset.load_in_4bit, "compute_dtype": preset.compute_dtype})
    fresh = retention_summary(model, tok, **kwargs)
    assert fresh["retention_kl"] == 0.0 and fresh["drift"] == 0.0 and fresh["drift_modules"] == 2 * 7
    assert fresh["retention_set"]["texts"] == len(GENERIC_PROMPTS) and fresh["retention_tokens"] > 0
    perturb_b(model, 0, scale=0.05)
    moved = retention_summary(model, tok, **kwargs)
    assert moved["retention_set"] == fresh["retention_set"]  # the same cached texts
    assert moved["retention_kl"] > 0.0 and moved["drift"] == pytest.approx(dense_drift(model, "default"), rel=1e-10)
