"""The cells every notebook shares, written once here and copied into each notebook.

The Colab set-up cell has to stay inline in each notebook (it runs before the repository exists on the
Colab VM), and papermill needs a literal ``parameters`` cell; so both are generated from this module and
``tests/test_notebooks_cells.py`` checks that every notebook's copy matches.

    python -m grit_study.notebook_cells          # says which notebooks differ from the source
    python -m grit_study.notebook_cells --write  # rewrites their shared cells
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
COLAB_TAG = "colab-setup"
PARAMETERS_TAG = "parameters"

REPO_URL = "https://github.com/grit-study/grit-study"

COLAB_CELL = '''# Colab: install the project and its GPU requirements; anywhere else this cell does nothing.
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
           "-e", f"{{target}}[study]", "-r", os.path.join(target, "requirements-gpu.txt")]
    subprocess.run(cmd, check=True)
    os.chdir(target)
    print("Installed from", REPO_URL, "keeping", ", ".join(pins) or "nothing pinned")
    for n in ("grit-study", "torch", "xformers", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "datasets"):
        print(f"  {{n}}=={{installed(n)}}")
    changed = [n for n, v in loaded.items() if installed(n) != v]
    if changed:
        print("RESTART NEEDED: this kernel had already imported", ", ".join(changed), "which the install changed. "
              "Runtime > Restart session, then run the notebook again from the top (the install is kept).")
    else:
        print("No restart needed: nothing this kernel had imported was changed.")
    print("Runs are logged to", os.environ.get("GRIT_LOGDIR", "tensorboard_logs/ on this VM (lost with it)"))
else:
    print("Not in Colab: using the installed environment.")'''.format(repo_url=REPO_URL)

# name -> the comment line above it in every parameters cell. None always means: the GRIT_<NAME>
# environment variable if set, else the preset's (or the notebook's) default.
PARAMETERS = {
    "ARM": 'ARM: an arm of the registry (grit_study.registry.ARMS), e.g. "grit", "control", "grit_sgd", "riemannian"',
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
    "01_baseline_qlora_unsloth": {"ARM": '"baseline"', **{n: "None" for n in (
        "PRESET", "DATA", "MAX_STEPS", "LEARNING_RATE", "SEED", "EVAL_STEPS", "LOGDIR", "OUTPUT_DIR", "EXPORT",
        "SAVE_STEPS", "RESUME_FROM_CHECKPOINT")}},
    "02_pure_grit": {"ARM": '"grit"', **{n: "None" for n in (
        "PRESET", "DATA", "MAX_STEPS", "LEARNING_RATE", "SEED", "EVAL_STEPS", "LOGDIR", "OUTPUT_DIR", "EXPORT",
        "SAVE_STEPS", "RESUME_FROM_CHECKPOINT")}},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the notebooks' shared cells")
    args = parser.parse_args(argv)
    stale = 0
    for name in NOTEBOOK_PARAMETERS:
        path = NOTEBOOKS / f"{name}.ipynb"
        if args.write:
            print(f"{path.name}: {'rewritten' if write(path) else 'up to date'}")
        elif diff := differences(path):
            stale += 1
            print(f"{path.name}: differs in {diff}; run python -m grit_study.notebook_cells --write")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
