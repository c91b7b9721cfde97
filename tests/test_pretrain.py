"""MagLoss training: schedule, determinism, checkpoints, held-out scoring and continuing a real model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from magface_al.data.faces import FaceRecordDataset
from magface_al.data.synthetic import write_synthetic_dataset
from magface_al.models.checkpoint import load_model
from magface_al.models.spec import ModelSpec, Preprocess, build_model
from magface_al.training.magloss import MagLossSettings
from magface_al.training.pretrain import (
    PretrainConfig,
    heldout_verification,
    learning_rate_at,
    pretrain,
    save_pretrained,
)

TINY_SPEC = ModelSpec(
    "iresnet",
    {"layers": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "dropout": 0.0},
    embedding_size=16,
    preprocess=Preprocess(input_size=(32, 32)),
)


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory) -> FaceRecordDataset:
    folder = tmp_path_factory.mktemp("tiny_sample")
    write_synthetic_dataset(folder, identities=6, images_per_identity=8, seed=1)
    return FaceRecordDataset(folder)


def _train(dataset: FaceRecordDataset, **changes) -> tuple[torch.nn.Module, object]:
    config = PretrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 3, **changes})
    torch.manual_seed(config.seed)
    model = build_model(TINY_SPEC)
    return model, pretrain(model, TINY_SPEC, dataset, config, progress=False)


@pytest.mark.parametrize(
    ("changes", "progress", "expected"),
    [
        ({"schedule": "constant"}, 3.7, 0.1),
        ({"schedule": "cosine", "epochs": 10}, 0.0, 0.1),
        ({"schedule": "cosine", "epochs": 10}, 5.0, 0.05),
        ({"schedule": "cosine", "epochs": 10}, 10.0, 0.0),
        ({"schedule": "step", "milestones": [4, 8]}, 3.9, 0.1),
        ({"schedule": "step", "milestones": [4, 8]}, 4.0, 0.01),
        ({"schedule": "step", "milestones": [4, 8]}, 9.0, 0.001),
        ({"schedule": "constant", "warmup_epochs": 2.0}, 0.0, 0.01),
        ({"schedule": "constant", "warmup_epochs": 2.0}, 1.0, 0.055),
    ],
)
def test_learning_rate_at_schedules(changes: dict, progress: float, expected: float) -> None:
    config = PretrainConfig(lr=0.1, **changes)
    assert learning_rate_at(config, progress) == pytest.approx(expected, abs=1e-12)


def test_pretrain_config_loss_from_mapping() -> None:
    config = PretrainConfig(loss={"lambda_g": 40.0, "scale": 32.0})
    assert config.loss == MagLossSettings(lambda_g=40.0, scale=32.0)


def test_pretrain_config_rejects_unknown_schedule() -> None:
    with pytest.raises(ValueError, match=r"invalid pretrain schedule 'linear': expected one of step, cosine, constant"):
        PretrainConfig(schedule="linear")


def test_pretrain_history_and_steps(tiny_sample: FaceRecordDataset) -> None:
    model, result = _train(tiny_sample)
    assert result.steps == 2 * (48 // 16)
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        assert math.isfinite(row["loss"])
        assert 0.0 <= row["train_accuracy"] <= 1.0
        assert row["magnitude_min"] <= row["magnitude_mean"] <= row["magnitude_max"]
    assert result.feasibility["lambda_g_feasible"] is True
    assert not model.training


def test_pretrain_lowers_loss(tiny_sample: FaceRecordDataset) -> None:
    _, result = _train(tiny_sample, epochs=8, schedule="constant", loss={"scale": 16.0, "lambda_g": 35.0})
    assert result.history[-1]["classification_loss"] < result.history[0]["classification_loss"]


def test_pretrain_same_seed_same_weights(tiny_sample: FaceRecordDataset) -> None:
    first, first_result = _train(tiny_sample, max_steps=3)
    second, second_result = _train(tiny_sample, max_steps=3)
    assert first_result.history == second_result.history
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_pretrain_max_steps_stops_early(tiny_sample: FaceRecordDataset) -> None:
    _, result = _train(tiny_sample, epochs=5, max_steps=4)
    assert result.steps == 4
    assert len(result.history) == 2  # 3 steps per epoch: epoch 1 full, epoch 2 stopped after one step


def test_pretrain_rejects_batch_larger_than_dataset(tiny_sample: FaceRecordDataset) -> None:
    model = build_model(TINY_SPEC)
    with pytest.raises(ValueError, match=r"contains 48 images, fewer than one batch of 64; lower pretrain.batch_size"):
        pretrain(model, TINY_SPEC, tiny_sample, PretrainConfig(batch_size=64), progress=False)


def test_save_pretrained_loads_strictly(tiny_sample: FaceRecordDataset, tmp_path: Path) -> None:
    config = PretrainConfig(epochs=1, batch_size=16, seed=3)
    torch.manual_seed(3)
    model = build_model(TINY_SPEC)
    result = pretrain(model, TINY_SPEC, tiny_sample, config, progress=False)
    path = tmp_path / "pretrained.pt"
    save_pretrained(str(path), model, TINY_SPEC, config, result)

    loaded, spec = load_model(path, device="cpu")
    assert spec == TINY_SPEC
    images = np.stack([tiny_sample[i][0] for i in range(4)])
    with torch.no_grad():
        expected = model(TINY_SPEC.preprocess.to_tensor(images))
        actual = loaded(spec.preprocess.to_tensor(images))
    torch.testing.assert_close(actual, expected)

    payload = torch.load(path, weights_only=True)
    record = payload["extra"]["pretrain"]
    assert record["config"]["batch_size"] == 16
    assert record["config"]["loss"]["lambda_g"] == 35.0
    assert record["lambda_g_check"]["lambda_g_feasible"] is True
    assert record["steps"] == 3


@pytest.mark.filterwarnings("ignore:tar_at_far")
def test_heldout_verification_reports_calibrated_accuracy(tiny_sample: FaceRecordDataset) -> None:
    model, _ = _train(tiny_sample, max_steps=2)
    report = heldout_verification(model, TINY_SPEC, tiny_sample, pairs_per_class=60, erc_fmr=0.05, seed=0)
    assert report["identities"] == 6
    assert report["calibration_identities"] == 3
    assert report["test_identities"] == 3
    assert report["verification"]["num_pairs"] == 120
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["max_reject_fraction"] == 0.5
    assert len(report["error_versus_reject_curve"]) == 11
    assert report["error_versus_reject_curve"][0]["kept"] == 120


def test_heldout_verification_rejects_three_identities(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, identities=3, images_per_identity=2)
    model = build_model(TINY_SPEC).eval()
    with pytest.raises(ValueError, match=r"contains 3 identities; held-out verification needs at least 4"):
        heldout_verification(model, TINY_SPEC, FaceRecordDataset(tmp_path))


def test_pretrain_continues_mobilefacenet_on_orl(orl_dir: Path, mobilefacenet_ckpt: Path) -> None:
    model, spec = load_model(mobilefacenet_ckpt, "mobilefacenet", device="cpu")
    assert spec.embedding_size == 128
    dataset = FaceRecordDataset(orl_dir)
    images = np.stack([dataset[i][0] for i in range(8)])
    with torch.no_grad():
        before = model(spec.preprocess.to_tensor(images)).clone()

    # The MagFace authors' settings for fine-tuning a model trained with ArcFace.
    loss = {"lower_magnitude": 1.0, "upper_magnitude": 51.0, "lower_margin": 0.45, "upper_margin": 1.0, "lambda_g": 5.0}
    config = PretrainConfig(epochs=1, batch_size=16, lr=0.01, max_steps=3, seed=0, loss=loss)
    result = pretrain(model, spec, dataset, config, progress=False)

    assert result.steps == 3
    assert result.head.weight.shape == (40, 128)  # 40 ORL identities
    assert math.isfinite(result.history[0]["loss"])
    with torch.no_grad():
        after = model(spec.preprocess.to_tensor(images))
    assert not torch.allclose(before, after)
