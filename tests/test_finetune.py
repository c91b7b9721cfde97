"""Tests for the trunk/head split, the trunk cache and the fine-tuning loop, on a tiny random iResNet."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from magface_al.models import ModelSpec, build_model
from magface_al.pairs.sampling import sample_pairs
from magface_al.training.feature_cache import TrunkHeadSplit, compute_trunk_features, layout_for
from magface_al.training.finetune import FinetuneConfig, finetune


class ArrayFaces:
    """Faces held in memory with the two methods fine-tuning reads: ``image`` and ``image_bytes``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.keys = np.arange(1, len(images) + 1, dtype=np.int64)
        self.labels = labels

    def image(self, key: int) -> np.ndarray:
        return self.images[key - 1]

    def image_bytes(self, key: int) -> bytes:
        return self.images[key - 1].tobytes()


def _tiny_spec() -> ModelSpec:
    return ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "width_multiplier": 0.125},
                     embedding_size=16)


@pytest.fixture(scope="module")
def tiny_model() -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(0)
    spec = _tiny_spec()
    return build_model(spec).eval(), spec


@pytest.fixture(scope="module")
def faces() -> ArrayFaces:
    # Each identity is a fixed random pattern plus per-image noise, so pairs are learnable.
    rng = np.random.default_rng(0)
    identities, per_identity = 8, 4
    prototypes = rng.integers(0, 256, size=(identities, 112, 112, 3))
    images, labels = [], []
    for identity in range(identities):
        for _ in range(per_identity):
            noise = rng.normal(0, 40, size=(112, 112, 3))
            images.append(np.clip(prototypes[identity] + noise, 0, 255).astype(np.uint8))
            labels.append(identity)
    return ArrayFaces(np.stack(images), np.asarray(labels, dtype=np.int64))


@pytest.fixture(scope="module")
def pair_sets(faces):
    identities = np.unique(faces.labels)
    train = sample_pairs(faces.keys, faces.labels, num_same=20, num_different=20, seed=1,
                         identities=identities[:5])
    val = sample_pairs(faces.keys, faces.labels, num_same=10, num_different=10, seed=2,
                       identities=identities[5:])
    return train, val


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("part", ["head", "last_stage", "all"])
def test_split_reproduces_forward(tiny_model, part):
    model, spec = tiny_model
    split = TrunkHeadSplit(model, spec.arch, part)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(x)
        got = split.head(split.trunk(x))
    assert torch.allclose(got, expected, atol=1e-5)


def test_split_head_parts_by_architecture(tiny_model):
    model, spec = tiny_model
    assert TrunkHeadSplit(model, spec.arch, "head").head_steps == ["fc", "features"]
    assert TrunkHeadSplit(model, spec.arch, "last_stage").head_steps[0] == "layer4"
    mobile = build_model(ModelSpec.mobilefacenet())
    assert TrunkHeadSplit(mobile, "mobilefacenet", "head").head_steps[:2] == ["linear7", "linear1"]
    assert TrunkHeadSplit(mobile, "mobilefacenet", "last_stage").head_steps[0] == "blocks.13"


def test_split_check_detects_changed_model(tiny_model):
    model, spec = tiny_model
    broken = build_model(spec).eval()
    broken.forward = lambda x: broken.forward_head(broken.forward_features(x)) * 2.0  # forward no longer matches
    split = TrunkHeadSplit(broken, spec.arch, "head")
    with pytest.raises(RuntimeError, match="does not reproduce the model's forward"):
        split.check_against_forward(torch.randn(2, 3, 112, 112))


def test_split_rejects_unknown_part_and_arch(tiny_model):
    model, spec = tiny_model
    with pytest.raises(ValueError, match="unknown train part 'neck'"):
        TrunkHeadSplit(model, spec.arch, "neck")
    with pytest.raises(ValueError, match="no trunk/head split is defined for architecture 'vit'"):
        layout_for("vit")


