"""Writing RecordIO datasets: from a folder of faces, and as subsets of another dataset."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from magface_al.data.faces import FaceRecordDataset, read_manifest
from magface_al.data.pack import pack_folder, write_subset


def _export_images(dataset: FaceRecordDataset, out: Path, rows: list[dict]) -> None:
    """Decode the images of ``rows`` into ``out/<source_file>`` as PNG (lossless)."""
    for row in rows:
        path = out / row["source_file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path.with_suffix(".png")), dataset.image(row["key"]))


def _ranges(rows: list[dict]) -> dict[int, tuple[int, int]]:
    keys = defaultdict(list)
    for row in rows:
        keys[row["label"]].append(row["key"])
    return {label: (min(values), max(values) + 1) for label, values in keys.items()}


@pytest.mark.parametrize("name, array_label", [("lfw", False), ("orl", True)])
def test_write_subset_all_keys_reproduces_mxnet_files(request, tmp_path, name, array_label):
    source = request.getfixturevalue(f"{name}_dir")
    dataset = FaceRecordDataset(source)
    write_subset(dataset, dataset.keys, tmp_path / name, array_label=array_label)
    for file_name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / name / file_name).read_bytes() == (source / file_name).read_bytes(), file_name


def test_write_subset_relabels_contiguously(orl_dir, tmp_path):
    dataset = FaceRecordDataset(orl_dir)
    chosen = [395, 31, 32, 399, 5, 33]  # identities 39, 3, 0, in no particular order
    rows = write_subset(dataset, chosen, tmp_path / "subset")
    subset = FaceRecordDataset(tmp_path / "subset")
    assert subset.keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert subset.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert [row["source_key"] for row in rows] == [5, 31, 32, 33, 395, 399]
    assert [row["source_label"] for row in rows] == [0, 3, 3, 3, 39, 39]
    assert [row["identity"] for row in rows] == ["s1", "s12", "s12", "s12", "s9", "s9"]
    for row in rows:
        assert subset.image_bytes(row["key"]) == dataset.image_bytes(row["source_key"])
    assert read_manifest(tmp_path / "subset" / "manifest.csv") == rows
    assert subset.property == (3, 112, 112)
    assert subset.label_kind == "scalar"


def test_write_subset_rejects_bad_keys(orl_dir, tmp_path):
    dataset = FaceRecordDataset(orl_dir)
    with pytest.raises(ValueError, match="repeat 1 times; pass each key once"):
        write_subset(dataset, [1, 2, 2], tmp_path / "out")
    with pytest.raises(ValueError, match="no keys given for a subset"):
        write_subset(dataset, [], tmp_path / "out")
    with pytest.raises(KeyError, match="key 420 is not an image record"):
        write_subset(dataset, [1, 420], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _check_pack_roundtrip(source: FaceRecordDataset, rows: list[dict], tmp_path: Path, **options) -> None:
    _export_images(source, tmp_path / "faces", rows)
    written = pack_folder(tmp_path / "faces", tmp_path / "packed", **options)
    packed = FaceRecordDataset(tmp_path / "packed")
    # Labels count from 0 in identity-name order, like the source, once relabelled to the chosen identities.
    relabel = {label: new for new, label in enumerate(sorted({row["label"] for row in rows}))}
    expected = [(row["identity"], relabel[row["label"]], Path(row["source_file"]).with_suffix(".png").as_posix()) for row in rows]
    assert [(row["identity"], row["label"], row["source_file"]) for row in written] == expected
    assert read_manifest(tmp_path / "packed" / "manifest.csv") == written
    assert packed.labels.tolist() == [label for _, label, _ in expected]
    assert packed.identity_key_ranges == _ranges(written)
    assert packed.property == (len(relabel), 112, 112)
    for row, source_row in zip(written, rows):
        image = packed.image(row["key"]).astype(np.int16)
        original = source.image(source_row["key"]).astype(np.int16)
        # JPEG at quality 95 of an already-JPEG image: close, not equal.
        assert np.abs(image - original).mean() < 2.5


def test_pack_folder_roundtrip_orl(orl_dir, tmp_path):
    source = FaceRecordDataset(orl_dir)
    rows = read_manifest(orl_dir / "manifest.csv")
    _check_pack_roundtrip(source, rows, tmp_path, array_label=True)
    assert FaceRecordDataset(tmp_path / "packed").label_kind == "array[2]"


def test_pack_folder_roundtrip_lfw_part(lfw_dir, tmp_path):
    source = FaceRecordDataset(lfw_dir)
    rows = [row for row in read_manifest(lfw_dir / "manifest.csv") if row["label"] < 300]
    _check_pack_roundtrip(source, rows, tmp_path)


@pytest.mark.slow
def test_pack_folder_roundtrip_lfw_full(lfw_dir, tmp_path):
    source = FaceRecordDataset(lfw_dir)
    _check_pack_roundtrip(source, read_manifest(lfw_dir / "manifest.csv"), tmp_path)


def test_pack_folder_jpeg_quality_changes_size(orl_dir, tmp_path):
    source = FaceRecordDataset(orl_dir)
    rows = read_manifest(orl_dir / "manifest.csv")[:20]
    _export_images(source, tmp_path / "faces", rows)
    pack_folder(tmp_path / "faces", tmp_path / "q95")
    pack_folder(tmp_path / "faces", tmp_path / "q50", jpeg_quality=50)
    assert (tmp_path / "q50" / "train.rec").stat().st_size < (tmp_path / "q95" / "train.rec").stat().st_size


def test_pack_folder_bad_quality_raises(tmp_path):
    with pytest.raises(ValueError, match="jpeg_quality is 0, expected an integer from 1 to 100"):
        pack_folder(tmp_path, tmp_path / "out", jpeg_quality=0)


def test_pack_folder_mixed_sizes_raise(tmp_path):
    (tmp_path / "faces" / "a").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "faces" / "a" / "1.png"), np.zeros((112, 112, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "faces" / "a" / "2.png"), np.zeros((100, 112, 3), np.uint8))
    with pytest.raises(ValueError, match=r"2.png is 112x100 pixels but .*1.png is 112x112; align all faces to one size"):
        pack_folder(tmp_path / "faces", tmp_path / "out")
    assert not (tmp_path / "out" / "train.rec").exists()


def test_pack_folder_unreadable_image_raises(tmp_path):
    (tmp_path / "faces" / "a").mkdir(parents=True)
    (tmp_path / "faces" / "a" / "1.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"1.jpg could not be read as an image; remove it or replace it"):
        pack_folder(tmp_path / "faces", tmp_path / "out")


def test_pack_folder_without_identities_raises(tmp_path):
    (tmp_path / "faces" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no sub-folder with images; expected one sub-folder per identity"):
        pack_folder(tmp_path / "faces", tmp_path / "out")
