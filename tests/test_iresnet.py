"""iResNet: MagFace's module tree, tensor counts, parameter counts and the small variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from magface_al.models import ModelSpec, build_model
from magface_al.models.iresnet import IResNet, iresnet

# state_dict entries (num_batches_tracked included) and parameters in millions
# of MagFace's published iResNets.
PUBLISHED = {
    "iresnet18": (187, 24),
    "iresnet34": (331, 34),
    "iresnet50": (475, 44),
    "iresnet100": (925, 65),
}


def _meta_model(arch: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: fast and memory-free
        return build_model(ModelSpec.magface(arch))


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_iresnet_state_dict_entry_count(arch):
    assert len(_meta_model(arch).state_dict()) == PUBLISHED[arch][0]


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_iresnet_parameter_count(arch):
    millions = sum(parameter.numel() for parameter in _meta_model(arch).parameters()) / 1e6
    assert abs(millions - PUBLISHED[arch][1]) < 1.0


def test_iresnet_module_order_matches_magface():
    model = _meta_model("iresnet18")
    names = [name for name, _ in model.named_children()]
    assert names == ["conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4", "bn2", "dropout", "fc", "features"]
    block_names = [name for name, _ in model.layer1[0].named_children()]
    assert block_names == ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample"]


def test_iresnet_head_shapes():
    model = _meta_model("iresnet50")
    assert isinstance(model.dropout, nn.Dropout2d)
    assert model.dropout.p == pytest.approx(0.4)
    assert model.fc.in_features == 512 * 7 * 7
    assert model.fc.out_features == 512
    assert isinstance(model.features, nn.BatchNorm1d)
    assert model.features.num_features == 512


def test_iresnet_stride_sits_in_conv2():
    model = _meta_model("iresnet34")
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        assert stage[0].conv2.stride == (2, 2)
        assert stage[0].conv1.stride == (1, 1)
        assert stage[0].downsample[0].stride == (2, 2)
        assert all(block.downsample is None for block in stage[1:])


@pytest.mark.parametrize(
    ("spec", "eps", "momentum"),
    [(ModelSpec.magface("iresnet18"), 2e-5, 0.9), (ModelSpec.arcface_torch("iresnet18"), 1e-5, 0.9)],
    ids=["magface", "arcface_torch"],
)
def test_iresnet_batchnorm_settings(spec, eps, momentum):
    with torch.device("meta"):
        model = build_model(spec)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == 1 + 8 * 3 + 4 + 2  # stem, 3 per block, 4 downsample, bn2 and features
    assert {m.eps for m in norms} == {eps}
    assert {m.momentum for m in norms} == {momentum}


def test_iresnet_small_variant_forward():
    spec = ModelSpec(
        arch="iresnet",
        arch_kwargs={"layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128], "dropout": 0.0},
        embedding_size=64,
    )
    model = build_model(spec).eval()
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        feature_map = model.forward_features(images)
        embedding = model(images)
    assert feature_map.shape == (2, 128, 7, 7)
    assert embedding.shape == (2, 64)
    assert torch.allclose(model.forward_head(feature_map), embedding)


def test_iresnet_input_size_sets_fc():
    model = iresnet([1, 1, 1, 1], widths=[8, 8, 16, 16], input_size=(56, 56), embedding_size=32)
    assert model.feature_map_size == (4, 4)  # 56 -> 28 -> 14 -> 7 -> 4
    assert model.fc.in_features == 16 * 4 * 4
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 56, 56)).shape == (1, 32)


def test_iresnet_width_multiplier():
    model = iresnet([1, 1, 1, 1], width_multiplier=0.25)
    assert model.widths == [16, 32, 64, 128]


def test_iresnet_widths_and_multiplier_rejected():
    with pytest.raises(ValueError, match="either widths or width_multiplier"):
        iresnet([1, 1, 1, 1], widths=[8, 8, 8, 8], width_multiplier=0.5)


def test_iresnet_invalid_layers():
    with pytest.raises(ValueError, match=r"invalid iResNet layers \[1, 1, 1\]"):
        IResNet([1, 1, 1])


def test_build_model_generic_iresnet_needs_layers():
    with pytest.raises(ValueError, match=r"arch 'iresnet' needs arch_kwargs\['layers'\]"):
        build_model(ModelSpec(arch="iresnet"))


def test_build_model_named_depth_rejects_other_layers():
    spec = ModelSpec(arch="iresnet18", arch_kwargs={"layers": [1, 1, 1, 1]})
    with pytest.raises(ValueError, match="use arch 'iresnet' for other depths"):
        build_model(spec)


def test_build_model_unknown_argument():
    spec = ModelSpec(arch="iresnet18", arch_kwargs={"depth": 18})
    with pytest.raises(ValueError, match=r"invalid arch_kwargs \{'depth': 18\} for iresnet18"):
        build_model(spec)


def test_model_spec_dict_round_trip():
    spec = ModelSpec.arcface_torch("iresnet50")
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_model_spec_unknown_arch():
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'"):
        ModelSpec(arch="resnet50")