def test_trunk_cache_disk_round_trip(tiny_model, faces, tmp_path, caplog):
    model, spec = tiny_model
    split = TrunkHeadSplit(model, spec.arch, "head")
    keys = faces.keys[:6]
    first = compute_trunk_features(split, spec, faces, keys, cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="magface_al.training.feature_cache"):
        second = compute_trunk_features(split, spec, faces, keys, cache_dir=tmp_path)
    assert "read 6 cached trunk outputs" in caplog.text
    assert torch.equal(first.features, second.features)
    assert len(list(tmp_path.iterdir())) == 1

    # Other weights give another fingerprint, so the stale copy is not read.
    other = build_model(spec).eval()
    third = compute_trunk_features(TrunkHeadSplit(other, spec.arch, "head"), spec, faces, keys, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert not torch.equal(first.features, third.features)


def test_finetune_head_trains_only_head(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    before = _parameters(model)
    train, val = pair_sets
    config = FinetuneConfig(train="head", epochs=3, lr=1e-2, early_stopping="none")
    result = finetune(model, spec, faces, train, val, config)

    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # input untouched
    after = result.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"fc.weight", "fc.bias", "features.weight", "features.bias"}
    assert not result.model.training


def test_finetune_bn_statistics_frozen_by_default(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets
    frozen = finetune(model, spec, faces, train, val,
                      FinetuneConfig(train="all", epochs=1, lr=1e-3, early_stopping="none"))
    moving = finetune(model, spec, faces, train, val,
                      FinetuneConfig(train="all", epochs=1, lr=1e-3, early_stopping="none", freeze_bn=False))
    name = "layer1.0.bn1.running_mean"
    assert torch.equal(frozen.model.state_dict()[name], model.state_dict()[name])
    assert not torch.equal(moving.model.state_dict()[name], model.state_dict()[name])


def test_finetune_reduces_training_loss(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, _ = pair_sets
    config = FinetuneConfig(train="last_stage", epochs=6, lr=3e-3, early_stopping="loss", patience=10)
    # Validating on the training pairs makes the validation loss the training objective.
    result = finetune(model, spec, faces, train, train, config)
    assert result.history[-1]["val_loss"] < 0.8 * result.history[0]["val_loss"]
    assert result.best_epoch > 0


def test_finetune_deterministic(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets
    config = FinetuneConfig(train="last_stage", epochs=2, lr=1e-3, early_stopping="none", seed=7)
    first = finetune(model, spec, faces, train, val, config).model.state_dict()
    second = finetune(model, spec, faces, train, val, config).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_finetune_keeps_pretrained_when_validation_worsens(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets
    # Training on inverted labels can only hurt the validation pairs.
    inverted = train.select(slice(None))
    inverted.label = 1 - inverted.label
    config = FinetuneConfig(train="head", epochs=3, lr=0.05, early_stopping="loss", patience=1)
    result = finetune(model, spec, faces, inverted, val, config)
    assert result.best_epoch == 0
    assert result.stopped_early
    reference = model.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in result.model.state_dict().items())


def test_finetune_l2sp_limits_drift(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets

    def drift(strength: float) -> float:
        config = FinetuneConfig(train="head", epochs=3, lr=1e-2, early_stopping="none", l2sp=strength)
        tuned = finetune(model, spec, faces, train, val, config).model
        return float(((tuned.fc.weight - model.fc.weight).detach() ** 2).sum())

    assert drift(10.0) < 0.5 * drift(0.0)


def test_finetune_distillation_keeps_embeddings(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets
    unlabelled = faces.keys[faces.labels >= 5]

    def change(strength: float) -> float:
        config = FinetuneConfig(train="head", epochs=3, lr=1e-2, early_stopping="none", distill=strength)
        tuned = finetune(model, spec, faces, train, val, config, unlabelled_keys=unlabelled).model
        x = spec.preprocess.to_tensor(faces.images[faces.labels >= 5])
        with torch.no_grad():
            cosine = torch.cosine_similarity(tuned(x), model(x), dim=1)
        return float((1 - cosine).mean())

    assert change(50.0) < 0.5 * change(0.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train": "neck"}, "finetune.train: invalid value 'neck'"),
        ({"optimizer": "lbfgs"}, "finetune.optimizer: invalid value 'lbfgs'"),
        ({"epochs": 0}, "finetune.epochs: must be at least 1, got 0"),
        ({"lr": -1.0}, "finetune.lr: must not be negative, got -1.0"),
    ],
)
def test_config_rejects_invalid_values(changes, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**changes)


def test_finetune_rejects_empty_feedback(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    _, val = pair_sets
    with pytest.raises(ValueError, match="no feedback pairs to fine-tune on"):
        finetune(model, spec, faces, val.select(slice(0, 0)), val, FinetuneConfig())


def test_finetune_reuses_matching_trunk_cache(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets
    split = TrunkHeadSplit(model, spec.arch, "head")
    cache = compute_trunk_features(split, spec, faces, np.concatenate([train.keys, val.keys]))
    config = FinetuneConfig(train="head", epochs=2, lr=1e-2, early_stopping="none")
    reused = finetune(model, spec, faces, train, val, config, trunk_cache=cache).model.state_dict()
    fresh = finetune(model, spec, faces, train, val, config).model.state_dict()
    assert all(torch.allclose(reused[name], fresh[name]) for name in fresh)


def test_finetune_rejects_cache_of_other_part(tiny_model, faces, pair_sets):
    model, spec = tiny_model
    train, val = pair_sets
    cache = compute_trunk_features(TrunkHeadSplit(model, spec.arch, "head"), spec, faces, train.keys)
    with pytest.raises(ValueError, match="computed for train part 'head', but the config trains 'last_stage'"):
        finetune(model, spec, faces, train, val, FinetuneConfig(train="last_stage"), trunk_cache=cache)
