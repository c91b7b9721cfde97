"""FaceRecordDataset against the real LFW and ORL files and their manifests, plus other layouts."""

from __future__ import annotations

import pickle
import struct
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from magface_al.data.faces import (
    FaceRecordDataset,
    UndecodableImageError,
    check_dataset,
    read_manifest,
    write_manifest,
)
from magface_al.data.recordio import IRHeader, RecordIOError, RecordIOWriter, pack_payload


def _plain_offsets(idx_path: Path) -> dict[int, int]:
    return {int(key): int(offset) for key, offset in (line.split() for line in idx_path.read_text().splitlines())}


def _plain_image_bytes(folder: Path, key: int) -> bytes:
    """Image bytes of an unsplit record, read without our reader."""
    with (folder / "train.rec").open("rb") as handle:
        handle.seek(_plain_offsets(folder / "train.idx")[key])
        _, lrec = struct.unpack("<II", handle.read(8))
        payload = handle.read(lrec & ((1 << 29) - 1))
    flag = struct.unpack_from("<I", payload)[0]
    return payload[24 + 4 * flag :]


def _corrupt_image(folder: Path, key: int) -> None:
    """Overwrite the JPEG bytes of record ``key`` (not its framing) with zeros."""
    offset = _plain_offsets(folder / "train.idx")[key]
    raw = bytearray((folder / "train.rec").read_bytes())
    _, lrec = struct.unpack_from("<II", raw, offset)
    start = offset + 8 + 24 + 8  # frame, IRHeader, ORL's two-value label array
    raw[start : offset + 8 + (lrec & ((1 << 29) - 1))] = bytes(offset + 8 + (lrec & ((1 << 29) - 1)) - start)
    (folder / "train.rec").write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def lfw(lfw_dir):
    return FaceRecordDataset(lfw_dir)


@pytest.fixture(scope="module")
def orl(orl_dir):
    return FaceRecordDataset(orl_dir)


