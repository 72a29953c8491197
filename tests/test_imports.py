"""Import rules between the layers, read from the source (ast), not by importing it.

* Fisher core, ``grit/*.py`` (everything outside ``grit/integrations``): the standard library, torch,
  peft and other core modules only; so never transformers, trl, accelerate, ``grit.integrations`` or
  ``grit_study``.
* Glue, ``grit/integrations/``: the core, its frameworks (transformers, trl, accelerate, ...), never
  ``grit_study``.
* Study, ``grit_study/`` (its own top-level package): uses grit through its public API only, the names
  ``grit/__init__.py`` exports (``from grit import GRITManager``), never ``grit.manager`` and friends.

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
            # `from . import x` / `from grit import name` import submodules or attributes by name: count them.
            names = [f"{target}.{a.name}" for a in node.names] if node.module is None or target == "grit" else []
            out += [(node.lineno, n) for n in names] if names else [(node.lineno, target)]
    return out


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).parts
    if rel[0] == "grit_study":
        return "study"
    if rel[1] == "integrations":
        return "glue"
    return "core"


def public_api(root: Path) -> set[str]:
    """The names in ``grit.__all__``, read from ``grit/__init__.py``."""
    for node in ast.parse((root / "grit" / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    raise AssertionError("grit/__init__.py defines no __all__")


def violations(root: Path) -> list[str]:
    out = []
    api = {f"grit.{name}" for name in public_api(root)}
    for path in sorted((root / "grit").rglob("*.py")) + sorted((root / "grit_study").rglob("*.py")):
        layer = layer_of(path, root)
        for line, name in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if layer == "study":
                if _is(name, "grit") and name not in api:
                    out.append(f"{where}: the study uses grit's public API only (the names of grit.__all__)")
                continue
            if _is(name, "grit_study"):
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
    layers = {layer_of(p, ROOT) for d in ("grit", "grit_study") for p in (ROOT / d).rglob("*.py")}
    assert layers == {"core", "glue", "study"}
    hf = imports_of(ROOT / "grit" / "integrations" / "hf.py", ROOT)
    assert any(name == "grit.integrations.optimizer" for _, name in hf)
    assert any(name == "transformers" for _, name in hf)
    manager = [name for _, name in imports_of(ROOT / "grit" / "manager.py", ROOT)]
    assert "grit.factors" in manager and "grit.schedule" in manager


@pytest.mark.parametrize("file,line,rule", [
    ("grit/manager.py", "from transformers import Trainer", "standard library, torch and peft"),
    ("grit/factors.py", "    import grit_study.arms", "never imports the study"),
    ("grit/hooks.py", "import trl.trainer", "standard library, torch and peft"),
    ("grit/config.py", "from grit.integrations import hf", "never imports the glue"),
    ("grit/kfac_math.py", "from grit_study import arms", "never imports the study"),
    ("grit/integrations/hf.py", "from grit_study.data import PadCollator", "never imports the study"),
    ("grit/integrations/optimizer.py", "import grit_study.runs", "never imports the study"),
    ("grit_study/arms.py", "from grit.manager import GRITManager", "public API only"),
    ("grit_study/runs.py", "    import grit.factors", "public API only"),
])
def test_a_planted_violation_is_reported(tmp_path, file, line, rule):
    for d in ("grit", "grit_study"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / file
    body = "def _planted():\n" + line if line.startswith(" ") else line
    target.write_text(target.read_text() + "\n" + body + "\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith(file) and rule in found[0], found
