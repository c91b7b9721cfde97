"""LFW pairs.txt resolution and the restricted loader for InsightFace verification .bin files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from magface_al.data.benchmarks import UnsafePickleError, load_bin, read_lfw_pairs
from magface_al.data.faces import FaceRecordDataset, read_manifest


@pytest.fixture(scope="module")
def lfw_pairs(lfw_dir):
    return read_lfw_pairs(lfw_dir / "pairs.txt", lfw_dir)


def test_read_lfw_pairs_counts_and_folds(lfw_pairs):
    assert len(lfw_pairs) == 6000
    for fold in range(10):
        block = [same for _, _, same in lfw_pairs[fold * 600 : (fold + 1) * 600]]
        assert block == [True] * 300 + [False] * 300


def test_read_lfw_pairs_keys_follow_manifest(lfw_dir, lfw_pairs):
    source_of = {row["key"]: row["source_file"] for row in read_manifest(lfw_dir / "manifest.csv")}
    lines = (lfw_dir / "pairs.txt").read_text().splitlines()[1:]
    for line, (first, second, same) in list(zip(lines, lfw_pairs))[::97]:
        fields = line.split()
        if same:
            expected = (f"{fields[0]}/{fields[0]}_{int(fields[1]):04d}.png", f"{fields[0]}/{fields[0]}_{int(fields[2]):04d}.png")
        else:
            expected = (f"{fields[0]}/{fields[0]}_{int(fields[1]):04d}.png", f"{fields[2]}/{fields[2]}_{int(fields[3]):04d}.png")
        assert (source_of[first], source_of[second]) == expected


def test_read_lfw_pairs_same_means_same_label(lfw_dir, lfw_pairs):
    dataset = FaceRecordDataset(lfw_dir)
    for first, second, same in lfw_pairs:
        assert (dataset.label_of(first) == dataset.label_of(second)) == same


def test_read_lfw_pairs_manifest_file_equals_folder(lfw_dir, lfw_pairs):
    assert read_lfw_pairs(lfw_dir / "pairs.txt", lfw_dir / "manifest.csv") == lfw_pairs


def _write_pairs(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_lfw_pairs_image_folder(tmp_path):
    for name, number in [("Ann", 1), ("Ann", 2), ("Bob_Lee", 3)]:
        (tmp_path / "faces" / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "faces" / name / f"{name}_{number:04d}.jpg"), np.zeros((8, 8, 3), np.uint8))
    pairs_txt = _write_pairs(tmp_path / "pairs.txt", ["1\t1", "Ann\t1\t2", "Ann\t2\tBob_Lee\t3"])
    pairs = read_lfw_pairs(pairs_txt, tmp_path / "faces")
    faces = tmp_path / "faces"
    assert pairs == [
        (faces / "Ann" / "Ann_0001.jpg", faces / "Ann" / "Ann_0002.jpg", True),
        (faces / "Ann" / "Ann_0002.jpg", faces / "Bob_Lee" / "Bob_Lee_0003.jpg", False),
    ]


def test_read_lfw_pairs_missing_image(lfw_dir, tmp_path, caplog):
    pairs_txt = _write_pairs(tmp_path / "pairs.txt", ["1\t1", "Abel_Pacheco\t1\t4", "Nobody_Here\t1\tAbel_Pacheco\t1"])
    with pytest.raises(ValueError, match=r"pairs.txt, line 3: image Nobody_Here/Nobody_Here_0001 is not in .*manifest.csv"):
        read_lfw_pairs(pairs_txt, lfw_dir)
    pairs = read_lfw_pairs(pairs_txt, lfw_dir, skip_missing=True)
    assert len(pairs) == 1
    assert "left out 1 pairs" in caplog.text


@pytest.mark.parametrize(
    "lines, message",
    [
        (["ten folds"], r"line 1 is 'ten folds'; expected 'folds pairs_per_fold'"),
        (["1\t1", "Ann\t1"], r"line 2 is 'Ann\\t1'; expected 'name n1 n2'"),
        (["1\t1", "Ann\tx\t2"], r"line 2 is 'Ann\\tx\\t2'"),
        (["2\t1", "Ann\t1\t2", "Ann\t1\tBob\t2"], r"declares 2 folds of 1 same and 1 different pairs \(4 lines\) but lists 2"),
    ],
)
def test_read_lfw_pairs_malformed(tmp_path, lfw_dir, lines, message):
    pairs_txt = _write_pairs(tmp_path / "pairs.txt", lines)
    with pytest.raises(ValueError, match=message):
        read_lfw_pairs(pairs_txt, lfw_dir)


def test_load_bin_real_fold_matches_pairs(lfw_dir, lfw_pairs):
    images, same = load_bin(lfw_dir / "lfw_fold1.bin")
    assert len(images) == 1200
    assert same.dtype == bool
    assert same.tolist() == [pair[2] for pair in lfw_pairs[:600]]
    dataset = FaceRecordDataset(lfw_dir)
    for index in range(0, 600, 37):
        first, second, _ = lfw_pairs[index]
        assert images[2 * index] == dataset.image_bytes(first)
        assert images[2 * index + 1] == dataset.image_bytes(second)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_bin_rejects_hostile_pickle(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"\xff\xd8", _RunsCommand(marker)], [True])))
    # os.system pickles under the name posix.system on Linux.
    with pytest.raises(UnsafePickleError, match=r"evil.bin tries to build posix.system; a verification .bin holds only"):
        load_bin(path)
    assert not marker.exists()


def test_load_bin_rejects_numpy_array(tmp_path):
    path = tmp_path / "array.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([True]))))
    with pytest.raises(UnsafePickleError, match=r"array.bin tries to build numpy"):
        load_bin(path)


def test_load_bin_protocol2_bytes(tmp_path):
    # Python 3 writes bytes in protocol 2 through _codecs.encode, which the loader allows for latin-1 only.
    path = tmp_path / "p2.bin"
    path.write_bytes(pickle.dumps(([b"\xff\xd8a", b"\x00b"], [False]), protocol=2))
    images, same = load_bin(path)
    assert images == [b"\xff\xd8a", b"\x00b"]
    assert same.tolist() == [False]


@pytest.mark.parametrize(
    "content, message",
    [
        ([b"a", b"b", b"c"], r"holds a list, expected a pair \(images, same-person flags\)"),
        (([b"a", "text"], [True]), "the first element must be a list of encoded image bytes"),
        (([b"a", b"b"], ["yes"]), "the second element must be a list of booleans"),
        (([b"a", b"b", b"c"], [True]), "holds 3 images for 1 pairs; expected exactly two images per pair"),
    ],
)
def test_load_bin_wrong_structure(tmp_path, content, message):
    path = tmp_path / "wrong.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_bin(path)


def test_load_bin_damaged_file(lfw_dir, tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes((lfw_dir / "lfw_fold1.bin").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut.bin is not a readable pickle .*; the file is damaged, copy it again"):
        load_bin(path)
