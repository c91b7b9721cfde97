"""Identity splits: disjoint parts, sizes, determinism, stratification."""

from __future__ import annotations

import numpy as np
import pytest

from magface_al.pairs.splits import IdentitySplit, split_identities


def test_split_parts_disjoint_and_complete():
    identities = np.arange(100)
    split = split_identities(identities, (0.6, 0.2, 0.2), seed=0)
    parts = [split.feedback, split.validation, split.test]
    assert [len(p) for p in parts] == [60, 20, 20]
    assert sorted(np.concatenate(parts).tolist()) == identities.tolist()


def test_split_same_seed_same_result():
    first = split_identities(np.arange(50), (0.5, 0.25, 0.25), seed=3)
    second = split_identities(np.arange(50), (0.5, 0.25, 0.25), seed=3)
    other = split_identities(np.arange(50), (0.5, 0.25, 0.25), seed=4)
    assert first.test.tolist() == second.test.tolist()
    assert first.test.tolist() != other.test.tolist()


def test_split_sizes_round_to_total():
    split = split_identities(np.arange(7), (0.5, 0.25, 0.25), seed=0)
    sizes = [len(split.feedback), len(split.validation), len(split.test)]
    assert sum(sizes) == 7
    # 3.5, 1.75, 1.75: floors 3, 1, 1; the two spare identities go to the largest remainders.
    assert sizes == [3, 2, 2]


def test_split_stratifies_multi_image_identities():
    identities = np.arange(100)
    counts = np.where(identities < 20, 5, 1)  # 20 identities with several images
    split = split_identities(identities, (0.5, 0.25, 0.25), seed=1, image_counts=counts)
    assert int((split.feedback < 20).sum()) == 10
    assert int((split.validation < 20).sum()) == 5
    assert int((split.test < 20).sum()) == 5


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_identities(np.arange(10), fractions, seed=0)


def test_split_round_trip_dict():
    split = split_identities(np.arange(30), (0.4, 0.3, 0.3), seed=5)
    restored = IdentitySplit.from_dict(split.to_dict())
    assert restored.feedback.tolist() == split.feedback.tolist()
    assert split.to_dict()["counts"] == {"feedback": 12, "validation": 9, "test": 9}


def test_split_rejects_overlap():
    with pytest.raises(ValueError, match="1 identities are in both feedback and test"):
        IdentitySplit(np.array([1, 2]), np.array([3]), np.array([2]))
