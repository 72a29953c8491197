"""Import rules between the layers of ``grit``, read from the source (ast), not by importing it.

* Fisher core, ``grit/*.py`` (everything outside ``grit/integrations`` and ``grit/study``): the standard
  library, torch, peft and other core modules only; so never transformers, trl, accelerate,
  ``grit.integrations`` or ``grit.study``.
* Glue, ``grit/integrations/``: the core, its frameworks (transformers, trl, accelerate, ...), never
  ``grit.study``.
* Study, ``grit/study/``: may import both.

Every import statement counts, also those inside functions (lazy imports are imports too). Relative
imports are resolved against the file's package.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE_THIRD_PARTY = {"torch", "peft"}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``/grit)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import x` / `from grit import study` import submodules by name: count them.
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None or target == "grit" else []
            out += [(node.lineno, n) for n in names] if names else [(node.lineno, target)]
    return out


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root / "grit").parts
    if rel[0] == "study":
        return "study"
    if rel[0] == "integrations":
        return "glue"
    return "core"


def violations(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "grit").rglob("*.py")):
        layer = layer_of(path, root)
        if layer == "study":
            continue
        for line, name in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if _is(name, "grit.study"):
                out.append(f"{where}: the {layer} never imports the study")
            elif layer == "core":
                if _is(name, "grit.integrations"):
                    out.append(f"{where}: the core never imports the glue")
                elif _is(name, "grit"):
                    continue
                elif name.split(".")[0] not in CORE_THIRD_PARTY | set(sys.stdlib_module_names):
                    out.append(f"{where}: the core imports only the standard library, torch and peft")
    return out


def test_import_rules_hold():
    assert violations(ROOT) == []


def test_the_rules_see_every_layer():
    """The walk reaches all three layers and resolves relative imports (else the test above passes vacuously)."""
    layers = {layer_of(p, ROOT) for p in (ROOT / "grit").rglob("*.py")}
    assert layers == {"core", "glue", "study"}
    hf = imports_of(ROOT / "grit" / "integrations" / "hf.py", ROOT)
    assert any(name == "grit.integrations.optimizer" for _, name in hf)
    assert any(name == "transformers" for _, name in hf)
    manager = [name for _, name in imports_of(ROOT / "grit" / "manager.py", ROOT)]
    assert "grit.factors" in manager and "grit.kfac_math" in manager


@pytest.mark.parametrize("file,line,rule", [
    ("grit/manager.py", "from transformers import Trainer", "standard library, torch and peft"),
    ("grit/factors.py", "    from .study import arms", "never imports the study"),
    ("grit/hooks.py", "import trl.trainer", "standard library, torch and peft"),
    ("grit/config.py", "from grit.integrations import hf", "never imports the glue"),
    ("grit/kfac_math.py", "from . import study", "never imports the study"),
    ("grit/integrations/hf.py", "from ..study.data import PadCollator", "never imports the study"),
    ("grit/integrations/optimizer.py", "import grit.study.runs", "never imports the study"),
])
def test_a_planted_violation_is_reported(tmp_path, file, line, rule):
    shutil.copytree(ROOT / "grit", tmp_path / "grit", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / file
    body = "def _planted():\n" + line if line.startswith(" ") else line
    target.write_text(target.read_text() + "\n" + body + "\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(file) and rule in found[0], found
