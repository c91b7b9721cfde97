"""Embedding: normalized features with magnitudes, flip test, streaming to disk, the embed command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from magface_al.cli import main
from magface_al.embedding import (
    Embeddings,
    ImageFileDataset,
    embed_dataset,
    embed_images,
    load_embeddings,
    save_embeddings,
)
from magface_al.models import ModelSpec, build_model, save_checkpoint

SMALL_SPEC = ModelSpec(
    arch="iresnet",
    arch_kwargs={"layers": [1, 1, 1, 1], "widths": [8, 16, 16, 32], "dropout": 0.0},
    embedding_size=32,
)


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(SMALL_SPEC)
    with torch.no_grad():  # non-trivial final BatchNorm statistics
        model.features.running_mean.uniform_(-0.5, 0.5)
        model.features.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def orl_dataset(orl_dir):
    from magface_al.data.faces import FaceRecordDataset

    return FaceRecordDataset(orl_dir)


@pytest.fixture(scope="module")
def faces(orl_dataset) -> np.ndarray:
    images, _, _ = orl_dataset.load_images(orl_dataset.keys[:10])
    return np.stack(images)


def test_embed_images_normalized_with_raw_magnitude(small_model, faces):
    features, magnitudes = embed_images(small_model, SMALL_SPEC, faces, batch_size=4)
    with torch.no_grad():
        raw = small_model(SMALL_SPEC.preprocess.to_tensor(faces)).numpy()
    assert features.shape == (10, 32)
    assert features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(magnitudes, np.linalg.norm(raw, axis=1), rtol=1e-4)
    np.testing.assert_allclose(features, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_embed_images_batch_size_invariant(small_model, faces):
    one, magnitudes_one = embed_images(small_model, SMALL_SPEC, faces, batch_size=1)
    many, magnitudes_many = embed_images(small_model, SMALL_SPEC, faces, batch_size=64)
    np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_allclose(magnitudes_one, magnitudes_many, rtol=1e-5)


def test_embed_images_flip_adds_mirror_features(small_model, faces):
    features, magnitudes = embed_images(small_model, SMALL_SPEC, faces, flip=True)
    with torch.no_grad():
        raw = small_model(SMALL_SPEC.preprocess.to_tensor(faces)).numpy()
        mirrored = small_model(SMALL_SPEC.preprocess.to_tensor(np.ascontiguousarray(faces[:, :, ::-1]))).numpy()
    combined = raw + mirrored
    np.testing.assert_allclose(features, combined / np.linalg.norm(combined, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(magnitudes, np.linalg.norm(raw, axis=1), rtol=1e-4)


def test_embed_images_restores_training_mode(faces):
    model = build_model(SMALL_SPEC).train()
    embed_images(model, SMALL_SPEC, faces[:2])
    assert model.training


def test_embed_images_rejects_wrong_dimension(small_model, faces):
    with pytest.raises(ValueError, match="the model returns 32-d embeddings but its specification says 64"):
        embed_images(small_model, SMALL_SPEC.replace(embedding_size=64), faces[:2])


def test_embed_dataset_streams_to_folder(small_model, orl_dataset, tmp_path):
    out_dir = tmp_path / "emb"
    result = embed_dataset(
        small_model, SMALL_SPEC, orl_dataset, batch_size=64, workers=2, out_dir=out_dir, progress=False
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["emb"]  # no temporary folder left
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "features.npy",
        "keys.npy",
        "labels.npy",
        "magnitudes.npy",
        "meta.json",
    ]
    assert isinstance(result.features, np.memmap)
    np.testing.assert_array_equal(np.load(out_dir / "keys.npy"), orl_dataset.keys)
    np.testing.assert_array_equal(np.load(out_dir / "labels.npy"), orl_dataset.labels)
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["count"] == len(orl_dataset)
    assert meta["dimension"] == 32
    assert meta["flip"] is False
    assert ModelSpec.from_dict(meta["model_spec"]) == SMALL_SPEC

    images, _, _ = orl_dataset.load_images(orl_dataset.keys[-5:])
    features, magnitudes = embed_images(small_model, SMALL_SPEC, np.stack(images))
    np.testing.assert_allclose(np.load(out_dir / "features.npy")[-5:], features, atol=1e-5)
    np.testing.assert_allclose(np.load(out_dir / "magnitudes.npy")[-5:], magnitudes, rtol=1e-5)


def test_embed_dataset_selected_keys_in_order(small_model, orl_dataset):
    keys = orl_dataset.keys[[17, 3, 250]]
    result = embed_dataset(small_model, SMALL_SPEC, orl_dataset, keys, workers=0, progress=False)
    np.testing.assert_array_equal(result.keys, keys)
    np.testing.assert_array_equal(result.labels, [orl_dataset.label_of(key) for key in keys])
    assert result.key_to_row() == {int(keys[0]): 0, int(keys[1]): 1, int(keys[2]): 2}


def test_embed_dataset_workers_match_main_process(small_model, orl_dataset):
    keys = orl_dataset.keys[:40]
    in_process = embed_dataset(small_model, SMALL_SPEC, orl_dataset, keys, workers=0, batch_size=16, progress=False)
    in_workers = embed_dataset(small_model, SMALL_SPEC, orl_dataset, keys, workers=2, batch_size=16, progress=False)
    np.testing.assert_array_equal(in_process.keys, in_workers.keys)
    np.testing.assert_allclose(in_process.features, in_workers.features, atol=1e-6)


def test_embed_dataset_unknown_key(small_model, orl_dataset):
    with pytest.raises(ValueError, match=r"1 requested keys are not images of the dataset \(first: 999999\)"):
        embed_dataset(small_model, SMALL_SPEC, orl_dataset, [int(orl_dataset.keys[0]), 999999], progress=False)


def test_embeddings_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 4)).astype(np.float32)
    emb = Embeddings(
        keys=np.arange(10, 15),
        labels=np.array([0, 0, 1, 1, 2]),
        features=features / np.linalg.norm(features, axis=1, keepdims=True),
        magnitudes=rng.uniform(10, 30, size=5).astype(np.float32),
        meta={"note": "test"},
        paths=["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c/1.png"],
    )
    save_embeddings(tmp_path / "emb", emb)
    loaded = load_embeddings(tmp_path / "emb")
    np.testing.assert_array_equal(loaded.keys, emb.keys)
    np.testing.assert_array_equal(loaded.labels, emb.labels)
    np.testing.assert_array_equal(loaded.features, emb.features)
    np.testing.assert_array_equal(loaded.magnitudes, emb.magnitudes)
    assert loaded.paths == emb.paths
    assert loaded.meta["note"] == "test"
    assert loaded.meta["count"] == 5


def test_load_embeddings_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="keys.npy not found"):
        load_embeddings(tmp_path)


def test_load_embeddings_row_mismatch(tmp_path):
    for name, array in (
        ("keys", np.arange(3)),
        ("labels", np.zeros(3, np.int64)),
        ("features", np.zeros((2, 4), np.float32)),
        ("magnitudes", np.zeros(3, np.float32)),
    ):
        np.save(tmp_path / f"{name}.npy", array)
    with pytest.raises(ValueError, match="features has 2 rows, keys has 3; write the folder again"):
        load_embeddings(tmp_path)


def test_embed_command_recordio_with_keys(small_model, orl_dir, orl_dataset, tmp_path):
    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model, SMALL_SPEC)
    keys_file = tmp_path / "keys.txt"
    chosen = orl_dataset.keys[[5, 1, 390]]
    keys_file.write_text("\n".join(str(key) for key in chosen) + "\n")
    out_dir = tmp_path / "out"
    code = main(
        ["embed", "--checkpoint", str(checkpoint), "--data", str(orl_dir), "--out", str(out_dir)]
        + ["--keys", str(keys_file), "--workers", "0", "--no-progress", "--device", "cpu"]
    )
    assert code == 0
    np.testing.assert_array_equal(np.load(out_dir / "keys.npy"), chosen)
    assert np.load(out_dir / "features.npy").shape == (3, 32)


def test_embed_command_image_folder(small_model, faces, tmp_path):
    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model, SMALL_SPEC)
    folder = tmp_path / "faces"
    for index, name in enumerate(["bob", "bob", "alice"]):
        (folder / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name / f"{name}_{index}.png"), faces[index])
    out_dir = tmp_path / "out"
    code = main(
        ["embed", "--checkpoint", str(checkpoint), "--data", str(folder), "--out", str(out_dir)]
        + ["--workers", "0", "--no-progress", "--device", "cpu"]
    )
    assert code == 0
    loaded = load_embeddings(out_dir)
    assert loaded.labels.tolist() == [0, 1, 1]  # alice, bob, bob
    assert [path.rsplit("/", 1)[-1] for path in loaded.paths] == ["alice_2.png", "bob_0.png", "bob_1.png"]
    expected, _ = embed_images(small_model, SMALL_SPEC, faces[[2, 0, 1]])
    np.testing.assert_allclose(loaded.features, expected, atol=1e-5)  # PNG is lossless


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_embed_command_backends_agree(small_model, orl_dir, orl_dataset, tmp_path, backend):
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs the optional onnxruntime package")
    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model, SMALL_SPEC)
    keys_file = tmp_path / "keys.txt"
    chosen = orl_dataset.keys[:20]
    keys_file.write_text(" ".join(str(key) for key in chosen))
    out_dir = tmp_path / backend
    code = main(
        ["embed", "--checkpoint", str(checkpoint), "--data", str(orl_dir), "--out", str(out_dir), "--flip"]
        + ["--keys", str(keys_file), "--workers", "0", "--no-progress", "--device", "cpu", "--backend", backend]
    )
    assert code == 0
    images, _, _ = orl_dataset.load_images(chosen)
    expected, magnitudes = embed_images(small_model, SMALL_SPEC, np.stack(images), flip=True)
    np.testing.assert_allclose(np.load(out_dir / "features.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(out_dir / "magnitudes.npy"), magnitudes, rtol=1e-5)


def test_embed_command_bad_keys_file(small_model, orl_dir, tmp_path, capsys):
    checkpoint = tmp_path / "small.pth"
    save_checkpoint(checkpoint, small_model, SMALL_SPEC)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("1\n2 x3\n")
    code = main(
        ["embed", "--checkpoint", str(checkpoint), "--data", str(orl_dir), "--out", str(tmp_path / "out")]
        + ["--keys", str(keys_file), "--device", "cpu"]
    )
    assert code == 1
    assert "line 2: 'x3' is not an integer image key" in capsys.readouterr().err


def test_image_file_dataset_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no images found in"):
        ImageFileDataset.from_folder(tmp_path)
