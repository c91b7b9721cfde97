"""InsightFace / MXNet RecordIO framing, read and written without MXNet.

A ``.rec`` file is a sequence of records. Each starts with the uint32 magic
number 0xced7230a and a uint32 ``lrec`` whose upper 3 bits are the part flag
(``cflag``) and lower 29 bits the part length in bytes; the payload follows,
zero-padded to a multiple of 4 bytes. A writer splits a payload wherever the
magic number occurs at a 4-byte aligned position inside it, so that a reader
scanning for the magic number never mistakes payload bytes for a record
start: the parts carry cflag 1 (first), 2 (middle) and 3 (last), and the
reader puts the magic number back between them. A whole record has cflag 0.

The ``.idx`` file is text, one ``key<TAB>byte_offset`` line per record, and
gives random access by key. A payload starts with an ``IRHeader``
(struct ``<IfQQ``: flag, label, id, id2); when ``flag > 0`` a float32 label
array of ``flag`` values follows the header and the scalar label field is 0.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from magface_al.utils import atomic_path

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrec
_IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_MASK = (1 << 29) - 1
_MAX_PART = _LENGTH_MASK  # a part length must fit in 29 bits
_HAS_PREAD = hasattr(os, "pread")  # POSIX; elsewhere every read takes the seek/read path
# Largest span read in one pread() on the fast path. A longer record, or a gap in a
# sparse index, falls back to the checked path, which reads exactly the record's length.
_MAX_PREAD = 1 << 20

# cflag values of the parts of a record split at occurrences of the magic number
CFLAG_WHOLE, CFLAG_START, CFLAG_MIDDLE, CFLAG_END = 0, 1, 2, 3

# Records checked for the magic number when a reader opens with validation:
# enough to catch an index built for another file, cheap even for millions of keys.
_SPOT_CHECKS = 64

# Incremented in every child process right after fork, so a reader can tell that
# its handle was inherited without a getpid() system call on each read.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_REINDEX_HINT = "rebuild the index with `magface-al rec index DATA` if only the .idx is wrong"


class RecordIOError(ValueError):
    """A ``.rec`` or ``.idx`` file that is damaged or does not match its partner.

    ``key`` is the record key concerned, when there is one.
    """

    def __init__(self, message: str, *, key: int | None = None) -> None:
        super().__init__(message)
        self.key = key


class IRHeader(NamedTuple):
    """The header at the start of every InsightFace record payload.

    ``label`` is a float, or a float32 array when ``flag > 0`` (then ``flag``
    is the array's length). ``id`` is the record's key in InsightFace datasets.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def unpack_payload(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its ``IRHeader`` and the data after it.

    Raises:
        RecordIOError: the payload is shorter than its header requires.
    """
    if len(payload) < _IRHEADER.size:
        raise RecordIOError(
            f"record payload of {len(payload)} bytes is shorter than the {_IRHEADER.size}-byte IRHeader"
        )
    flag, label, record_id, id2 = _IRHEADER.unpack_from(payload)
    start = _IRHEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise RecordIOError(
                f"record payload of {len(payload)} bytes is too short for its label array of {flag} float32 values"
            )
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=start).astype(np.float32)
        start = end
    return IRHeader(flag, label, record_id, id2), payload[start:]


def pack_payload(header: IRHeader, data: bytes = b"") -> bytes:
    """Build a record payload from an ``IRHeader`` and the data that follows it.

    An array label (anything with more than zero dimensions) is written after
    the header with ``flag`` set to its length, as InsightFace does; the
    ``flag`` passed in is then ignored.
    """
    label = header.label
    if np.ndim(label) > 0:
        values = np.asarray(label, dtype="<f4").ravel()
        head = _IRHEADER.pack(values.size, 0.0, header.id, header.id2)
        return head + values.tobytes() + bytes(data)
    return _IRHEADER.pack(0, float(label), header.id, header.id2) + bytes(data)


def _padding(length: int) -> int:
    return -length % 4


def parse_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file into (keys, byte offsets), both int64, in file order.

    Raises:
        RecordIOError: a line is not two non-negative integers, or a key repeats.
    """
    path = Path(idx_path)
    raw = path.read_bytes()
    tokens = raw.split()
    line_count = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    values = None
    if len(tokens) == 2 * line_count:
        try:
            values = np.array(tokens, dtype=np.int64).reshape(-1, 2)
        except (ValueError, OverflowError):
            values = None
    if values is None or (values < 0).any():
        # The slow path runs only on a malformed index, to name the bad line.
        values = _parse_index_lines(path, raw)
    keys, offsets = values[:, 0].copy(), values[:, 1].copy()
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1][:5].tolist()
        raise RecordIOError(
            f"{path}: keys {repeated} appear more than once; the index is damaged, "
            f"copy the dataset again or {_REINDEX_HINT}"
        )
    return keys, offsets


def _parse_index_lines(path: Path, raw: bytes) -> np.ndarray:
    """Parse an index line by line, skipping blank lines and raising on the first malformed one."""
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(field.isdigit() for field in fields):
            shown = line[:80].decode("utf-8", "replace")
            raise RecordIOError(
                f"{path}: line {number} is {shown!r}, expected 'key<TAB>byte_offset' with two "
                f"non-negative integers; copy the dataset again or {_REINDEX_HINT}"
            )
        rows.append((int(fields[0]), int(fields[1])))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class RecordIOReader:
    """Random access by key (through the ``.idx``) and sequential scans of a ``.rec``.

    The file handle is opened lazily and reopened in a child process after fork,
    so one reader can be shared with forked DataLoader workers or pickled to
    spawned ones: each process reads through its own handle.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` file; by default the ``.rec`` path with suffix
            ``.idx`` when that exists. Without an index only ``scan`` works.
        validate: check at open that no offset lies past the end of the file
            and that a sample of records starts with the magic number, so a
            truncated ``.rec`` or a foreign ``.idx`` fails early. ``rec check``
            turns this off to report every damaged key instead.
        use_index: False ignores any ``.idx`` (for a scan that rebuilds one).
    """

    def __init__(
        self,
        rec_path: str | os.PathLike,
        idx_path: str | os.PathLike | None = None,
        *,
        validate: bool = True,
        use_index: bool = True,
    ) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file {self.rec_path} not found; pass the path of an existing .rec file")
        if not use_index:
            self.idx_path = None
        elif idx_path is None:
            default_idx = self.rec_path.with_suffix(".idx")
            self.idx_path = default_idx if default_idx.is_file() else None
        else:
            self.idx_path = Path(idx_path)
            if not self.idx_path.is_file():
                raise FileNotFoundError(
                    f"index file {self.idx_path} not found; pass the .idx written with {self.rec_path}, "
                    f"or build one with `magface-al rec index DATA`"
                )
        self.size = self.rec_path.stat().st_size
        self._handle: io.BufferedReader | None = None
        self._fd = -1
        self._generation: int | None = None
        if self.idx_path is None:
            self._index_keys = np.zeros(0, dtype=np.int64)
            self._index_offsets = np.zeros(0, dtype=np.int64)
        else:
            self._index_keys, self._index_offsets = parse_index(self.idx_path)
        self._build_lookup()
        if validate:
            self.validate_offsets()
            self._spot_check()

    # -- index -------------------------------------------------------------

    def _build_lookup(self) -> None:
        keys = self._index_keys
        order = np.argsort(keys, kind="stable")
        self.keys: list[int] = keys[order].tolist()
        # Dense keys (the usual 0..N-1) get a list indexed by key: the fastest lookup in CPython.
        self._dense: list[int] | None = None
        self._sparse: dict[int, int] | None = None
        self._dense_span: list[int] | None = None
        if keys.size and keys.min() >= 0 and keys.max() < 2 * keys.size + 1024:
            dense = np.full(int(keys.max()) + 1, -1, dtype=np.int64)
            dense[keys] = self._index_offsets
            self._dense = dense.tolist()
            # Bytes from each record's offset to the next indexed offset (or the end of the
            # file): a whole record and its padding, read with one pread() call.
            by_offset = np.argsort(self._index_offsets, kind="stable")
            sorted_offsets = self._index_offsets[by_offset]
            spans = np.zeros_like(dense)
            spans[keys[by_offset]] = np.append(sorted_offsets[1:], self.size) - sorted_offsets
            self._dense_span = np.clip(spans, 0, _MAX_PREAD).tolist()
        else:
            self._sparse = dict(zip(keys.tolist(), self._index_offsets.tolist()))

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        try:
            self.offset(int(key))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def offset(self, key: int) -> int:
        """Return the byte offset of ``key`` from the index.

        Raises:
            KeyError: the key is not in the index.
        """
        if self._dense is not None:
            if 0 <= key < len(self._dense):
                found = self._dense[key]
                if found >= 0:
                    return found
        elif self._sparse is not None and key in self._sparse:
            return self._sparse[key]
        where = self.idx_path if self.idx_path is not None else f"{self.rec_path} (no .idx file)"
        raise KeyError(f"key {key} is not in {where}")

    def validate_offsets(self) -> None:
        """Raise ``RecordIOError`` naming the first key whose offset lies past the end of the ``.rec``."""
        beyond = np.flatnonzero(self._index_offsets + _FRAME.size > self.size)
        if beyond.size:
            key = int(self._index_keys[beyond[0]])
            offset = int(self._index_offsets[beyond[0]])
            raise RecordIOError(self._past_end_message(key, offset), key=key)

    def _past_end_message(self, key: int, offset: int) -> str:
        return (
            f"{self.idx_path}: key {key} has byte offset {offset}, past the end of {self.rec_path} "
            f"({self.size} bytes). The .rec is truncated or the .idx belongs to another file: "
            f"copy the dataset again, or {_REINDEX_HINT}"
        )

    def _spot_check(self) -> None:
        count = len(self._index_offsets)
        if not count:
            return
        positions = np.unique(np.linspace(0, count - 1, num=min(count, _SPOT_CHECKS)).astype(np.int64))
        handle = self._file()
        for position in positions.tolist():
            key, offset = int(self._index_keys[position]), int(self._index_offsets[position])
            handle.seek(offset)
            self._read_frame(handle, key, offset)

    # -- reading -----------------------------------------------------------

    def _file(self) -> io.BufferedReader:
        if self._handle is None or self._generation != _fork_generation:
            # After fork the inherited handle shares its file position with the
            # parent, so each process opens its own and leaves the parent's alone.
            self._handle = open(self.rec_path, "rb")  # noqa: SIM115 - closed in close()
            self._fd = self._handle.fileno()
            self._generation = _fork_generation
        return self._handle

    def _read_frame(self, handle: io.BufferedReader, key: int | None, offset: int) -> tuple[int, int]:
        """Read one part header at the current position; return (cflag, length)."""
        head = handle.read(_FRAME.size)
        where = f"byte offset {offset} (key {key})" if key is not None else f"byte offset {offset}"
        if len(head) < _FRAME.size:
            if key is not None and offset >= self.size:
                raise RecordIOError(self._past_end_message(key, offset))
            raise RecordIOError(
                f"{self.rec_path}: record at {where} is truncated: the file ends inside its "
                f"8-byte header ({self.size} bytes in all). The file is incomplete; copy it again"
            )
        magic, lrec = _FRAME.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{self.rec_path}: no RecordIO record starts at {where}: found 0x{magic:08x} instead of "
                f"the magic number 0x{MAGIC:08x}. The .rec is damaged or the .idx belongs to another "
                f".rec file: copy the dataset again, or {_REINDEX_HINT}"
            )
        return lrec >> 29, lrec & _LENGTH_MASK

    def _read_part(self, handle: io.BufferedReader, key: int | None, offset: int, length: int) -> bytes:
        data = handle.read(length)
        if len(data) < length:
            where = f"byte offset {offset} (key {key})" if key is not None else f"byte offset {offset}"
            raise RecordIOError(
                f"{self.rec_path}: record at {where} is truncated: it announces {length} bytes but the "
                f"file ends after {len(data)}. The file is incomplete; copy it again"
            )
        return data

    def _read_record(self, handle: io.BufferedReader, key: int | None, offset: int) -> bytes:
        """Read the logical record at the current position (``offset``), joining split parts."""
        cflag, length = self._read_frame(handle, key, offset)
        data = self._read_part(handle, key, offset, length)
        if cflag == CFLAG_WHOLE:
            handle.seek(_padding(length), io.SEEK_CUR)
            return data
        if cflag != CFLAG_START:
            raise RecordIOError(
                f"{self.rec_path}: the record at byte offset {offset} (key {key}) starts with part flag "
                f"{cflag}, expected 0 or 1. The .rec is damaged or the .idx points into the middle of a "
                f"record: copy the dataset again, or {_REINDEX_HINT}"
            )
        parts = [data]
        while cflag != CFLAG_END:
            handle.seek(_padding(length), io.SEEK_CUR)
            part_offset = handle.tell()
            cflag, length = self._read_frame(handle, key, part_offset)
            if cflag not in (CFLAG_MIDDLE, CFLAG_END):
                raise RecordIOError(
                    f"{self.rec_path}: the record at byte offset {offset} (key {key}) continues at byte "
                    f"offset {part_offset} with part flag {cflag}, expected 2 or 3. The .rec is damaged; "
                    f"copy it again"
                )
            parts.append(self._read_part(handle, key, part_offset, length))
        handle.seek(_padding(length), io.SEEK_CUR)
        return MAGIC_BYTES.join(parts)

    def read(self, key: int) -> bytes:
        """Return the payload of record ``key`` (split parts joined).

        Raises:
            KeyError: the key is not in the index.
            RecordIOError: the record is truncated or no record starts at its offset.
        """
        dense = self._dense
        offset = dense[key] if dense is not None and 0 <= key < len(dense) else -1
        if offset < 0:
            offset = self.offset(key)
        handle = self._handle
        if handle is None or self._generation != _fork_generation:
            handle = self._file()
        if _HAS_PREAD and dense is not None:
            # Fast path: one pread() of the record's span, no seek; position-free, so
            # it does not disturb the buffered handle.
            chunk = os.pread(self._fd, self._dense_span[key], offset)
            if len(chunk) >= _FRAME.size:
                magic, lrec = _FRAME.unpack_from(chunk)
                end = _FRAME.size + (lrec & _LENGTH_MASK)
                if magic == MAGIC and lrec >> 29 == CFLAG_WHOLE and end <= len(chunk):
                    return chunk[_FRAME.size : end]
        # Split records, sparse keys and every error take the checked path.
        handle.seek(offset)
        try:
            return self._read_record(handle, key, offset)
        except RecordIOError as error:
            error.key = key
            raise

    def scan(self, *, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield (byte offset, payload) for every record in file order, without the index.

        Uses its own handle with a large buffer, so it may run while ``read``
        is used on the same reader.
        """
        with open(self.rec_path, "rb", buffering=1 << 20) as handle:
            handle.seek(start)
            offset = start
            while offset < self.size:
                payload = self._read_record(handle, None, offset)
                yield offset, payload
                offset = handle.tell()

    def close(self) -> None:
        """Close this process's file handle; a later read reopens it."""
        if self._handle is not None and self._generation == _fork_generation:
            self._handle.close()
        self._handle = None
        self._generation = None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_generation"] = None
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down io already
            pass


def split_payload(payload: bytes) -> list[bytes]:
    """Split a payload at every 4-byte aligned occurrence of the magic number.

    Only aligned occurrences matter: records start at multiples of 4, so a
    scanning reader can only resynchronise on an aligned magic number.
    """
    aligned = len(payload) - len(payload) % 4
    words = np.frombuffer(payload, dtype="<u4", count=aligned // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    if not cuts:
        return [payload]
    parts = []
    start = 0
    for cut in cuts:
        parts.append(payload[start:cut])
        start = cut + 4
    parts.append(payload[start:])
    return parts


class RecordIOWriter:
    """Write a ``.rec`` and its ``.idx`` in the layout MXNet's ``MXIndexedRecordIO`` reads.

    Both files are written to temporary paths and renamed into place when the
    writer closes without an exception, so an interrupted run leaves no
    half-written dataset.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        # Both temporary files are renamed into place by the stack on commit,
        # and removed by it when the writer is discarded.
        self._stack = contextlib.ExitStack()
        with self._stack as stack:
            rec_tmp = stack.enter_context(atomic_path(self.rec_path))
            idx_tmp = stack.enter_context(atomic_path(self.idx_path))
            self._rec = stack.enter_context(open(rec_tmp, "wb"))
            self._idx = stack.enter_context(open(idx_tmp, "w", encoding="ascii", newline="\n"))
            self._stack = stack.pop_all()
        self._keys: set[int] = set()
        self._closed = False

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under ``key`` and add its index line.

        Raises:
            ValueError: the key was already written, is negative, or a part exceeds 2**29 - 1 bytes.
        """
        key = int(key)
        if key < 0:
            raise ValueError(f"record key {key} is negative; RecordIO keys are non-negative integers")
        if key in self._keys:
            raise ValueError(f"record key {key} was already written to {self.rec_path}; keys must be unique")
        parts = split_payload(bytes(payload))
        if any(len(part) > _MAX_PART for part in parts):
            raise ValueError(f"record {key} has a part longer than {_MAX_PART} bytes, the RecordIO limit")
        offset = self._rec.tell()
        for position, part in enumerate(parts):
            if len(parts) == 1:
                cflag = CFLAG_WHOLE
            elif position == 0:
                cflag = CFLAG_START
            elif position == len(parts) - 1:
                cflag = CFLAG_END
            else:
                cflag = CFLAG_MIDDLE
            self._rec.write(_FRAME.pack(MAGIC, (cflag << 29) | len(part)))
            self._rec.write(part)
            self._rec.write(b"\x00" * _padding(len(part)))
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)

    def close(self, *, commit: bool = True) -> None:
        """Flush both files and rename them into place (or discard them when ``commit`` is false)."""
        if self._closed:
            return
        self._closed = True
        if commit:
            self._stack.close()
        else:
            discarded = RuntimeError(f"RecordIO writer for {self.rec_path} discarded")
            self._stack.__exit__(RuntimeError, discarded, None)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(commit=exc_type is None)


def build_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> int:
    """Rebuild a ``.idx`` by scanning a ``.rec``, taking each record's key from its IRHeader ``id``.

    InsightFace datasets and our writer store the key in ``id``. Returns the
    number of records indexed.

    Raises:
        RecordIOError: the scan hits a damaged record, or two records share an id.
    """
    reader = RecordIOReader(rec_path, validate=False, use_index=False)
    seen: set[int] = set()
    lines = []
    for offset, payload in reader.scan():
        header, _ = unpack_payload(payload)
        if header.id in seen:
            raise RecordIOError(
                f"{rec_path}: two records carry id {header.id} (the second at byte offset {offset}), so the "
                f"id cannot serve as key; this .rec cannot be indexed from its headers"
            )
        seen.add(header.id)
        lines.append(f"{header.id}\t{offset}\n")
    with atomic_path(idx_path) as tmp:
        tmp.write_text("".join(lines), encoding="ascii")
    logger.info("indexed %d records of %s into %s", len(lines), rec_path, idx_path)
    return len(lines)
