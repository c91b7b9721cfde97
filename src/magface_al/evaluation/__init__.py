"""Verification, identification and quality metrics, and threshold calibration.

``pipeline`` (evaluate a model on validation and test pairs) imports torch
through the embedding package, so it is not imported here.
"""

from magface_al.evaluation.calibration import accuracy_at_threshold, best_accuracy_threshold, calibrate_threshold
from magface_al.evaluation.degenerate import UndefinedMetricWarning
from magface_al.evaluation.identification import identification_metrics
from magface_al.evaluation.quality import error_versus_reject, pair_quality
from magface_al.evaluation.verification import cosine_scores, verification_metrics

__all__ = [
    "UndefinedMetricWarning",
    "accuracy_at_threshold",
    "best_accuracy_threshold",
    "calibrate_threshold",
    "cosine_scores",
    "error_versus_reject",
    "identification_metrics",
    "pair_quality",
    "verification_metrics",
]
