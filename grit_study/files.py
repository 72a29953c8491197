"""File names the study shares, the one way it writes a file or folder atomically, and the one way it
reads a run summary back.

Kept free of heavy imports (no torch, no transformers), so the comparison can read logs anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

SUMMARY_NAME = "run_summary.json"      # one per run directory, written by grit_study.runs.RunRecorder
PREDICTIONS_NAME = "predictions.jsonl"  # every test prediction of a final run
PER_PROMPT_NAME = "per_prompt.jsonl"    # per final-evaluation prompt: {"id", "family", "nll_sum", "tokens"}


class SummaryError(ValueError):
    """A run summary that exists but cannot be read as a JSON object."""


def read_summary(run_dir: str | os.PathLike, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """The ``run_summary.json`` of ``run_dir``, parsed: the one reader every part of the study uses.

    A missing summary raises ``FileNotFoundError``, or gives None with ``missing_ok`` (a run not finished
    yet). A summary that cannot be read, is not UTF-8 JSON, or is not a JSON object raises ``SummaryError``
    naming the file: a damaged summary must stop a comparison, not drop out of it.
    """
    path = Path(run_dir) / SUMMARY_NAME
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path} does not exist: the run did not finish")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise SummaryError(f"{path}: unreadable run summary ({e}); restore it (it is committed for the study's "
                           "runs) or delete its run directory and run it again") from None
    if not isinstance(summary, dict):
        raise SummaryError(f"{path}: a run summary is a JSON object, this one holds a {type(summary).__name__}; "
                           "restore it or delete its run directory and run it again")
    return summary


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
