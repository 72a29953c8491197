"""benchmarks/gpu_check.py's dry run (so the GPU acceptance plan cannot rot on CPU-only CI: it runs in `make test`),
and the Makefile's stop when nvidia-smi sees a GPU that torch cannot use (simulated with a fake nvidia-smi)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
g = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(_spec))  # dataclasses look it up there
_spec.loader.exec_module(g)


def _dry(capsys, *argv) -> tuple[int, str]:
    rc = g.main(["--dry-run", *argv])
    return rc, capsys.readouterr().out


def test_the_dry_run_prints_the_plan_and_passes_its_checks(capsys, monkeypatch):
    monkeypatch.setattr(g, "prepare", lambda *a: pytest.fail("the dry run must not download"))
    rc, out = _dry(capsys)
    assert rc == 0, out
    session = [p for p in g.PARTS.values() if p.this_session]
    assert [p.name for p in session] == ["core", "overhead"]
    for p in session:
        assert p.estimate_s <= g.PART_LIMIT_S and f"timeout_s={p.timeout_s}, command={p.command()!r}" in out
        assert len(p.command()) <= 2000  # the device tool's limit
    assert re.search(r"carry [\d.]+ MiB \+ working tree [\d.]+ MiB = [\d.]+ MiB of 64 MiB", out)
    assert "each part of this session <= 300 s" in out and out.rstrip().endswith("ok")
    assert g.PARTS["overhead"].seq_pairs == ((512, 50),) and g.PARTS["overhead-2048"].seq_pairs == ((2048, 25),)


def test_without_the_wheels_the_dry_run_says_what_to_download(capsys, tmp_path):
    rc, out = _dry(capsys, "--wheel-dir", str(tmp_path))
    assert rc == 0
    assert g.download_command(["peft==0.21.2", "bitsandbytes==0.50.2"]) in out
    assert "bitsandbytes==0.50.2" in out and "MISSING (about 43 MB)" in out and "MISSING (about 1 MB)" in out
    assert not list(tmp_path.iterdir()), "nothing downloaded"


def test_a_carry_over_64_mib_is_refused(capsys, tmp_path):
    for name, mib in (("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", 70), ("peft-0.21.2-py3-none-any.whl", 1)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(mib * g.MiB)  # sparse: no disk used
    rc, out = _dry(capsys, "--wheel-dir", str(tmp_path))
    assert rc == 1 and "over the device tool's 64 MiB" in out


def test_a_part_over_five_minutes_is_refused():
    """25 pairs at seq 2048 next to 50 at 512 do not fit one 5-minute call (why overhead-2048 has its own session)."""
    both = g.overhead_part("overhead", ((512, 50), (2048, 25)))
    errors = g.check_plan([g.PARTS["core"], both], carry=0, tree=0)
    assert any(e.startswith("part overhead: estimate") and "over 300 s" in e for e in errors), errors
    assert g.check_plan(list(g.PARTS.values()), carry=0, tree=0) == []


def test_the_overhead_row_is_provisional_under_100_pairs():
    res = {"control": {"mean": 1.8}, "grit": {"mean": 1.9}, "timed_preconditioned": 50,
           "ratio": {"mean_ratio": 1.05, "ci95": [1.01, 1.09]},
           "grit_time_s": {"total": {"mean": 0.06, "ci95": [0.05, 0.07]}}, "peak_mib": {"control": 9943, "grit": 9913}}
    check, result, detail = g.overhead_row(512, 50, res)
    assert result == "PASS (provisional: 50 < 100 pairs)" and "ratio 1.0500 [1.0100, 1.0900]" in detail
    assert g.overhead_row(512, 100, res)[1] == "PASS (final)"
    assert g.pytest_summary("....\n== 62 passed, 1 deselected in 25.1s ==\n") == "62 passed, 1 deselected in 25.1s"


# ----------------------------------------------------------------------------- make: a GPU torch cannot use

RUN_TARGETS = ("unit", "notebooks", "runtime", "study", "ablations", "sweep", "gpu-check")


def test_every_run_target_checks_the_gpu_first():
    makefile = (ROOT / "Makefile").read_text()
    for target in RUN_TARGETS:
        m = re.search(rf"^{re.escape(target)}:([^\n]*)$", makefile, re.M)
        assert m and "cuda-check" in m.group(1).split(), f"make {target} does not depend on cuda-check"


def _make(tmp_path, *args):
    import torch

    if shutil.which("make") is None or not (ROOT / ".venv" / ".grit-installed").exists():
        pytest.skip("needs make and the installed .venv (make test makes both)")
    if torch.cuda.is_available():
        pytest.skip("torch can use a GPU here: nothing to simulate")
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Tesla T4 (UUID: GPU-00000000-0000-0000-0000-000000000000)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    # -o: the installed stamp counts as up to date, whatever changed since (no install here).
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.grit-installed", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_make_stops_when_nvidia_smi_sees_a_gpu_torch_cannot_use(tmp_path):
    proc = _make(tmp_path, "cuda-check")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "nvidia-smi sees a GPU (GPU 0: Tesla T4), but torch" in proc.stderr and "cannot use it" in proc.stderr
    assert "make <target> HAS_CUDA=0" in proc.stderr  # what to do
    assert _make(tmp_path, "cuda-check", "HAS_CUDA=0").returncode == 0  # the CPU on purpose
