"""Face quality evaluation: the error-versus-reject curve (ERC).

MagFace uses the embedding magnitude as face quality and evaluates it with an
ERC. The quality of a pair is the smaller magnitude of its two faces. The
lowest-quality pairs are dropped in steps of 5%, and the false non-match rate
(FNMR) is measured on the rest. The threshold is the one where the false
match rate (FMR) of all pairs is 1e-3, and it stays fixed while pairs are
dropped. If quality predicts errors, the curve falls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from magface_al.evaluation.calibration import _as_arrays
from magface_al.evaluation.degenerate import warn_undefined
from magface_al.evaluation.verification import far_name
from magface_al.pairs.table import Pairs


def pair_quality(magnitudes: np.ndarray, key_to_row: Mapping[int, int], pairs: Pairs) -> np.ndarray:
    """Return each pair's quality: the smaller embedding magnitude of its two faces."""
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    rows1 = np.fromiter((key_to_row[k] for k in pairs.key1.tolist()), dtype=np.int64, count=len(pairs))
    rows2 = np.fromiter((key_to_row[k] for k in pairs.key2.tolist()), dtype=np.int64, count=len(pairs))
    return np.minimum(magnitudes[rows1], magnitudes[rows2])


def threshold_at_fmr(scores: np.ndarray, labels: np.ndarray, fmr: float) -> float:
    """Return the lowest threshold whose false match rate is at most ``fmr``.

    NaN with a warning unless there are at least ``1 / fmr`` different-person pairs.
    """
    if not 0 < fmr < 1:
        raise ValueError(f"fmr must be in (0, 1), got {fmr}")
    scores, labels = _as_arrays(scores, labels)
    impostor = np.sort(scores[labels == 0])[::-1]
    required = math.ceil(1.0 / fmr - 1e-9)
    if len(impostor) < required:
        warn_undefined(
            f"FMR {fmr:g} needs at least {required} different-person pairs, got {len(impostor)}"
        )
        return float("nan")
    allowed = math.floor(fmr * len(impostor) + 1e-9)
    # Just above the first impostor score that must be rejected; ties with it are rejected too.
    return float(np.nextafter(impostor[allowed], np.inf))


@dataclass(frozen=True)
class ErrorRejectCurve:
    """The ERC: per reject fraction, the pairs kept and the errors among them.

    Attributes:
        reject_fraction: requested share of lowest-quality pairs dropped.
        kept: number of pairs kept at each step.
        fnmr: false non-match rate of the kept pairs at ``fmr_threshold``.
        accuracy: accuracy of the kept pairs at ``accuracy_threshold`` (NaN when none given).
        fmr: the false match rate that fixes ``fmr_threshold`` on all pairs.
        fmr_threshold: the fixed score threshold for ``fnmr``.
        accuracy_threshold: the threshold for ``accuracy``, typically calibrated.
        reason: why ``fnmr`` is NaN, when it is.
    """

    reject_fraction: np.ndarray
    kept: np.ndarray
    fnmr: np.ndarray
    accuracy: np.ndarray
    fmr: float
    fmr_threshold: float
    accuracy_threshold: float | None
    reason: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        """Return one mapping per step, for a CSV or JSON plot file."""
        return [
            {
                "reject_fraction": round(float(r), 6),
                "kept": int(k),
                "fnmr": float(f),
                "accuracy": float(a),
            }
            for r, k, f, a in zip(self.reject_fraction, self.kept, self.fnmr, self.accuracy)
        ]

    def summary(self) -> dict[str, Any]:
        """Return scalars that show whether the curve falls, ready for strict JSON.

        ``fnmr_drop`` is the FNMR with nothing rejected minus the FNMR at the
        largest reject fraction (positive when quality helps); ``fnmr_slope``
        is the least-squares slope of FNMR over the reject fraction.
        """
        key = f"erc_fmr_{far_name(self.fmr)}"
        summary: dict[str, Any] = {
            "erc_fmr": self.fmr,
            "erc_threshold": self.fmr_threshold if math.isfinite(self.fmr_threshold) else None,
            "erc_max_reject_fraction": float(self.reject_fraction[-1]) if len(self.reject_fraction) else None,
        }
        finite = np.isfinite(self.fnmr)
        if len(self.fnmr) and finite.all():
            summary[f"{key}_fnmr_at_no_reject"] = float(self.fnmr[0])
            summary[f"{key}_fnmr_at_max_reject"] = float(self.fnmr[-1])
            summary[f"{key}_fnmr_drop"] = float(self.fnmr[0] - self.fnmr[-1])
            if len(self.fnmr) > 1:
                summary[f"{key}_fnmr_slope"] = float(np.polyfit(self.reject_fraction, self.fnmr, 1)[0])
            else:
                summary[f"{key}_fnmr_slope"] = None
                summary[f"{key}_fnmr_slope_reason"] = "the curve has a single step"
        else:
            reason = self.reason or "FNMR is undefined at some reject fraction (no same-person pairs left)"
            for name in ("fnmr_at_no_reject", "fnmr_at_max_reject", "fnmr_drop", "fnmr_slope"):
                summary[f"{key}_{name}"] = None
                summary[f"{key}_{name}_reason"] = reason
        return summary


