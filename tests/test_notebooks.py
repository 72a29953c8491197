"""Smoke run of the study: the three notebooks executed with papermill on the tiny preset, every cell,
into a temporary LOGDIR, then assertions on what each run recorded (make test and CI run this).

Each notebook runs in its own kernel, so importing Unsloth in 01 never patches this process."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

# `make notebooks` selects these with -m notebook; `make unit` leaves them out.
pytestmark = [pytest.mark.notebook, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
STEPS = 4


def _execute(name: str, out: Path, **parameters) -> None:
    import papermill as pm

    pm.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, cwd=str(ROOT), kernel_name="python3",
                        progress_bar=False, request_save_on_cell_execute=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    logdir, outdir = tmp / "logs", tmp / "outputs"
    env = {"UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "GRIT_ACCURACY_CACHE": str(tmp / "base_accuracy.json")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernels inherit this process's environment
    try:
        common = dict(PRESET="tiny", MAX_STEPS=STEPS, EVAL_STEPS=2, LOGDIR=str(logdir), OUTPUT_DIR=str(outdir))
        # Both notebooks' export cells run: merge -> GGUF q8_0 -> llama.cpp eval -> Modelfile.
        _execute("01_baseline_qlora_unsloth.ipynb", tmp / "01.ipynb", **common, EXPORT=True)
        # The tiny preset's kfac_update_freq is 2: the first inversion at step 2, so steps 2..4 are preconditioned.
        _execute("02_pure_grit.ipynb", tmp / "02_grit.ipynb", **common, ARM="grit", EXPORT=True)
        _execute("02_pure_grit.ipynb", tmp / "02_control.ipynb", **common, ARM="control")
        _execute("03_compare.ipynb", tmp / "03.ipynb", LOGDIR=str(logdir), FIGURES_DIR=str(tmp / "readme_files"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summaries = {}
    for run in sorted(logdir.iterdir()):
        s = json.loads((run / "run_summary.json").read_text())
        summaries[s["arm"]] = s
    return tmp, summaries


def test_every_arm_trained_and_recorded(study):
    _, runs = study
    assert sorted(runs) == ["baseline", "control", "grit"]
    for arm, s in runs.items():
        assert s["steps"] == STEPS, arm
        assert len(s["batch_hashes"]) == STEPS and len(s["train_loss_per_step"]) == STEPS
        assert all(math.isfinite(x) for x in s["train_loss_per_step"]), arm
        assert sorted(map(int, s["eval_loss"])) == [0, 2, 4] and all(math.isfinite(v) for v in s["eval_loss"].values())
        assert s["optimizer"] == s["optimizer_used"] == "adamw_torch_fused" and s["response_tokens_seen"] > 0
        assert s["optimizer_class"] == runs["control"]["optimizer_class"], "same base optimizer in every arm"
        assert 0.0 <= s["exact_match"] <= 1.0 and 0.0 <= s["base_exact_match"] <= 1.0
    assert runs["grit"]["preconditioned_steps"] == STEPS - 1
    assert runs["control"]["preconditioned_steps"] == 0 and "grit_config" not in runs["control"]
    assert runs["baseline"]["stack"] == "unsloth+trl" and runs["grit"]["stack"] == "hf+peft"


def test_arms_are_fair(study):
    _, runs = study
    ref = runs["control"]
    for arm in ("baseline", "grit"):
        assert runs[arm]["train_fingerprint"] == ref["train_fingerprint"]
        assert runs[arm]["val_fingerprint"] == ref["val_fingerprint"]
        assert runs[arm]["batch_hashes"] == ref["batch_hashes"], f"{arm} trained on other batches than control"
        assert runs[arm]["response_tokens_seen"] == ref["response_tokens_seen"]
        # Step 0 evaluates the untouched base (LoRA B = 0) through each stack: the same network.
        assert runs[arm]["eval_loss"]["0"] == pytest.approx(ref["eval_loss"]["0"], rel=1e-3)
    # Both HF arms start from the same LoRA init on the same stack: their first step is identical.
    assert runs["grit"]["train_loss_per_step"][0] == pytest.approx(ref["train_loss_per_step"][0], rel=1e-6)
    # Unsloth's get_peft_model(random_state=seed) and peft's after torch.manual_seed(seed) give the same
    # LoRA init, and the two stacks compute the same network: the whole trajectories agree, not just step 1.
    assert runs["baseline"]["train_loss_per_step"] == pytest.approx(ref["train_loss_per_step"], rel=1e-5)
    # The base model's accuracy is computed once (by the first notebook, 01) and then read from the cache.
    assert not runs["baseline"]["base_exact_match_cached"]
    assert runs["control"]["base_exact_match_cached"] and runs["grit"]["base_exact_match_cached"]
    assert runs["control"]["base_exact_match"] == runs["baseline"]["base_exact_match"]


def test_export_cells_wrote_gguf_and_modelfile(study):
    _, runs = study
    for arm in ("baseline", "grit"):
        ex = runs[arm]["export"]
        gguf = Path(ex["gguf"])
        assert gguf.is_file() and gguf.stat().st_size == ex["gguf_bytes"] > 0, arm
        assert gguf.read_bytes()[:4] == b"GGUF"
        modelfile = (gguf.parent / "Modelfile").read_text()
        assert f"FROM ./{gguf.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile, modelfile
        # Deployment costs little: merged 16-bit and q8_0 GGUF losses sit next to the 4-bit-trained model's.
        trained = runs[arm]["eval_loss"][str(STEPS)]
        assert math.isfinite(ex["eval_loss_merged"]) and math.isfinite(ex["eval_loss_gguf"])
        assert ex["eval_loss_merged"] == pytest.approx(trained, rel=0.02)
        assert ex["eval_loss_gguf"] == pytest.approx(ex["eval_loss_merged"], rel=0.02)
    assert "export" not in runs["control"]


def test_compare_notebook_wrote_plots_and_table(study):
    tmp, runs = study
    out = tmp / "readme_files"
    for name in ("train_loss", "eval_loss", "grad_norm", "learning_rate", "step_time", "peak_memory"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    table = (out / "results.md").read_text()
    for arm in runs:
        assert f"| {arm} |" in table
    assert runs["control"]["train_fingerprint"] in table
