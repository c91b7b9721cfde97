"""Tests for the no-degradation guard: the promotion rule, benchmark loading and scoring."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from magface_al.data.benchmarks import read_lfw_pairs
from magface_al.data.faces import FaceRecordDataset
from magface_al.models import ModelSpec, build_model
from magface_al.training.guard import (
    BenchmarkComparison,
    GuardBenchmark,
    GuardSource,
    decide_promotion,
    load_guard_benchmark,
    run_guard,
)


def test_promotion_within_tolerance():
    comparisons = [BenchmarkComparison("orl", 1000, 99.0, 98.9), BenchmarkComparison("lfw", 3000, 98.0, 98.5)]
    result = decide_promotion(comparisons, 0.2)
    assert result.promoted
    assert result.reason == "no benchmark dropped by more than 0.2 points (orl: -0.10 points; lfw: +0.50 points)"


def test_promotion_refused_names_benchmark():
    comparisons = [BenchmarkComparison("orl", 1000, 99.0, 99.5), BenchmarkComparison("lfw", 3000, 98.0, 97.5)]
    result = decide_promotion(comparisons, 0.2)
    assert not result.promoted
    assert "lfw: 97.50% vs pretrained 98.00% (-0.50 points)" in result.reason
    assert "orl" not in result.reason
    assert result.to_dict()["benchmarks"][1]["delta_points"] == pytest.approx(-0.5)


def test_promotion_drop_equal_to_tolerance_accepted():
    result = decide_promotion([BenchmarkComparison("orl", 1000, 99.0, 98.8)], 0.2)
    assert result.promoted


def test_promotion_refused_without_benchmark():
    result = decide_promotion([], 0.2)
    assert not result.promoted
    assert result.reason.startswith("no general benchmark was given")


def test_promotion_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="guard tolerance must not be negative, got -1 points"):
        decide_promotion([], -1)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "csv"}, "invalid kind 'csv'"),
        ({"kind": "bin"}, "kind 'bin' needs a path to its pairs file"),
        ({"kind": "lfw_pairs", "path": "pairs.txt"}, "kind 'lfw_pairs' needs the RecordIO folder in images"),
    ],
)
def test_guard_source_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        GuardSource(name="x", **fields)


def test_run_guard_identical_models_promoted():
    torch.manual_seed(0)
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "width_multiplier": 0.125},
                     embedding_size=16)
    model = build_model(spec).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 112, 112, 3), dtype=np.uint8)
    benchmark = GuardBenchmark("random", images, np.array([0, 1, 2, 3, 4, 5]), np.array([1, 2, 3, 4, 5, 6]),
                               np.array([1, 0, 1, 0, 1, 0]))
    result = run_guard(model, model, spec, [benchmark], tolerance_points=0.0, folds=2, device=torch.device("cpu"))
    assert result.promoted
    assert result.benchmarks[0].delta_points == 0.0


def test_run_guard_refuses_damaged_model():
    torch.manual_seed(0)
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "width_multiplier": 0.125},
                     embedding_size=16)
    model = build_model(spec).eval()
    # Pairs of an image with itself are "same", pairs of two random images "different": the
    # random model separates them perfectly, a model whose output ignores the input cannot.
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 112, 112, 3), dtype=np.uint8)
    first = np.arange(12)
    second = np.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 6])
    labels = np.array([1] * 6 + [0] * 6)
    benchmark = GuardBenchmark("random", images, first, second, labels)
    damaged = build_model(spec).eval()
    with torch.no_grad():
        damaged.fc.weight.zero_()
        damaged.features.bias.copy_(torch.randn(16))  # every face maps to the same embedding
    result = run_guard(model, damaged, spec, [benchmark], tolerance_points=0.2, folds=2, device=torch.device("cpu"))
    assert not result.promoted
    assert result.benchmarks[0].pretrained_accuracy == pytest.approx(100.0)
    assert result.benchmarks[0].finetuned_accuracy < 100.0


def test_load_lfw_pairs_excludes_feedback_identities(lfw_dir):
    source = GuardSource(name="lfw", kind="lfw_pairs", path=str(lfw_dir / "pairs.txt"), images=str(lfw_dir),
                         exclude_feedback_identities=True)
    pool = np.arange(0, 4281, 2)  # every other identity
    outside = load_guard_benchmark(source, feedback_identities=pool)
    dataset = FaceRecordDataset(lfw_dir)
    resolved = read_lfw_pairs(lfw_dir / "pairs.txt", lfw_dir)
    expected = [
        int(same) for first, second, same in resolved
        if dataset.label_of(first) % 2 == 1 and dataset.label_of(second) % 2 == 1
    ]
    assert len(outside) == len(expected)
    assert outside.labels.tolist() == expected
    assert outside.images.shape[1:] == (112, 112, 3)


def test_load_bin_pairs(lfw_dir):
    benchmark = load_guard_benchmark(GuardSource(name="fold1", kind="bin", path=str(lfw_dir / "lfw_fold1.bin")))
    assert len(benchmark) == 600
    assert benchmark.images.shape == (1200, 112, 112, 3)
    assert benchmark.first[:3].tolist() == [0, 2, 4]


def test_load_sampled_pairs(orl_dir):
    source = GuardSource(name="orl", kind="sampled", images=str(orl_dir), num_same=100, num_different=100, seed=3)
    benchmark = load_guard_benchmark(source)
    assert len(benchmark) == 200
    assert int(benchmark.labels.sum()) == 100


def test_run_guard_shared_trunk_matches_full_scoring():
    torch.manual_seed(0)
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "width_multiplier": 0.125},
                     embedding_size=16)
    model = build_model(spec).eval()
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.fc.weight.add_(0.05 * torch.randn_like(tuned.fc.weight))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(10, 112, 112, 3), dtype=np.uint8)
    benchmark = GuardBenchmark("random", images, np.arange(10), (np.arange(10) + 1) % 10,
                               np.array([1, 0] * 5))
    full = run_guard(model, tuned, spec, [benchmark], tolerance_points=50.0, folds=2)
    shared = run_guard(model, tuned, spec, [benchmark], tolerance_points=50.0, folds=2, shared_trunk_part="head")
    assert shared.benchmarks[0].to_dict() == full.benchmarks[0].to_dict()
