"""The cells every notebook shares, written once here and copied into each notebook; the Colab set; the badges.

The Colab set-up cell has to stay inline in each notebook (it runs before the repository exists on the
Colab VM), and papermill needs a literal ``parameters`` cell; so both are generated from this module and
``tests/test_notebook_cells.py`` checks that every notebook's copy matches. The same goes for
``requirements-gpu.txt``, what the Colab cell installs: requirements.txt (the study stack's one source)
less ``NOT_IN_COLAB``, at the same pins; and for the Open-in-Colab badges of README.md and docs/colab-gpu.md,
made from ``REPO_URL`` (between ``BADGE_MARKERS``).

    python -m grit_study.notebook_cells          # says which notebooks, requirements-gpu.txt or badges differ
    python -m grit_study.notebook_cells --write  # rewrites them
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .colab import KERNEL_OWNED

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
REQUIREMENTS = ROOT / "requirements.txt"
COLAB_REQUIREMENTS = ROOT / "requirements-gpu.txt"
# Left out of the Colab install: Colab is a Jupyter front end already and runs its own kernel (jupyterlab,
# ipykernel; papermill would upgrade jupyter-client and tornado under it), and what the kernel runs on stays at
# the VM's own versions (grit_study.colab.KERNEL_OWNED, held by a constraints file).
NOT_IN_COLAB = ("jupyterlab", "papermill", *KERNEL_OWNED)
# In the Colab set without their pin: tensorboard 2.21 needs protobuf >= 6.31.1, newer than the protobuf Colab
# holds for its TensorFlow (5.29 when checked), while Colab ships a tensorboard that fits it; the study only
# writes event files through torch.utils.tensorboard, which any tensorboard release serves.
UNPINNED_IN_COLAB = ("tensorboard",)
COLAB_TAG = "colab-setup"
PARAMETERS_TAG = "parameters"

# The one place the repository's address is written: the Colab cell clones it, the badges open its notebooks.
# A fork: set it here, run `python -m grit_study.notebook_cells --write`, commit (docs/colab-gpu.md).
REPO_URL = "https://github.com/grit-study/grit-study"
BRANCH = "main"
README = ROOT / "README.md"
COLAB_PAGE = ROOT / "docs" / "colab-gpu.md"
BADGE_MARKERS = ("<!-- badges:start -->", "<!-- badges:end -->")

COLAB_CELL = '''# Colab: clone the repository, then grit_study.colab installs grit and the study's GPU set (keeping what
# Colab's kernel runs on), with USE_DRIVE logs and checkpoints the runs on Google Drive (MyDrive/grit-study), and
# says whether to restart. Anywhere else: put this checkout's study package (grit_study/) on sys.path.
import os, subprocess, sys
REPO_URL = "{repo_url}"  # a fork: its address here (docs/colab-gpu.md)
USE_DRIVE = True
if "google.colab" in sys.modules:
    target = "/content/grit-study"
    if not os.path.isdir(target):
        try:
            subprocess.run(["git", "clone", "--depth", "1", REPO_URL, target], check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"git could not clone REPO_URL = {{REPO_URL!r}} (exit {{e.returncode}}, git's message "
                               "is above). Set REPO_URL in this cell to where the repository is published, e.g. "
                               "your fork https://github.com/<you>/<fork>, and run the cell again "
                               "(docs/colab-gpu.md).") from None
    os.chdir(target)
    if target not in sys.path:
        sys.path.insert(0, target)  # grit_study runs from the clone
    from grit_study.colab import setup
    setup(target, use_drive=USE_DRIVE, repo_url=REPO_URL)
else:
    # Jupyter starts the kernel in notebooks/: the repository root is the first folder up holding grit_study/.
    from pathlib import Path
    root = next((str(p) for p in (Path.cwd(), *Path.cwd().parents) if (p / "grit_study").is_dir()), None)
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)
    print("Not in Colab: grit_study from", root or "the installed environment")'''.format(repo_url=REPO_URL)


def github_path(repo_url: str = REPO_URL) -> str:
    """``owner/name`` of a GitHub address."""
    m = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", repo_url)
    if not m:
        raise ValueError(f"REPO_URL = {repo_url!r} is not a GitHub address (https://github.com/<owner>/<name>): "
                         "Colab opens notebooks from GitHub")
    return m.group(1)


def badges(repo_url: str = REPO_URL, branch: str = BRANCH) -> str:
    """The Open-in-Colab table README and docs/colab-gpu.md show, from ``REPO_URL``."""
    rows = ["| notebook | |", "|---|---|"]
    for name in NOTEBOOK_PARAMETERS:
        url = f"https://colab.research.google.com/github/{github_path(repo_url)}/blob/{branch}/notebooks/{name}.ipynb"
        rows.append(f"| `notebooks/{name}.ipynb` | [![Open In Colab](https://colab.research.google.com/assets/"
                    f"colab-badge.svg)]({url}) |")
    return "\n".join(rows)


# name -> the comment line above it in every parameters cell. None always means: the GRIT_<NAME>
# environment variable if set, else the preset's (or the notebook's) default.
PARAMETERS = {
    "ARM": 'ARM: an arm of the registry (grit_study.registry.ARMS), e.g. "grit", "control", "grit_sgd", "riemannian"; '
           'None = the notebook\'s own arm (01: "baseline", 02: "grit")',
    "PRESET": 'PRESET: "llama3-8b" (CUDA default), "alpaca-smollm2" (CPU default: real instruction data), '
              '"smollm2-135m" (CPU, synthetic tasks), "tiny" (tests); None = auto',
    "DATA": 'DATA: "synthetic", "hub:vicgalle/alpaca-gpt4", or a .json/.jsonl/.csv path',
    "MAX_STEPS": "MAX_STEPS: optimizer steps",
    "LEARNING_RATE": "LEARNING_RATE: peak learning rate (the sweep tunes it per arm on the validation split)",
    "SEED": "SEED: training seed (LoRA init and data order; the splits come from the preset's data_seed)",
    "EVAL_STEPS": "EVAL_STEPS: evaluate on the shared validation split every this many steps",
    "LOGDIR": "LOGDIR: TensorBoard root (default tensorboard_logs/, in Colab with USE_DRIVE a folder on Drive)",
    "OUTPUT_DIR": "OUTPUT_DIR: trainer outputs, checkpoints and exports (default outputs/, in Colab with USE_DRIVE a "
                  "folder on Drive)",
    "EXPORT": "EXPORT: merge -> GGUF q8_0 -> eval + Ollama Modelfile (default False)",
    "INSTALL_OLLAMA": "INSTALL_OLLAMA: with EXPORT, install Ollama with its official script when no ollama binary is "
                      "found (None: only in Colab)",
    "FIGURES_DIR": "FIGURES_DIR: where the plots and results.md go (default readme_files/)",
    "SAVE_STEPS": "SAVE_STEPS: write a resumable checkpoint every this many steps (default 0: none; in Colab with "
                  "USE_DRIVE 25)",
    "RESUME_FROM_CHECKPOINT": "RESUME_FROM_CHECKPOINT: a checkpoint folder (<OUTPUT_DIR>/<run>/checkpoint-<step>) "
                              "to continue that run from, or \"latest\": the newest unfinished run of this arm "
                              "and settings, if any (in Colab with USE_DRIVE the default)",
}

# Which parameters each notebook declares: only the ones it reads.
NOTEBOOK_PARAMETERS = {
    "01_baseline_qlora_unsloth": {n: "None" for n in (
        "ARM", "PRESET", "DATA", "MAX_STEPS", "LEARNING_RATE", "SEED", "EVAL_STEPS", "LOGDIR", "OUTPUT_DIR", "EXPORT",
        "INSTALL_OLLAMA", "SAVE_STEPS", "RESUME_FROM_CHECKPOINT")},
    "02_pure_grit": {n: "None" for n in (
        "ARM", "PRESET", "DATA", "MAX_STEPS", "LEARNING_RATE", "SEED", "EVAL_STEPS", "LOGDIR", "OUTPUT_DIR", "EXPORT",
        "INSTALL_OLLAMA", "SAVE_STEPS", "RESUME_FROM_CHECKPOINT")},
    "03_compare": {n: "None" for n in ("PRESET", "DATA", "LOGDIR", "FIGURES_DIR")},
}


def parameters_cell(notebook: str) -> str:
    lines = ["# Parameters (papermill). None = the GRIT_<NAME> environment variable if set, else the default."]
    for name, default in NOTEBOOK_PARAMETERS[notebook].items():
        lines += [f"# {PARAMETERS[name]}", f"{name} = {default}"]
    return "\n".join(lines)


def expected_cells(notebook: str) -> dict[str, str]:
    """{tag: source} of the shared cells of ``notebook``."""
    return {COLAB_TAG: COLAB_CELL, PARAMETERS_TAG: parameters_cell(notebook)}


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def differences(path: Path) -> list[str]:
    """The tags of ``path``'s shared cells that differ from this module's source (or are missing)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = {}
    for cell in nb["cells"]:
        for tag in cell.get("metadata", {}).get("tags", []):
            found.setdefault(tag, []).append(_source(cell))
    out = []
    for tag, source in expected_cells(path.stem).items():
        if found.get(tag) != [source]:
            out.append(tag)
    return out


