"""Retention: how far tuning moved the model away from its base, measured two ways.

``retention_kl``
    KL(base || tuned), token-averaged, on a fixed set of texts: generic instructions (``GENERIC_PROMPTS``,
    nothing like the synthetic tasks) rendered with the study's template, each continued by up to T
    tokens sampled once from the untuned base model (adapters disabled, temperature 1, no top-k / top-p,
    a fixed generator seed per text). At every position that predicts a sampled token (EOS excluded)
    both next-token distributions are computed on the same model, the base side inside PEFT's
    ``disable_adapter()``, and KL = Σ_v p_base(v) (log p_base(v) − log p_tuned(v)) in float64.
    The texts are sampled once per (model id, prompts, T, seed, template, ...) and cached as token ids
    (``build_retention_set``), so every arm and seed is scored on the same tokens; the set's fingerprint
    goes into the run summary.
``lora_drift``
    Σ over LoRA modules of ‖s·B·A‖_F, the Frobenius norm of each module's weight update (s = the module's
    ``scaling[adapter]``), computed from r x r Grams without forming the d_out x d_in product.

GRIT's claim is "less drift" for the same task gain; these two numbers are what it is checked on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import IGNORE_INDEX, format_prompt, prompt_ids
from .evaluate import _device, _eval_mode, base_model_view, causal_lm_parts, response_hidden_states

# Per run: each retention text's summed KL and token count, next to run_summary.json (retention_summary).
PER_TEXT_NAME = "retention_per_text.jsonl"

# Bumped whenever what build_retention_set samples for a given key changes.
RETENTION_VERSION = 1
DEFAULT_NUM_TOKENS = 32
DEFAULT_SEED = 0

# Generic instructions, unrelated to the synthetic families: drift here is drift off the task.
GENERIC_PROMPTS: tuple[str, ...] = (
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "Give three tips for staying healthy.",
    "Describe a city you would like to visit.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a cup of tea?",
    "Tell me a fun fact about space.",
    "Write an email asking a colleague for help with a report.",
    "What are the benefits of reading books?",
    "Explain what a computer program is to a child.",
    "List some common fruits and their colors.",
    "Write the opening sentence of a mystery story.",
    "Why do people keep pets?",
    "Suggest a name for a new coffee shop and explain it.",
)


@dataclass
class RetentionSet:
    """Fixed texts for ``retention_kl``: token ids of each rendered prompt and of its sampled continuation.

    A continuation holds the sampled tokens in order; when sampling drew EOS it is the last token (and
    is never scored), else the continuation has exactly ``key["num_tokens"]`` tokens.
    """

    key: dict[str, Any]
    prompt_ids: list[list[int]]
    continuation_ids: list[list[int]]
    eos_token_id: int
    fingerprint: str
    cached: bool = field(default=False, compare=False)

    @property
    def scored_tokens(self) -> int:
        return sum(sum(t != self.eos_token_id for t in c) for c in self.continuation_ids)

    def summary(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "key": self.key, "texts": len(self.prompt_ids),
                "scored_tokens": self.scored_tokens,
                "stopped_at_eos": sum(bool(c) and c[-1] == self.eos_token_id for c in self.continuation_ids)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sequence_seed(seed: int, index: int) -> int:
    """The torch generator seed of text ``index``: one generator per text, so a text's sample does not
    depend on the other prompts, and the same in every process."""
    return int(_sha(f"grit-retention-{seed}-{index}")[:15], 16)


def retention_key(model_id: str, *, prompts: Sequence[str], num_tokens: int, seed: int, template: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a retention set depends on; ``extra`` adds facts such as quantization and compute dtype."""
    return {"version": RETENTION_VERSION, "model_id": model_id, "template": template, "num_tokens": num_tokens,
            "seed": seed, "prompts": len(prompts), "prompts_sha256": _sha(json.dumps(list(prompts)))[:16],
            **(extra or {})}


def _fingerprint(key: dict, prompts: list[list[int]], continuations: list[list[int]]) -> str:
    return _sha(json.dumps({"key": key, "prompts": prompts, "continuations": continuations}, sort_keys=True))[:16]


