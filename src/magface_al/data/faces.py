"""Face datasets stored in InsightFace's RecordIO layout, and their CSV manifests.

A dataset folder holds ``train.rec``, ``train.idx`` and ``property``
(``num_classes,height,width``). Two layouts occur:

- with a header record: key 0 has a label array ``(K, M)``; image records
  are keys ``1..K-1`` and identity records are keys ``K..M-1``, where record
  ``K + i`` holds the ``[start, end)`` image-key range of identity ``i``;
- without one: every key is an image whose label is its identity.

An image record's label is a float, or a float array whose first value is
the identity (IRHeader flag > 0).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from magface_al.data.recordio import IRHeader, RecordIOError, RecordIOReader, unpack_payload
from magface_al.utils import atomic_path

logger = logging.getLogger(__name__)

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("key", "identity", "label", "source_file")
_INTEGER_COLUMNS = ("key", "label", "source_key", "source_label")

_SKIP_HINT = "pass skip_undecodable=True (`--skip-undecodable` on the command line) to leave such images out"


class UndecodableImageError(RecordIOError):
    """A record whose image bytes do not decode as an image."""


@dataclass(frozen=True)
class DamagedRecord:
    """One record that failed a check, with the reason."""

    key: int
    reason: str


@dataclass
class CheckReport:
    """The result of reading and decoding records: how many, and which failed why."""

    folder: str
    checked: int = 0
    damaged: list[DamagedRecord] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.damaged

    @property
    def damaged_keys(self) -> list[int]:
        return [record.key for record in self.damaged]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "checked": self.checked,
            "damaged_count": len(self.damaged),
            "sound": self.sound,
            "damaged": [{"key": record.key, "reason": record.reason} for record in self.damaged],
        }


def label_from_header(header: IRHeader) -> float:
    """Return the identity label of a record: the scalar label, or ``label[0]`` when the label is an array."""
    if header.flag > 0:
        return float(header.label[0])
    return float(header.label)


def read_property(folder: str | os.PathLike) -> tuple[int, int, int] | None:
    """Read ``property`` (``num_classes,height,width``); None when the file is absent.

    Raises:
        ValueError: the file is not three comma-separated integers.
    """
    path = Path(folder) / PROPERTY_NAME
    if not path.is_file():
        return None
    text = path.read_text(encoding="ascii", errors="replace").strip()
    fields = text.split(",")
    if len(fields) != 3 or not all(part.strip().isdigit() for part in fields):
        raise ValueError(f"{path} contains {text!r}, expected 'num_classes,height,width' such as '4281,112,112'")
    num_classes, height, width = (int(part) for part in fields)
    return num_classes, height, width


class FaceRecordDataset:
    """Images and identity labels of a face dataset in InsightFace's RecordIO layout.

    Picklable: each DataLoader worker process reopens the ``.rec`` on first read.

    Attributes:
        keys: int64 array of image record keys, ascending.
        labels: int64 array, the identity id of each image, aligned with ``keys``.
        identities: int64 array of the distinct identity ids that have images.
        header: ``(K, M)`` from the header record, or None for a dataset without one.
        label_kind: ``"scalar"`` or ``"array[n]"``, from the first image record.

    Args:
        folder: the folder holding ``train.rec``, ``train.idx`` and ``property``.
        validate: passed to ``RecordIOReader``; False defers every per-key
            problem to the read of that key (``check`` uses this).
    """

    def __init__(self, folder: str | os.PathLike, *, validate: bool = True) -> None:
        self.folder = Path(folder)
        self.rec_path = self.folder / REC_NAME
        self.idx_path = self.folder / IDX_NAME
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found; a dataset folder holds {REC_NAME}, {IDX_NAME} and {PROPERTY_NAME} "
                    f"as InsightFace distributes them (build one with `magface-al rec pack FOLDER OUT_DIR`)"
                )
        self.property = read_property(self.folder)
        self.reader = RecordIOReader(self.rec_path, self.idx_path, validate=validate)
        self.header = self._read_header()
        # Identity id -> [start, end) image-key range, as the identity records state it.
        self.identity_key_ranges: dict[int, tuple[int, int]] | None = None
        if self.header is not None and self.header[1] > self.header[0]:
            keys, labels = self._labels_from_identity_records()
        else:
            keys, labels = self._labels_from_image_records()
        self.keys = keys
        self.labels = labels
        self._index_tables()
        self.label_kind = self._detect_label_kind()
        if self.property is not None and self.property[0] != len(self.identities):
            logger.warning(
                "%s states %d classes but the records hold %d identities",
                self.folder / PROPERTY_NAME,
                self.property[0],
                len(self.identities),
            )

    # -- building the tables ---------------------------------------------------

    def _read_header(self) -> tuple[int, int] | None:
        """Return (K, M) of the header record at key 0, or None when key 0 is an image or absent."""
        if 0 not in self.reader:
            return None
        header, data = unpack_payload(self.reader.read(0))
        # An image record at key 0 may have an array label too; a header record has no image bytes.
        if header.flag < 2 or data:
            return None
        first_identity_key, end_key = int(header.label[0]), int(header.label[1])
        if not 1 <= first_identity_key <= end_key:
            raise RecordIOError(
                f"{self.rec_path}: the header record (key 0) has label {header.label.tolist()}, expected "
                f"[first identity key, end key] with 1 <= first <= end; the file is damaged, copy it again",
                key=0,
            )
        return first_identity_key, end_key

    def _labels_from_identity_records(self) -> tuple[np.ndarray, np.ndarray]:
        first_identity_key, end_key = self.header  # type: ignore[misc]
        image_count = first_identity_key - 1
        labels = np.full(image_count, -1, dtype=np.int64)
        ranges: dict[int, tuple[int, int]] = {}
        for record_key in range(first_identity_key, end_key):
            header, _ = unpack_payload(self._read_required(record_key, "identity record"))
            if header.flag < 2:
                raise RecordIOError(
                    f"{self.rec_path}: identity record {record_key} has no [start, end) label array "
                    f"(flag {header.flag}); the file is damaged, copy it again",
                    key=record_key,
                )
            start, end = int(header.label[0]), int(header.label[1])
            identity = record_key - first_identity_key
            if not 1 <= start <= end <= first_identity_key:
                raise RecordIOError(
                    f"{self.rec_path}: identity record {record_key} gives the image-key range "
                    f"[{start}, {end}), outside the image keys 1..{first_identity_key - 1}; the file is damaged, "
                    f"copy it again",
                    key=record_key,
                )
            claimed = labels[start - 1 : end - 1]
            if (claimed >= 0).any():
                other = int(claimed[claimed >= 0][0])
                raise RecordIOError(
                    f"{self.rec_path}: identity record {record_key} claims image keys [{start}, {end}) that "
                    f"overlap identity {other}; the file is damaged, copy it again",
                    key=record_key,
                )
            claimed[:] = identity
            ranges[identity] = (start, end)
        orphans = np.flatnonzero(labels < 0) + 1
        if orphans.size:
            raise RecordIOError(
                f"{self.rec_path}: image keys {orphans[:10].tolist()} (of {orphans.size}) belong to no identity "
                f"record; the file is damaged, copy it again",
                key=int(orphans[0]),
            )
        missing = [key for key in range(1, first_identity_key) if key not in self.reader]
        if missing:
            raise RecordIOError(
                f"{self.idx_path}: image keys {missing[:10]} (of {len(missing)}) named by the header record are "
                f"missing from the index; copy the dataset again or rebuild the index with `magface-al rec index DATA`",
                key=missing[0],
            )
        self.identity_key_ranges = ranges
        return np.arange(1, first_identity_key, dtype=np.int64), labels

    def _labels_from_image_records(self) -> tuple[np.ndarray, np.ndarray]:
        if self.header is not None:
            keys = [key for key in range(1, self.header[0]) if key in self.reader]
        else:
            keys = list(self.reader.keys)
        labels = np.empty(len(keys), dtype=np.int64)
        for position, key in enumerate(keys):
            header, _ = unpack_payload(self._read_required(key, "image record"))
            labels[position] = self._integer_label(key, header)
        return np.asarray(keys, dtype=np.int64), labels

    def _read_required(self, key: int, what: str) -> bytes:
        try:
            return self.reader.read(key)
        except KeyError:
            raise RecordIOError(
                f"{self.idx_path}: {what} {key} is missing from the index; copy the dataset again or "
                f"rebuild the index with `magface-al rec index DATA`",
                key=key,
            ) from None

    def _integer_label(self, key: int, header: IRHeader) -> int:
        value = label_from_header(header)
        if not value.is_integer() or value < 0:
            raise RecordIOError(
                f"{self.rec_path}: image record {key} has label {value}, expected a non-negative integer "
                f"identity id; the file is damaged or is not a face-identity dataset",
                key=key,
            )
        return int(value)

    def _index_tables(self) -> None:
        self._order = np.argsort(self.labels, kind="stable")
        self.identities, starts, counts = np.unique(self.labels[self._order], return_index=True, return_counts=True)
        self._identity_slices = {
            int(identity): (int(start), int(start + count))
            for identity, start, count in zip(self.identities, starts, counts)
        }

    def _detect_label_kind(self) -> str:
        if not len(self.keys):
            return "none"
        header, _ = unpack_payload(self.reader.read(int(self.keys[0])))
        return f"array[{header.flag}]" if header.flag > 0 else "scalar"

    # -- access ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        """Return (image BGR uint8 (H, W, 3), identity label, record key) of the ``index``-th image."""
        key = int(self.keys[index])
        return self.image(key), int(self.labels[index]), key

    def keys_of(self, identity: int) -> np.ndarray:
        """Return the image keys (int64, ascending) of ``identity``.

        Raises:
            KeyError: no image has that identity.
        """
        try:
            start, end = self._identity_slices[int(identity)]
        except KeyError:
            raise KeyError(f"identity {identity} has no images in {self.folder}") from None
        return self.keys[self._order[start:end]]

    def position_of(self, key: int) -> int:
        """Return the position of image ``key`` in ``keys``.

        Raises:
            KeyError: ``key`` is not an image key of this dataset.
        """
        position = int(np.searchsorted(self.keys, key))
        if position >= len(self.keys) or self.keys[position] != key:
            raise KeyError(f"key {key} is not an image record of {self.folder}")
        return position

    def label_of(self, key: int) -> int:
        """Return the identity label of image ``key``."""
        return int(self.labels[self.position_of(key)])

    def record(self, key: int) -> tuple[IRHeader, bytes]:
        """Read image record ``key`` and return its header and image bytes."""
        self.position_of(key)
        return unpack_payload(self.reader.read(key))

    def image_bytes(self, key: int) -> bytes:
        """Return the encoded image (usually JPEG) stored in record ``key``."""
        return self.record(key)[1]

    def image(self, key: int) -> np.ndarray:
        """Decode record ``key`` into a BGR uint8 array (H, W, 3), as ``cv2.imdecode`` returns it.

        Raises:
            UndecodableImageError: the bytes are not an image OpenCV can decode.
        """
        return self._decode(key, self.image_bytes(key))

    def _decode(self, key: int, data: bytes) -> np.ndarray:
        image = None
        if data:
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise UndecodableImageError(
                f"{self.rec_path}: the image bytes of key {key} ({len(data)} bytes, starting "
                f"{data[:4].hex() or 'empty'}) do not decode as an image. The record is damaged: copy the "
                f"dataset again, or {_SKIP_HINT}",
                key=key,
            )
        return image

    def load_images(
        self, keys: Sequence[int] | np.ndarray | None = None, *, skip_undecodable: bool = False
    ) -> tuple[list[np.ndarray], np.ndarray, list[DamagedRecord]]:
        """Decode many images at once.

        Args:
            keys: image keys; all images by default.
            skip_undecodable: leave out images whose bytes do not decode, and
                return them as skipped, instead of raising on the first.

        Returns:
            (BGR images, the int64 keys that were decoded, skipped records).
        """
        keys = self.keys if keys is None else np.asarray(keys, dtype=np.int64)
        images: list[np.ndarray] = []
        kept: list[int] = []
        skipped: list[DamagedRecord] = []
        for key in keys.tolist():
            try:
                images.append(self.image(key))
            except UndecodableImageError as error:
                if not skip_undecodable:
                    raise
                skipped.append(DamagedRecord(key, str(error)))
                continue
            kept.append(key)
        if skipped:
            logger.warning(
                "skipped %d undecodable images of %s, keys %s",
                len(skipped),
                self.rec_path,
                [record.key for record in skipped],
            )
        return images, np.asarray(kept, dtype=np.int64), skipped

    def check(self, keys: Iterable[int] | None = None, *, progress: bool = False) -> CheckReport:
        """Read and decode every image record, returning which are damaged and why.

        Besides reading and decoding, each image's own label must equal the
        identity that the identity records give it.
        """
        keys = self.keys if keys is None else np.asarray(list(keys), dtype=np.int64)
        report = CheckReport(folder=str(self.folder))
        for key in tqdm(keys.tolist(), desc=f"checking {self.folder.name}", unit="img", disable=not progress):
            report.checked += 1
            try:
                header, data = self.record(key)
                label = self._integer_label(key, header)
                expected = self.label_of(key)
                if label != expected:
                    raise RecordIOError(
                        f"{self.rec_path}: image record {key} has label {label} but the identity records "
                        f"place it under identity {expected}; the file is damaged, copy it again",
                        key=key,
                    )
                self._decode(key, data)
            except (RecordIOError, KeyError) as error:
                report.damaged.append(DamagedRecord(key, _error_text(error)))
        return report

    def describe(self) -> dict[str, Any]:
        """Summarise the dataset for ``rec info``: counts, header layout, label kind."""
        header = None
        if self.header is not None:
            header = {"key": 0, "first_identity_key": self.header[0], "end_key": self.header[1]}
        return {
            "folder": str(self.folder),
            "images": len(self.keys),
            "identities": len(self.identities),
            "keys": len(self.reader),
            "header": header,
            "identity_records": len(self.identity_key_ranges) if self.identity_key_ranges is not None else 0,
            "label_kind": self.label_kind,
            "property": list(self.property) if self.property is not None else None,
            "rec_bytes": self.reader.size,
        }


def _error_text(error: BaseException) -> str:
    # KeyError wraps its message in quotes; show the message itself.
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def check_dataset(folder: str | os.PathLike, *, progress: bool = False) -> CheckReport:
    """Read and decode every record of the dataset in ``folder``; never raises on damage.

    Per-key problems (truncated records, wrong magic numbers, offsets past the
    end, undecodable images) are listed key by key. A damaged header or
    identity record makes the image table unknowable, so the report then
    holds that record alone.
    """
    try:
        dataset = FaceRecordDataset(folder, validate=False)
    except RecordIOError as error:
        key = error.key if error.key is not None else -1
        return CheckReport(folder=str(folder), checked=1, damaged=[DamagedRecord(key, str(error))])
    return dataset.check(progress=progress)


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a manifest CSV (``key,identity,label,source_file``) into one dict per row.

    ``key`` and ``label`` become ints, and so do the optional ``source_key``
    and ``source_label`` columns that ``write_subset`` adds. Other extra
    columns stay strings.

    Raises:
        ValueError: a required column is missing or an integer column contains something else.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        missing = [column for column in MANIFEST_COLUMNS if column not in columns]
        if missing:
            raise ValueError(
                f"{path} lacks the columns {missing}; a manifest has the header {','.join(MANIFEST_COLUMNS)}"
            )
        integer_columns = [column for column in columns if column in _INTEGER_COLUMNS]
        for line_number, row in enumerate(reader, start=2):
            for column in integer_columns:
                try:
                    row[column] = int(row[column])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}, line {line_number}: column {column} holds {row[column]!r}, expected an integer"
                    ) from None
            rows.append(row)
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write manifest rows atomically: the columns ``key,identity,label,source_file`` first, then
    any extra columns of the first row in their order."""
    rows = list(rows)
    extra = [column for column in (rows[0] if rows else {}) if column not in MANIFEST_COLUMNS]
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            # csv's default CRLF line ends match the manifests shipped with InsightFace-style datasets.
            writer = csv.DictWriter(handle, fieldnames=[*MANIFEST_COLUMNS, *extra], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
