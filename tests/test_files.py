"""grit_study.files: the one atomic write every writer of the study goes through (atomic_path), and the
one reader of run summaries every reader goes through (read_summary)."""

from __future__ import annotations

import json

import pytest

from grit_study.files import SUMMARY_NAME, SummaryError, atomic_path, atomic_write_text, read_summary


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "run_summary.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_file_is_replaced_whole(tmp_path):
    target = atomic_write_text(tmp_path / "a.json", "old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_folder_replaces_an_existing_one_and_a_cache_keeps_the_first(tmp_path):
    target = tmp_path / "merged"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "w.safetensors").write_text("1")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "w2.safetensors").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["w2.safetensors"]
    with atomic_path(target, directory=True, replace=False) as tmp:  # another process built it first
        (tmp / "w3.safetensors").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["w2.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_summary_reads_back_as_written(tmp_path):
    summary = {"arm": "grit", "eval_loss": {"0": 2.5, "60": 1.25}, "note": "café"}
    atomic_write_text(tmp_path / SUMMARY_NAME, json.dumps(summary, indent=2))
    assert read_summary(tmp_path) == summary
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_summary(tmp_path / "unfinished")
    assert read_summary(tmp_path / "unfinished", missing_ok=True) is None


DAMAGED = [
    ("truncated", b'{"arm": "grit", "eval_loss": {"0": 2.5', "Expecting"),
    ("latin-1", '{"arm": "caf\u00e9"}'.encode("latin-1"), "utf-8"),
    ("not-an-object", b'[{"arm": "grit"}]', "holds a list"),
    ("empty", b"", "Expecting value"),
]


@pytest.mark.parametrize("case,data,message", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_a_damaged_summary_is_an_error_naming_the_file(tmp_path, case, data, message):
    (tmp_path / SUMMARY_NAME).write_bytes(data)
    with pytest.raises(SummaryError) as err:
        read_summary(tmp_path, missing_ok=True)  # missing_ok forgives a missing file, never a damaged one
    assert str(tmp_path / SUMMARY_NAME) in str(err.value) and message in str(err.value)


def test_every_reader_of_summaries_goes_through_read_summary(tmp_path):
    """compare, the sweep and tier 4 all stop at a damaged summary with the reader's error."""
    from grit_study import claims, compare, sweep

    run = sweep.PlannedRun(1, "control", 2e-4, 3407, 60, "val")
    path = sweep.run_dir(tmp_path, run) / SUMMARY_NAME
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{not json")
    calls = {
        "compare.load_runs": lambda: compare.load_runs(tmp_path, recursive=True),
        "sweep.finished_records": lambda: sweep.finished_records(tmp_path),
        "sweep.status": lambda: sweep.status(tmp_path, run, "tiny"),
        "claims.ranks_of": lambda: claims.ranks_of(tmp_path, run.name),
    }
    for name, call in calls.items():
        with pytest.raises(SummaryError, match="unreadable run summary") as err:
            call()
        assert str(path) in str(err.value), name
