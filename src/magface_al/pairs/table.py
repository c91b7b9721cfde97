"""The pair table shared by sampling, feedback files, training and evaluation."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from magface_al.utils import atomic_path

PAIR_COLUMNS = ("key1", "key2", "label", "identity1", "identity2")
TRUTH_COLUMN = "truth"


@dataclass
class Pairs:
    """Face pairs as equal-length int64 arrays.

    Attributes:
        key1: record key of the first image.
        key2: record key of the second image.
        label: 1 same person, 0 different person; may be noisy feedback.
        identity1: integer identity id of the first image.
        identity2: integer identity id of the second image.
        truth: the true label where ``label`` may be noisy, else None.
    """

    key1: np.ndarray
    key2: np.ndarray
    label: np.ndarray
    identity1: np.ndarray
    identity2: np.ndarray
    truth: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in PAIR_COLUMNS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1))
        if self.truth is not None:
            self.truth = np.asarray(self.truth, dtype=np.int64).reshape(-1)
        lengths = {name: len(getattr(self, name)) for name in self._columns()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"pair columns differ in length: {lengths}")
        for name in ("label", "truth"):
            values = getattr(self, name)
            if values is not None and not np.isin(values, (0, 1)).all():
                bad = sorted(set(values.tolist()) - {0, 1})
                raise ValueError(f"pair column {name!r} must hold only 0 and 1, found {bad[:5]}")

    def _columns(self) -> tuple[str, ...]:
        return PAIR_COLUMNS + ((TRUTH_COLUMN,) if self.truth is not None else ())

    def __len__(self) -> int:
        return len(self.key1)

    @classmethod
    def empty(cls) -> Pairs:
        """Return a table with no pairs."""
        zero = np.zeros(0, dtype=np.int64)
        return cls(zero, zero, zero, zero, zero)

    @property
    def true_labels(self) -> np.ndarray:
        """The labels to score against: ``truth`` when present, else ``label``."""
        return self.truth if self.truth is not None else self.label

    @property
    def keys(self) -> np.ndarray:
        """Sorted distinct record keys used by any pair."""
        return np.unique(np.concatenate([self.key1, self.key2]))

    @property
    def identities(self) -> np.ndarray:
        """Sorted distinct identity ids used by any pair."""
        return np.unique(np.concatenate([self.identity1, self.identity2]))

    def canonical(self) -> np.ndarray:
        """Return the (N, 2) array of (smaller key, larger key), so that (a, b) equals (b, a)."""
        return np.stack([np.minimum(self.key1, self.key2), np.maximum(self.key1, self.key2)], axis=1)

    def select(self, index: np.ndarray | slice) -> Pairs:
        """Return the pairs at ``index`` (an integer array, a boolean mask or a slice)."""
        truth = self.truth[index] if self.truth is not None else None
        return Pairs(
            self.key1[index], self.key2[index], self.label[index],
            self.identity1[index], self.identity2[index], truth,
        )

    @staticmethod
    def concatenate(parts: list[Pairs]) -> Pairs:
        """Join tables; ``truth`` is kept only when every part has it."""
        parts = [p for p in parts if len(p)] or [Pairs.empty()]
        keep_truth = all(p.truth is not None for p in parts)
        return Pairs(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in PAIR_COLUMNS),
            truth=np.concatenate([p.truth for p in parts]) if keep_truth else None,
        )


def write_pairs_csv(path: str | os.PathLike, pairs: Pairs) -> None:
    """Write ``pairs`` as CSV with a header (``truth`` column only when present), atomically."""
    columns = pairs._columns()
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        arrays = [getattr(pairs, name) for name in columns]
        writer.writerows(zip(*(a.tolist() for a in arrays)))


def read_pairs_csv(path: str | os.PathLike) -> Pairs:
    """Read a table written by :func:`write_pairs_csv`.

    Raises:
        ValueError: the file lacks a required column or contains a non-integer value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}; run the pairs stage first")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [name for name in PAIR_COLUMNS if name not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; "
                f"expected a header with {', '.join(PAIR_COLUMNS)}[,{TRUTH_COLUMN}]"
            )
        columns = list(PAIR_COLUMNS) + ([TRUTH_COLUMN] if TRUTH_COLUMN in header else [])
        values: dict[str, list[int]] = {name: [] for name in columns}
        for line_number, row in enumerate(reader, start=2):
            for name in columns:
                try:
                    values[name].append(int(row[name]))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}, line {line_number}: column {name!r} must be an integer, "
                        f"got {row[name]!r}"
                    ) from None
    truth = values.pop(TRUTH_COLUMN, None)
    return Pairs(*(values[name] for name in PAIR_COLUMNS), truth=truth)
