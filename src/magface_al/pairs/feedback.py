"""Feedback files: pair labels from people or from a simulation, as JSON.

The format stays readable by the earlier labelling tool:
``{"pairs": [{"image1", "image2", "label", "identity1", "identity2"}, ...]}``
with label 1 for the same person. Records written here also carry the record
keys ``key1``/``key2``, the ``source`` ("simulated" or "human") and, for
simulated records, the true label ``truth``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Literal, Mapping

import numpy as np

from magface_al.pairs.table import Pairs
from magface_al.utils import write_json_atomic

logger = logging.getLogger(__name__)

SOURCE_SIMULATED = "simulated"
SOURCE_HUMAN = "human"
SOURCES = (SOURCE_SIMULATED, SOURCE_HUMAN)

# Accepted label spellings (compared lower-case, stripped) and the label each means.
LABEL_SPELLINGS: dict[str, int] = {
    "1": 1, "true": 1, "same": 1, "yes": 1,
    "0": 0, "false": 0, "different": 0, "no": 0,
}
_LABEL_HELP = "1/0, true/false, same/different or yes/no"


class FeedbackError(ValueError):
    """A feedback file is invalid: unknown images, bad labels, repeated or conflicting pairs."""


@dataclass(frozen=True)
class ImageInfo:
    """What the manifest records about one image."""

    key: int
    identity: str
    label: int
    source_file: str


class ImageIndex:
    """Resolves image names in feedback files to dataset record keys.

    A name resolves, in this order, as a record key (an integer or a string of
    digits), as a manifest ``source_file``, as a path that ends with a
    ``source_file`` (``/data/lfw/Name/Name_0001.png``), or as a file name
    that occurs once in the manifest.
    """

    def __init__(self, images: Iterable[ImageInfo]) -> None:
        self._by_key: dict[int, ImageInfo] = {}
        self._by_path: dict[str, int] = {}
        self._by_file_name: dict[str, list[int]] = defaultdict(list)
        for info in images:
            if info.key in self._by_key:
                raise ValueError(f"manifest lists key {info.key} twice; rebuild the manifest")
            self._by_key[info.key] = info
            path = PurePosixPath(info.source_file.replace("\\", "/"))
            self._by_path[str(path)] = info.key
            self._by_file_name[path.name].append(info.key)

    @classmethod
    def from_manifest_rows(cls, rows: Iterable[Mapping[str, Any]]) -> ImageIndex:
        """Build the index from manifest rows with ``key``, ``identity``, ``label``, ``source_file``."""
        return cls(
            ImageInfo(int(r["key"]), str(r["identity"]), int(r["label"]), str(r["source_file"])) for r in rows
        )

    @classmethod
    def from_manifest(cls, path: str | os.PathLike) -> ImageIndex:
        """Read a manifest CSV (``key,identity,label,source_file``)."""
        from magface_al.data.faces import read_manifest

        return cls.from_manifest_rows(read_manifest(path))

    @classmethod
    def from_labels(cls, keys: np.ndarray, labels: np.ndarray) -> ImageIndex:
        """Build an index without a manifest: names are the record keys, identities the label ids."""
        return cls(
            ImageInfo(int(k), str(int(v)), int(v), str(int(k)))
            for k, v in zip(np.asarray(keys).tolist(), np.asarray(labels).tolist())
        )

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def info(self, key: int) -> ImageInfo:
        """Return the manifest entry of record ``key``."""
        return self._by_key[int(key)]

    def resolve(self, name: Any) -> int:
        """Return the record key that ``name`` refers to.

        Raises:
            KeyError: with the reason (unknown or ambiguous) as its message.
        """
        if isinstance(name, bool) or name is None:
            raise KeyError(f"{name!r} is not an image name")
        if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
            key = int(name)
            if key in self._by_key:
                return key
            if isinstance(name, int):
                raise KeyError(f"record key {key} is not in the dataset")
        if not isinstance(name, str):
            raise KeyError(f"{name!r} is not an image name")
        parts = PurePosixPath(name.strip().replace("\\", "/")).parts
        # Longest suffix first, so "a/Name/Name_0001.png" matches "Name/Name_0001.png".
        for start in range(len(parts)):
            key = self._by_path.get(str(PurePosixPath(*parts[start:])))
            if key is not None:
                return key
        candidates = self._by_file_name.get(parts[-1], []) if parts else []
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise KeyError(
                f"image {name!r} is ambiguous: {len(candidates)} manifest entries have that file name; "
                "give the path relative to the dataset (the manifest's source_file)"
            )
        raise KeyError(f"image {name!r} is not in the manifest")


def normalize_label(value: Any) -> int:
    """Return 1 or 0 for an accepted label spelling.

    Raises:
        ValueError: the value is none of 1/0, true/false, same/different, yes/no.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_SPELLINGS:
        return LABEL_SPELLINGS[value.strip().lower()]
    raise ValueError(f"label {value!r} is not one of {_LABEL_HELP}")


