"""grit_study.files.atomic_path: the one atomic write every writer of the study goes through."""

from __future__ import annotations

import pytest

from grit_study.files import atomic_path, atomic_write_text


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
