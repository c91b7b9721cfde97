"""Closed-set identification: rank-k accuracy with one gallery image per identity."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from magface_al.evaluation.degenerate import warn_undefined

logger = logging.getLogger(__name__)


def split_gallery(labels: np.ndarray, *, seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pick one gallery image per identity; every other image is a probe.

    Args:
        labels: identity id per image.
        seed: seed for the choice of gallery image; None takes each identity's first image.

    Returns:
        Positions of the gallery images and of the probe images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed) if seed is not None else None
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    offsets = rng.integers(0, counts) if rng is not None else np.zeros(len(counts), dtype=np.int64)
    gallery = np.sort(order[starts + offsets])
    probe_mask = np.ones(len(labels), dtype=bool)
    probe_mask[gallery] = False
    return gallery, np.flatnonzero(probe_mask)


def rank_of_true_identity(
    features: np.ndarray, labels: np.ndarray, gallery: np.ndarray, probes: np.ndarray, *, block_size: int = 1024
) -> np.ndarray:
    """Return, per probe, how many gallery images score strictly higher than its own identity's.

    Rank 0 is a correct top-1 match. Ties with the true gallery image count in
    the probe's favour.
    """
    features = np.asarray(features, dtype=np.float32)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels, dtype=np.int64)
    gallery_features = features[gallery]
    gallery_labels = labels[gallery]
    column_of = {int(label): i for i, label in enumerate(gallery_labels.tolist())}
    ranks = np.empty(len(probes), dtype=np.int64)
    for start in range(0, len(probes), block_size):
        block = probes[start:start + block_size]
        scores = features[block] @ gallery_features.T
        true_column = np.array([column_of[int(label)] for label in labels[block].tolist()], dtype=np.int64)
        true_score = scores[np.arange(len(block)), true_column]
        ranks[start:start + len(block)] = (scores > true_score[:, None]).sum(axis=1)
    return ranks


def identification_metrics(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    ranks: tuple[int, ...] = (1, 5, 10),
    seed: int | None = 0,
) -> dict[str, Any]:
    """Compute top-k identification accuracy, ready for strict JSON.

    Every identity contributes one gallery image (identities with a single
    image act as distractors); the remaining images are probes.

    Returns:
        ``num_gallery``, ``num_probes`` and ``top_<k>`` per rank; a top-k value
        is None with ``top_<k>_reason`` when there are no probes.
    """
    features = np.asarray(features)
    labels = np.asarray(labels, dtype=np.int64)
    if len(features) != len(labels):
        raise ValueError(f"features has {len(features)} rows but labels {len(labels)}; align them")
    gallery, probes = split_gallery(labels, seed=seed)
    result: dict[str, Any] = {"num_gallery": int(len(gallery)), "num_probes": int(len(probes))}
    if len(probes) == 0:
        reason = "no identity has a second image to use as a probe"
        warn_undefined(f"identification: {reason}")
        for k in ranks:
            result[f"top_{k}"] = None
            result[f"top_{k}_reason"] = reason
        return result
    rank = rank_of_true_identity(features, labels, gallery, probes)
    for k in ranks:
        result[f"top_{k}"] = float(np.mean(rank < k))
    return result
