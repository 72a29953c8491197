"""File names the study shares, and the one way it writes a file or folder atomically.

Kept free of heavy imports (no torch, no transformers), so the comparison can read logs anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

SUMMARY_NAME = "run_summary.json"      # one per run directory, written by grit_study.runs.RunRecorder
PREDICTIONS_NAME = "predictions.jsonl"  # every test prediction of a final run


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``target`` (a file, or a folder with ``directory=True``) to write
    into; when the block succeeds it is renamed onto ``target``, otherwise it is deleted.

    An interrupted write therefore never leaves a half-written ``target`` that a later run would take for a
    finished one. ``replace=False`` (caches built by several processes): if ``target`` appears meanwhile,
    the other process's copy is kept and ours dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not replace and target.exists():
            return
        if directory and target.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside, then delete it.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if replace or not target.exists():
                    raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
