"""Merge PEFT LoRA adapters into a 16-bit base model, one shard at a time.

For every base weight W (out, in) that a LoRA pair (A: (r, in), B: (out, r)) targets,

    W_merged = cast(W + s * B @ A),    s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r)),

computed in float32 and cast back to the dtype the base shard stores W in (bf16 for the presets).
The merge goes into a copy of the 16-bit base, never into 4-bit weights: merging into NF4 would
round the adapters' update to the 4-bit grid and lose most of it.

Memory: the base is read with ``safetensors.safe_open`` (memory-mapped) and the merged shard is
written tensor by tensor (``_StreamingWriter``), so at most one input shard is mapped and one tensor
(plus its float32 copy while merging) is held at a time, next to the adapters. Peak memory is about
one shard plus the adapters, not the model: an 8B merge (largest shard 5 GB, largest LoRA target
58.7 M parameters) fits a free Colab's ~12 GB.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peft.utils.other import get_pattern_key

from .files import atomic_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
# Files of the base folder that are weights (rewritten here) or must not travel with the merged model.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


class MergeError(ValueError):
    """An adapter or base model that the merge refuses to guess about; the message says what to do."""


@dataclass
class LoraDelta:
    """One LoRA pair: W += scale * B @ A (transposed when ``fan_in_fan_out``)."""

    A: "torch.Tensor"  # (r, in)
    B: "torch.Tensor"  # (out, r)
    scale: float
    fan_in_fan_out: bool = False

    def add_to_(self, w):
        """w (out, in) float32 += scale * B @ A in place (B @ A transposed for Conv1D-style weights);
        in place so that no second weight-sized temporary exists."""
        import torch

        B, A = self.B.to(torch.float32), self.A.to(torch.float32)
        if self.fan_in_fan_out:
            B, A = A.T, B.T
        return w.addmm_(B, A, alpha=self.scale)

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)


def read_adapter(adapter_dir: str | os.PathLike, adapter_name: str | None = None) -> tuple[dict[str, LoraDelta], dict]:
    """Read a PEFT LoRA adapter folder; return ({base tensor name: LoraDelta}, adapter config).

    Accepts PEFT's key naming ``base_model.model.<module>.lora_A.weight`` with or without an adapter
    name (``.lora_A.<name>.weight``); the scale follows ``lora_alpha``, ``alpha_pattern`` and
    ``use_rslora``; the rank is the stored A's row count (which is what ``r``/``rank_pattern`` set).
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise MergeError(f"adapter folder {folder} does not exist; pass the folder written by "
                         "model.save_pretrained(...) (it holds adapter_config.json and adapter_model.safetensors) "
                         "or the PeftModel itself")
    if not (folder / ADAPTER_CONFIG).is_file() and adapter_name and (folder / adapter_name / ADAPTER_CONFIG).is_file():
        folder = folder / adapter_name  # PEFT saves a non-default adapter in a subfolder named after it
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / f).is_file()]
    if missing:
        hint = " (adapter_model.bin is not supported: re-save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise MergeError(f"adapter folder {folder} lacks {missing}{hint}; pass a folder written by "
                         "PeftModel.save_pretrained")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA adapters can be merged here")
    if config.get("use_dora"):
        raise MergeError(f"{folder} is a DoRA adapter; the streaming merge supports plain LoRA only")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    pairs: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            unsupported.append(key)
            continue
        pairs.setdefault((m["module"], m["name"]), {})[m["ab"]] = tensor
    if unsupported:
        raise MergeError(f"{folder} holds tensors that are not LoRA A/B pairs (modules_to_save, embedding LoRA, "
                         f"DoRA magnitudes?), e.g. {unsupported[:3]}; the merge supports LoRA on linear layers only")
    names = {name for _, name in pairs}
    if len(names) > 1:
        if adapter_name not in names:
            raise MergeError(f"{folder} holds several adapters {sorted(n or 'default' for n in names)}; "
                             "pass adapter_name= to choose one")
        pairs = {k: v for k, v in pairs.items() if k[1] == adapter_name}
    if not pairs:
        raise MergeError(f"{folder}/{ADAPTER_WEIGHTS} holds no LoRA weights")
    deltas = {}
    for (module, _), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{folder}: module {module} has lora_{next(iter(ab))} but not its pair; the file is incomplete")
        r = ab["A"].shape[0]
        if ab["B"].shape[1] != r:
            raise MergeError(f"{folder}: module {module} has lora_A rank {r} but lora_B rank {ab['B'].shape[1]}")
        alpha_pattern = config.get("alpha_pattern") or {}
        # PEFT's own lookup: a pattern key matches a module name that ends with it.
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas[f"{module}.weight"] = LoraDelta(ab["A"], ab["B"], float(scale), bool(config.get("fan_in_fan_out")))
    return deltas, config


