"""Atomic writes and strict JSON."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from magface_al.utils import atomic_path, to_strict_json, write_json_atomic


def test_atomic_file_replaced_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory_swaps_whole_folder(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "fresh.txt").write_text("fresh")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_atomic_directory_failure_keeps_old(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises(ValueError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise ValueError("bad input")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_strict_json_replaces_nan_and_numpy():
    data = {"a": np.float32(0.5), "b": float("nan"), "c": np.array([1.0, math.inf]), "d": np.int64(3)}
    assert to_strict_json(data) == {"a": 0.5, "b": None, "c": [1.0, None], "d": 3}


def test_write_json_atomic_is_strict(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"auc": float("nan"), "auc_reason": "one class only"})
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"auc": None, "auc_reason": "one class only"}


def test_atomic_outputs_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
        with atomic_path(tmp_path / "folder", is_dir=True) as tmp:
            (tmp / "inner.txt").write_text("y")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "file.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