def feedback_records(
    pairs: Pairs, index: ImageIndex | None = None, *, source: str = SOURCE_SIMULATED
) -> list[dict[str, Any]]:
    """Convert pairs to feedback records; ``truth`` is included when the pairs carry it."""
    if source not in SOURCES:
        raise ValueError(f"unknown feedback source {source!r}; expected one of {', '.join(SOURCES)}")
    records = []
    for i in range(len(pairs)):
        key1, key2 = int(pairs.key1[i]), int(pairs.key2[i])
        if index is not None and key1 in index and key2 in index:
            first, second = index.info(key1), index.info(key2)
            image1, image2 = first.source_file, second.source_file
            identity1, identity2 = first.identity, second.identity
        else:
            image1, image2 = str(key1), str(key2)
            identity1, identity2 = int(pairs.identity1[i]), int(pairs.identity2[i])
        record = {
            "image1": image1,
            "image2": image2,
            "label": int(pairs.label[i]),
            "identity1": identity1,
            "identity2": identity2,
            "key1": key1,
            "key2": key2,
            "source": source,
        }
        if pairs.truth is not None:
            record["truth"] = int(pairs.truth[i])
        records.append(record)
    return records


def write_feedback_json(
    path: str | os.PathLike,
    pairs: Pairs,
    index: ImageIndex | None = None,
    *,
    source: str = SOURCE_SIMULATED,
) -> None:
    """Write ``pairs`` as a feedback file, atomically."""
    write_json_atomic(path, {"pairs": feedback_records(pairs, index, source=source)})


@dataclass(frozen=True)
class DroppedEntry:
    """A feedback entry left out on import, with the reason."""

    position: int
    image1: Any
    image2: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "image1": self.image1, "image2": self.image2, "reason": self.reason}


@dataclass
class FeedbackImport:
    """Result of reading a feedback file.

    Attributes:
        pairs: the valid pairs; ``truth`` is set only when every kept record has one.
        sources: the ``source`` of each kept pair.
        dropped: entries left out (only with ``on_error="drop"``).
        identity_mismatches: entries whose stated identity disagrees with the manifest.
    """

    pairs: Pairs
    sources: list[str]
    dropped: list[DroppedEntry] = field(default_factory=list)
    identity_mismatches: int = 0

    def report(self) -> dict[str, Any]:
        """Return a JSON-ready summary with every dropped entry and its reason."""
        return {
            "kept": len(self.pairs),
            "dropped": len(self.dropped),
            "identity_mismatches": self.identity_mismatches,
            "dropped_entries": [d.to_dict() for d in self.dropped],
        }


@dataclass
class _Entry:
    position: int
    image1: Any
    image2: Any
    key1: int
    key2: int
    label: int
    source: str
    truth: int | None


