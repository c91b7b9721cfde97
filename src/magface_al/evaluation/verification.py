"""Verification metrics for scored pairs: k-fold accuracy, ROC AUC, EER, TAR at FAR.

Scores are cosine similarities; a pair is predicted "same person" when its
score is at or above the threshold. Functions that return a single number
warn (:class:`UndefinedMetricWarning`) and return NaN on input where the
metric is undefined; :func:`verification_metrics` turns those into ``None``
with a ``<name>_reason`` entry so the result can be written as strict JSON.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from magface_al.evaluation.calibration import _as_arrays, accuracy_at_threshold, best_accuracy_threshold
from magface_al.evaluation.degenerate import warn_undefined
from magface_al.pairs.table import Pairs

logger = logging.getLogger(__name__)

DEFAULT_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)


class _Undefined(Exception):
    """Internal: a metric cannot be measured; the message is the reason."""


def cosine_scores(features: np.ndarray, key_to_row: Mapping[int, int], pairs: Pairs) -> np.ndarray:
    """Return the cosine similarity of each pair (float64, shape (N,)).

    Args:
        features: embeddings (M, D); rows are L2-normalized again here, so raw
            embeddings work too.
        key_to_row: record key to row of ``features``.
        pairs: the pairs to score.

    Raises:
        KeyError: a pair uses a key that has no embedding.
    """
    features = np.asarray(features, dtype=np.float64)
    missing = [k for k in pairs.keys.tolist() if k not in key_to_row]
    if missing:
        raise KeyError(
            f"{len(missing)} pair keys have no embedding (for example {missing[:5]}); "
            "embed every key that the pairs use"
        )
    rows1 = np.fromiter((key_to_row[k] for k in pairs.key1.tolist()), dtype=np.int64, count=len(pairs))
    rows2 = np.fromiter((key_to_row[k] for k in pairs.key2.tolist()), dtype=np.int64, count=len(pairs))
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    return np.einsum("ij,ij->i", unit[rows1], unit[rows2])


def far_name(far: float) -> str:
    """Return the metric-name form of a FAR target: 1e-3 -> "1e-3", 0.05 -> "5e-2"."""
    mantissa, exponent = f"{far:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _class_counts(labels: np.ndarray) -> tuple[int, int]:
    return int((labels == 1).sum()), int((labels == 0).sum())


def _check_ranking(scores: np.ndarray, labels: np.ndarray) -> None:
    """Raise _Undefined when ranking metrics (ROC, EER, TAR) cannot be measured."""
    positives, negatives = _class_counts(labels)
    if len(scores) == 0:
        raise _Undefined("there are no pairs")
    if positives == 0 or negatives == 0:
        raise _Undefined(f"needs both classes, got {positives} same-person and {negatives} different-person pairs")
    if np.ptp(scores) == 0:
        raise _Undefined("all scores are equal")


def _measure(function, *args: Any, **kwargs: Any) -> float:
    """Call an internal metric and turn _Undefined into a warning plus NaN."""
    try:
        return function(*args, **kwargs)
    except _Undefined as error:
        warn_undefined(f"{function.__name__.lstrip('_')}: {error}", stacklevel=4)
        return float("nan")


def _roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    _check_ranking(scores, labels)
    return float(roc_auc_score(labels, scores))


def _eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    _check_ranking(scores, labels)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    # fnr - fpr falls from 1 to -1 along the curve; interpolate where it crosses 0.
    gap = fnr - fpr
    crossing = int(np.flatnonzero(gap <= 0)[0])
    if crossing == 0 or gap[crossing] == 0:
        return float(fpr[crossing]), float(thresholds[max(crossing, 1)])
    before = crossing - 1
    weight = gap[before] / (gap[before] - gap[crossing])
    eer = fpr[before] + weight * (fpr[crossing] - fpr[before])
    # The first ROC threshold is +inf; use the next finite one there.
    low = thresholds[crossing]
    high = thresholds[before] if np.isfinite(thresholds[before]) else low
    return float(eer), float(high + weight * (low - high))


def _tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    _check_ranking(scores, labels)
    _, negatives = _class_counts(labels)
    required = math.ceil(1.0 / far - 1e-9)
    if negatives < required:
        raise _Undefined(
            f"FAR {far:g} needs at least {required} different-person pairs, got {negatives}"
        )
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    false_accepts = np.rint(fpr * negatives)
    allowed = math.floor(far * negatives + 1e-9)
    return float(tpr[false_accepts <= allowed].max())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the area under the ROC curve (scikit-learn); NaN with a warning when undefined."""
    scores, labels = _as_arrays(scores, labels)
    return _measure(_roc_auc, scores, labels)


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return the equal error rate and its threshold, interpolated linearly on the ROC curve.

    NaNs with a warning when undefined.
    """
    scores, labels = _as_arrays(scores, labels)
    try:
        return _eer(scores, labels)
    except _Undefined as error:
        warn_undefined(f"eer: {error}")
        return float("nan"), float("nan")


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Return the highest true accept rate whose false accept rate is at most ``far``.

    Undefined (NaN with a warning) unless there are at least ``1 / far``
    different-person pairs, because with fewer the FAR cannot be resolved and
    the result would be a misleading 0 or 1.
    """
    scores, labels = _as_arrays(scores, labels)
    return _measure(_tar_at_far, scores, labels, far)


