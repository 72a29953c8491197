"""The notebooks' shared cells are copies of grit_study.notebook_cells, and every notebook declares only
the parameters it reads."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from grit_study import notebook_cells as nc

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


def test_the_colab_cell_is_valid_python_and_a_no_op_outside_colab(capsys):
    exec(compile(nc.COLAB_CELL, "colab-setup", "exec"), {})
    assert "Not in Colab" in capsys.readouterr().out
