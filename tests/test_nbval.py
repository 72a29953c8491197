"""The notebooks under nbval, as a CI user runs them: ``pytest --nbval-lax notebooks/`` executes every cell of
01, 02 and 03, in that order, each notebook in its own kernel started in notebooks/ (as Jupyter starts it),
on the tiny preset chosen through the ``GRIT_*`` environment variables the parameters cells read, into a
temporary LOGDIR. Then: the runs of 01 and 02 are in the log directory, 03 compared them, nothing was
written into notebooks/, and notebook 02's run is the run ``arms.run_hf`` (the sweep's entry point) makes:
same batches, same losses.

PYTHONPATH is left without the checkout on purpose: the notebooks' setup cell must find grit_study itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# `make notebooks` selects these with -m notebook; `make unit` leaves them out.
pytestmark = [pytest.mark.notebook, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
STEPS = 4
EVAL_STEPS = 2

# The command, from the repository root; `-p no:cacheprovider` leaves no .pytest_cache behind.
NBVAL = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "notebooks/"]


def nbval_env(tmp: Path) -> dict[str, str]:
    """This process's environment with no GRIT_* setting of its own (the cache folder excepted), the checkout
    taken off PYTHONPATH, offline, and the tiny preset's short run chosen through GRIT_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIT_") or k == "GRIT_CACHE_DIR"}
    path = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(
        UNSLOTH_SKIP_TORCHVISION_CHECK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", UNSLOTH_COMPILE_LOCATION=str(tmp / "unsloth_compiled_cache"),
        GRIT_PRESET="tiny", GRIT_MAX_STEPS=str(STEPS), GRIT_EVAL_STEPS=str(EVAL_STEPS), GRIT_EXPORT="0",
        GRIT_LOGDIR=str(tmp / "logs"), GRIT_OUTPUT_DIR=str(tmp / "outputs"),
        GRIT_FIGURES_DIR=str(tmp / "readme_files"), GRIT_ACCURACY_CACHE=str(tmp / "base_accuracy.json"))
    return env


def code_cells() -> int:
    return sum(c["cell_type"] == "code" for nb in sorted(NOTEBOOKS.glob("*.ipynb"))
               for c in json.loads(nb.read_text())["cells"])


@pytest.fixture(scope="module")
def nbval(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nbval")
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    proc = subprocess.run(NBVAL, cwd=ROOT, env=nbval_env(tmp), capture_output=True, text=True, timeout=1800)
    after = sorted(p.name for p in NOTEBOOKS.iterdir())
    runs = {}
    for run in sorted((tmp / "logs").iterdir()) if (tmp / "logs").is_dir() else []:
        s = json.loads((run / "run_summary.json").read_text())
        runs[s["arm"]] = s
    return tmp, proc, before, after, runs


def test_every_notebook_cell_passes_under_nbval(nbval):
    _, proc, *_ = nbval
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", out))
    assert counts == {"passed": code_cells()}, out[-3000:]


def test_the_notebooks_wrote_their_runs_and_compared_them(nbval):
    tmp, _, _, _, runs = nbval
    assert sorted(runs) == ["baseline", "grit"]
    for arm, s in runs.items():
        assert s["preset"] == "tiny" and s["steps"] == STEPS and len(s["batch_hashes"]) == STEPS, arm
        assert sorted(map(int, s["eval_loss"])) == [0, 2, 4] and all(math.isfinite(v) for v in s["eval_loss"].values())
        assert "export" not in s and math.isfinite(s["test_loss"]), arm
    assert runs["grit"]["preconditioned_steps"] == STEPS - 1 and runs["baseline"]["preconditioned_steps"] == 0
    assert runs["grit"]["batch_hashes"] == runs["baseline"]["batch_hashes"]
    table = (tmp / "readme_files" / "results.md").read_text()
    assert "| baseline |" in table and "| grit |" in table


def test_nothing_was_written_into_the_notebooks_folder(nbval):
    _, _, before, after, _ = nbval
    assert after == before


def test_notebook_02_is_the_run_the_sweep_makes(nbval, tmp_path, monkeypatch):
    """arms.run_hf, in this process, with the preset the notebook read from GRIT_*: the same data, the same
    batches at every step, the same losses (the notebook calls the same step functions in the same order)."""
    from grit_study import arms

    for k in [k for k in os.environ if k.startswith("GRIT_") and k != "GRIT_CACHE_DIR"]:
        monkeypatch.delenv(k)
    _, _, _, _, runs = nbval
    notebook = runs["grit"]
    preset = arms.study_preset("tiny", max_steps=STEPS, eval_steps=EVAL_STEPS)
    res = arms.run_hf(preset, "grit", logdir=str(tmp_path / "logs"), output_dir=str(tmp_path / "outputs"))
    sweep = res.summary
    for key in ("preset_fields", "arm_definition", "grit_config", "train_fingerprint", "val_fingerprint",
                "test_fingerprint", "batch_hashes", "preconditioned_steps", "trainable_parameters"):
        assert sweep[key] == notebook[key], key
    assert sweep["train_loss_per_step"] == pytest.approx(notebook["train_loss_per_step"], rel=1e-6)
    assert sweep["eval_loss"] == pytest.approx(notebook["eval_loss"], rel=1e-6)
