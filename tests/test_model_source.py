"""The params `model` section: which checkpoint, and how to read one without a specification."""

from __future__ import annotations

import pytest
import torch

from magface_al.models.source import ModelSource
from magface_al.models.spec import ModelSpec, build_model


def test_spec_none_when_arch_null():
    assert ModelSource(checkpoint="x.pt").spec() is None


def test_spec_preprocess_override_merges():
    spec = ModelSource(checkpoint="x.pt", arch="iresnet18", preprocess={"channel_order": "RGB"}).spec()
    assert spec.arch == "iresnet18"
    assert spec.preprocess.channel_order == "RGB"
    # untouched fields keep MagFace's preprocessing
    assert spec.preprocess.scale == pytest.approx(1 / 255)
    assert spec.preprocess.mean == (0.0, 0.0, 0.0)


def test_spec_arcface_torch_variant():
    spec = ModelSource(checkpoint="x.pt", arch="iresnet50", variant="arcface_torch").spec()
    assert spec.preprocess.channel_order == "RGB"
    assert spec.arch_kwargs["bn_eps"] == pytest.approx(1e-5)


def test_spec_preprocess_without_arch_rejected():
    source = ModelSource(checkpoint="x.pt", preprocess={"channel_order": "RGB"})
    with pytest.raises(ValueError, match="model.preprocess is set but model.arch is null"):
        source.spec()


def test_load_official_layout_with_arch(tmp_path):
    torch.manual_seed(0)
    reference = build_model(ModelSpec.magface("iresnet18")).eval()
    # Official MagFace DDP layout: backbone under `features.module.`, no specification stored.
    state = {f"features.module.{name}": tensor for name, tensor in reference.state_dict().items()}
    path = tmp_path / "magface_epoch_00025.pth"
    torch.save({"state_dict": state, "epoch": 25, "arch": "iresnet18"}, path)

    model, spec = ModelSource(checkpoint=str(path), arch="iresnet18").load(device="cpu")

    assert spec.preprocess.channel_order == "BGR"
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def test_load_path_replaces_checkpoint(mobilefacenet_ckpt):
    source = ModelSource(checkpoint="missing.pt", arch="mobilefacenet")
    model, spec = source.load(path=str(mobilefacenet_ckpt), device="cpu")
    assert spec.embedding_size == 128
    assert spec.preprocess.input_size == (112, 96)
