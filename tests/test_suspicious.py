"""Tests for ranking feedback pairs whose labels contradict the model."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from magface_al.pairs.table import Pairs
from magface_al.training.suspicious import rank_suspicious_pairs, write_suspicious_csv


def _pairs(labels, truth=None) -> Pairs:
    count = len(labels)
    keys = np.arange(count)
    return Pairs(keys, keys + 100, labels, keys, keys + 50, truth=truth)


def test_rank_orders_by_contradiction():
    # threshold 0.4: pair 0 "same" at 0.1 (suspicion 0.3), pair 1 "different" at 0.9 (0.5),
    # pair 2 "same" at 0.8 (agrees, -0.4), pair 3 "different" at 0.35 (-0.05).
    pairs = _pairs([1, 0, 1, 0])
    ranking = rank_suspicious_pairs(pairs, np.array([0.1, 0.9, 0.8, 0.35]), 0.4)
    assert ranking.order.tolist() == [1, 0, 3, 2]
    assert ranking.suspicion == pytest.approx([0.5, 0.3, -0.05, -0.4])
    assert ranking.flagged.tolist() == [True, True, False, False]
    assert not ranking.excluded.any()


def test_rank_flag_margin_limits_flags():
    pairs = _pairs([1, 0, 1])
    ranking = rank_suspicious_pairs(pairs, np.array([0.35, 0.9, 0.8]), 0.4, flag_margin=0.1)
    # Only the "different" pair at 0.9 contradicts by more than 0.1.
    assert ranking.flagged.tolist() == [True, False, False]


def test_rank_excludes_only_flagged_pairs():
    pairs = _pairs([1, 0, 1, 0])
    ranking = rank_suspicious_pairs(pairs, np.array([0.1, 0.9, 0.8, 0.2]), 0.4, exclude_top_fraction=0.75)
    # ceil(0.75 * 4) = 3 candidates, but only two pairs contradict the model.
    assert ranking.excluded.tolist() == [True, True, False, False]
    kept = ranking.kept_pairs()
    assert kept.key1.tolist() == [2, 3]


def test_rank_top_k_exclusion():
    pairs = _pairs([1, 0, 1, 0])
    ranking = rank_suspicious_pairs(pairs, np.array([0.1, 0.9, 0.8, 0.2]), 0.4, exclude_top_k=1)
    assert ranking.excluded.tolist() == [True, False, False, False]
    assert sorted(ranking.kept_pairs().key1.tolist()) == [0, 2, 3]


def test_summary_precision_against_truth():
    # Pairs 0 and 1 are flagged; only pair 1 was really mislabelled, and pair 3 is a
    # mislabelled pair the model missed.
    pairs = _pairs([1, 0, 1, 1], truth=[1, 1, 1, 0])
    ranking = rank_suspicious_pairs(pairs, np.array([0.1, 0.9, 0.8, 0.7]), 0.4, exclude_top_k=1)
    summary = ranking.summary()
    assert summary["mislabelled"] == 2
    assert summary["flagged"] == 2
    assert summary["flagged_precision"] == pytest.approx(0.5)
    assert summary["flagged_recall"] == pytest.approx(0.5)
    assert summary["excluded"] == 1
    assert summary["excluded_precision"] == pytest.approx(1.0)


def test_summary_without_truth_gives_reason():
    ranking = rank_suspicious_pairs(_pairs([1, 0]), np.array([0.1, 0.9]), 0.4)
    summary = ranking.summary()
    assert "flagged_precision" not in summary
    assert "no true labels" in summary["precision_reason"]


def test_summary_nothing_flagged_is_null_with_reason():
    pairs = _pairs([1, 0], truth=[1, 0])
    summary = rank_suspicious_pairs(pairs, np.array([0.9, 0.1]), 0.4).summary()
    assert summary["flagged_precision"] is None
    assert summary["flagged_precision_reason"] == "no pair was flagged"


def test_rank_rejects_misaligned_scores():
    with pytest.raises(ValueError, match=r"expected one score per pair \(2\), got shape \(3,\)"):
        rank_suspicious_pairs(_pairs([1, 0]), np.array([0.1, 0.2, 0.3]), 0.4)


def test_write_csv_is_reviewable(tmp_path):
    pairs = _pairs([1, 0, 1], truth=[0, 0, 1])
    ranking = rank_suspicious_pairs(pairs, np.array([0.05, 0.2, 0.9]), 0.4, exclude_top_k=1)
    path = tmp_path / "suspicious_pairs.csv"
    write_suspicious_csv(path, ranking)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    first = rows[0]
    assert (first["key1"], first["key2"], first["label"], first["truth"]) == ("0", "100", "1", "0")
    assert first["excluded"] == "1"
    assert first["reason"] == "labelled same person, but cosine 0.050 is 0.350 below the threshold 0.400"
    assert rows[2]["flagged"] == "0"
