"""Peak memory of the streaming LoRA merge on a model saved in many shards.

Measured in a fresh subprocess with the kernel's accounting, because torch tensors are not Python
allocations (tracemalloc does not see them): after the imports the process resets its peak resident
set (``/proc/self/clear_refs`` "5", Linux >= 4.0), and the increase is the peak (VmHWM, which
``ru_maxrss`` reports too) after the merge minus the resident set before it. That counts heap and
memory-mapped shard pages alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MEASURE = r"""
import json, sys
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from grit_study.merge import merge_lora

def status(key):  # kB -> bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

torch.ones(4) @ torch.ones(4)  # first-use allocations of torch happen before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident set: the import's peak is forgotten
before = status("VmRSS")
merge_lora(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"rss_before": before, "peak": status("VmHWM")}))
"""


def _write_sharded_model(folder: Path, layers=8, hidden=512, inter=2048, kv=128, r=8, alpha=16):
    """A Llama-named fp32 checkpoint, one layer per shard (15 MB each, 122 MB in all), and a PEFT adapter."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir()
    adapter.mkdir()
    weight_map, lora = {}, {}
    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {f"model.layers.{i}.{m}.weight": torch.randn(s, generator=g) * 0.02 for m, s in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        save_file(tensors, base / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        for m, (out, inp) in shapes.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            lora[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.05
            lora[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.05
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    return base, adapter, max(4 * inter * hidden, 4 * hidden * hidden)


@pytest.mark.slow
def test_merge_peak_memory_is_one_shard_plus_adapters(tmp_path):
    base, adapter, largest_tensor_fp32 = _write_sharded_model(tmp_path)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(base), str(adapter), str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    shards = [p.stat().st_size for p in base.glob("*.safetensors")]
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    # The stated margin: the targeted tensor being merged exists up to 4 times at once in float32
    # (read, B @ A, their sum, the cast), plus 8 MiB for allocator and interpreter slack.
    bound = max(shards) + adapter_bytes + 4 * largest_tensor_fp32 + 8 * 2 ** 20
    increase = m["peak"] - m["rss_before"]
    mib = 2 ** 20
    print(f"\nmerge peak increase {increase / mib:.1f} MiB; bound {bound / mib:.1f} MiB (largest shard "
          f"{max(shards) / mib:.1f} MiB, adapters {adapter_bytes / mib:.1f} MiB); model {sum(shards) / mib:.1f} MiB "
          f"in {len(shards)} shards")
    assert sum(shards) > 2 * bound  # loading the whole model could not pass
    assert increase < bound
    merged = tmp_path / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in merged.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.open("rb").read(8), "little") for p in merged.glob("*.safetensors"))