@dataclass(frozen=True)
class KFoldResult:
    """Per-fold accuracy of thresholds chosen on the other folds."""

    accuracies: np.ndarray
    thresholds: np.ndarray
    assignment: str

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies)) if len(self.accuracies) else float("nan")

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0), as the LFW protocol reports it."""
        return float(np.std(self.accuracies)) if len(self.accuracies) else float("nan")


def fold_indices(labels: np.ndarray, folds: int) -> tuple[list[np.ndarray], str]:
    """Split pair positions into ``folds`` folds that each hold both classes.

    Contiguous folds are used when each contains both classes, which reproduces
    the LFW protocol for pairs in ``pairs.txt`` order. Otherwise (for example
    all same-person pairs listed first), each class is cut into contiguous
    runs separately and fold f takes the f-th run of each; for LFW this gives
    the same ten folds.

    Returns:
        The index arrays and "contiguous" or "stratified".
    """
    labels = np.asarray(labels)
    contiguous = np.array_split(np.arange(len(labels)), folds)
    if all(((labels[f] == 1).any() and (labels[f] == 0).any()) for f in contiguous):
        return contiguous, "contiguous"
    positives = np.array_split(np.flatnonzero(labels == 1), folds)
    negatives = np.array_split(np.flatnonzero(labels == 0), folds)
    stratified = [np.sort(np.concatenate([p, n])) for p, n in zip(positives, negatives)]
    logger.info("contiguous folds would hold a single class; assigning each class to the %d folds separately", folds)
    return stratified, "stratified"


def _kfold(scores: np.ndarray, labels: np.ndarray, folds: int) -> KFoldResult:
    positives, negatives = _class_counts(labels)
    usable = min(folds, positives, negatives)
    if usable < 2:
        raise _Undefined(
            f"{folds}-fold accuracy needs at least 2 pairs of each class, "
            f"got {positives} same-person and {negatives} different-person pairs"
        )
    if usable < folds:
        warn_undefined(
            f"only {usable} folds are possible with {positives} same-person and "
            f"{negatives} different-person pairs; using {usable} instead of {folds}",
            stacklevel=5,
        )
    parts, assignment = fold_indices(labels, usable)
    accuracies, thresholds = [], []
    for test in parts:
        train = np.ones(len(labels), dtype=bool)
        train[test] = False
        threshold, _ = best_accuracy_threshold(scores[train], labels[train])
        thresholds.append(threshold)
        accuracies.append(accuracy_at_threshold(scores[test], labels[test], threshold))
    return KFoldResult(np.asarray(accuracies), np.asarray(thresholds), assignment)


def kfold_accuracy(scores: np.ndarray, labels: np.ndarray, *, folds: int = 10) -> KFoldResult:
    """Run the k-fold protocol: per fold, pick the best threshold on the other folds and test it.

    Returns an empty result (mean and std NaN) with a warning when either
    class has fewer than two pairs.
    """
    scores, labels = _as_arrays(scores, labels)
    try:
        return _kfold(scores, labels, folds)
    except _Undefined as error:
        warn_undefined(f"kfold accuracy: {error}")
        return KFoldResult(np.zeros(0), np.zeros(0), "none")


def _confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    predicted = scores >= threshold
    actual = labels == 1
    return {
        "true_positive": int((predicted & actual).sum()),
        "false_positive": int((predicted & ~actual).sum()),
        "true_negative": int((~predicted & ~actual).sum()),
        "false_negative": int((~predicted & actual).sum()),
    }


class _Collector:
    """Gathers metric values and, for unmeasurable ones, None plus a reason."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def put(self, name: str, function, *args: Any) -> Any:
        try:
            value = function(*args)
        except _Undefined as error:
            self.undefined(name, str(error), stacklevel=6)
            return None
        self.values[name] = value
        return value

    def undefined(self, name: str, reason: str, *, stacklevel: int = 5) -> None:
        # stacklevel points the warning at the caller of verification_metrics.
        self.values[name] = None
        self.values[f"{name}_reason"] = reason
        warn_undefined(f"{name}: {reason}", stacklevel=stacklevel)