def error_versus_reject(
    scores: np.ndarray,
    labels: np.ndarray,
    quality: np.ndarray,
    *,
    fmr: float = 1e-3,
    step: float = 0.05,
    max_reject: float = 0.5,
    accuracy_threshold: float | None = None,
) -> ErrorRejectCurve:
    """Compute the error-versus-reject curve.

    Args:
        scores: cosine similarity per pair.
        labels: true label per pair.
        quality: quality per pair, e.g. :func:`pair_quality`; lower is dropped first.
        fmr: false match rate that fixes the FNMR threshold on all pairs.
        step: reject fraction increment.
        max_reject: largest reject fraction (included when it is a multiple of ``step``).
        accuracy_threshold: also report accuracy at this threshold per step.

    Returns:
        The curve; FNMR is NaN (with ``reason``) when there are fewer than
        ``1 / fmr`` different-person pairs or no same-person pair is left.
    """
    scores, labels = _as_arrays(scores, labels)
    quality = np.asarray(quality, dtype=np.float64).reshape(-1)
    if quality.shape != scores.shape:
        raise ValueError(f"quality has {len(quality)} entries but scores {len(scores)}; pass one per pair")
    if not 0 < fmr < 1:
        raise ValueError(f"fmr must be in (0, 1), got {fmr}")
    if not 0 < step <= 1 or not 0 <= max_reject < 1:
        raise ValueError(f"need 0 < step <= 1 and 0 <= max_reject < 1, got step {step} and max_reject {max_reject}")

    fractions = np.round(np.arange(0.0, max_reject + 1e-9, step), 10)
    reason = None
    negatives = int((labels == 0).sum())
    required = math.ceil(1.0 / fmr - 1e-9)
    if negatives < required:
        reason = f"FMR {fmr:g} needs at least {required} different-person pairs, got {negatives}"
        warn_undefined(f"error versus reject: {reason}")
        threshold = float("nan")
    else:
        threshold = threshold_at_fmr(scores, labels, fmr)

    # Stable sort, so pairs of equal quality are dropped in their given order.
    order = np.argsort(quality, kind="stable")
    kept_counts, fnmr, accuracy = [], [], []
    for fraction in fractions:
        kept = order[int(round(fraction * len(scores))):]
        genuine = scores[kept][labels[kept] == 1]
        kept_counts.append(len(kept))
        if math.isfinite(threshold) and len(genuine):
            fnmr.append(float(np.mean(genuine < threshold)))
        else:
            fnmr.append(float("nan"))
        if accuracy_threshold is not None and len(kept):
            accuracy.append(float(np.mean((scores[kept] >= accuracy_threshold) == (labels[kept] == 1))))
        else:
            accuracy.append(float("nan"))
    if reason is None and any(math.isnan(f) for f in fnmr):
        reason = "no same-person pair is left at some reject fraction"
        warn_undefined(f"error versus reject: {reason}")
    return ErrorRejectCurve(
        reject_fraction=fractions,
        kept=np.asarray(kept_counts),
        fnmr=np.asarray(fnmr),
        accuracy=np.asarray(accuracy),
        fmr=fmr,
        fmr_threshold=threshold,
        accuracy_threshold=accuracy_threshold,
        reason=reason,
    )
