"""Verification metrics against hand-computed cases and against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from magface_al.evaluation.calibration import (
    accuracy_at_threshold,
    best_accuracy_threshold,
    calibrate_threshold,
)
from magface_al.evaluation.degenerate import UndefinedMetricWarning
from magface_al.evaluation.verification import (
    cosine_scores,
    equal_error_rate,
    far_name,
    fold_indices,
    kfold_accuracy,
    roc_auc,
    roc_points,
    score_histogram,
    tar_at_far,
    verification_metrics,
)
from magface_al.pairs import Pairs

# Six pairs: same-person scores 0.9, 0.8, 0.6; different-person 0.7, 0.5, 0.4.
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
HAND_LABELS = np.array([1, 1, 0, 1, 0, 0])
IGNORE_UNDEFINED = pytest.mark.filterwarnings("ignore::magface_al.evaluation.degenerate.UndefinedMetricWarning")


def _random_pairs(count: int, seed: int, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    scores = rng.normal(0.0, 1.0, size=count) + separation * labels
    return scores, labels


def _brute_force_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    best = 0.0
    positives, negatives = scores[labels == 1], scores[labels == 0]
    for threshold in np.concatenate([np.unique(scores), [np.inf]]):
        if np.mean(negatives >= threshold) <= far:
            best = max(best, float(np.mean(positives >= threshold)))
    return best


def test_auc_hand_case():
    # 8 of the 9 (same, different) score pairs are ordered correctly.
    assert roc_auc(HAND_SCORES, HAND_LABELS) == pytest.approx(8 / 9)


def test_auc_matches_sklearn():
    scores, labels = _random_pairs(500, seed=1)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_eer_hand_case():
    # At threshold 0.7: one of three different-person pairs accepted, one of three same-person rejected.
    eer, threshold = equal_error_rate(HAND_SCORES, HAND_LABELS)
    assert eer == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.7)


def test_eer_interpolates_between_points():
    scores, labels = _random_pairs(2000, seed=2)
    eer, threshold = equal_error_rate(scores, labels)
    far = np.mean(scores[labels == 0] >= threshold)
    frr = np.mean(scores[labels == 1] < threshold)
    assert abs(far - eer) < 0.01
    assert abs(frr - eer) < 0.01


def test_best_threshold_hand_case():
    # Cuts below 0.6 and below 0.8 both give 5 of 6 correct; the lower-median one is taken.
    threshold, accuracy = best_accuracy_threshold(HAND_SCORES, HAND_LABELS)
    assert threshold == pytest.approx(0.55)
    assert accuracy == pytest.approx(5 / 6)


def test_best_threshold_reaches_brute_force_maximum():
    scores, labels = _random_pairs(300, seed=3)
    _, accuracy = best_accuracy_threshold(scores, labels)
    brute = max(
        np.mean((scores >= t) == (labels == 1)) for t in np.concatenate([np.unique(scores), [np.inf]])
    )
    assert accuracy == pytest.approx(brute)


def test_best_threshold_separable_is_between_classes():
    threshold, accuracy = best_accuracy_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert accuracy == 1.0
    assert threshold == pytest.approx(0.5)


def test_accuracy_at_threshold_hand_case():
    # At 0.4 every pair is accepted: the three same-person pairs are right.
    assert accuracy_at_threshold(HAND_SCORES, HAND_LABELS, 0.4) == pytest.approx(3 / 6)
    assert accuracy_at_threshold(HAND_SCORES, HAND_LABELS, 0.75) == pytest.approx(5 / 6)


def test_calibrated_threshold_transfers_to_test():
    val_scores, val_labels = _random_pairs(20000, seed=4, separation=2.0)
    test_scores, test_labels = _random_pairs(2000, seed=5, separation=2.0)
    threshold = calibrate_threshold(val_scores, val_labels)
    # Two unit normals 2 apart: the best threshold is their midpoint, 1.0.
    assert threshold == pytest.approx(1.0, abs=0.2)
    assert accuracy_at_threshold(test_scores, test_labels, threshold) > 0.8


@pytest.mark.parametrize("far", [1e-1, 1e-2])
def test_tar_at_far_matches_brute_force(far):
    scores, labels = _random_pairs(3000, seed=6, separation=2.0)
    assert tar_at_far(scores, labels, far) == pytest.approx(_brute_force_tar(scores, labels, far))


def test_tar_at_far_too_few_negatives_is_nan():
    scores, labels = _random_pairs(200, seed=7)
    with pytest.warns(UndefinedMetricWarning, match="FAR 0.001 needs at least 1000 different-person pairs"):
        value = tar_at_far(scores, labels, 1e-3)
    assert np.isnan(value)


def test_far_name_formats():
    assert far_name(1e-3) == "1e-3"
    assert far_name(0.1) == "1e-1"
    assert far_name(5e-2) == "5e-2"


def test_fold_indices_contiguous_in_protocol_order():
    labels = np.tile(np.repeat([1, 0], 3), 10)  # ten folds of 3 same then 3 different
    folds, assignment = fold_indices(labels, 10)
    assert assignment == "contiguous"
    assert [f.tolist() for f in folds] == [list(range(6 * i, 6 * i + 6)) for i in range(10)]


def test_fold_indices_stratified_when_positives_first():
    protocol = np.tile(np.repeat([1, 0], 3), 10)
    protocol_folds, _ = fold_indices(protocol, 10)
    # Reorder to all same-person pairs first, keeping each class's order.
    order = np.concatenate([np.flatnonzero(protocol == 1), np.flatnonzero(protocol == 0)])
    folds, assignment = fold_indices(protocol[order], 10)
    assert assignment == "stratified"
    for fold, protocol_fold in zip(folds, protocol_folds):
        assert set(order[fold].tolist()) == set(protocol_fold.tolist())
        assert set(protocol[order][fold].tolist()) == {0, 1}


def test_kfold_thresholds_chosen_on_other_folds():
    scores, labels = _random_pairs(600, seed=8)
    result = kfold_accuracy(scores, labels, folds=10)
    folds, _ = fold_indices(labels, 10)
    for fold, threshold, accuracy in zip(folds, result.thresholds, result.accuracies):
        train = np.setdiff1d(np.arange(len(labels)), fold)
        expected_threshold, _ = best_accuracy_threshold(scores[train], labels[train])
        assert threshold == pytest.approx(expected_threshold)
        assert accuracy == pytest.approx(np.mean((scores[fold] >= threshold) == (labels[fold] == 1)))
    assert result.mean == pytest.approx(np.mean(result.accuracies))
    assert result.std == pytest.approx(np.std(result.accuracies))


def test_kfold_separable_is_perfect():
    labels = np.tile(np.repeat([1, 0], 30), 10)
    scores = np.where(labels == 1, 0.8, 0.1) + np.linspace(0, 0.05, len(labels))
    result = kfold_accuracy(scores, labels)
    assert result.mean == 1.0
    assert result.std == 0.0


@IGNORE_UNDEFINED
def test_metrics_hand_case_values():
    metrics = verification_metrics(HAND_SCORES, HAND_LABELS, fixed_threshold=0.4, folds=2, threshold=0.75)
    assert metrics["num_pairs"] == 6
    assert metrics["num_same"] == 3
    assert metrics["accuracy_at_fixed_threshold"] == pytest.approx(0.5)
    assert metrics["accuracy_at_operating_threshold"] == pytest.approx(5 / 6)
    assert metrics["confusion"] == {"true_positive": 2, "false_positive": 0, "true_negative": 3, "false_negative": 1}
    assert metrics["precision"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["auc"] == pytest.approx(8 / 9)
    assert metrics["eer"] == pytest.approx(1 / 3)
    assert metrics["best_threshold"] == pytest.approx(0.55)
    assert len(metrics["fold_accuracies"]) == 2


@IGNORE_UNDEFINED
def test_metrics_keys_for_verify_command():
    scores, labels = _random_pairs(6000, seed=9, separation=3.0)
    metrics = verification_metrics(scores, labels)
    for key in ("accuracy", "accuracy_std", "auc", "eer", "tar_at_far_1e-3"):
        assert isinstance(metrics[key], float), key
    assert metrics["tar_at_far_1e-4"] is None
    assert "needs at least 10000" in metrics["tar_at_far_1e-4_reason"]
    assert metrics["num_folds"] == 10
    json.dumps(metrics, allow_nan=False)


@IGNORE_UNDEFINED
def test_metrics_one_class_warns_and_is_strict_json():
    with pytest.warns(UndefinedMetricWarning, match="needs both classes"):
        metrics = verification_metrics(np.array([0.5, 0.7, 0.9]), np.array([1, 1, 1]))
    assert metrics["auc"] is None
    assert metrics["auc_reason"] == "needs both classes, got 3 same-person and 0 different-person pairs"
    assert metrics["accuracy"] is None
    assert metrics["accuracy_at_fixed_threshold"] == 1.0
    json.dumps(metrics, allow_nan=False)


@IGNORE_UNDEFINED
def test_metrics_empty_warns_and_is_strict_json():
    with pytest.warns(UndefinedMetricWarning, match="there are no pairs"):
        metrics = verification_metrics(np.zeros(0), np.zeros(0, dtype=int))
    assert metrics["num_pairs"] == 0
    assert metrics["auc"] is None
    assert metrics["accuracy_at_fixed_threshold"] is None
    assert metrics["precision"] is None
    json.dumps(metrics, allow_nan=False)


@IGNORE_UNDEFINED
def test_metrics_constant_scores_warns():
    with pytest.warns(UndefinedMetricWarning, match="all scores are equal"):
        metrics = verification_metrics(np.full(40, 0.3), np.tile([0, 1], 20))
    assert metrics["auc"] is None
    assert metrics["eer"] is None
    assert metrics["auc_reason"] == "all scores are equal"


def test_auc_one_class_returns_nan():
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="scores has 3 entries but labels 2"):
        verification_metrics(np.zeros(3), np.zeros(2, dtype=int))


def test_cosine_scores_match_manual():
    rng = np.random.default_rng(10)
    features = rng.normal(size=(5, 8)).astype(np.float32)
    key_to_row = {10 + i: i for i in range(5)}
    pairs = Pairs([10, 11, 12], [14, 13, 10], [1, 0, 0], [0, 0, 1], [0, 1, 1])
    scores = cosine_scores(features, key_to_row, pairs)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    expected = [unit[0] @ unit[4], unit[1] @ unit[3], unit[2] @ unit[0]]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_cosine_scores_missing_key():
    pairs = Pairs([1], [2], [1], [0], [0])
    with pytest.raises(KeyError, match="1 pair keys have no embedding"):
        cosine_scores(np.eye(2), {1: 0}, pairs)


def test_roc_points_are_finite():
    scores, labels = _random_pairs(100, seed=11)
    roc = roc_points(scores, labels)
    assert np.isfinite(roc["threshold"]).all()
    assert roc["fpr"][0] == 0.0
    assert roc["tpr"][-1] == 1.0


def test_score_histogram_counts_by_class():
    histogram = score_histogram(HAND_SCORES, HAND_LABELS, bins=4)
    assert histogram["same_person"].sum() == 3
    assert histogram["different_person"].sum() == 3
    # Bins of width 0.5 on [-1, 1]: every score is in the last one except 0.4 and 0.5 edges.
    assert histogram["same_person"].tolist() == [0, 0, 0, 3]
    assert histogram["different_person"].tolist() == [0, 0, 1, 2]
