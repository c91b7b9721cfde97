"""RecordIO framing: reading the real MXNet-written files, writing, split records and damaged files."""

from __future__ import annotations

import multiprocessing
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from magface_al.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    build_index,
    pack_payload,
    parse_index,
    split_payload,
    unpack_payload,
)


def _plain_index(idx_path: Path) -> dict[int, int]:
    return {int(key): int(offset) for key, offset in (line.split() for line in idx_path.read_text().splitlines())}


def _plain_read(rec_path: Path, offset: int) -> bytes:
    """Read a whole (unsplit) record the simplest way, independent of the reader."""
    with rec_path.open("rb") as handle:
        handle.seek(offset)
        magic, lrec = struct.unpack("<II", handle.read(8))
        assert magic == MAGIC and lrec >> 29 == 0
        return handle.read(lrec & ((1 << 29) - 1))


def test_reader_lfw_keys_and_payloads(lfw_dir):
    index = _plain_index(lfw_dir / "train.idx")
    with RecordIOReader(lfw_dir / "train.rec", lfw_dir / "train.idx") as reader:
        assert reader.keys == sorted(index)
        assert len(reader) == 11983
        for key in (0, 1, 2, 7701, 7702, 11982):
            assert reader.read(key) == _plain_read(lfw_dir / "train.rec", index[key])


def test_reader_default_index_next_to_rec(orl_dir):
    reader = RecordIOReader(orl_dir / "train.rec")
    assert reader.idx_path == orl_dir / "train.idx"
    assert len(reader) == 441


def test_reader_scan_matches_random_access(orl_dir):
    index = _plain_index(orl_dir / "train.idx")
    key_at = {offset: key for key, offset in index.items()}
    reader = RecordIOReader(orl_dir / "train.rec")
    scanned = list(reader.scan())
    assert len(scanned) == len(index)
    for offset, payload in scanned:
        assert payload == reader.read(key_at[offset])


def test_reader_missing_key_raises(orl_dir):
    reader = RecordIOReader(orl_dir / "train.rec")
    with pytest.raises(KeyError, match="key 9999 is not in .*train.idx"):
        reader.read(9999)
    assert 9999 not in reader
    assert 440 in reader


def test_unpack_payload_header_record(lfw_dir):
    reader = RecordIOReader(lfw_dir / "train.rec")
    header, data = unpack_payload(reader.read(0))
    assert header.flag == 2
    assert header.label.tolist() == [7702.0, 11983.0]
    assert header.id == 0
    assert data == b""


def test_unpack_payload_array_label_image(orl_dir):
    reader = RecordIOReader(orl_dir / "train.rec")
    header, data = unpack_payload(reader.read(11))
    assert header.flag == 2
    assert header.label.dtype == np.float32
    assert header.label.tolist() == [1.0, 0.0]
    assert data[:2] == b"\xff\xd8"  # JPEG start-of-image marker


@pytest.mark.parametrize(
    "header",
    [IRHeader(0, 3.0, 7, 0), IRHeader(0, np.array([3.0, 0.0], dtype=np.float32), 7, 0), IRHeader(0, [1, 5, 9], 2, 1)],
)
def test_pack_payload_roundtrip(header):
    payload = pack_payload(header, b"image bytes")
    unpacked, data = unpack_payload(payload)
    assert data == b"image bytes"
    assert unpacked.id == header.id
    assert unpacked.id2 == header.id2
    assert np.array_equal(np.atleast_1d(unpacked.label), np.atleast_1d(np.asarray(header.label, dtype=np.float32)))
    expected_flag = np.size(header.label) if np.ndim(header.label) else 0
    assert unpacked.flag == expected_flag


def test_unpack_payload_short_raises():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte IRHeader"):
        unpack_payload(b"\x00" * 10)
    with pytest.raises(RecordIOError, match="too short for its label array of 3 float32 values"):
        unpack_payload(struct.pack("<IfQQ", 3, 0.0, 1, 0) + b"\x00" * 4)


@pytest.mark.parametrize(
    "payload",
    [
        MAGIC_BYTES + b"abcd",  # at the start
        b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + MAGIC_BYTES + b"xy",  # middle and consecutive
        b"abcdefgh" + MAGIC_BYTES,  # at the end
        MAGIC_BYTES,  # nothing but the magic number
    ],
)
def test_writer_splits_at_magic_and_reader_joins(tmp_path, payload):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as writer:
        writer.write(1, b"before")
        writer.write(2, payload)
        writer.write(3, b"after!")
    raw = rec.read_bytes()
    offset = _plain_index(idx)[2]
    first_flag = struct.unpack_from("<I", raw, offset + 4)[0] >> 29
    assert first_flag == 1  # cflag 1: the first part of a split record
    reader = RecordIOReader(rec, idx)
    assert reader.read(2) == payload
    assert reader.read(3) == b"after!"
    assert [data for _, data in reader.scan()] == [b"before", payload, b"after!"]


def test_split_payload_ignores_unaligned_magic():
    payload = b"ab" + MAGIC_BYTES + b"cd"
    assert split_payload(payload) == [payload]


def test_writer_rejects_repeated_key(tmp_path):
    with pytest.raises(ValueError, match="record key 1 was already written"):
        with RecordIOWriter(tmp_path / "t.rec", tmp_path / "t.idx") as writer:
            writer.write(1, b"x")
            writer.write(1, b"y")
    assert not (tmp_path / "t.rec").exists()
    assert not (tmp_path / "t.idx").exists()
    assert list(tmp_path.iterdir()) == []


