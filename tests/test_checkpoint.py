"""Checkpoint layouts load to identical outputs; strict loading names what does not fit; round trips."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from torch import nn

from magface_al.models import CheckpointError, ModelSpec, build_model, load_model, read_checkpoint, save_checkpoint
from magface_al.models.checkpoint import MAGFACE_PREFIX

SMALL_SPEC = ModelSpec(
    arch="iresnet",
    arch_kwargs={"layers": [1, 1, 1, 1], "widths": [8, 16, 16, 32], "dropout": 0.0},
    embedding_size=32,
)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic a random value, so no tensor is at its default."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var") or name.endswith("prelu.weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model.eval()


def _layout_payload(layout: str, state: dict[str, torch.Tensor]) -> dict:
    """Build a checkpoint as each training setup writes it, heads included."""
    if layout == "ddp":
        backbone = {MAGFACE_PREFIX + key: value for key, value in state.items()}
        head = {"fc.weight": torch.randn(100, 512), "parallel_fc.weight": torch.randn(100, 512)}
        return {"state_dict": {**backbone, **head}, "epoch": 25, "arch": "iresnet"}
    if layout == "dp":
        backbone = {"module.features." + key: value for key, value in state.items()}
        return {"state_dict": {**backbone, "module.fc.weight": torch.randn(512, 300)}, "epoch": 3}
    if layout in ("plain", "arcface_torch"):
        return dict(state)
    raise AssertionError(layout)


def _images(count: int, size: tuple[int, int] = (112, 112)) -> torch.Tensor:
    return torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("arch", "images"),
    [
        ("iresnet18", 1),
        pytest.param("iresnet34", 1, marks=pytest.mark.slow),
        pytest.param("iresnet50", 1, marks=pytest.mark.slow),
        pytest.param("iresnet100", 1, marks=pytest.mark.slow),
    ],
)
def test_checkpoint_layouts_load_identical_outputs(tmp_path, arch, images):
    batch = _images(images)
    for layout in ("ddp", "dp", "plain", "arcface_torch"):
        spec = ModelSpec.arcface_torch(arch) if layout == "arcface_torch" else ModelSpec.magface(arch)
        reference = _randomize(build_model(spec))
        with torch.no_grad():
            expected = reference(batch)
        path = tmp_path / f"{layout}.pth"
        torch.save(_layout_payload(layout, reference.state_dict()), path)
        del reference

        model, used = load_model(path, spec, device="cpu")
        with torch.no_grad():
            assert torch.equal(model(batch), expected), layout
        assert used == spec
        path.unlink()  # iresnet100 files are 260 MB each


@pytest.mark.parametrize(
    ("layout", "name", "skipped"),
    [
        ("ddp", "magface_ddp", ["fc.weight", "parallel_fc.weight"]),
        ("dp", "magface_dp", ["module.fc.weight"]),
        ("plain", "plain", []),
    ],
)
def test_checkpoint_layout_detected_and_heads_skipped(tmp_path, layout, name, skipped):
    model = _randomize(build_model(SMALL_SPEC))
    path = tmp_path / "model.pth"
    torch.save(_layout_payload(layout, model.state_dict()), path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == name
    assert checkpoint.skipped == skipped
    assert set(checkpoint.state_dict) == set(model.state_dict())


def test_checkpoint_dataparallel_around_bare_iresnet(tmp_path):
    # `module.features.*` here is the final BatchNorm1d, not MagFace's DataParallel prefix.
    model = _randomize(build_model(SMALL_SPEC))
    path = tmp_path / "model.pth"
    torch.save({"net_state_dict": {"module." + key: value for key, value in model.state_dict().items()}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "dataparallel"
    assert "fc.weight" in checkpoint.state_dict
    assert "features.running_mean" in checkpoint.state_dict
    loaded, _ = load_model(path, SMALL_SPEC, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(_images(1)), model(_images(1)))


def test_checkpoint_missing_tensor_named(tmp_path):
    model = build_model(ModelSpec.magface("iresnet18"))
    payload = _layout_payload("ddp", model.state_dict())
    del payload["state_dict"][MAGFACE_PREFIX + "layer3.1.bn2.running_var"]
    path = tmp_path / "model.pth"
    torch.save(payload, path)
    with pytest.raises(
        CheckpointError, match=r"1 missing, 0 unexpected, 0 shape-mismatched tensors\. Missing: layer3\.1\.bn2\.running_var\."
    ):
        load_model(path, "iresnet18", device="cpu")


def test_checkpoint_final_batchnorm_missing_fails(tmp_path):
    model = build_model(SMALL_SPEC)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("features.")}
    path = tmp_path / "model.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"4 missing.*Missing: features\.weight, features\.bias"):
        load_model(path, SMALL_SPEC, device="cpu")


def test_checkpoint_unknown_key_outside_prefix_fails(tmp_path):
    model = build_model(SMALL_SPEC)
    payload = _layout_payload("ddp", model.state_dict())
    payload["state_dict"]["margin.kernel"] = torch.zeros(3)
    path = tmp_path / "model.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected.*Unexpected: margin\.kernel\."):
        load_model(path, SMALL_SPEC, device="cpu")


def test_checkpoint_shape_mismatch_fails(tmp_path):
    model = build_model(SMALL_SPEC)
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    wider = SMALL_SPEC.replace(embedding_size=16)
    with pytest.raises(CheckpointError, match=r"shape-mismatched tensors\. Shape-mismatched: fc\.weight \(32, 1568\) \(model \(16, 1568\)\), fc\.bias"):
        load_model(path, wider, device="cpu")


def test_checkpoint_many_missing_listed_with_count(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"Missing: bn1\.weight, bn1\.bias, bn1\.running_mean, bn1\.running_var, prelu\.weight and \d+ more\."):
        load_model(path, SMALL_SPEC, device="cpu")


def test_checkpoint_pickle_rejected_without_flag(tmp_path):
    model = build_model(SMALL_SPEC)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"pass allow_pickle=True \(command line: --allow-pickle\)"):
        load_model(path, SMALL_SPEC, device="cpu")
    loaded, _ = load_model(path, SMALL_SPEC, allow_pickle=True, device="cpu")
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_checkpoint_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "absent.pth")


def test_checkpoint_round_trip_our_loader(tmp_path, caplog):
    model = _randomize(build_model(SMALL_SPEC))
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model, SMALL_SPEC, epoch=4, extra={"loss": "maglinear", "lr": 0.01})
    with caplog.at_level(logging.INFO, logger="magface_al.models.checkpoint"):
        loaded, spec = load_model(path, device="cpu")
    assert spec == SMALL_SPEC
    count = len(model.state_dict())
    assert f"loaded {count}/{count} tensors" in caplog.text
    with torch.no_grad():
        assert torch.equal(loaded(_images(2)), model(_images(2)))
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "magface_al"
    assert checkpoint.epoch == 4
    assert checkpoint.extra == {"loss": "maglinear", "lr": 0.01}


def test_checkpoint_round_trip_official_loader(tmp_path):
    # The official MagFace loader strips `features.module.` and needs every tensor of the same tree.
    model = _randomize(build_model(ModelSpec.magface("iresnet18")), seed=3)
    path = tmp_path / "ours.pth"
    save_checkpoint(path, model, ModelSpec.magface("iresnet18"), epoch=2)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["arch"] == "iresnet18"
    assert payload["epoch"] == 2
    assert all(key.startswith(MAGFACE_PREFIX) for key in payload["state_dict"])
    state = {key[len(MAGFACE_PREFIX) :]: value for key, value in payload["state_dict"].items()}

    official = build_model(ModelSpec.magface("iresnet18"))
    official.load_state_dict(state, strict=True)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(official.features, name), getattr(model.features, name)), name
    with torch.no_grad():
        assert torch.equal(official.eval()(_images(1)), model(_images(1)))


def test_checkpoint_stored_spec_rejects_other_arch(tmp_path):
    path = tmp_path / "ours.pth"
    save_checkpoint(path, build_model(SMALL_SPEC), SMALL_SPEC)
    with pytest.raises(CheckpointError, match="holds a iresnet model, but architecture 'iresnet18' was requested"):
        load_model(path, "iresnet18", device="cpu")


def test_save_checkpoint_rejects_model_of_other_spec(tmp_path):
    with pytest.raises(ValueError, match="the model does not match its specification iresnet18"):
        save_checkpoint(tmp_path / "x.pth", build_model(SMALL_SPEC), ModelSpec.magface("iresnet18"))
    assert not (tmp_path / "x.pth").exists()


def test_save_checkpoint_rejects_unloadable_extra(tmp_path):
    with pytest.raises(ValueError, match=r"extra\['args'\] is a Namespace"):
        save_checkpoint(tmp_path / "x.pth", build_model(SMALL_SPEC), SMALL_SPEC, extra={"args": argparse.Namespace()})


def test_checkpoint_absent_batch_counters_tolerated(tmp_path, caplog):
    model = _randomize(build_model(SMALL_SPEC))
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="magface_al.models.checkpoint"):
        loaded, _ = load_model(path, SMALL_SPEC, device="cpu")
    assert "num_batches_tracked counters absent" in caplog.text
    with torch.no_grad():
        assert torch.equal(loaded(_images(1)), model(_images(1)))


def test_checkpoint_bare_iresnet_warns_about_arcface_torch(tmp_path, caplog):
    model = build_model(ModelSpec.magface("iresnet18"))
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="magface_al.models.checkpoint"):
        _, spec = load_model(path, device="cpu")
    assert spec == ModelSpec.magface("iresnet18")
    assert "arcface_torch" in caplog.text
    assert "features.weight is all ones" in caplog.text  # freshly initialized, as arcface_torch leaves it


def test_checkpoint_unknown_architecture_needs_spec(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(build_model(SMALL_SPEC).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"cannot tell the architecture .* pass the architecture \(--arch\)"):
        load_model(path, device="cpu")
