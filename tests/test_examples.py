"""The examples run as a user runs them (``python examples/<name>.py``, a fresh process each) and really
precondition: the count each prints is checked against the schedule rule worked out here by hand."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"loss (?P<first>[\d.]+) -> (?P<last>[\d.]+); preconditioned (?P<pre>\d+) of (?P<steps>\d+) "
                       r"optimizer steps")


def run_example(name: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = LAST_LINE.search(proc.stdout)
    assert match, proc.stdout[-2000:]
    assert "GRITManager(" in proc.stdout  # the manager's repr lists its hyperparameters
    return {k: float(v) for k, v in match.groupdict().items()}


# Every example gathers far more than kfac_min_samples=64 statistics tokens per step, so the first
# inversion is at step kfac_update_freq and every step from there on is preconditioned.
@pytest.mark.parametrize("name,steps,freq,min_drop", [
    ("plain_loop.py", 60, 10, 0.5),   # a cycle a 2-layer MLP learns almost perfectly: loss falls by > 2x
    ("hf_trainer.py", 40, 10, 0.05),  # logged means of 10 steps: a random Llama learns the cycle slowly
    ("trl_sft.py", 12, 4, 0.05),
])
def test_example_preconditions_and_learns(name, steps, freq, min_drop):
    out = run_example(name)
    assert out["steps"] == steps
    assert out["pre"] == steps - freq + 1
    assert out["last"] < (1 - min_drop) * out["first"], out
