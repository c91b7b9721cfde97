"""Scored test pairs: the one input every part of the report reads."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Outcome names double as the folder names of the error report.
TRUE_POSITIVE = "true_positives"
TRUE_NEGATIVE = "true_negatives"
FALSE_POSITIVE = "false_positives"
FALSE_NEGATIVE = "false_negatives"
OUTCOMES = (FALSE_POSITIVE, FALSE_NEGATIVE, TRUE_POSITIVE, TRUE_NEGATIVE)
ERROR_OUTCOMES = (FALSE_POSITIVE, FALSE_NEGATIVE)


@dataclasses.dataclass
class ScoredPairs:
    """Face pairs with one model's similarity scores and face magnitudes.

    All arrays have one entry per pair. ``label`` is 1 for the same person and
    0 for different people. A pair is predicted "same" when its cosine
    similarity ``score`` is at least ``threshold``. ``index`` is the pair's
    row in the pairs file; it defaults to ``0..N-1``.
    """

    key1: np.ndarray
    key2: np.ndarray
    label: np.ndarray
    identity1: np.ndarray
    identity2: np.ndarray
    score: np.ndarray
    magnitude1: np.ndarray
    magnitude2: np.ndarray
    threshold: float
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.key1 = np.asarray(self.key1, dtype=np.int64)
        self.key2 = np.asarray(self.key2, dtype=np.int64)
        self.label = np.asarray(self.label, dtype=np.int64)
        self.identity1 = np.asarray(self.identity1)
        self.identity2 = np.asarray(self.identity2)
        self.score = np.asarray(self.score, dtype=np.float64)
        self.magnitude1 = np.asarray(self.magnitude1, dtype=np.float64)
        self.magnitude2 = np.asarray(self.magnitude2, dtype=np.float64)
        self.threshold = float(self.threshold)
        if self.index is None:
            self.index = np.arange(len(self.key1), dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        self._validate()

    def _validate(self) -> None:
        count = len(self.key1)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray) and value.shape != (count,):
                raise ValueError(
                    f"ScoredPairs.{field.name} has shape {value.shape}, expected ({count},) "
                    "like key1; pass one value per pair"
                )
        bad_labels = np.setdiff1d(np.unique(self.label), [0, 1])
        if bad_labels.size:
            raise ValueError(
                f"ScoredPairs.label contains {bad_labels.tolist()}; labels must be 1 (same person) "
                "or 0 (different people)"
            )
        if not np.isfinite(self.threshold):
            raise ValueError(f"ScoredPairs.threshold is {self.threshold}; pass a finite cosine threshold")
        if not np.all(np.isfinite(self.score)):
            bad = int(np.flatnonzero(~np.isfinite(self.score))[0])
            raise ValueError(
                f"ScoredPairs.score of pair {int(self.index[bad])} is {self.score[bad]}; "
                "scores must be finite cosine similarities"
            )

    def __len__(self) -> int:
        return len(self.key1)

    @property
    def predicted(self) -> np.ndarray:
        """Predicted labels (int64): 1 where ``score >= threshold``."""
        return (self.score >= self.threshold).astype(np.int64)

    @property
    def margin(self) -> np.ndarray:
        """Signed distance of each score from the threshold (``score - threshold``)."""
        return self.score - self.threshold

    @property
    def pair_quality(self) -> np.ndarray:
        """Quality of each pair: the smaller magnitude of its two faces, as MagFace defines it."""
        return np.minimum(self.magnitude1, self.magnitude2)

    def outcomes(self) -> np.ndarray:
        """Return the outcome name of every pair (one of :data:`OUTCOMES`), as an object array."""
        predicted = self.predicted
        names = np.empty(len(self), dtype=object)
        names[(self.label == 1) & (predicted == 1)] = TRUE_POSITIVE
        names[(self.label == 0) & (predicted == 0)] = TRUE_NEGATIVE
        names[(self.label == 0) & (predicted == 1)] = FALSE_POSITIVE
        names[(self.label == 1) & (predicted == 0)] = FALSE_NEGATIVE
        return names

    def pair_record(self, row: int) -> dict[str, Any]:
        """Describe pair ``row`` as a JSON-ready mapping."""
        return {
            "index": int(self.index[row]),
            "key1": int(self.key1[row]),
            "key2": int(self.key2[row]),
            "identity1": _plain(self.identity1[row]),
            "identity2": _plain(self.identity2[row]),
            "label": int(self.label[row]),
            "predicted": int(self.predicted[row]),
            "score": float(self.score[row]),
            "threshold": self.threshold,
            "margin": float(self.margin[row]),
            "magnitude1": float(self.magnitude1[row]),
            "magnitude2": float(self.magnitude2[row]),
            "pair_quality": float(self.pair_quality[row]),
        }

    @classmethod
    def from_pairs(
        cls,
        pairs: Any,
        score: np.ndarray,
        magnitude1: np.ndarray,
        magnitude2: np.ndarray,
        threshold: float,
    ) -> "ScoredPairs":
        """Build from a ``magface_al.pairs.Pairs`` (or any object with the same fields).

        When the pairs carry ``truth`` (the true label of a possibly noisy
        feedback label), the true label is the one the report judges against.
        """
        truth = getattr(pairs, "truth", None)
        label = pairs.label if truth is None else truth
        return cls(
            key1=pairs.key1,
            key2=pairs.key2,
            label=label,
            identity1=pairs.identity1,
            identity2=pairs.identity2,
            score=score,
            magnitude1=magnitude1,
            magnitude2=magnitude2,
            threshold=threshold,
        )


def _plain(value: Any) -> Any:
    """Convert a numpy scalar to int, float or str for JSON."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def error_order(scored: ScoredPairs, rows: np.ndarray) -> np.ndarray:
    """Sort ``rows`` so the most confidently wrong pair (largest ``|score - threshold|``) comes first.

    Ties keep the pairs-file order, so the order is deterministic.
    """
    rows = np.asarray(rows, dtype=np.int64)
    distance = np.abs(scored.margin[rows])
    return rows[np.lexsort((scored.index[rows], -distance))]
