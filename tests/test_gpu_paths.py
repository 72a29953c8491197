"""The CUDA path, simulated on the CPU: conditions a GPU run meets that a CPU run never would.

* precision: a T4 (sm75) reports ``torch.cuda.is_bf16_supported() == True`` because that call counts
  emulation, while Unsloth decides by compute capability; every arm must land on the same dtype;
* padding: Unsloth's ``fix_pad_token`` gives a Llama-3 tokenizer a pad token other than EOS, and the
  batch hashes cover padded positions; every arm must pad alike;
* export: the baseline trains on a pre-quantized checkpoint (which the merge refuses), and an 8B merged model
  in 16-bit (15 GiB) does not fit a 16 GiB card next to the training model, nor whole on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from grit_study import arms
from grit_study.presets import resolve_preset
from grit_study.runs import batch_digest, hardware

ROOT = Path(__file__).resolve().parents[1]


def _pretend_cuda(monkeypatch, capability):
    """A CUDA device of ``capability`` as torch's queries describe it; is_bf16_supported() says True on
    every card, as the pinned torch does by default (it counts emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    name = {(7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-40GB"}[capability]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(name=name, total_memory=16 * 2**30))


class _StopAtLoad(Exception):
    pass


def _baseline_dtype(monkeypatch, preset, tmp_path):
    """The dtype run_baseline hands to Unsloth's FastLanguageModel.from_pretrained (which would download
    the 8B checkpoint, so a stand-in records the call and stops the run there)."""
    seen = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs):
            seen.update(kwargs)
            raise _StopAtLoad

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    with pytest.raises(_StopAtLoad):
        arms.run_baseline(preset, logdir=str(tmp_path / "logs"), output_dir=str(tmp_path / "out"), train=False)
    return seen["dtype"]


@pytest.mark.parametrize("capability,dtype", [((7, 5), "float16"), ((8, 0), "bfloat16")])
def test_one_precision_for_every_arm_from_compute_capability(monkeypatch, tmp_path, capability, dtype):
    _pretend_cuda(monkeypatch, capability)
    preset = arms.study_preset("llama3-8b")
    assert preset.compute_dtype == dtype
    flags = arms.training_arguments(preset, str(tmp_path))
    assert (flags["bf16"], flags["fp16"]) == (dtype == "bfloat16", dtype == "float16")
    facts = hardware()
    assert facts["bf16"] is (dtype == "bfloat16")
    assert facts["compute_capability"] == f"{capability[0]}.{capability[1]}"
    assert _baseline_dtype(monkeypatch, preset, tmp_path) == getattr(torch, dtype)
    # An explicit float32 is the user's choice and stays.
    assert resolve_preset("llama3-8b", compute_dtype="float32").compute_dtype == "float32"


def _step_hashes(trainer, steps: int, accumulation: int) -> list[str]:
    """The recorder's step hash over the batches the trainer's own dataloader yields."""
    it = iter(trainer.get_train_dataloader())
    out = []
    for _ in range(steps):
        h = hashlib.sha256()
        for _ in range(accumulation):
            batch = next(it)
            batch_digest(h, batch["input_ids"], batch["labels"])
        out.append(h.hexdigest()[:16])
    return out


# Runs in its own interpreter: importing Unsloth patches transformers for the rest of a process.
_BASELINE = """
import json, sys
import unsloth
from unsloth import FastLanguageModel

load = FastLanguageModel.from_pretrained

def load_with_fixed_pad(*args, **kwargs):
    model, tokenizer = load(*args, **kwargs)
    # What unsloth_zoo's fix_pad_token does to a Llama-3 tokenizer whose pad is EOS: another token.
    tokenizer.pad_token = "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return model, tokenizer

FastLanguageModel.from_pretrained = staticmethod(load_with_fixed_pad)
sys.path.insert(0, sys.argv[2])
from test_gpu_paths import _step_hashes
from grit_study import arms
preset = arms.study_preset("tiny")
res = arms.run_baseline(preset, logdir=sys.argv[1] + "/logs", output_dir=sys.argv[1] + "/out", train=False)
print("HASHES " + json.dumps({"pad": res.tokenizer.pad_token_id,
      "hashes": _step_hashes(res.trainer, preset.max_steps, preset.gradient_accumulation_steps)}))
"""


@pytest.mark.slow
def test_baseline_pads_like_the_hf_arms_when_unsloth_changes_the_pad_token(tmp_path):
    env = {**os.environ, "UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _BASELINE, str(tmp_path), str(ROOT / "tests")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("HASHES "))[7:])

    preset = arms.study_preset("tiny")
    res = arms.run_hf(preset, "control", logdir=str(tmp_path / "logs"),
                      output_dir=str(tmp_path / "out"), train=False)
    assert baseline["pad"] != res.tokenizer.pad_token_id  # the condition under test really holds
    hf = _step_hashes(res.trainer, preset.max_steps, preset.gradient_accumulation_steps)
    assert baseline["hashes"] == hf

    # The hash still sees every token: one changed response token in step 1 changes its hash.
    batches = iter(res.trainer.get_train_dataloader())
    first = [next(batches) for _ in range(preset.gradient_accumulation_steps)]
    row, col = (first[0]["labels"] != -100).nonzero()[0].tolist()
    first[0]["input_ids"][row, col] += 1
    h = hashlib.sha256()
    for batch in first:
        batch_digest(h, batch["input_ids"], batch["labels"])
    assert h.hexdigest()[:16] != hf[0]


_WITHOUT_DATASETS = r"""
import importlib.util, json, sys

# The lent GPU machine has no `datasets`: with None in sys.modules, find_spec gives None (transformers' check)
# and `import datasets` raises ModuleNotFoundError.
sys.modules["datasets"] = None
assert importlib.util.find_spec("datasets") is None
from grit_study import arms
preset = arms.study_preset("tiny")
res = arms.run_hf(preset, "grit", logdir=sys.argv[1] + "/logs", output_dir=sys.argv[1] + "/out")
assert sys.modules["datasets"] is None
s = res.summary
print("RUN " + json.dumps({k: s[k] for k in ("batch_hashes", "train_loss_per_step", "preconditioned_steps")}))
"""


@pytest.mark.slow
def test_hf_arms_train_the_same_batches_without_the_datasets_package(tmp_path):
    """run_hf on a machine without `datasets` (the lent GPU machine) trains on the same batches, with the same
    losses, as with it: the list the Trainer then gets is drawn by the same seeded sampler."""
    env = {**os.environ, "UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_DATASETS, str(tmp_path / "bare")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RUN "))[4:])

    import datasets  # noqa: F401  (installed here: the reference run uses it)

    res = arms.run_hf(arms.study_preset("tiny"), "grit", logdir=str(tmp_path / "logs"), output_dir=str(tmp_path / "out"))
    s = res.summary
    assert bare["preconditioned_steps"] == s["preconditioned_steps"] > 0
    assert bare["batch_hashes"] == s["batch_hashes"] and len(s["batch_hashes"]) == s["steps"]
    assert bare["train_loss_per_step"] == s["train_loss_per_step"]


def _quantized_copy(folder: Path) -> Path:
    """What ``unsloth/llama-3-8b-bnb-4bit`` is to the llama3-8b preset: the tiny base's files under a
    bitsandbytes ``quantization_config`` (the pre-quantized checkpoint the baseline trains on)."""
    from grit_study.models import tiny_dir

    folder.mkdir()
    for f in tiny_dir().iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# Total memory torch reports for a T4 and an H100, in GiB; Llama-3-8B's merged weights are 16.06e9 bytes.
CARD_GIB = {"T4": 14.57, "H100": 79.1}
LLAMA3_8B_WEIGHTS_GIB = 16.06e9 / 2**30


@pytest.mark.slow
@pytest.mark.parametrize("arm,card,load", [("baseline", None, "cpu"), ("grit", "T4", "offload"),
                                           ("control", "H100", "16bit")])
def test_export_merges_into_the_16bit_base_after_releasing_the_training_model(monkeypatch, tmp_path, arm, card, load):
    """Every arm merges into ``preset.model_id`` (the baseline's own checkpoint is pre-quantized), the training
    model is gone when the merged one is loaded, and a card too small for the merged model gets it offloaded."""
    from transformers import AutoModelForCausalLM

    from grit_study import export as ex
    from grit_study.merge import base_model_folder

    preset = dataclasses.replace(arms.study_preset("tiny"), baseline_model_id=str(_quantized_copy(tmp_path / "bnb")))
    res = arms.run_hf(preset, "control" if arm == "baseline" else arm, logdir=str(tmp_path / "logs"),
                      output_dir=str(tmp_path / "out"), train=False)
    res.arm = arm  # export_figures' baseline path (the Unsloth model is a PeftModel of the same kind)
    if res.grit_manager is not None:  # as after 3 preconditioned steps: the summary must keep the count
        res.grit_manager.preconditioned_steps = 3
    if card is not None:  # a CUDA preset and the 8B's merged weights on this card; the model stays on this CPU
        res.preset = dataclasses.replace(res.preset, device="cuda", compute_dtype="bfloat16")
        monkeypatch.setattr(ex, "gpu_total_memory_gib", lambda: CARD_GIB[card], raising=False)
        monkeypatch.setattr(ex, "weights_gib", lambda folder: LLAMA3_8B_WEIGHTS_GIB, raising=False)

    merged_bases = []
    merge = ex.merge_lora
    monkeypatch.setattr(ex, "merge_lora", lambda base, *a, **k: merged_bases.append(Path(base)) or merge(base, *a, **k))
    model = weakref.ref(res.model)
    loads = []
    load_pretrained = AutoModelForCausalLM.from_pretrained

    def loader(path, **kwargs):
        loads.append({"training_model_alive": model() is not None, **kwargs})
        return load_pretrained(path, dtype=kwargs.get("dtype"))  # on this CPU, whatever the card

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loader)
    out = arms.export_figures(res)

    assert merged_bases == [base_model_folder(preset.model_id)]
    assert [x["training_model_alive"] for x in loads] == [False]
    assert out["merged_base"] == preset.model_id and out["training_model_released"] is True
    assert res.model is None and res.trainer is None and model() is None
    assert out["eval_load"] == load
    kwargs = loads[0]
    if load == "cpu":
        assert kwargs == {"training_model_alive": False, "dtype": torch.float32}
    elif load == "16bit":
        assert kwargs["device_map"] == {"": 0} and kwargs["dtype"] == torch.bfloat16
    else:  # the first 10.6 GiB on the card, the rest in CPU memory (and on disk beyond it)
        assert kwargs["device_map"] == "auto" and kwargs["dtype"] == torch.bfloat16
        assert kwargs["max_memory"][0] == int((CARD_GIB["T4"] - ex.EVAL_HEADROOM_GIB) * 2**30)
        assert kwargs["max_memory"]["cpu"] > 0
        assert Path(kwargs["offload_folder"]).parent == Path(out["merged_dir"]).parent
    assert math.isfinite(out["eval_loss_merged"]) and math.isfinite(out["eval_loss_gguf"])
    # the summary is still written without the model, with the GRIT step count it had
    res.recorder.update(export=out)
    assert res.summary["export"]["eval_load"] == load
    assert res.summary["preconditioned_steps"] == (3 if arm == "grit" else 0)


def test_release_keeps_a_training_model_held_elsewhere_and_says_so():
    """A notebook's ``model`` variable keeps the model alive: dropping the result's references would free
    nothing and break later cells, so they come back, with a warning that says what to delete."""
    from grit_study.export import release_training_model

    class Trainer:
        pass

    model = torch.nn.Linear(4, 4)
    trainer = Trainer()
    trainer.model = model
    trainer_ref = weakref.ref(trainer)
    recorder = types.SimpleNamespace(trainer=trainer, grit_manager=None)
    res = types.SimpleNamespace(model=model, trainer=trainer, grit_manager=None, recorder=recorder)
    del trainer
    with pytest.warns(UserWarning, match=r"still referenced.*del model, trainer"):
        assert release_training_model(res) is False
    assert res.model is model and trainer_ref() is None  # what only the result held is freed all the same
    ref = weakref.ref(model)
    del model
    assert release_training_model(res) is True and ref() is None and res.model is None
