"""Full fine-tuning under bfloat16 autocast against float32: the loss curves must agree.

Runs on the CPU where it has native bfloat16 (AVX512-BF16 or AMX), the
case ``precision: auto`` turns autocast on for. The model is the small
iResNet of the embedded default's size class on generated faces, trained
in full (``train: all``) for five epochs with both precisions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from magface_al.data.faces import FaceRecordDataset
from magface_al.data.synthetic import write_synthetic_dataset
from magface_al.embedding.backends import cpu_supports_bf16
from magface_al.models.spec import ModelSpec, Preprocess, build_model
from magface_al.pairs.sampling import sample_pairs
from magface_al.training.finetune import FinetuneConfig, finetune, resolve_precision

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")

SPEC = ModelSpec(
    "iresnet",
    {"layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128], "dropout": 0.0},
    embedding_size=64,
    preprocess=Preprocess(input_size=(56, 56)),
)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> FaceRecordDataset:
    folder = tmp_path_factory.mktemp("faces")
    write_synthetic_dataset(folder, identities=16, images_per_identity=8, seed=2)
    return FaceRecordDataset(folder)


@pytest.fixture(scope="module")
def curves(faces: FaceRecordDataset) -> dict[str, list[dict]]:
    keys, labels = np.asarray(faces.keys), np.asarray(faces.labels)
    train = sample_pairs(keys, labels, num_same=48, num_different=48, seed=0, identities=faces.identities[:10])
    val = sample_pairs(keys, labels, num_same=32, num_different=32, seed=1, identities=faces.identities[10:])
    histories = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(SPEC).eval()
        config = FinetuneConfig(train="all", lr=1e-3, epochs=5, batch_size=32, early_stopping="none",
                                precision=precision, embed_batch_size=32)
        histories[precision] = finetune(model, SPEC, faces, train, val, config).history
    return histories


def test_auto_precision_fp32_for_frozen_trunk() -> None:
    assert resolve_precision(FinetuneConfig(train="last_stage", precision="auto"), torch.device("cpu")) is None
    assert resolve_precision(FinetuneConfig(train="all", precision="fp32"), torch.device("cpu")) is None


@needs_bf16
def test_auto_precision_bf16_for_full_finetuning() -> None:
    assert resolve_precision(FinetuneConfig(train="all", precision="auto"), torch.device("cpu")) is torch.bfloat16


def test_unknown_precision_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"finetune.precision: invalid value 'fp8'; expected one of auto, fp32, bf16"):
        FinetuneConfig(precision="fp8")


@needs_bf16
def test_bf16_loss_curve_follows_fp32(curves: dict[str, list[dict]]) -> None:
    fp32 = [epoch["train_loss"] for epoch in curves["fp32"][1:]]
    bf16 = [epoch["train_loss"] for epoch in curves["bf16"][1:]]
    assert fp32[-1] < 0.8 * fp32[0], f"float32 training did not learn: {fp32}"
    # Stated tolerance, in units of the first epoch's float32 loss (the scale of the curve): every
    # epoch within 10%, and on average within 3%. bfloat16 keeps 8 bits of mantissa, and rounding
    # shifts single epochs (measured here: at most 1.1%, 0.5% on average).
    scale = fp32[0]
    differences = [abs(reduced - reference) / scale for reference, reduced in zip(fp32, bf16)]
    assert max(differences) <= 0.10, f"bf16 {bf16} against fp32 {fp32}"
    assert sum(differences) / len(differences) <= 0.03, f"bf16 {bf16} against fp32 {fp32}"
    # Autocast really ran: the curves are close, not equal.
    assert bf16 != fp32


@needs_bf16
def test_bf16_validation_accuracy_follows_fp32(curves: dict[str, list[dict]]) -> None:
    for reference, reduced in zip(curves["fp32"][1:], curves["bf16"][1:]):
        assert abs(reduced["val_accuracy"] - reference["val_accuracy"]) <= 0.05
