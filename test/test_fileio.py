"""apr_localizer.fileio: atomic writes leave the old file or the new one, never a temporary."""

from __future__ import annotations

import os

import pytest

from apr_localizer.fileio import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, clean_stale_tmp


def _tmps(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_and_leaves_no_tmp(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert _tmps(p.parent) == []


def test_failed_write_keeps_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert _tmps(tmp_path) == []


def test_atomic_dir_replaces_existing(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    (d / "old").write_text("x")
    with atomic_dir(d) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(os.listdir(d)) == ["new"]
    assert _tmps(tmp_path) == []


def test_clean_stale_tmp_removes_files_and_dirs_only(tmp_path):
    (tmp_path / ".m.safetensors.abc.tmp").write_bytes(b"x" * 10)
    (tmp_path / ".export.x1.tmp").mkdir()
    (tmp_path / "keep.tmp").write_text("not ours: no leading dot")
    (tmp_path / "model.safetensors").write_text("keep")
    removed = clean_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == [".export.x1.tmp", ".m.safetensors.abc.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["keep.tmp", "model.safetensors"]


def test_clean_stale_tmp_keeps_young_files(tmp_path):
    (tmp_path / ".a.b.tmp").write_text("x")
    assert clean_stale_tmp(tmp_path, older_than_s=3600) == []
    assert clean_stale_tmp(tmp_path / "missing") == []


def test_clean_stale_tmp_by_destination_name(tmp_path):
    (tmp_path / ".model.safetensors.k1.tmp").write_bytes(b"x")
    (tmp_path / ".model.safetensors.k2.tmp").mkdir()
    (tmp_path / ".other.safetensors.k3.tmp").write_bytes(b"y")
    (tmp_path / ".model[1].safetensors.k4.tmp").write_bytes(b"z")  # glob characters in a name are literal
    removed = clean_stale_tmp(tmp_path, name="model.safetensors")
    assert sorted(p.name for p in removed) == [".model.safetensors.k1.tmp", ".model.safetensors.k2.tmp"]
    assert [p.name for p in clean_stale_tmp(tmp_path, name="model[1].safetensors")] == [".model[1].safetensors.k4.tmp"]
    assert _tmps(tmp_path) == [".other.safetensors.k3.tmp"]


def test_atomic_path_temporaries_are_found_by_name(tmp_path):
    p = tmp_path / "m.bin"
    with atomic_path(p) as tmp:
        tmp.write_bytes(b"partial")
        assert [x.name for x in clean_stale_tmp(tmp_path, name="m.bin", older_than_s=3600)] == []
        assert tmp.name.startswith(".m.bin.") and tmp.name.endswith(".tmp")
    assert p.read_bytes() == b"partial" and _tmps(tmp_path) == []