class _EntryError(Exception):
    """One entry is invalid; carries the reason and the fix."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def _resolve_key(record: dict[str, Any], number: int, index: ImageIndex) -> int:
    key_field, image_field = f"key{number}", f"image{number}"
    if record.get(key_field) is not None:
        value = record[key_field]
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
            raise _EntryError(f"{key_field} {value!r} is not a record key", f"write {key_field} as an integer")
        if int(value) not in index:
            raise _EntryError(
                f"{key_field} {int(value)} is not in the dataset",
                "check that the file belongs to this dataset or remove the entry",
            )
        return int(value)
    if record.get(image_field) is None:
        raise _EntryError(f"{image_field} is missing", f"give {image_field} (an image path) or {key_field}")
    try:
        return index.resolve(record[image_field])
    except KeyError as error:
        raise _EntryError(
            str(error.args[0]), "use image names from the dataset manifest (source_file) or record keys"
        ) from None


def _identity_matches(stated: Any, info: ImageInfo) -> bool:
    if stated is None or stated == "":
        return True
    if isinstance(stated, str):
        return stated == info.identity or (stated.strip().isdigit() and int(stated) == info.label)
    if isinstance(stated, int) and not isinstance(stated, bool):
        return stated == info.label
    return False


def _parse_entry(record: Any, position: int, index: ImageIndex, allowed: set[int] | None) -> tuple[_Entry, bool]:
    """Return the entry and whether its stated identities agree with the manifest."""
    if not isinstance(record, dict):
        raise _EntryError(f"entry is a {type(record).__name__}, not an object", "write each pair as a JSON object")
    key1 = _resolve_key(record, 1, index)
    key2 = _resolve_key(record, 2, index)
    if key1 == key2:
        raise _EntryError(f"pairs image {key1} with itself", "remove the entry")
    if "label" not in record:
        raise _EntryError("label is missing", f"add a label ({_LABEL_HELP})")
    try:
        label = normalize_label(record["label"])
    except ValueError as error:
        raise _EntryError(str(error), f"write the label as {_LABEL_HELP}") from None
    truth = None
    if record.get("truth") is not None:
        try:
            truth = normalize_label(record["truth"])
        except ValueError as error:
            raise _EntryError(f"truth: {error}", f"write the truth as {_LABEL_HELP}") from None
    source = record.get("source") or SOURCE_HUMAN
    if source not in SOURCES:
        raise _EntryError(f"source {source!r} is unknown", f"use one of {', '.join(SOURCES)}")
    first, second = index.info(key1), index.info(key2)
    if allowed is not None:
        outside = sorted({info.identity for info in (first, second) if info.label not in allowed})
        if outside:
            subject = f"identity {outside[0]} is" if len(outside) == 1 else f"identities {', '.join(outside)} are"
            raise _EntryError(
                f"{subject} not in the feedback pool but held out for validation or test",
                "remove the entry, because training on held-out people would leak into the evaluation",
            )
    matches = _identity_matches(record.get("identity1"), first) and _identity_matches(record.get("identity2"), second)
    entry = _Entry(position, record.get("image1", key1), record.get("image2", key2), key1, key2, label, source, truth)
    return entry, matches


def _describe_entry(path: Path, position: int, record: Any) -> str:
    if isinstance(record, dict):
        first = record.get("image1", record.get("key1"))
        second = record.get("image2", record.get("key2"))
        return f"{path}: pair {position} ({first!r}, {second!r})"
    return f"{path}: pair {position}"


def _load_records(path: Path) -> list[Any]:
    if not path.is_file():
        raise FeedbackError(f"feedback file not found: {path}; check the path in params.yaml")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FeedbackError(f"{path}: invalid JSON ({error}); expected {{\"pairs\": [...]}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise FeedbackError(f"{path}: expected a JSON object with a \"pairs\" list")
    return data["pairs"]


def read_feedback_json(
    path: str | os.PathLike,
    index: ImageIndex,
    *,
    on_error: Literal["raise", "drop"] = "raise",
    allowed_identities: np.ndarray | None = None,
) -> FeedbackImport:
    """Read and validate a feedback file.

    Args:
        path: the JSON file.
        index: resolves ``image1``/``image2`` (or ``key1``/``key2``) to record keys.
        on_error: "raise" stops at the first invalid entry; "drop" leaves invalid
            entries out and lists them in the result. A repeated pair keeps its
            first entry; a pair given conflicting labels is dropped entirely.
        allowed_identities: identity ids a pair may use (the feedback pool); all when None.

    Raises:
        FeedbackError: the file is unreadable, or (with on_error="raise") an entry is
            invalid. The message names the file, the pair and the fix.
    """
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")
    path = Path(path)
    records = _load_records(path)
    allowed = set(np.asarray(allowed_identities).tolist()) if allowed_identities is not None else None
    drop_hint = 'or import with on_error="drop" to leave such entries out with a report'

    entries: list[_Entry] = []
    dropped: list[DroppedEntry] = []
    mismatches = 0
    for position, record in enumerate(records):
        try:
            entry, matches = _parse_entry(record, position, index, allowed)
        except _EntryError as error:
            if on_error == "raise":
                raise FeedbackError(
                    f"{_describe_entry(path, position, record)}: {error.reason}; {error.fix}, {drop_hint}"
                ) from None
            first = record.get("image1", record.get("key1")) if isinstance(record, dict) else None
            second = record.get("image2", record.get("key2")) if isinstance(record, dict) else None
            dropped.append(DroppedEntry(position, first, second, error.reason))
            continue
        mismatches += not matches
        entries.append(entry)

    kept = _resolve_repeats(path, entries, dropped, on_error=on_error, drop_hint=drop_hint)
    if mismatches:
        logger.warning(
            "%s: %d entries state an identity that differs from the manifest; labels are kept, "
            "identities are taken from the manifest",
            path, mismatches,
        )
    if dropped:
        logger.warning("%s: dropped %d of %d entries; see the import report", path, len(dropped), len(records))
    pairs = _entries_to_pairs(kept, index)
    logger.info("read %d feedback pairs from %s", len(pairs), path)
    return FeedbackImport(pairs, [e.source for e in kept], sorted(dropped, key=lambda d: d.position), mismatches)


def _resolve_repeats(
    path: Path, entries: list[_Entry], dropped: list[DroppedEntry], *, on_error: str, drop_hint: str
) -> list[_Entry]:
    """Reject or drop repeated pairs; a pair with conflicting labels loses every entry."""
    by_pair: dict[tuple[int, int], list[_Entry]] = defaultdict(list)
    for entry in entries:
        by_pair[(min(entry.key1, entry.key2), max(entry.key1, entry.key2))].append(entry)
    left_out: set[int] = set()
    for group in by_pair.values():
        if len(group) == 1:
            continue
        first, later = group[0], group[1:]
        labels = {e.label for e in group}
        if len(labels) > 1:
            reason = f"pair repeated at positions {[e.position for e in group]} with conflicting labels"
            fix = "keep one entry with the right label"
            victims = group
        else:
            reason = f"duplicate of pair {first.position} (the same images in either order)"
            fix = "remove the duplicate"
            victims = later
        if on_error == "raise":
            shown = later[0] if len(labels) == 1 else first
            raise FeedbackError(
                f"{path}: pair {shown.position} ({shown.image1!r}, {shown.image2!r}): {reason}; {fix}, {drop_hint}"
            )
        for victim in victims:
            dropped.append(DroppedEntry(victim.position, victim.image1, victim.image2, reason))
            left_out.add(victim.position)
    return [e for e in entries if e.position not in left_out]


def _entries_to_pairs(entries: list[_Entry], index: ImageIndex) -> Pairs:
    if not entries:
        return Pairs.empty()
    key1 = np.array([e.key1 for e in entries], dtype=np.int64)
    key2 = np.array([e.key2 for e in entries], dtype=np.int64)
    identity1 = np.array([index.info(k).label for k in key1.tolist()], dtype=np.int64)
    identity2 = np.array([index.info(k).label for k in key2.tolist()], dtype=np.int64)
    labels = np.array([e.label for e in entries], dtype=np.int64)
    truth = None
    if all(e.truth is not None for e in entries):
        truth = np.array([e.truth for e in entries], dtype=np.int64)
    return Pairs(key1, key2, labels, identity1, identity2, truth=truth)
