"""What ``pip install .`` gives: grit alone (no study code, no data), with torch and peft; the [hf] extra bounded
to the transformers and trl that requirements.txt pins (the releases the glue's tests run on)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the venv's setuptools, no index access; the build copies the tree to a temp dir.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (whl,) = out.glob("grit-*.whl")
    return whl


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def test_wheel_holds_grit_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        top = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        names = z.namelist()
    assert top == {"grit"}, top  # no grit_study, examples, data (the CC BY-NC sample) or notebooks
    assert not [n for n in names if "study" in n or n.endswith((".json", ".jsonl", ".ipynb"))]
    assert "grit/py.typed" in names and "grit/integrations/hf.py" in names


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_base_install_pulls_torch_and_peft_only(wheel):
    meta = _metadata(wheel)
    base = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert _requirement_names(base) == {"torch", "peft"}
    import grit
    assert meta["Version"] == grit.__version__


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#;]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_hf_extra_admits_exactly_the_pinned_releases(wheel):
    from packaging.requirements import Requirement

    meta = _metadata(wheel)
    hf = [Requirement(r.split(";")[0]) for r in meta.get_all("Requires-Dist") if 'extra == "hf"' in r]
    assert {r.name for r in hf} == {"transformers", "trl"}
    pins = _pins()
    for req in hf:
        assert req.specifier.contains(pins[req.name]), (req, pins[req.name])
        # Bounded above: the glue overrides private Trainer methods, so untested releases are refused.
        assert any(s.operator in ("<", "<=", "==") for s in req.specifier), req


def test_grit_is_a_thin_library():
    """The Fisher core and its glue, nothing else: under 3,000 lines (the study lives in grit_study/)."""
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "grit").rglob("*.py"))
    assert lines < 3000, lines
    assert not (ROOT / "grit" / "study").exists()