def test_reader_pickle_roundtrip(orl_dir):
    reader = RecordIOReader(orl_dir / "train.rec")
    expected = reader.read(17)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(17) == expected


def _read_in_child(reader: RecordIOReader, key: int) -> bytes:
    return reader.read(key)


def test_reader_after_fork_reads_own_handle(orl_dir):
    reader = RecordIOReader(orl_dir / "train.rec")
    reader.read(5)  # the parent's handle exists and sits mid-file before the fork
    keys = [1, 100, 200, 300, 440]
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.starmap(_read_in_child, [(reader, key) for key in keys])
    assert results == [reader.read(key) for key in keys]


def test_build_index_reproduces_mxnet_index(orl_copy):
    expected = (orl_copy / "train.idx").read_text()
    (orl_copy / "train.idx").write_text("damaged\n")
    count = build_index(orl_copy / "train.rec", orl_copy / "train.idx")
    assert count == 441
    assert (orl_copy / "train.idx").read_text() == expected


def test_parse_index_order_and_values(orl_dir):
    keys, offsets = parse_index(orl_dir / "train.idx")
    assert keys[:3].tolist() == [1, 2, 3]
    assert keys[-1] == 0  # the header record comes last in files written by InsightFace tools
    assert offsets[0] == 0


# -- damaged files ---------------------------------------------------------------


def test_truncated_rec_raises_on_open(orl_copy):
    rec = orl_copy / "train.rec"
    rec.write_bytes(rec.read_bytes()[:100_000])
    with pytest.raises(RecordIOError, match=r"train.idx: key \d+ has byte offset \d+, past the end of .*train.rec "
                       r"\(100000 bytes\)\. The \.rec is truncated"):
        RecordIOReader(rec, orl_copy / "train.idx")


def test_truncated_rec_last_record_raises_on_read(orl_copy):
    rec = orl_copy / "train.rec"
    index = _plain_index(orl_copy / "train.idx")
    last_key = max(index, key=index.get)
    rec.write_bytes(rec.read_bytes()[: index[last_key] + 20])
    reader = RecordIOReader(rec, orl_copy / "train.idx", validate=False)
    message = (
        f"{re.escape(str(rec))}: record at byte offset {index[last_key]} \\(key {last_key}\\) is truncated: "
        r"it announces \d+ bytes but the file ends after 12\. The file is incomplete; copy it again"
    )
    with pytest.raises(RecordIOError, match=message) as caught:
        reader.read(last_key)
    assert caught.value.key == last_key


def test_wrong_magic_raises_naming_key(orl_copy):
    rec = orl_copy / "train.rec"
    offset = _plain_index(orl_copy / "train.idx")[123]
    raw = bytearray(rec.read_bytes())
    raw[offset : offset + 4] = b"\x00\x00\x00\x00"
    rec.write_bytes(bytes(raw))
    reader = RecordIOReader(rec, orl_copy / "train.idx", validate=False)
    message = (
        f"{re.escape(str(rec))}: no RecordIO record starts at byte offset {offset} \\(key 123\\): found 0x00000000 "
        r"instead of the magic number 0xced7230a\. The \.rec is damaged or the \.idx belongs to another \.rec file: "
        r"copy the dataset again, or rebuild the index with `magface-al rec index DATA`"
    )
    with pytest.raises(RecordIOError, match=message):
        reader.read(123)


def test_index_offset_past_end_raises_on_open(orl_copy):
    idx = orl_copy / "train.idx"
    lines = idx.read_text().splitlines()
    lines[6] = "7\t99999999"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"train.idx: key 7 has byte offset 99999999, past the end of "
                       r".*train.rec \(1990344 bytes\)") as caught:
        RecordIOReader(orl_copy / "train.rec", idx)
    assert caught.value.key == 7


def test_foreign_index_raises_on_open(lfw_dir, orl_dir):
    with pytest.raises(RecordIOError, match=r"lfw/train.rec: no RecordIO record starts at byte offset \d+ \(key \d+\)"
                       r".*the \.idx belongs to another \.rec file"):
        RecordIOReader(lfw_dir / "train.rec", orl_dir / "train.idx")


def test_malformed_index_line_raises(orl_copy):
    idx = orl_copy / "train.idx"
    lines = idx.read_text().splitlines()
    lines[3] = "4\tnot-a-number"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"train.idx: line 4 is '4\\tnot-a-number', expected 'key<TAB>byte_offset'"):
        parse_index(idx)


def test_repeated_index_key_raises(orl_copy):
    idx = orl_copy / "train.idx"
    idx.write_text(idx.read_text() + "5\t0\n")
    with pytest.raises(RecordIOError, match=r"train.idx: keys \[5\] appear more than once"):
        parse_index(idx)


def test_missing_files_raise(tmp_path, orl_dir):
    with pytest.raises(FileNotFoundError, match="RecordIO file .*nothing.rec not found"):
        RecordIOReader(tmp_path / "nothing.rec")
    with pytest.raises(FileNotFoundError, match="index file .*nothing.idx not found"):
        RecordIOReader(orl_dir / "train.rec", tmp_path / "nothing.idx")


def test_reader_sparse_keys(tmp_path):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as writer:
        writer.write(10_000_000, b"far")
        writer.write(5, b"near" + MAGIC_BYTES)
    reader = RecordIOReader(rec, idx)
    assert reader.keys == [5, 10_000_000]
    assert reader.read(10_000_000) == b"far"
    assert reader.read(5) == b"near" + MAGIC_BYTES
