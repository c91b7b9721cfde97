"""Tests of the simulated active-learning rounds on a tiny random iResNet and in-memory faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magface_al.active.rounds import RoundsConfig, labels_to_reach, learning_curves, simulate_rounds, summarize
from magface_al.active.strategies import STRATEGIES
from magface_al.models import ModelSpec, build_model
from magface_al.pairs.sampling import sample_pairs
from magface_al.training.finetune import FinetuneConfig


class ArrayFaces:
    """Faces held in memory with the dataset methods the rounds read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.keys = np.arange(1, len(images) + 1, dtype=np.int64)
        self.labels = labels

    def image(self, key: int) -> np.ndarray:
        return self.images[key - 1]

    def image_bytes(self, key: int) -> bytes:
        return self.images[key - 1].tobytes()

    def label_of(self, key: int) -> int:
        return int(self.labels[key - 1])


@pytest.fixture(scope="module")
def faces() -> ArrayFaces:
    rng = np.random.default_rng(0)
    identities, per_identity = 12, 4
    prototypes = rng.integers(0, 256, size=(identities, 112, 112, 3))
    images, labels = [], []
    for identity in range(identities):
        for _ in range(per_identity):
            noise = rng.normal(0, 40, size=(112, 112, 3))
            images.append(np.clip(prototypes[identity] + noise, 0, 255).astype(np.uint8))
            labels.append(identity)
    return ArrayFaces(np.stack(images), np.asarray(labels, dtype=np.int64))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "width_multiplier": 0.125},
                     embedding_size=16)
    return build_model(spec).eval(), spec


@pytest.fixture(scope="module")
def records(faces, tiny_model):
    model, spec = tiny_model
    identities = np.unique(faces.labels)
    val = sample_pairs(faces.keys, faces.labels, num_same=8, num_different=8, seed=2, identities=identities[6:9])
    test = sample_pairs(faces.keys, faces.labels, num_same=8, num_different=8, seed=3, identities=identities[9:])
    pool_keys = faces.keys[np.isin(faces.labels, identities[:6])]
    config = RoundsConfig(rounds=2, batch_size=6, correct_rate=1.0, random_count=20, neighbours=2, farthest=1)
    finetune_config = FinetuneConfig(epochs=2, batch_size=4, lr=1e-3, early_stopping="none")
    return simulate_rounds(model, spec, faces, pool_keys, val, test, config, finetune_config)


@pytest.mark.slow  # ten fine-tuning runs: about 15 s of CPU, longer on a busy machine
def test_rounds_record_every_strategy_and_round(records):
    assert [(r["strategy"], r["round"]) for r in records] == [(s, n) for s in STRATEGIES for n in range(3)]
    assert [r["labels"] for r in records if r["strategy"] == "random"] == [0, 6, 12]


@pytest.mark.slow  # ten fine-tuning runs: about 15 s of CPU, longer on a busy machine
def test_rounds_start_from_same_pretrained_point(records):
    starts = {r["test_accuracy"] for r in records if r["round"] == 0}
    assert len(starts) == 1


@pytest.mark.slow  # ten fine-tuning runs: about 15 s of CPU, longer on a busy machine
def test_rounds_simulated_labels_clean_at_full_correct_rate(records):
    assert all(r["label_errors"] == 0 for r in records if r["round"] > 0)


@pytest.mark.slow  # ten fine-tuning runs: about 15 s of CPU, longer on a busy machine
def test_rounds_accuracies_are_fractions(records):
    for record in records:
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert 0.0 <= record["validation_accuracy"] <= 1.0


@pytest.mark.slow  # ten fine-tuning runs: about 15 s of CPU, longer on a busy machine
def test_rounds_summary_names_every_strategy(records):
    summary = summarize(records)
    assert set(summary["strategies"]) == set(STRATEGIES)
    assert summary["budget"] == 12
    random = summary["strategies"]["random"]
    if summary["target_accuracy"] > summary["pretrained_accuracy"]:
        # The control ends at its own target, so it reaches it within the budget.
        assert random["labels_to_reach_control"] <= 12
    else:
        assert "no gain to reach" in random["labels_to_reach_control_reason"]


