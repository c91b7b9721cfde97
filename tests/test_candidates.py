"""Tests of candidate-pair mining on synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from magface_al.active.candidates import (
    SOURCE_FARTHEST,
    SOURCE_NEIGHBOUR,
    SOURCE_RANDOM,
    exact_other_identity_neighbours,
    faiss_available,
    farthest_same_identity,
    mine_candidates,
    other_identity_neighbours,
    random_pairs,
    resolve_index_kind,
)


def synthetic_pool(identities: int = 12, per_identity: int = 5, dimension: int = 16, seed: int = 0):
    """Unit vectors clustered by identity, with some identities of a single image."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dimension))
    sizes = np.array([per_identity if i % 4 else 1 for i in range(identities)])
    labels = np.repeat(np.arange(identities) * 10, sizes)  # ids need not be contiguous
    features = centres[labels // 10] + 0.6 * rng.normal(size=(len(labels), dimension))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32), labels


def brute_force_neighbours(features, labels, k):
    similarities = features @ features.T
    result = []
    for row in range(len(features)):
        others = [c for c in np.argsort(-similarities[row], kind="stable") if labels[c] != labels[row]]
        result.append(others[:k])
    return result


def test_exact_neighbours_match_brute_force():
    features, labels = synthetic_pool()
    rows, values = exact_other_identity_neighbours(features, labels, 4)
    expected = brute_force_neighbours(features, labels, 4)
    assert rows.tolist() == expected
    np.testing.assert_allclose(values[0], (features[expected[0]] @ features[0]), rtol=1e-5)


def test_exact_neighbours_block_size_does_not_change_result():
    features, labels = synthetic_pool()
    whole, _ = exact_other_identity_neighbours(features, labels, 3)
    blocked, _ = exact_other_identity_neighbours(features, labels, 3, block_rows=7)
    assert blocked.tolist() == whole.tolist()


def test_exact_neighbours_never_same_identity():
    features, labels = synthetic_pool()
    rows, _ = exact_other_identity_neighbours(features, labels, 6)
    assert (rows >= 0).all()
    assert not np.any(labels[rows] == labels[:, None])


def test_exact_neighbours_fill_missing_slots():
    features, labels = synthetic_pool(identities=2, per_identity=3)
    rows, values = exact_other_identity_neighbours(features, labels, 5)
    own_count = {label: int(np.sum(labels == label)) for label in np.unique(labels)}
    for row in range(len(labels)):
        available = len(labels) - own_count[labels[row]]
        assert (rows[row, :available] >= 0).all()
        assert (rows[row, available:] == -1).all()
        assert np.isneginf(values[row, available:]).all()


def test_sklearn_neighbours_match_exact():
    features, labels = synthetic_pool(identities=20)
    exact, _ = other_identity_neighbours(features, labels, 4, index="exact")
    approximate, values = other_identity_neighbours(features, labels, 4, index="sklearn")
    assert approximate.tolist() == exact.tolist()
    np.testing.assert_allclose(values[:, 0], np.sum(features * features[approximate[:, 0]], axis=1), atol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (optional: pip install faiss-cpu)")
def test_faiss_neighbours_match_exact():
    features, labels = synthetic_pool(identities=20)
    exact, _ = other_identity_neighbours(features, labels, 4, index="exact")
    approximate, _ = other_identity_neighbours(features, labels, 4, index="faiss")
    assert np.mean(approximate == exact) > 0.95


def test_farthest_same_identity_matches_brute_force():
    features, labels = synthetic_pool()
    rows, values = farthest_same_identity(features, labels, 2)
    similarities = features @ features.T
    for row in range(len(labels)):
        own = [c for c in np.argsort(similarities[row], kind="stable") if labels[c] == labels[row] and c != row]
        if not own:
            assert rows[row].tolist() == [-1, -1]
            assert np.isposinf(values[row]).all()
            continue
        assert rows[row].tolist() == own[:2]


def test_random_pairs_half_same_identity():
    _, labels = synthetic_pool(identities=40)
    first, second = random_pairs(labels, 400, rng=np.random.default_rng(3))
    same = labels[first] == labels[second]
    assert len(first) == 400
    assert same.sum() == 200
    assert (first != second).all()


def test_random_pairs_seeded():
    _, labels = synthetic_pool()
    a = random_pairs(labels, 50, rng=np.random.default_rng(7))
    b = random_pairs(labels, 50, rng=np.random.default_rng(7))
    assert a[0].tolist() == b[0].tolist()
    assert a[1].tolist() == b[1].tolist()


def test_mine_candidates_pairs_are_canonical_and_distinct():
    features, labels = synthetic_pool()
    candidates = mine_candidates(features, labels, neighbours=3, farthest=2, random_count=60, seed=1)
    assert (candidates.row1 < candidates.row2).all()
    codes = candidates.row1 * len(labels) + candidates.row2
    assert len(np.unique(codes)) == len(candidates)


def test_mine_candidates_sources_match_identities():
    features, labels = synthetic_pool()
    candidates = mine_candidates(features, labels, neighbours=3, farthest=2, random_count=60, seed=1)
    same = labels[candidates.row1] == labels[candidates.row2]
    assert not same[candidates.source == SOURCE_NEIGHBOUR].any()
    assert same[candidates.source == SOURCE_FARTHEST].all()
    counts = candidates.counts()
    assert counts["neighbour"] > 0
    assert counts["farthest"] > 0
    assert counts["random"] > 0
    assert set(candidates.source_names()) == {"neighbour", "farthest", "random"}


def test_mine_candidates_keeps_every_nearest_neighbour():
    features, labels = synthetic_pool()
    candidates = mine_candidates(features, labels, neighbours=2, farthest=0, random_count=0)
    codes = set(zip(candidates.row1.tolist(), candidates.row2.tolist()))
    rows, _ = exact_other_identity_neighbours(features, labels, 2)
    for anchor, found in enumerate(rows.tolist()):
        for other in found:
            assert (min(anchor, other), max(anchor, other)) in codes
    assert (candidates.source == SOURCE_NEIGHBOUR).all()
    assert not (candidates.source == SOURCE_RANDOM).any()


def test_mine_candidates_deterministic_for_seed():
    features, labels = synthetic_pool()
    a = mine_candidates(features, labels, random_count=30, seed=5)
    b = mine_candidates(features, labels, random_count=30, seed=5)
    c = mine_candidates(features, labels, random_count=30, seed=6)
    assert a.row1.tolist() == b.row1.tolist()
    assert a.row2.tolist() == b.row2.tolist()
    assert (a.row1.tolist(), a.row2.tolist()) != (c.row1.tolist(), c.row2.tolist())


def test_mine_candidates_rejects_unnormalized_features():
    features, labels = synthetic_pool()
    with pytest.raises(ValueError, match="features must be L2-normalized"):
        mine_candidates(features * 3, labels)


def test_mine_candidates_rejects_negative_count():
    features, labels = synthetic_pool()
    with pytest.raises(ValueError, match="neighbours must be zero or positive, got -1"):
        mine_candidates(features, labels, neighbours=-1)


def test_mine_candidates_rejects_label_count_mismatch():
    features, labels = synthetic_pool()
    with pytest.raises(ValueError, match=r"features has \d+ rows but labels 3"):
        mine_candidates(features, labels[:3])


def test_resolve_index_kind():
    assert resolve_index_kind("auto", 1000) == "exact"
    assert resolve_index_kind("auto", 10**6) == ("faiss" if faiss_available() else "sklearn")
    assert resolve_index_kind("sklearn", 10) == "sklearn"
    with pytest.raises(ValueError, match="unknown nearest-neighbour index 'annoy'"):
        resolve_index_kind("annoy", 10)


@pytest.mark.skipif(faiss_available(), reason="faiss is installed, so requesting it succeeds")
def test_resolve_index_kind_faiss_missing():
    with pytest.raises(ValueError, match="faiss is not installed"):
        resolve_index_kind("faiss", 10)
