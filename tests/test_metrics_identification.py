"""Identification top-k accuracy against hand-computed cases and a brute-force ranking."""

from __future__ import annotations

import numpy as np
import pytest

from magface_al.evaluation.degenerate import UndefinedMetricWarning
from magface_al.evaluation.identification import identification_metrics, split_gallery


def _angle_features(angles_degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(angles_degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_split_gallery_one_per_identity():
    labels = np.array([3, 3, 3, 7, 9, 9])
    gallery, probes = split_gallery(labels, seed=0)
    assert sorted(labels[gallery].tolist()) == [3, 7, 9]
    assert len(probes) == 3
    assert set(gallery.tolist()) | set(probes.tolist()) == set(range(6))


def test_split_gallery_first_image_without_seed():
    labels = np.array([5, 5, 2, 2])
    gallery, probes = split_gallery(labels, seed=None)
    assert gallery.tolist() == [0, 2]
    assert probes.tolist() == [1, 3]


def test_identification_hand_case():
    # Gallery (first images): identity 0 at 0 deg, 1 at 90 deg, 2 at 180 deg.
    # Probes: identity 0 at 10 deg (nearest is its own: rank 0), identity 1 at
    # 170 deg (nearest is identity 2; its own at 90 deg is second: rank 1).
    features = _angle_features([0, 10, 90, 170, 180])
    labels = np.array([0, 0, 1, 1, 2])
    metrics = identification_metrics(features, labels, ranks=(1, 2, 5), seed=None)
    assert metrics["num_gallery"] == 3
    assert metrics["num_probes"] == 2
    assert metrics["top_1"] == pytest.approx(0.5)
    assert metrics["top_2"] == pytest.approx(1.0)
    assert metrics["top_5"] == pytest.approx(1.0)


def test_identification_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, size=300)
    centres = rng.normal(size=(40, 16))
    features = centres[labels] + rng.normal(scale=0.9, size=(300, 16))
    metrics = identification_metrics(features, labels, ranks=(1, 5), seed=3)
    gallery, probes = split_gallery(labels, seed=3)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    hits = {1: 0, 5: 0}
    for probe in probes:
        similarities = unit[gallery] @ unit[probe]
        ranked = labels[gallery][np.argsort(-similarities)]
        for k in hits:
            hits[k] += labels[probe] in ranked[:k]
    assert metrics["top_1"] == pytest.approx(hits[1] / len(probes))
    assert metrics["top_5"] == pytest.approx(hits[5] / len(probes))
    assert metrics["top_1"] < metrics["top_5"]


def test_identification_without_probes_warns():
    with pytest.warns(UndefinedMetricWarning, match="no identity has a second image"):
        metrics = identification_metrics(np.eye(3), np.array([0, 1, 2]))
    assert metrics["top_1"] is None
    assert metrics["top_1_reason"] == "no identity has a second image to use as a probe"
