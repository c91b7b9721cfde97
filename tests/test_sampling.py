"""Pair sampling: balance, no duplicates, seeds, capacity errors, hard pairs, label noise."""

from __future__ import annotations

import numpy as np
import pytest

from magface_al.pairs import Pairs, read_pairs_csv, write_pairs_csv
from magface_al.pairs.noise import flip_labels, realized_noise_rate, simulate_feedback
from magface_al.pairs.sampling import count_same_pairs, mine_hard_pairs, sample_pairs


def _dataset(images_per_identity: list[int]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(images_per_identity)), images_per_identity)
    keys = np.arange(1, len(labels) + 1) * 3  # keys that are not positions
    return keys, labels


def _assert_valid(pairs: Pairs, keys: np.ndarray, labels: np.ndarray) -> None:
    label_of = dict(zip(keys.tolist(), labels.tolist()))
    canonical = pairs.canonical()
    assert len(np.unique(canonical, axis=0)) == len(pairs), "duplicate pair"
    assert (pairs.key1 != pairs.key2).all(), "self pair"
    for key1, key2, label, identity1, identity2 in zip(
        pairs.key1.tolist(), pairs.key2.tolist(), pairs.label.tolist(), pairs.identity1.tolist(), pairs.identity2.tolist()
    ):
        assert label_of[key1] == identity1
        assert label_of[key2] == identity2
        assert label == int(identity1 == identity2)


def test_sample_balanced_and_valid():
    keys, labels = _dataset([5, 4, 3, 2, 1, 6])
    pairs = sample_pairs(keys, labels, num_same=20, num_different=20, seed=0)
    assert int(pairs.label.sum()) == 20
    assert len(pairs) == 40
    _assert_valid(pairs, keys, labels)


def test_sample_seeded():
    keys, labels = _dataset([5, 4, 3, 6])
    first = sample_pairs(keys, labels, num_same=10, num_different=10, seed=7)
    second = sample_pairs(keys, labels, num_same=10, num_different=10, seed=7)
    other = sample_pairs(keys, labels, num_same=10, num_different=10, seed=8)
    assert first.canonical().tolist() == second.canonical().tolist()
    assert first.canonical().tolist() != other.canonical().tolist()


def test_sample_every_same_pair_when_requested_all():
    keys, labels = _dataset([4, 3, 2])
    total = count_same_pairs(labels)
    assert total == 6 + 3 + 1
    pairs = sample_pairs(keys, labels, num_same=total, num_different=0, seed=1)
    _assert_valid(pairs, keys, labels)
    assert len(pairs) == total


def test_sample_spreads_same_pairs_over_identities():
    keys, labels = _dataset([30, 3, 3, 3])
    pairs = sample_pairs(keys, labels, num_same=12, num_different=0, seed=2)
    per_identity = np.bincount(pairs.identity1, minlength=4)
    assert per_identity.tolist() == [3, 3, 3, 3]


def test_sample_too_many_same_pairs_raises():
    keys, labels = _dataset([3, 2, 1])
    with pytest.raises(ValueError, match=r"validation part \(3 identities, 6 images\) can form only 4 distinct same-person pairs, but 5 were requested"):
        sample_pairs(keys, labels, num_same=5, num_different=0, seed=0, description="validation part")


def test_sample_too_many_different_pairs_raises():
    keys, labels = _dataset([2, 2])
    with pytest.raises(ValueError, match="can form only 4 distinct different-person pairs, but 5 were requested"):
        sample_pairs(keys, labels, num_same=0, num_different=5, seed=0)


def test_sample_all_different_pairs_when_requested_all():
    keys, labels = _dataset([2, 3, 1])
    pairs = sample_pairs(keys, labels, num_same=0, num_different=2 * 3 + 2 * 1 + 3 * 1, seed=0)
    _assert_valid(pairs, keys, labels)
    assert len(pairs) == 11


def test_sample_restricted_to_identities():
    keys, labels = _dataset([4, 4, 4, 4])
    pairs = sample_pairs(keys, labels, num_same=6, num_different=6, seed=0, identities=np.array([1, 3]))
    assert set(pairs.identities.tolist()) <= {1, 3}


def test_sample_excludes_given_pairs():
    keys, labels = _dataset([3, 3])
    everything = sample_pairs(keys, labels, num_same=6, num_different=9, seed=0)
    excluded = everything.select(np.arange(5))
    rest = sample_pairs(keys, labels, num_same=6 - int(excluded.label.sum()),
                        num_different=9 - int((excluded.label == 0).sum()), seed=1, exclude=excluded)
    both = Pairs.concatenate([excluded, rest])
    assert len(np.unique(both.canonical(), axis=0)) == 15


def test_mine_hard_pairs_picks_extremes():
    keys, labels = _dataset([3, 3])
    # Identity 0 at angles 0, 10, 80 deg; identity 1 at 90, 100, 180 deg.
    angles = np.deg2rad([0, 10, 80, 90, 100, 180])
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    hard = mine_hard_pairs(keys, labels, features, num_same=1, num_different=1)
    same, different = hard.select(hard.label == 1), hard.select(hard.label == 0)
    # Least similar same-person pair: 90 and 180 deg (identity 1, keys 12 and 18).
    assert same.canonical().tolist() == [[12, 18]]
    # Most similar different-person pair: 80 and 90 deg (keys 9 and 12).
    assert different.canonical().tolist() == [[9, 12]]


def test_flip_labels_rate_on_large_set():
    labels = np.tile([0, 1], 50_000)
    noisy = flip_labels(labels, 0.9, seed=0)
    assert abs(np.mean(noisy != labels) - 0.1) < 0.01


def test_simulate_feedback_keeps_truth():
    keys, labels = _dataset([6, 6, 6, 6])
    pairs = sample_pairs(keys, labels, num_same=40, num_different=40, seed=0)
    feedback = simulate_feedback(pairs, 0.7, seed=1)
    assert feedback.truth.tolist() == pairs.label.tolist()
    assert realized_noise_rate(feedback) == pytest.approx(np.mean(feedback.label != pairs.label))
    assert 0 < realized_noise_rate(feedback) < 0.6


def test_flip_labels_rejects_bad_rate():
    with pytest.raises(ValueError, match="correct_rate must be in"):
        flip_labels(np.zeros(3, int), 1.5, seed=0)


def test_pairs_csv_round_trip(tmp_path):
    keys, labels = _dataset([4, 4, 4])
    pairs = simulate_feedback(sample_pairs(keys, labels, num_same=5, num_different=5, seed=0), 0.8, seed=0)
    write_pairs_csv(tmp_path / "pairs.csv", pairs)
    restored = read_pairs_csv(tmp_path / "pairs.csv")
    for name in ("key1", "key2", "label", "identity1", "identity2", "truth"):
        assert getattr(restored, name).tolist() == getattr(pairs, name).tolist()


def test_pairs_csv_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("key1,key2,label\n1,2,1\n")
    with pytest.raises(ValueError, match="missing column\\(s\\) identity1, identity2"):
        read_pairs_csv(path)


def test_pairs_reject_bad_label():
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        Pairs([1], [2], [2], [0], [0])
