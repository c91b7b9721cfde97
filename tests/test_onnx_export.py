"""ONNX export: parity with torch on real faces, the stored specification, the export command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs the optional 'onnx' package (extra 'fast')")
pytest.importorskip("onnxruntime", reason="ONNX parity needs the optional 'onnxruntime' package (extra 'fast')")

from magface_al.cli import main  # noqa: E402
from magface_al.embedding import embed_images  # noqa: E402
from magface_al.models import ModelSpec, build_model, load_model  # noqa: E402
from magface_al.models.export import OnnxModel, export_onnx  # noqa: E402

MAX_ABS_DIFFERENCE = 1e-4


@pytest.fixture(scope="module")
def lfw_faces(lfw_dir) -> np.ndarray:
    from magface_al.data.faces import FaceRecordDataset

    dataset = FaceRecordDataset(lfw_dir)
    images, _, _ = dataset.load_images(dataset.keys[::500])  # 16 people spread over the alphabet
    return np.stack(images)


def _raw(model, spec: ModelSpec, faces: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(spec.preprocess.to_tensor(faces)).numpy()


def test_onnx_mobilefacenet_parity_on_real_faces(mobilefacenet_ckpt, lfw_faces, tmp_path):
    model, spec = load_model(mobilefacenet_ckpt, device="cpu")
    path = export_onnx(model, spec, tmp_path / "mobilefacenet.onnx")
    onnx_model = OnnxModel(path)
    assert onnx_model.spec == spec
    expected = _raw(model, spec, lfw_faces)
    exported = _raw(onnx_model, spec, lfw_faces)
    assert exported.shape == (len(lfw_faces), 128)
    assert np.abs(exported - expected).max() <= MAX_ABS_DIFFERENCE


def test_onnx_iresnet_parity_on_real_faces(lfw_faces, tmp_path):
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 2, 2, 1], "widths": [16, 32, 64, 128]})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = export_onnx(model, spec, tmp_path / "iresnet.onnx")
    onnx_model = OnnxModel(path)
    expected = _raw(model, spec, lfw_faces)
    assert np.abs(_raw(onnx_model, spec, lfw_faces) - expected).max() <= MAX_ABS_DIFFERENCE

    features, magnitudes = embed_images(onnx_model, spec, lfw_faces, batch_size=5)
    np.testing.assert_allclose(magnitudes, np.linalg.norm(expected, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


def test_onnx_model_rejects_gpu(tmp_path):
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "widths": [4, 4, 4, 4]}, embedding_size=8)
    path = export_onnx(build_model(spec), spec, tmp_path / "tiny.onnx")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        OnnxModel(path).to("cuda")


def test_export_command(mobilefacenet_ckpt, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code = main(["export", "--checkpoint", str(mobilefacenet_ckpt), "--out", str(out), "--device", "cpu"])
    assert code == 0
    assert out.is_file()
    difference = float(capsys.readouterr().out.rsplit(": ", 1)[1])
    assert difference <= MAX_ABS_DIFFERENCE
