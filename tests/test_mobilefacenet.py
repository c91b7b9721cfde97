"""MobileFaceNet: the pretrained CASIA-WebFace checkpoint loads strictly; its preprocessing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from magface_al.models import ModelSpec, build_model, load_model, read_checkpoint


def test_mobilefacenet_matches_checkpoint_tensors(mobilefacenet_ckpt):
    raw = torch.load(mobilefacenet_ckpt, map_location="cpu", weights_only=True)["net_state_dict"]
    model_state = build_model(ModelSpec.mobilefacenet()).state_dict()
    assert set(model_state) == set(raw)
    mismatched = [key for key in raw if raw[key].shape != model_state[key].shape]
    assert mismatched == []


def test_mobilefacenet_checkpoint_loads_every_tensor(mobilefacenet_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="magface_al.models.checkpoint"):
        model, spec = load_model(mobilefacenet_ckpt, device="cpu")
    assert spec == ModelSpec.mobilefacenet()
    assert "loaded 333/333 tensors" in caplog.text
    assert not model.training
    checkpoint = read_checkpoint(mobilefacenet_ckpt)
    assert checkpoint.layout == "net_state_dict"
    assert checkpoint.epoch == 68


def test_mobilefacenet_output_shape():
    model = build_model(ModelSpec.mobilefacenet()).eval()
    with torch.no_grad():
        feature_map = model.forward_features(torch.rand(2, 3, 112, 96))
        embedding = model.forward_head(feature_map)
    assert feature_map.shape == (2, 512, 7, 6)
    assert embedding.shape == (2, 128)


def test_mobilefacenet_residuals_only_where_shape_kept():
    model = build_model(ModelSpec.mobilefacenet())
    residual = [block.residual for block in model.blocks]
    # Blocks 0, 5 and 12 open a stage with stride 2 (block 5 also widens 64 -> 128).
    assert residual == [False, True, True, True, True, False, True, True, True, True, True, True, False, True, True]


def test_mobilefacenet_preprocess_crop_rgb_scale():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 112, 112, 3), dtype=np.uint8)
    tensor = ModelSpec.mobilefacenet().preprocess.to_tensor(images)
    assert tensor.shape == (2, 3, 112, 96)
    assert tensor.dtype == torch.float32
    # Channel 0 is red, which OpenCV stores last; column 0 is image column 8.
    for channel, bgr_index in ((0, 2), (1, 1), (2, 0)):
        expected = (images[1, 5, 8, bgr_index] - 127.5) / 128
        assert tensor[1, channel, 5, 0].item() == pytest.approx(expected)
    expected_last = (images[0, 111, 103, 0] - 127.5) / 128
    assert tensor[0, 2, 111, 95].item() == pytest.approx(expected_last)


def test_magface_preprocess_keeps_bgr_and_scales():
    images = np.zeros((1, 112, 112, 3), dtype=np.uint8)
    images[0, 0, 0] = (255, 51, 0)  # blue, green, red
    tensor = ModelSpec.magface("iresnet18").preprocess.to_tensor(images)
    assert tensor.shape == (1, 3, 112, 112)
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.2, 0.0])


def test_preprocess_rejects_crop_outside_image():
    images = np.zeros((1, 100, 100, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"crop \(0, 8, 112, 96\) .* does not fit images of size 100x100"):
        ModelSpec.mobilefacenet().preprocess.to_tensor(images)


def test_mobilefacenet_same_person_scores_higher(mobilefacenet_ckpt, orl_dir):
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.embedding import embed_images

    dataset = FaceRecordDataset(orl_dir)
    keys = np.concatenate([dataset.keys_of(identity)[:3] for identity in dataset.identities[:6]])
    images, _, _ = dataset.load_images(keys)
    labels = np.asarray([dataset.label_of(key) for key in keys])
    model, spec = load_model(mobilefacenet_ckpt, device="cpu")
    features, magnitudes = embed_images(model, spec, np.stack(images), batch_size=18)
    similarity = features @ features.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(keys), dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.3
    assert np.all(magnitudes > 0)
