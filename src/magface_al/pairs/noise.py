"""Simulated annotator noise: flip feedback labels, keep the truth."""

from __future__ import annotations

import logging

import numpy as np

from magface_al.pairs.table import Pairs

logger = logging.getLogger(__name__)


def flip_labels(labels: np.ndarray, correct_rate: float, *, seed: int | np.random.Generator) -> np.ndarray:
    """Return a copy of binary ``labels`` where each is flipped with probability ``1 - correct_rate``.

    Each label is flipped independently (a Bernoulli draw per pair), so the
    realized noise rate varies around ``1 - correct_rate`` by about
    ``sqrt(p (1 - p) / n)``.
    """
    if not 0.0 <= correct_rate <= 1.0:
        raise ValueError(f"correct_rate must be in [0, 1], got {correct_rate}; set it in params.yaml")
    labels = np.asarray(labels, dtype=np.int64)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    flip = rng.random(len(labels)) >= correct_rate
    return np.where(flip, 1 - labels, labels)


def simulate_feedback(pairs: Pairs, correct_rate: float, *, seed: int | np.random.Generator) -> Pairs:
    """Return ``pairs`` with noisy labels in ``label`` and the true ones in ``truth``."""
    truth = pairs.true_labels
    noisy = flip_labels(truth, correct_rate, seed=seed)
    result = Pairs(pairs.key1, pairs.key2, noisy, pairs.identity1, pairs.identity2, truth=truth.copy())
    logger.info(
        "simulated feedback on %d pairs: %d labels flipped (requested noise rate %.3f, realized %.3f)",
        len(result), int((noisy != truth).sum()), 1.0 - correct_rate, realized_noise_rate(result),
    )
    return result


def realized_noise_rate(pairs: Pairs) -> float:
    """Return the share of pairs whose label differs from the truth; NaN when unknown or empty."""
    if pairs.truth is None or len(pairs) == 0:
        return float("nan")
    return float(np.mean(pairs.label != pairs.truth))