def write(path: Path) -> bool:
    """Rewrite the shared cells of ``path`` from this module; True if the file changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        for tag, source in expected_cells(path.stem).items():
            if tag in tags:
                cell["source"] = source.splitlines(keepends=True)
                cell["outputs"], cell["execution_count"] = [], None
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def requirement_name(line: str) -> str | None:
    """The normalized project name of a requirements line; None for a comment, a blank or an option line."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", line).group(0)).lower()


def colab_requirements(requirements: str) -> str:
    """requirements-gpu.txt's text: the requirement lines of ``requirements`` (requirements.txt's text), pins,
    extras and order kept, less ``NOT_IN_COLAB``, and ``UNPINNED_IN_COLAB`` by name only."""
    keep = [name if name in UNPINNED_IN_COLAB else line.split("#", 1)[0].strip() for line in requirements.splitlines()
            if (name := requirement_name(line)) not in (None, *NOT_IN_COLAB)]
    header = [
        "# GENERATED from requirements.txt by `python -m grit_study.notebook_cells --write`: edit that file.",
        "# What the notebooks' Colab cell installs on a CUDA machine (grit_study/colab.py), next to `pip install -e .[hf]`",
        f"# and xformers for the VM's torch: the study's stack at its pins, less {', '.join(NOT_IN_COLAB[:2])} (Colab",
        "# runs its own Jupyter) and what Colab's kernel runs on, which the cell holds at the VM's versions:",
        f"# {', '.join(KERNEL_OWNED)}.",
        f"# Unpinned: {', '.join(UNPINNED_IN_COLAB)} (the pinned release needs a newer protobuf than Colab's; "
        "Colab's own fits).",
    ]
    return "\n".join(header + keep) + "\n"


