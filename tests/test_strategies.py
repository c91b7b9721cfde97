"""Tests of the selection strategies on synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from magface_al.active.strategies import (
    STRATEGIES,
    SelectionParams,
    hardness,
    pair_codes,
    quality_cutoff,
    rank_hard,
    rank_quality,
    rank_uncertainty,
    select_batch,
    select_diverse,
    unlabelled_mask,
)


def unit_rows(count: int, dimension: int = 8, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dimension))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def candidate_table(count: int = 60, images: int = 30, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows1 = rng.integers(0, images, size=count)
    rows2 = (rows1 + 1 + rng.integers(0, images - 1, size=count)) % images
    magnitudes = rng.uniform(10, 30, size=images)
    return {
        "scores": rng.uniform(-0.2, 0.9, size=count),
        "same_identity": rng.random(count) < 0.5,
        "rows1": rows1,
        "rows2": rows2,
        "quality": np.minimum(magnitudes[rows1], magnitudes[rows2]),
        "features": unit_rows(images, seed=seed),
        "image_magnitudes": magnitudes,
    }


def test_pair_codes_ignore_order():
    assert pair_codes(np.array([3, 9]), np.array([9, 3])).tolist()[0] == pair_codes(np.array([9]), np.array([3]))[0]
    assert len(set(pair_codes(np.array([1, 2, 1]), np.array([2, 3, 3])).tolist())) == 3


def test_pair_codes_reject_large_keys():
    with pytest.raises(ValueError, match=r"record keys must lie in \[0, 2\*\*31\)"):
        pair_codes(np.array([2**31]), np.array([1]))


def test_unlabelled_mask_either_order():
    mask = unlabelled_mask(np.array([1, 2, 5]), np.array([2, 3, 6]), np.array([3, 6]), np.array([2, 5]))
    assert mask.tolist() == [True, False, False]


def test_rank_uncertainty_nearest_threshold_first():
    order = rank_uncertainty(np.array([0.9, 0.41, 0.1, 0.35, 0.5]), 0.4)
    assert order.tolist() == [1, 3, 4, 2, 0]


def test_hardness_sign_by_identity():
    values = hardness(np.array([0.8, 0.8, 0.1, 0.1]), 0.4, np.array([False, True, False, True]))
    np.testing.assert_allclose(values, [0.4, -0.4, -0.3, 0.3])


def test_rank_hard_most_confusing_first():
    scores = np.array([0.2, 0.95, 0.5, -0.3, 0.45])
    same = np.array([True, False, True, True, False])
    # Pair 1 is a different-identity pair scored 0.55 above the threshold; pair 3
    # a same-identity pair 0.7 below it.
    assert rank_hard(scores, 0.4, same).tolist()[:2] == [3, 1]


def test_quality_cutoff_is_quantile():
    assert quality_cutoff(np.arange(1, 11, dtype=float), 0.5) == pytest.approx(5.5)


def test_quality_cutoff_rejects_empty():
    with pytest.raises(ValueError, match="cannot compute a quality cutoff from no magnitudes"):
        quality_cutoff(np.array([]), 0.1)


def test_rank_quality_skip_drops_low_quality():
    scores = np.array([0.40, 0.41, 0.9, 0.39])
    quality = np.array([5.0, 20.0, 20.0, 25.0])
    assert rank_quality(scores, 0.4, quality, 10.0, "skip").tolist() == [1, 3, 2]


def test_rank_quality_prefer_puts_low_quality_first():
    scores = np.array([0.41, 0.9, 0.0, 0.39])
    quality = np.array([20.0, 5.0, 6.0, 25.0])
    # Low-quality pairs 1 and 2 come first, each group by distance from the threshold.
    assert rank_quality(scores, 0.4, quality, 10.0, "prefer").tolist() == [2, 1, 0, 3]


def test_select_diverse_limits_image_use():
    features = unit_rows(6)
    rows1 = np.array([0, 0, 1, 2])
    rows2 = np.array([1, 2, 3, 4])
    chosen = select_diverse(np.arange(4), rows1, rows2, features, 4, similarity=1.01)
    # Pair 1 reuses image 0 and pair 2 reuses image 1.
    assert chosen.tolist() == [0, 3]


def test_select_diverse_skips_near_duplicate_pairs():
    base = unit_rows(4, seed=2)
    # Images 4 and 5 are nearly copies of images 1 and 0.
    copies = base[[1, 0]] + 0.01 * unit_rows(2, seed=3)
    features = np.vstack([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    rows1 = np.array([0, 4, 2])
    rows2 = np.array([1, 5, 3])
    chosen = select_diverse(np.arange(3), rows1, rows2, features, 3, similarity=0.95)
    assert chosen.tolist() == [0, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_select_batch_never_reasks_labelled(strategy):
    table = candidate_table()
    available = np.ones(60, dtype=bool)
    available[::2] = False
    params = SelectionParams(strategy=strategy, batch_size=10, max_pairs_per_image=3, diversity_similarity=1.0)
    chosen = select_batch(params, threshold=0.4, available=available, **table)
    assert len(chosen) == 10
    assert available[chosen].all()
    assert len(set(chosen.tolist())) == 10


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_select_batch_all_labelled_returns_nothing(strategy):
    table = candidate_table()
    chosen = select_batch(
        SelectionParams(strategy=strategy, batch_size=5), threshold=0.4, available=np.zeros(60, bool), **table
    )
    assert chosen.tolist() == []


def test_select_batch_uncertainty_order():
    table = candidate_table()
    chosen = select_batch(SelectionParams(strategy="uncertainty", batch_size=5), threshold=0.4, **table)
    distances = np.abs(table["scores"] - 0.4)
    assert chosen.tolist() == np.argsort(distances, kind="stable")[:5].tolist()


def test_select_batch_random_seeded():
    table = candidate_table()
    first = select_batch(SelectionParams(strategy="random", batch_size=8, seed=4), threshold=0.4, **table)
    second = select_batch(SelectionParams(strategy="random", batch_size=8, seed=4), threshold=0.4, **table)
    other = select_batch(SelectionParams(strategy="random", batch_size=8, seed=5), threshold=0.4, **table)
    assert first.tolist() == second.tolist()
    assert first.tolist() != other.tolist()


def test_select_batch_quality_skip_excludes_low_magnitude():
    table = candidate_table()
    params = SelectionParams(strategy="quality", batch_size=20, quality_mode="skip", quality_quantile=0.3)
    chosen = select_batch(params, threshold=0.4, **table)
    cutoff = np.quantile(table["image_magnitudes"], 0.3)
    assert (table["quality"][chosen] >= cutoff).all()


def test_select_batch_quality_prefer_takes_low_magnitude_first():
    table = candidate_table()
    params = SelectionParams(strategy="quality", batch_size=5, quality_mode="prefer", quality_quantile=0.3)
    chosen = select_batch(params, threshold=0.4, **table)
    cutoff = np.quantile(table["image_magnitudes"], 0.3)
    assert (table["quality"][chosen] < cutoff).all()


def test_select_batch_diversity_uses_each_image_once():
    table = candidate_table()
    chosen = select_batch(SelectionParams(strategy="diversity", batch_size=10), threshold=0.4, **table)
    images = np.concatenate([table["rows1"][chosen], table["rows2"][chosen]])
    assert len(np.unique(images)) == len(images)


def test_select_batch_rejects_length_mismatch():
    table = candidate_table()
    table["quality"] = table["quality"][:5]
    with pytest.raises(ValueError, match="quality has 5 entries but scores 60"):
        select_batch(SelectionParams(), threshold=0.4, **table)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "entropy"}, "unknown strategy 'entropy'"),
        ({"quality_mode": "avoid"}, "unknown quality_mode 'avoid'"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"quality_quantile": 1.0}, r"quality_quantile must be in \[0, 1\), got 1.0"),
        ({"diversity_similarity": 2.0}, r"diversity_similarity is a cosine in \[-1, 1\], got 2.0"),
        ({"max_pairs_per_image": 0}, "max_pairs_per_image must be at least 1, got 0"),
    ],
)
def test_selection_params_reject_invalid(options, message):
    with pytest.raises(ValueError, match=message):
        SelectionParams(**options)