def verification_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    fixed_threshold: float = 0.4,
    folds: int = 10,
    threshold: float | None = None,
    far_targets: tuple[float, ...] = DEFAULT_FAR_TARGETS,
) -> dict[str, Any]:
    """Compute every verification metric for scored pairs, ready for strict JSON.

    Args:
        scores: cosine similarity per pair.
        labels: true label per pair (1 same person, 0 different).
        fixed_threshold: the conventional fixed threshold to report accuracy at.
        folds: number of folds of the k-fold protocol.
        threshold: operating threshold for precision, recall and the confusion
            counts, typically calibrated on validation pairs; ``fixed_threshold``
            when None.
        far_targets: FARs for the ``tar_at_far_<far>`` entries.

    Returns:
        A flat mapping (``confusion`` is nested). Keys: ``num_pairs``,
        ``num_same``, ``num_different``, ``accuracy`` and ``accuracy_std`` (k-fold
        mean and std), ``num_folds``, ``fold_assignment``, ``fold_accuracies``,
        ``fold_thresholds``, ``best_threshold`` and ``best_threshold_accuracy``
        (on all pairs), ``fixed_threshold``, ``accuracy_at_fixed_threshold``,
        ``operating_threshold``, ``accuracy_at_operating_threshold``,
        ``precision``, ``recall``, ``confusion``, ``auc``, ``eer``,
        ``eer_threshold`` and ``tar_at_far_<far>``. A value that cannot be
        measured is None, with the reason under ``<key>_reason``.
    """
    scores, labels = _as_arrays(scores, labels)
    positives, negatives = _class_counts(labels)
    operating = fixed_threshold if threshold is None else float(threshold)
    result = _Collector()
    result.values.update(num_pairs=len(scores), num_same=positives, num_different=negatives)

    kfold = result.put("accuracy", _kfold, scores, labels, folds)
    if kfold is not None:
        result.values["accuracy"] = kfold.mean
        result.values["accuracy_std"] = kfold.std
        result.values.update(
            num_folds=len(kfold.accuracies),
            fold_assignment=kfold.assignment,
            fold_accuracies=kfold.accuracies.tolist(),
            fold_thresholds=kfold.thresholds.tolist(),
        )
    else:
        result.values["accuracy_std"] = None
        result.values["accuracy_std_reason"] = result.values["accuracy_reason"]
        result.values.update(num_folds=0, fold_assignment="none", fold_accuracies=[], fold_thresholds=[])

    if len(scores):
        best, best_accuracy = best_accuracy_threshold(scores, labels)
        result.values.update(best_threshold=best, best_threshold_accuracy=best_accuracy)
        fixed_accuracy = accuracy_at_threshold(scores, labels, fixed_threshold)
        operating_accuracy = accuracy_at_threshold(scores, labels, operating)
    else:
        for name in ("best_threshold", "best_threshold_accuracy"):
            result.undefined(name, "there are no pairs")
        fixed_accuracy = operating_accuracy = None
    result.values["fixed_threshold"] = fixed_threshold
    if fixed_accuracy is None:
        result.undefined("accuracy_at_fixed_threshold", "there are no pairs")
    else:
        result.values["accuracy_at_fixed_threshold"] = fixed_accuracy
    result.values["operating_threshold"] = operating
    if operating_accuracy is None:
        result.undefined("accuracy_at_operating_threshold", "there are no pairs")
    else:
        result.values["accuracy_at_operating_threshold"] = operating_accuracy

    confusion = _confusion(scores, labels, operating)
    predicted_same = confusion["true_positive"] + confusion["false_positive"]
    if predicted_same:
        result.values["precision"] = confusion["true_positive"] / predicted_same
    else:
        result.undefined("precision", "no pair scored at or above the operating threshold")
    if positives:
        result.values["recall"] = confusion["true_positive"] / positives
    else:
        result.undefined("recall", "there are no same-person pairs")
    result.values["confusion"] = confusion

    result.put("auc", _roc_auc, scores, labels)
    eer = result.put("eer", _eer, scores, labels)
    if eer is not None:
        result.values["eer"], result.values["eer_threshold"] = eer
    else:
        result.values["eer_threshold"] = None
    for far in far_targets:
        result.put(f"tar_at_far_{far_name(far)}", _tar_at_far, scores, labels, far)
    return result.values


def roc_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Return the ROC curve (scikit-learn, intermediate points dropped) as ``fpr``, ``tpr``, ``threshold``.

    The first point's threshold, +inf in scikit-learn, is replaced by the
    largest score so the arrays can be written as strict JSON or CSV.
    Empty arrays with a warning when the curve is undefined.
    """
    scores, labels = _as_arrays(scores, labels)
    try:
        _check_ranking(scores, labels)
    except _Undefined as error:
        warn_undefined(f"roc: {error}")
        return {"fpr": np.zeros(0), "tpr": np.zeros(0), "threshold": np.zeros(0)}
    fpr, tpr, thresholds = roc_curve(labels, scores)
    thresholds = np.where(np.isfinite(thresholds), thresholds, np.nextafter(scores.max(), np.inf))
    return {"fpr": fpr, "tpr": tpr, "threshold": thresholds}


def score_histogram(scores: np.ndarray, labels: np.ndarray, *, bins: int = 50) -> dict[str, np.ndarray]:
    """Count scores per bin on [-1, 1] separately for same-person and different-person pairs."""
    scores, labels = _as_arrays(scores, labels)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    clipped = np.clip(scores, -1.0, 1.0)
    same, _ = np.histogram(clipped[labels == 1], bins=edges)
    different, _ = np.histogram(clipped[labels == 0], bins=edges)
    return {"score": 0.5 * (edges[:-1] + edges[1:]), "same_person": same, "different_person": different}
