"""Decision thresholds: accuracy at a threshold and the best-accuracy threshold.

A pair is predicted "same person" when its score is at or above the threshold.
"""

from __future__ import annotations

import numpy as np

from magface_al.evaluation.degenerate import warn_undefined


def _as_arrays(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores has {len(scores)} entries but labels {len(labels)}; pass one label per score")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (different person) or 1 (same person)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the embeddings")
    return scores, labels.astype(np.int64)


def accuracy_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Return the share of pairs classified correctly at ``threshold``; NaN (with a warning) when empty."""
    scores, labels = _as_arrays(scores, labels)
    if len(scores) == 0:
        warn_undefined("accuracy is undefined for an empty set of pairs")
        return float("nan")
    return float(np.mean((scores >= threshold) == (labels == 1)))


def best_threshold_candidates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return every distinct decision threshold and the number of correct pairs at each.

    Candidates lie between consecutive distinct scores, plus one that accepts
    every pair and one that rejects every pair, so the search is exact rather
    than on a grid.
    """
    scores, labels = _as_arrays(scores, labels)
    if len(scores) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    n = len(sorted_scores)
    # Cut c predicts "same" for sorted positions >= c.
    negatives_below = np.concatenate([[0], np.cumsum(sorted_labels == 0)])
    positives_below = np.concatenate([[0], np.cumsum(sorted_labels == 1)])
    correct = negatives_below + (positives_below[-1] - positives_below)
    cuts = np.arange(n + 1)
    valid = (cuts == 0) | (cuts == n)
    valid[1:n] = sorted_scores[1:] > sorted_scores[:-1]
    cuts = cuts[valid]
    inner = cuts[(cuts > 0) & (cuts < n)]
    thresholds = np.concatenate([
        sorted_scores[:1],
        0.5 * (sorted_scores[inner - 1] + sorted_scores[inner]),
        [np.nextafter(sorted_scores[-1], np.inf)],
    ])
    return thresholds, correct[cuts]


def best_accuracy_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return the threshold with the highest accuracy on these pairs, and that accuracy.

    When several thresholds reach the best accuracy, the median of them (by
    position) is taken, which sits in the middle of the best range when the
    classes are separable. Returns NaNs with a warning for an empty input.
    """
    scores, labels = _as_arrays(scores, labels)
    if len(scores) == 0:
        warn_undefined("the best threshold is undefined for an empty set of pairs")
        return float("nan"), float("nan")
    thresholds, correct = best_threshold_candidates(scores, labels)
    best = np.flatnonzero(correct == correct.max())
    chosen = best[(len(best) - 1) // 2]
    return float(thresholds[chosen]), float(correct[chosen] / len(scores))


def calibrate_threshold(validation_scores: np.ndarray, validation_labels: np.ndarray) -> float:
    """Return the best-accuracy threshold on validation pairs, to apply unchanged to test pairs."""
    threshold, _ = best_accuracy_threshold(validation_scores, validation_labels)
    return threshold
