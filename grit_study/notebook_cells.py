"""The cells every notebook shares, written once here and copied into each notebook; and the Colab set.

The Colab set-up cell has to stay inline in each notebook (it runs before the repository exists on the
Colab VM), and papermill needs a literal ``parameters`` cell; so both are generated from this module and
``tests/test_notebook_cells.py`` checks that every notebook's copy matches. The same goes for
``requirements-gpu.txt``, what the Colab cell installs: requirements.txt (the study stack's one source)
less ``NOT_IN_COLAB``, at the same pins.

    python -m grit_study.notebook_cells          # says which notebooks (or requirements-gpu.txt) differ
    python -m grit_study.notebook_cells --write  # rewrites their shared cells and requirements-gpu.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
REQUIREMENTS = ROOT / "requirements.txt"
COLAB_REQUIREMENTS = ROOT / "requirements-gpu.txt"
# Left out of the Colab install: Colab is a Jupyter front end already (and runs its own Jupyter server).
NOT_IN_COLAB = ("jupyterlab",)
COLAB_TAG = "colab-setup"
PARAMETERS_TAG = "parameters"

REPO_URL = "https://github.com/grit-study/grit-study"

COLAB_CELL = '''# Colab: install grit and the study's GPU requirements from a clone. Anywhere else: put this checkout's
# study package (grit_study/, run from the checkout, not installed) on sys.path.
# Each Colab notebook runs on its own VM: with USE_DRIVE the runs are logged to Google Drive
# (MyDrive/grit-study/tensorboard_logs), so 03_compare, opened later, can read what 01 and 02 wrote.
import importlib.metadata as md, os, subprocess, sys
REPO_URL = "{repo_url}"  # the one place the repository's address is written
USE_DRIVE = True
if "google.colab" in sys.modules:
    if USE_DRIVE:
        from google.colab import drive
        drive.mount("/content/drive")
        os.environ.setdefault("GRIT_LOGDIR", "/content/drive/MyDrive/grit-study/tensorboard_logs")
    target = "/content/grit-study"
    if not os.path.isdir(target):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, target], check=True)
    # Keep Colab's own CUDA build of torch (and xformers, torchvision, torchaudio when present): Unsloth's
    # dependencies would otherwise upgrade torch to a build this VM's CUDA driver may not run.
    def installed(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    pins = [f"{{n}}=={{v}}" for n in ("torch", "xformers", "torchvision", "torchaudio") if (v := installed(n))]
    with open("/content/colab-constraints.txt", "w") as f:
        f.write("\\n".join(pins) + "\\n")
    loaded = {{n: installed(n) for n in ("numpy", "transformers", "accelerate", "peft", "torch", "pyarrow")
              if n in sys.modules}}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", "/content/colab-constraints.txt",
           "-e", f"{{target}}[hf]", "-r", os.path.join(target, "requirements-gpu.txt")]
    subprocess.run(cmd, check=True)
    os.chdir(target)
    sys.path.insert(0, target)  # grit_study runs from the clone
    print("Installed from", REPO_URL, "keeping", ", ".join(pins) or "nothing pinned")
    for n in ("grit", "torch", "xformers", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "datasets"):
        print(f"  {{n}}=={{installed(n)}}")
    changed = [n for n, v in loaded.items() if installed(n) != v]
    if changed:
        print("RESTART NEEDED: this kernel had already imported", ", ".join(changed), "which the install changed. "
              "Runtime > Restart session, then run the notebook again from the top (the install is kept).")
    else:
        print("No restart needed: nothing this kernel had imported was changed.")
    print("Runs are logged to", os.environ.get("GRIT_LOGDIR", "tensorboard_logs/ on this VM (lost with it)"))
else:
    # Jupyter starts the kernel in notebooks/: the repository root is the first folder up holding grit_study/.
    from pathlib import Path
    root = next((str(p) for p in (Path.cwd(), *Path.cwd().parents) if (p / "grit_study").is_dir()), None)
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)
    print("Not in Colab: grit_study from", root or "the installed environment")'''.format(repo_url=REPO_URL)

# name -> the comment line above it in every parameters cell. None always means: the GRIT_<NAME>
# environment variable if set, else the preset's (or the notebook's) default.
PARAMETERS = {
    "ARM": 'ARM: an arm of the registry (grit_study.registry.ARMS), e.g. "grit", "control", "grit_sgd", "riemannian"; '
           'None = the notebook\'s own arm (01: "baseline", 02: "grit")',
    "PRESET": 'PRESET: "llama3-8b" (CUDA), "smollm2-135m" (CPU default), "tiny" (tests); None = auto',
    "DATA": 'DATA: "synthetic", "hub:vicgalle/alpaca-gpt4", or a .json/.jsonl/.csv path',
    "MAX_STEPS": "MAX_STEPS: optimizer steps",
    "LEARNING_RATE": "LEARNING_RATE: peak learning rate (the sweep tunes it per arm on the validation split)",
    "SEED": "SEED: training seed (LoRA init and data order; the splits come from the preset's data_seed)",
    "EVAL_STEPS": "EVAL_STEPS: evaluate on the shared validation split every this many steps",
    "LOGDIR": "LOGDIR: TensorBoard root (default tensorboard_logs/, in Colab with USE_DRIVE a folder on Drive)",
    "OUTPUT_DIR": "OUTPUT_DIR: trainer outputs and exports (default outputs/)",
    "EXPORT": "EXPORT: merge -> GGUF q8_0 -> eval + Ollama Modelfile (default False)",
    "FIGURES_DIR": "FIGURES_DIR: where the plots and results.md go (default readme_files/)",
    "SAVE_STEPS": "SAVE_STEPS: write a resumable checkpoint every this many steps (default 0: none)",
    "RESUME_FROM_CHECKPOINT": "RESUME_FROM_CHECKPOINT: a checkpoint folder (<OUTPUT_DIR>/<run>/checkpoint-<step>) "
                              "to continue that run from",
}

# Which parameters each notebook declares: only the ones it reads.
NOTEBOOK_PARAMETERS = {
    "01_baseline_qlora_unsloth": {n: "None" for n in (
        "ARM", "PRESET", "DATA", "MAX_STEPS", "LEARNING_RATE", "SEED", "EVAL_STEPS", "LOGDIR", "OUTPUT_DIR", "EXPORT",
        "SAVE_STEPS", "RESUME_FROM_CHECKPOINT")},
    "02_pure_grit": {n: "None" for n in (
        "ARM", "PRESET", "DATA", "MAX_STEPS", "LEARNING_RATE", "SEED", "EVAL_STEPS", "LOGDIR", "OUTPUT_DIR", "EXPORT",
        "SAVE_STEPS", "RESUME_FROM_CHECKPOINT")},
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
    extras and order kept, less ``NOT_IN_COLAB``."""
    keep = [line.split("#", 1)[0].strip() for line in requirements.splitlines()
            if requirement_name(line) not in (None, *NOT_IN_COLAB)]
    header = [
        "# GENERATED from requirements.txt by `python -m grit_study.notebook_cells --write`: edit that file.",
        "# What the notebooks' Colab cell installs on a CUDA machine, next to `pip install -e .[hf]`: the study's",
        f"# stack at its pins, less {', '.join(NOT_IN_COLAB)} (Colab is a Jupyter front end already). The machine's own",
        "# CUDA torch is kept (requirements.txt asks only for a torch range; the cell pins the installed build).",
    ]
    return "\n".join(header + keep) + "\n"


def colab_requirements_stale() -> bool:
    expected = colab_requirements(REQUIREMENTS.read_text(encoding="utf-8"))
    return not COLAB_REQUIREMENTS.is_file() or COLAB_REQUIREMENTS.read_text(encoding="utf-8") != expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the notebooks' shared cells and requirements-gpu.txt")
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
    elif colab_requirements_stale():
        stale += 1
        print(f"{COLAB_REQUIREMENTS.name}: differs from requirements.txt; run python -m grit_study.notebook_cells --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
