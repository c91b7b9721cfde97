"""Error-versus-reject curve and FMR thresholds against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magface_al.evaluation.degenerate import UndefinedMetricWarning
from magface_al.evaluation.quality import error_versus_reject, pair_quality, threshold_at_fmr
from magface_al.pairs import Pairs
from magface_al.utils import to_strict_json


def test_threshold_at_fmr_allows_one_false_match_in_1000():
    impostor = np.arange(1000) / 1000.0  # 0.000 .. 0.999
    scores = np.concatenate([impostor, [0.5]])
    labels = np.concatenate([np.zeros(1000, int), [1]])
    threshold = threshold_at_fmr(scores, labels, 1e-3)
    assert np.mean(impostor >= threshold) == pytest.approx(1e-3)
    assert 0.998 < threshold <= 0.999


def test_threshold_at_fmr_too_few_negatives():
    with pytest.warns(UndefinedMetricWarning, match="needs at least 1000 different-person pairs, got 10"):
        assert np.isnan(threshold_at_fmr(np.zeros(11), np.r_[np.zeros(10, int), 1], 1e-3))


def _quality_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # 1000 impostors with scores 0..0.999 and 100 genuine pairs; the 20 genuine
    # pairs of lowest quality score 0.1 (missed), the other 80 score 0.99.
    impostor_scores = np.arange(1000) / 1000.0
    genuine_scores = np.r_[np.full(20, 0.1), np.full(80, 0.9995)]
    scores = np.r_[impostor_scores, genuine_scores]
    labels = np.r_[np.zeros(1000, int), np.ones(100, int)]
    quality = np.r_[np.linspace(50, 60, 1000), np.linspace(10, 11, 20), np.full(80, 70.0)]
    return scores, labels, quality


def test_erc_hand_case_falls():
    scores, labels, quality = _quality_case()
    curve = error_versus_reject(scores, labels, quality, fmr=1e-3, step=0.05, max_reject=0.1)
    assert curve.reject_fraction.tolist() == [0.0, 0.05, 0.1]
    assert curve.kept.tolist() == [1100, 1045, 990]
    # No reject: 20 of 100 genuine missed. 5% (55 pairs) drops the 20 bad genuine ones.
    assert curve.fnmr.tolist() == pytest.approx([0.2, 0.0, 0.0])
    summary = curve.summary()
    assert summary["erc_fmr_1e-3_fnmr_drop"] == pytest.approx(0.2)
    assert summary["erc_fmr_1e-3_fnmr_slope"] < 0


def test_erc_accuracy_at_threshold_per_step():
    scores, labels, quality = _quality_case()
    curve = error_versus_reject(scores, labels, quality, max_reject=0.05, accuracy_threshold=0.5)
    # At 0.5: impostors >= 0.5 (500) wrong, 20 genuine at 0.1 wrong.
    assert curve.accuracy[0] == pytest.approx((1100 - 520) / 1100)
    assert curve.accuracy[1] == pytest.approx((1045 - 500) / 1045)


def test_erc_too_few_negatives_gives_reasons():
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    labels = np.array([1, 1, 0, 0])
    with pytest.warns(UndefinedMetricWarning, match="needs at least 1000"):
        curve = error_versus_reject(scores, labels, np.arange(4.0))
    summary = curve.summary()
    assert summary["erc_fmr_1e-3_fnmr_drop"] is None
    assert "needs at least 1000" in summary["erc_fmr_1e-3_fnmr_drop_reason"]
    json.dumps(to_strict_json(curve.rows()), allow_nan=False)


def test_pair_quality_is_smaller_magnitude():
    pairs = Pairs([1, 2], [3, 1], [1, 0], [0, 0], [0, 0])
    quality = pair_quality(np.array([20.0, 25.0, 18.0]), {1: 0, 2: 1, 3: 2}, pairs)
    assert quality.tolist() == [18.0, 20.0]