def sample_continuations(model, prompts: Sequence[Sequence[int]], *, num_tokens: int, seed: int,
                         eos_token_id: int) -> list[list[int]]:
    """Ancestral sampling from ``model`` as it is (wrap it in ``base_model_view`` for the base): up to
    ``num_tokens`` tokens per prompt, stopping after EOS. Each step draws from softmax(fp32 logits)
    (temperature 1, full vocabulary) with ``torch.multinomial`` on the CPU and a generator seeded
    ``sequence_seed(seed, i)``, so the draw does not depend on the device's RNG."""
    import torch

    body, head = causal_lm_parts(model)
    device = _device(model)
    out: list[list[int]] = []
    with _eval_mode(model):
        for i, p in enumerate(prompts):
            gen = torch.Generator(device="cpu").manual_seed(sequence_seed(seed, i))
            step_ids = torch.tensor([list(p)], dtype=torch.long, device=device)  # (1, L) then (1, 1)
            past = None
            tokens: list[int] = []
            for _ in range(num_tokens):
                o = body(input_ids=step_ids, past_key_values=past, use_cache=True)
                past = o.past_key_values
                probs = torch.softmax(head(o[0][:, -1]).float(), dim=-1).cpu()  # (1, vocab)
                token = int(torch.multinomial(probs, 1, generator=gen))
                tokens.append(token)
                if token == eos_token_id:
                    break
                step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
            out.append(tokens)
    return out


def build_retention_set(model, tokenizer, *, model_id: str, template: str = "alpaca",
                        prompts: Sequence[str] = GENERIC_PROMPTS, num_tokens: int = DEFAULT_NUM_TOKENS,
                        seed: int = DEFAULT_SEED, key_extra: dict[str, Any] | None = None,
                        cache_file: str | Path | None = None) -> RetentionSet:
    """The retention texts for this key: read from the cache, else sampled from the base (``model``
    with its adapters disabled, whatever they hold now) and cached.

    Cache: ``cache_file``, else ``<cache_dir>/retention/<hash of the key>.json``, written atomically.
    """
    from .files import atomic_write_text
    from .models import cache_dir

    if num_tokens < 1 or not prompts:
        raise ValueError(f"build_retention_set needs num_tokens >= 1 and at least one prompt, got {num_tokens} "
                         f"and {len(prompts)} prompts")
    key = retention_key(model_id, prompts=prompts, num_tokens=num_tokens, seed=seed, template=template,
                        extra=key_extra)
    name = f"{_sha(json.dumps(key, sort_keys=True))[:16]}.json"
    path = Path(cache_file) if cache_file else cache_dir() / "retention" / name
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") != key:
            raise ValueError(f"{path} holds a retention set for another key ({stored.get('key')}); delete it "
                             "or pass another cache_file")
        return RetentionSet(key, stored["prompt_ids"], stored["continuation_ids"], stored["eos_token_id"],
                            stored["fingerprint"], cached=True)
    p_ids = [prompt_ids(format_prompt({"instruction": p, "input": ""}, tokenizer, template), tokenizer, template)
             for p in prompts]
    eos = tokenizer.eos_token_id
    with base_model_view(model):
        continuations = sample_continuations(model, p_ids, num_tokens=num_tokens, seed=seed, eos_token_id=eos)
    fp = _fingerprint(key, p_ids, continuations)
    atomic_write_text(path, json.dumps({"key": key, "prompt_ids": p_ids, "continuation_ids": continuations,
                                        "eos_token_id": eos, "fingerprint": fp}))
    return RetentionSet(key, p_ids, continuations, eos, fp, cached=False)


def retention_kl(model, rset: RetentionSet, *, batch_size: int = 8, chunk_positions: int = 128) -> dict[str, Any]:
    """KL(base || tuned) averaged over the scored tokens of ``rset``: ``{"kl", "tokens", "fingerprint",
    "per_text"}``, ``per_text`` one ``{"kl_sum", "tokens"}`` per text of the set, in its order.

    Scored positions are those whose next token is a sampled non-EOS token. The base side is the same
    model inside ``disable_adapter()``. Logits are formed ``chunk_positions`` at a time and the
    log-softmax taken in float64 (peak about 3 x chunk_positions x vocab x 8 bytes).
    """
    import torch

    _, head = causal_lm_parts(model)
    device = _device(model)
    per_text = torch.zeros(len(rset.prompt_ids), dtype=torch.float64)
    counts = [0] * len(rset.prompt_ids)
    pairs = list(zip(rset.prompt_ids, rset.continuation_ids))
    with _eval_mode(model):
        for b in range(0, len(pairs), batch_size):
            chunk = pairs[b:b + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for j, (p, c) in enumerate(chunk):
                ids[j, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
                mask[j, :len(p) + len(c)] = 1
                labels[j, len(p):len(p) + len(c)] = torch.tensor([t if t != rset.eos_token_id else IGNORE_INDEX
                                                                  for t in c], dtype=torch.long)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            tuned_h, _ = response_hidden_states(model, ids, mask, labels)   # (N, H)
            with base_model_view(model):
                base_h, _ = response_hidden_states(model, ids, mask, labels)
            # The text of each scored position (row-major, as response_hidden_states selects them).
            text = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0].cpu() + b   # (N,)
            for s in range(0, tuned_h.shape[0], chunk_positions):
                log_q = torch.log_softmax(head(tuned_h[s:s + chunk_positions]).double(), dim=-1)  # (c, V)
                with base_model_view(model):
                    log_p = torch.log_softmax(head(base_h[s:s + chunk_positions]).double(), dim=-1)
                kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).cpu()                            # (c,)
                per_text.index_add_(0, text[s:s + chunk_positions], kl)
            for j in text.tolist():
                counts[j] += 1
    tokens = sum(counts)
    if tokens == 0:
        raise ValueError("retention_kl: the retention set has no scored tokens (every continuation is EOS at once); "
                         "sample more tokens or another seed")
    return {"kl": float(per_text.sum()) / tokens, "tokens": tokens, "fingerprint": rset.fingerprint,
            "per_text": [{"kl_sum": float(k), "tokens": n} for k, n in zip(per_text.tolist(), counts)]}