@pytest.mark.parametrize("name, images, identities", [("lfw", 7701, 4281), ("orl", 400, 40)])
def test_dataset_matches_manifest(request, name, images, identities):
    dataset = request.getfixturevalue(name)
    manifest = read_manifest(dataset.folder / "manifest.csv")
    assert len(dataset) == images == len(manifest)
    assert len(dataset.identities) == identities == len({row["label"] for row in manifest})
    assert dataset.keys.tolist() == [row["key"] for row in manifest]
    assert dataset.labels.tolist() == [row["label"] for row in manifest]
    for row in manifest[:: max(1, len(manifest) // 300)]:
        assert dataset.label_of(row["key"]) == row["label"]


@pytest.mark.parametrize("name", ["lfw", "orl"])
def test_dataset_identity_ranges_match_manifest(request, name):
    dataset = request.getfixturevalue(name)
    expected = defaultdict(list)
    for row in read_manifest(dataset.folder / "manifest.csv"):
        expected[row["label"]].append(row["key"])
    for identity, keys in expected.items():
        assert dataset.keys_of(identity).tolist() == keys
        assert dataset.identity_key_ranges[identity] == (min(keys), max(keys) + 1)


@pytest.mark.parametrize("name, label_kind", [("lfw", "scalar"), ("orl", "array[2]")])
def test_dataset_record_labels_match_manifest(request, name, label_kind):
    dataset = request.getfixturevalue(name)
    assert dataset.label_kind == label_kind
    for row in read_manifest(dataset.folder / "manifest.csv"):
        header, _ = dataset.record(row["key"])
        own_label = header.label[0] if header.flag > 0 else header.label
        assert own_label == row["label"]


@pytest.mark.parametrize("name, step", [("lfw", 25), ("orl", 1)])
def test_dataset_pixels_equal_imdecode(request, name, step):
    dataset = request.getfixturevalue(name)
    for position in range(0, len(dataset), step):
        image, label, key = dataset[position]
        expected = cv2.imdecode(np.frombuffer(_plain_image_bytes(dataset.folder, key), np.uint8), cv2.IMREAD_COLOR)
        assert image.dtype == np.uint8
        assert image.shape == (112, 112, 3)
        assert np.array_equal(image, expected)
        assert label == dataset.labels[position]


def test_dataset_describe_lfw(lfw):
    summary = lfw.describe()
    assert summary["images"] == 7701
    assert summary["identities"] == 4281
    assert summary["keys"] == 11983
    assert summary["header"] == {"key": 0, "first_identity_key": 7702, "end_key": 11983}
    assert summary["property"] == [4281, 112, 112]


def test_dataset_unknown_identity_and_key_raise(orl):
    with pytest.raises(KeyError, match="identity 40 has no images in"):
        orl.keys_of(40)
    with pytest.raises(KeyError, match="key 401 is not an image record of"):
        orl.label_of(401)  # an identity record, not an image


def test_dataset_pickle_reopens(orl):
    clone = pickle.loads(pickle.dumps(orl))
    assert np.array_equal(clone.keys, orl.keys)
    assert np.array_equal(clone.image(33), orl.image(33))


def test_dataset_dataloader_workers(orl):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Subset

    subset = Subset(orl, list(range(0, 400, 10)))
    loader = DataLoader(subset, batch_size=8, num_workers=2, multiprocessing_context="fork")
    seen = []
    for images, labels, keys in loader:
        assert images.shape[1:] == (112, 112, 3)
        for image, key in zip(images, keys.tolist()):
            assert torch.equal(image, torch.from_numpy(orl.image(key)))
        seen.extend(keys.tolist())
    assert seen == orl.keys[::10].tolist()


def _write_records(folder: Path, records: list[tuple[int, IRHeader, bytes]]) -> None:
    folder.mkdir()
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
        for key, header, data in records:
            writer.write(key, pack_payload(header, data))


def test_dataset_without_header_record(orl, tmp_path):
    # Every key is an image; key 0 too, with an array label as some datasets use.
    source_keys = [1, 2, 11, 12, 13, 399]
    records = []
    for key, source in enumerate(source_keys):
        label = orl.label_of(source)
        records.append((key, IRHeader(0, np.array([label, 0.0], np.float32), key, 0), orl.image_bytes(source)))
    _write_records(tmp_path / "plain", records)
    dataset = FaceRecordDataset(tmp_path / "plain")
    assert dataset.header is None
    assert dataset.keys.tolist() == [0, 1, 2, 3, 4, 5]
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1, 39]
    assert dataset.identities.tolist() == [0, 1, 39]
    assert dataset.keys_of(1).tolist() == [2, 3, 4]
    assert np.array_equal(dataset.image(5), orl.image(399))


def test_dataset_header_without_identity_records(orl, tmp_path):
    records = [(key, IRHeader(0, float(key % 2), key, 0), orl.image_bytes(key)) for key in range(1, 5)]
    records.append((0, IRHeader(0, np.array([5, 5], np.float32), 0, 1), b""))
    _write_records(tmp_path / "flat", records)
    dataset = FaceRecordDataset(tmp_path / "flat")
    assert dataset.header == (5, 5)
    assert dataset.labels.tolist() == [1, 0, 1, 0]
    assert dataset.keys_of(0).tolist() == [2, 4]


def test_dataset_overlapping_identity_ranges_raise(orl, tmp_path):
    records = [(key, IRHeader(0, 0.0, key, 0), orl.image_bytes(key)) for key in range(1, 4)]
    records.append((4, IRHeader(0, np.array([1, 3], np.float32), 4, 0), b""))
    records.append((5, IRHeader(0, np.array([2, 4], np.float32), 5, 0), b""))
    records.append((0, IRHeader(0, np.array([4, 6], np.float32), 0, 1), b""))
    _write_records(tmp_path / "overlap", records)
    with pytest.raises(RecordIOError, match=r"identity record 5 claims image keys \[2, 4\) that overlap identity 0"):
        FaceRecordDataset(tmp_path / "overlap")


def test_dataset_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.rec not found; a dataset folder holds train.rec, train.idx"):
        FaceRecordDataset(tmp_path)


def test_undecodable_image_raises_naming_key(orl_copy):
    _corrupt_image(orl_copy, 57)
    dataset = FaceRecordDataset(orl_copy)
    message = (
        r"train.rec: the image bytes of key 57 \(\d+ bytes, starting 00000000\) do not decode as an image\. "
        r"The record is damaged: copy the dataset again, or pass skip_undecodable=True"
    )
    with pytest.raises(UndecodableImageError, match=message):
        dataset.image(57)


def test_load_images_skips_undecodable(orl_copy, caplog):
    _corrupt_image(orl_copy, 57)
    _corrupt_image(orl_copy, 58)
    dataset = FaceRecordDataset(orl_copy)
    with pytest.raises(UndecodableImageError):
        dataset.load_images(range(50, 60))
    images, kept, skipped = dataset.load_images(range(50, 60), skip_undecodable=True)
    assert kept.tolist() == [50, 51, 52, 53, 54, 55, 56, 59]
    assert len(images) == 8
    assert [record.key for record in skipped] == [57, 58]
    assert "skipped 2 undecodable images" in caplog.text
    assert "[57, 58]" in caplog.text


def test_check_dataset_lists_damaged_keys(orl_copy):
    _corrupt_image(orl_copy, 57)
    offset = _plain_offsets(orl_copy / "train.idx")[200]
    raw = bytearray((orl_copy / "train.rec").read_bytes())
    raw[offset] ^= 0xFF  # break the magic number of key 200
    (orl_copy / "train.rec").write_bytes(bytes(raw))
    report = check_dataset(orl_copy)
    assert not report.sound
    assert report.checked == 400
    assert report.damaged_keys == [57, 200]
    assert "do not decode as an image" in report.damaged[0].reason
    assert "no RecordIO record starts at byte offset" in report.damaged[1].reason


def test_check_dataset_sound(orl_dir):
    report = check_dataset(orl_dir)
    assert report.sound
    assert report.checked == 400
    assert report.to_dict()["damaged"] == []


def test_check_dataset_damaged_header(orl_copy):
    offset = _plain_offsets(orl_copy / "train.idx")[0]
    raw = bytearray((orl_copy / "train.rec").read_bytes())
    raw[offset + 8 + 24 : offset + 8 + 32] = struct.pack("<2f", 500.0, 20.0)  # end key before the first
    (orl_copy / "train.rec").write_bytes(bytes(raw))
    report = check_dataset(orl_copy)
    assert report.damaged_keys == [0]
    assert "the header record (key 0) has label [500.0, 20.0]" in report.damaged[0].reason


def test_manifest_roundtrip_keeps_extra_columns(tmp_path):
    rows = [
        {"key": 1, "identity": "a b", "label": 0, "source_file": "a b/1.png", "source_key": 10, "source_label": 3},
        {"key": 2, "identity": "c,d", "label": 1, "source_file": "c,d/2.png", "source_key": 12, "source_label": 5},
    ]
    write_manifest(tmp_path / "manifest.csv", rows)
    assert read_manifest(tmp_path / "manifest.csv") == rows
    assert (tmp_path / "manifest.csv").read_bytes().startswith(b"key,identity,label,source_file,source_key")


def test_read_manifest_missing_column_raises(tmp_path):
    (tmp_path / "m.csv").write_text("key,label\n1,0\n")
    with pytest.raises(ValueError, match=r"m.csv lacks the columns \['identity', 'source_file'\]"):
        read_manifest(tmp_path / "m.csv")