def colab_requirements_stale() -> bool:
    expected = colab_requirements(REQUIREMENTS.read_text(encoding="utf-8"))
    return not COLAB_REQUIREMENTS.is_file() or COLAB_REQUIREMENTS.read_text(encoding="utf-8") != expected


def stale_badges() -> list[Path]:
    """The pages (README.md, docs/colab-gpu.md) whose badges block is not ``badges()``."""
    from .main import block

    return [page for page in (README, COLAB_PAGE) if block(page, *BADGE_MARKERS) != badges()]


def main(argv: list[str] | None = None) -> int:
    from .main import include_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true",
                        help="rewrite the notebooks' shared cells, requirements-gpu.txt and the badges")
    args = parser.parse_args(argv)
    stale = 0
    for name in NOTEBOOK_PARAMETERS:
        path = NOTEBOOKS / f"{name}.ipynb"
        if args.write:
            print(f"{path.name}: {'rewritten' if write(path) else 'up to date'}")
        elif diff := differences(path):
            stale += 1
            print(f"{path.name}: differs in {diff}; run python -m grit_study.notebook_cells --write")
    if args.write:
        changed = colab_requirements_stale()
        if changed:
            COLAB_REQUIREMENTS.write_text(colab_requirements(REQUIREMENTS.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"{COLAB_REQUIREMENTS.name}: {'rewritten' if changed else 'up to date'}")
        old = stale_badges()
        for page in (README, COLAB_PAGE):
            if page in old:
                include_text(page, badges(), *BADGE_MARKERS)
            print(f"{page.relative_to(ROOT)} badges: {'rewritten' if page in old else 'up to date'}")
    else:
        if colab_requirements_stale():
            stale += 1
            print(f"{COLAB_REQUIREMENTS.name}: differs from requirements.txt; run python -m grit_study.notebook_cells --write")
        for page in stale_badges():
            stale += 1
            print(f"{page.relative_to(ROOT)}: badges differ from REPO_URL; run python -m grit_study.notebook_cells --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