def lora_drift(model, adapter_name: str | None = None) -> dict[str, Any]:
    """Σ over LoRA modules of ‖s·B·A‖_F for one adapter: ``{"drift", "modules", "adapter"}``.

    ``adapter_name``: default the active adapter (read from each layer, never assumed to be 'default').
    ‖s·B·A‖_F² = s² ⟨BᵀB, AAᵀ⟩ (r x r Grams, float64): exact, and cheap at any width.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    total, modules, names = 0.0, 0, set()
    for qualname, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        active = [adapter_name] if adapter_name is not None else list(m.active_adapters)
        if len(active) != 1:
            raise ValueError(f"{qualname}: {len(active)} active adapters {active}; pass adapter_name to choose one")
        name = active[0]
        if name in getattr(m, "lora_embedding_A", {}):
            raise ValueError(f"{qualname}: embedding LoRA is not supported by lora_drift")
        if name not in m.lora_A:
            continue  # this module is not targeted by the adapter
        if getattr(m, "use_dora", {}).get(name):
            raise ValueError(f"{qualname}: DoRA's update is not s·B·A; lora_drift does not apply")
        a = m.lora_A[name].weight.detach().to(torch.float64)   # (r, d_in)
        b = m.lora_B[name].weight.detach().to(torch.float64)   # (d_out, r)
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{qualname}: LoRA factors of shape {tuple(a.shape)}, {tuple(b.shape)} are not linear")
        sq = float(((b.T @ b) * (a @ a.T)).sum())
        total += abs(float(m.scaling[name])) * math.sqrt(max(sq, 0.0))
        modules += 1
        names.add(name)
    if modules == 0:
        raise ValueError(f"lora_drift: no LoRA module holds adapter {adapter_name!r}" if adapter_name else
                         "lora_drift: the model has no LoRA modules")
    return {"drift": total, "modules": modules, "adapter": sorted(names)[0] if len(names) == 1 else sorted(names)}


def retention_summary(model, tokenizer, *, model_id: str, template: str = "alpaca",
                      num_tokens: int = DEFAULT_NUM_TOKENS, seed: int = DEFAULT_SEED,
                      key_extra: dict[str, Any] | None = None, batch_size: int = 8,
                      per_text_file: str | Path | None = None) -> dict[str, Any]:
    """Everything retention adds to ``run_summary.json``: ``{"retention_kl", "retention_tokens",
    "retention_set": RetentionSet.summary(), "drift", "drift_modules"}``. With ``per_text_file`` (JSON lines,
    ``PER_TEXT_NAME`` in a run directory), one ``{"index", "kl_sum", "tokens"}`` per text of the set, in its
    order: Σ kl_sum / Σ tokens is ``retention_kl``."""
    from .evaluate import write_jsonl

    rset = build_retention_set(model, tokenizer, model_id=model_id, template=template, num_tokens=num_tokens,
                               seed=seed, key_extra=key_extra)
    kl = retention_kl(model, rset, batch_size=batch_size)
    if per_text_file is not None:
        write_jsonl(per_text_file, [{"index": i, **t} for i, t in enumerate(kl["per_text"])])
    drift = lora_drift(model)
    return {"retention_kl": kl["kl"], "retention_tokens": kl["tokens"], "retention_set": rset.summary(),
            "drift": drift["drift"], "drift_modules": drift["modules"]}