def base_model_folder(model_id: str) -> Path:
    """A local folder with the base's safetensors for a builtin id, a local path or a hub id."""
    from .models import resolve_model_path

    path = resolve_model_path(model_id)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"]))


def _shards(base: Path) -> list[str]:
    if (base / INDEX).is_file():
        weight_map = json.loads((base / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in base.glob("*.safetensors"))
    if not files:
        raise MergeError(f"base model folder {base} has no .safetensors weights; re-save it with "
                         "save_pretrained(..., safe_serialization=True)")
    return files


def _check_base(base: Path, deltas: dict[str, LoraDelta]) -> dict[str, str]:
    """Fail before writing anything when the adapter does not fit the base; return {tensor: shard}."""
    from safetensors import safe_open

    config = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    if config.get("quantization_config"):
        raise MergeError(f"base model {base} is quantized ({config['quantization_config'].get('quant_method')}); "
                         "merge into the 16-bit base (the preset's model_id), never into 4-bit weights")
    where, shapes = {}, {}
    for shard in _shards(base):
        with safe_open(str(base / shard), framework="pt") as f:
            for name in f.keys():
                where[name] = shard
                shapes[name] = tuple(f.get_slice(name).get_shape())
    absent = [n for n in deltas if n not in where]
    wrong = [f"{n}: base {shapes[n]}, adapter {d.shape}" for n, d in deltas.items()
             if n in where and shapes[n] != d.shape]
    if absent or wrong:
        raise MergeError(f"the adapter does not fit base model {base}: "
                         + (f"{len(absent)} targeted weight(s) absent, e.g. {absent[:3]}; " if absent else "")
                         + (f"{len(wrong)} shape mismatch(es), e.g. {wrong[:3]}; " if wrong else "")
                         + "pass the base model the adapter was trained on")
    return where


class _StreamingWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is known
    from the input before any data is read, so no whole shard is ever held in memory."""

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int], int]], metadata: dict | None):
        header, offset = {}, 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
        self.expected = {name: nbytes for name, _, _, nbytes in entries}
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        data = tensor.contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
        if data.nbytes != self.expected[name]:
            raise RuntimeError(f"internal error: {name} has {data.nbytes} bytes, header says {self.expected[name]}")
        self.f.write(memoryview(data))

    def close(self) -> None:
        self.f.close()


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _merge_shard(src: Path, dst: Path, deltas: dict[str, LoraDelta]) -> int:
    """Copy one shard to ``dst`` with every targeted weight merged; return its data size in bytes."""
    import torch
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        names = list(f.keys())
        entries = []
        for name in names:
            sl = f.get_slice(name)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
            entries.append((name, dtype, shape, math.prod(shape) * _ITEMSIZE[dtype]))
        writer = _StreamingWriter(dst, entries, f.metadata())
        try:
            for name in names:
                tensor = f.get_tensor(name)
                if name in deltas:
                    if not tensor.is_floating_point():
                        raise MergeError(f"{src.name}: {name} is stored as {tensor.dtype}, not a 16/32-bit float; "
                                         "merge into the 16-bit base model")
                    dtype = tensor.dtype
                    tensor = deltas[name].add_to_(tensor.to(torch.float32)).to(dtype)
                writer.write(name, tensor)
                del tensor
        finally:
            writer.close()
    return sum(e[3] for e in entries)


def merge_lora(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
               adapter_name: str | None = None, finish: Callable[[Path], None] | None = None) -> Path:
    """Write base + merged adapters as an HF folder at ``out_dir`` (shards, index, config, tokenizer files).

    The folder is built under a temporary name next to ``out_dir`` and renamed when complete; an
    existing ``out_dir`` is replaced only then. Non-weight files of the base (config, tokenizer,
    generation config) are copied unchanged; ``finish(folder)`` may add or rewrite files (the
    tokenizer with its chat template) before the rename.
    """
    base, out = Path(base_dir), Path(out_dir)
    deltas, _ = read_adapter(adapter_dir, adapter_name)
    where = _check_base(base, deltas)
    with atomic_path(out, directory=True) as tmp:
        total = 0
        for shard in _shards(base):
            total += _merge_shard(base / shard, tmp / shard, {n: d for n, d in deltas.items() if where[n] == shard})
        if (base / INDEX).is_file():
            index = json.loads((base / INDEX).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        for p in base.iterdir():
            if p.is_file() and not p.name.endswith(_SKIP_SUFFIXES) and p.name != INDEX:
                shutil.copy(p, tmp / p.name)
        if finish is not None:
            finish(tmp)
    return out