def test_rounds_finetune_reuses_trunk_cache(faces, tiny_model, monkeypatch):
    import magface_al.training.finetune as finetune_module

    def no_recompute(*args, **kwargs):
        raise AssertionError("fine-tuning recomputed trunk outputs that simulate_rounds had cached")

    monkeypatch.setattr(finetune_module, "compute_trunk_features", no_recompute)
    model, spec = tiny_model
    identities = np.unique(faces.labels)
    val = sample_pairs(faces.keys, faces.labels, num_same=4, num_different=4, seed=2, identities=identities[6:9])
    test = sample_pairs(faces.keys, faces.labels, num_same=4, num_different=4, seed=3, identities=identities[9:])
    pool_keys = faces.keys[np.isin(faces.labels, identities[:6])]
    config = RoundsConfig(strategies=["random"], rounds=1, batch_size=4, random_count=10, neighbours=1, farthest=1)
    finetune_config = FinetuneConfig(epochs=1, batch_size=4, early_stopping="none")
    records = simulate_rounds(model, spec, faces, pool_keys, val, test, config, finetune_config)
    assert [r["round"] for r in records] == [0, 1]


def test_labels_to_reach_stable_crossing():
    labels = np.array([0, 10, 20, 30])
    accuracy = np.array([0.80, 0.84, 0.83, 0.86])
    # 0.84 is touched at 10 labels, lost at 20 and held from 30 on.
    assert labels_to_reach(labels, accuracy, 0.84) == 30
    assert labels_to_reach(labels, accuracy, 0.83) == 10
    assert labels_to_reach(labels, accuracy, 0.85) == 30
    assert labels_to_reach(labels, accuracy, 0.90) is None
    assert labels_to_reach(labels, accuracy, 0.80) == 0


def test_labels_to_reach_curve_ending_below():
    labels = np.array([0, 10, 20])
    assert labels_to_reach(labels, np.array([0.80, 0.90, 0.85]), 0.88) is None


def test_summarize_hand_made_curves():
    records = []
    for strategy, curve in {"random": [0.80, 0.82, 0.84], "uncertainty": [0.80, 0.85, 0.86],
                            "hard": [0.80, 0.79, 0.81]}.items():
        for round_number, accuracy in enumerate(curve):
            records.append({"strategy": strategy, "seed": 0, "round": round_number,
                            "labels": 50 * round_number, "test_accuracy": accuracy})
    summary = summarize(records)
    assert summary["target_accuracy"] == pytest.approx(0.84)
    assert summary["strategies"]["uncertainty"]["labels_to_reach_control"] == 50
    assert summary["strategies"]["uncertainty"]["label_fraction_of_control"] == pytest.approx(0.5)
    assert summary["strategies"]["hard"]["labels_to_reach_control"] is None
    assert "ends below 0.8400" in summary["strategies"]["hard"]["labels_to_reach_control_reason"]


def test_summarize_control_without_gain():
    records = []
    for strategy, curve in {"random": [0.80, 0.81, 0.80], "uncertainty": [0.80, 0.80, 0.80]}.items():
        for round_number, accuracy in enumerate(curve):
            records.append({"strategy": strategy, "seed": 0, "round": round_number,
                            "labels": 50 * round_number, "test_accuracy": accuracy})
    summary = summarize(records)
    for entry in summary["strategies"].values():
        assert entry["labels_to_reach_control"] is None
        assert "no gain to reach" in entry["labels_to_reach_control_reason"]


def test_learning_curves_average_seeds():
    records = [
        {"strategy": "random", "seed": seed, "round": r, "labels": 10 * r, "test_accuracy": base + 0.01 * r}
        for seed, base in ((0, 0.80), (1, 0.90)) for r in range(2)
    ]
    labels, accuracy = learning_curves(records)["random"]
    assert labels.tolist() == [0, 10]
    np.testing.assert_allclose(accuracy, [0.85, 0.86])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategies": ["uncertainty"]}, "strategies must include 'random'"),
        ({"strategies": ["random", "entropy"]}, r"unknown strategies \['entropy'\]"),
        ({"rounds": 0}, "rounds must be at least 1, got 0"),
        ({"correct_rate": 1.5}, r"correct_rate must be in \[0, 1\], got 1.5"),
    ],
)
def test_rounds_config_rejects_invalid(options, message):
    with pytest.raises(ValueError, match=message):
        RoundsConfig(**options)
