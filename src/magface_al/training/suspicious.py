"""Find feedback pairs whose label contradicts the model, the likeliest labelling mistakes.

Each pair gets a suspicion score in cosine units: for a pair labelled "same"
it is how far the model's cosine lies below the calibrated threshold, for a
pair labelled "different" how far it lies above. A positive value means the
model disagrees with the label; the larger, the more confidently. The ranked
table is written as CSV for a person to review, and the top of it can be left
out of training.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from magface_al.pairs.table import Pairs
from magface_al.utils import atomic_path

logger = logging.getLogger(__name__)

SUSPICIOUS_COLUMNS = (
    "rank", "key1", "key2", "identity1", "identity2", "label", "score", "threshold",
    "suspicion", "flagged", "excluded", "reason",
)


@dataclass
class SuspicionRanking:
    """Feedback pairs ranked by how strongly the model contradicts their labels.

    Attributes:
        pairs: the feedback pairs in ranked order, most suspicious first.
        scores: the model's cosine per pair, aligned with ``pairs``.
        suspicion: signed disagreement in cosine units (> 0: the model contradicts the label).
        threshold: the calibrated decision threshold the scores were compared with.
        flagged: pairs whose suspicion exceeds the flag margin.
        excluded: flagged pairs chosen to be left out of training.
        order: index of each ranked pair in the input table.
    """

    pairs: Pairs
    scores: np.ndarray
    suspicion: np.ndarray
    threshold: float
    flagged: np.ndarray
    excluded: np.ndarray
    order: np.ndarray

    def kept_pairs(self) -> Pairs:
        """Return the pairs to train on (every pair not excluded), in the input order."""
        keep = np.ones(len(self.order), dtype=bool)
        keep[self.order[self.excluded]] = False
        return self._input_pairs().select(np.flatnonzero(keep))

    def _input_pairs(self) -> Pairs:
        inverse = np.empty_like(self.order)
        inverse[self.order] = np.arange(len(self.order))
        return self.pairs.select(inverse)

    def reasons(self) -> list[str]:
        """Return one sentence per ranked pair saying why it is (or is not) suspicious."""
        sentences = []
        for label, score, suspicion in zip(self.pairs.label.tolist(), self.scores.tolist(), self.suspicion.tolist()):
            said = "same person" if label == 1 else "different people"
            side = "below" if label == 1 else "above"
            if suspicion > 0:
                sentences.append(
                    f"labelled {said}, but cosine {score:.3f} is {suspicion:.3f} {side} "
                    f"the threshold {self.threshold:.3f}"
                )
            else:
                sentences.append(f"labelled {said}; cosine {score:.3f} agrees with the threshold {self.threshold:.3f}")
        return sentences

    def summary(self) -> dict[str, Any]:
        """Return counts and, when the truth is known, the precision and recall of the flags."""
        result: dict[str, Any] = {
            "pairs": len(self.order),
            "threshold": self.threshold,
            "flagged": int(self.flagged.sum()),
            "excluded": int(self.excluded.sum()),
        }
        truth = self.pairs.truth
        if truth is None:
            result["precision_reason"] = "the feedback has no true labels, so mislabelled pairs are unknown"
            return result
        wrong = self.pairs.label != truth
        result["mislabelled"] = int(wrong.sum())
        for name, mask in (("flagged", self.flagged), ("excluded", self.excluded)):
            hits = int((wrong & mask).sum())
            result[f"{name}_mislabelled"] = hits
            result[f"{name}_precision"] = hits / int(mask.sum()) if mask.any() else None
            result[f"{name}_recall"] = hits / int(wrong.sum()) if wrong.any() else None
            if not mask.any():
                result[f"{name}_precision_reason"] = f"no pair was {name}"
            if not wrong.any():
                result[f"{name}_recall_reason"] = "no pair was mislabelled"
        return result


def rank_suspicious_pairs(
    pairs: Pairs,
    scores: np.ndarray,
    threshold: float,
    *,
    flag_margin: float = 0.0,
    exclude_top_k: int = 0,
    exclude_top_fraction: float = 0.0,
) -> SuspicionRanking:
    """Rank feedback pairs by how strongly the model's scores contradict their labels.

    Args:
        pairs: The feedback pairs; ``label`` is what the person answered.
        scores: The model's cosine similarity per pair, aligned with ``pairs``.
        threshold: The decision threshold, calibrated on validation pairs.
        flag_margin: A pair is flagged when its suspicion exceeds this many
            cosine units (0 flags every contradiction).
        exclude_top_k: Leave at most this many of the most suspicious flagged pairs out.
        exclude_top_fraction: Leave at most this share of all pairs out (rounded
            up). With both set, the larger count applies; only flagged pairs are
            ever excluded.

    Returns:
        The ranking, most suspicious first (ties keep the input order).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(pairs),):
        raise ValueError(f"expected one score per pair ({len(pairs)}), got shape {scores.shape}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if exclude_top_k < 0:
        raise ValueError(f"exclude_top_k must not be negative, got {exclude_top_k}")
    if not 0.0 <= exclude_top_fraction <= 1.0:
        raise ValueError(f"exclude_top_fraction must be in [0, 1], got {exclude_top_fraction}")

    # Positive when the label disagrees with the model: "same" below the threshold
    # or "different" above it.
    signed = np.where(pairs.label == 1, threshold - scores, scores - threshold)
    order = np.argsort(-signed, kind="stable")
    suspicion = signed[order]
    flagged = suspicion > flag_margin
    exclude_count = max(exclude_top_k, math.ceil(exclude_top_fraction * len(pairs)))
    excluded = flagged & (np.arange(len(order)) < exclude_count)
    ranking = SuspicionRanking(
        pairs=pairs.select(order),
        scores=scores[order],
        suspicion=suspicion,
        threshold=float(threshold),
        flagged=flagged,
        excluded=excluded,
        order=order,
    )
    logger.info("%d of %d feedback pairs contradict the model by more than %.3f; %d left out of training",
                int(flagged.sum()), len(pairs), flag_margin, int(excluded.sum()))
    return ranking


def write_suspicious_csv(path: str | os.PathLike, ranking: SuspicionRanking) -> None:
    """Write the ranking as CSV (most suspicious first), with ``truth`` when it is known, atomically."""
    columns = list(SUSPICIOUS_COLUMNS)
    if ranking.pairs.truth is not None:
        columns.insert(columns.index("score"), "truth")
    reasons = ranking.reasons()
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for i in range(len(ranking.order)):
            row = {
                "rank": i + 1,
                "key1": int(ranking.pairs.key1[i]),
                "key2": int(ranking.pairs.key2[i]),
                "identity1": int(ranking.pairs.identity1[i]),
                "identity2": int(ranking.pairs.identity2[i]),
                "label": int(ranking.pairs.label[i]),
                "score": f"{ranking.scores[i]:.6f}",
                "threshold": f"{ranking.threshold:.6f}",
                "suspicion": f"{ranking.suspicion[i]:.6f}",
                "flagged": int(ranking.flagged[i]),
                "excluded": int(ranking.excluded[i]),
                "reason": reasons[i],
            }
            if ranking.pairs.truth is not None:
                row["truth"] = int(ranking.pairs.truth[i])
            writer.writerow([row[name] for name in columns])
