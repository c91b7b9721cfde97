"""Inference backends: support detection, runners on the CPU, OpenVINO's precision, the allocator setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magface_al.embedding import embed_images
from magface_al.embedding.backends import (
    Backend,
    BackendUnavailableError,
    OpenVinoModel,
    OnnxExport,
    TorchRunner,
    available_backends,
    build_backend,
    configure_allocator,
    cpu_bf16_flags,
    cpu_flags,
    engines_for,
    precisions_for,
    unavailable_reason,
)
from magface_al.embedding.embed import _copy_ahead
from magface_al.models import ModelSpec, build_model

TINY_SPEC = ModelSpec(
    arch="iresnet",
    arch_kwargs={"layers": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "dropout": 0.0},
    embedding_size=16,
)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY_SPEC).eval()


@pytest.fixture(scope="module")
def tiny_batch() -> torch.Tensor:
    return torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))


def _raw(runner, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return runner(batch).float().numpy()


def test_cpu_flags_reads_first_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx512f", "avx512_bf16"})
    assert cpu_bf16_flags(cpuinfo) == ["avx512_bf16"]


def test_cpu_flags_missing_file_is_empty(tmp_path):
    assert cpu_flags(tmp_path / "absent") == frozenset()
    assert cpu_bf16_flags(tmp_path / "absent") == []


@pytest.mark.parametrize(
    ("device_type", "cpu_bf16", "cuda_bf16", "expected"),
    [
        ("cpu", False, False, ("fp32",)),
        ("cpu", True, False, ("fp32", "bf16")),
        ("cuda", False, False, ("fp32", "fp16")),
        ("cuda", False, True, ("fp32", "fp16", "bf16")),
    ],
)
def test_precisions_for_device(device_type, cpu_bf16, cuda_bf16, expected):
    assert precisions_for(device_type, cpu_bf16=cpu_bf16, cuda_bf16=cuda_bf16) == expected


def test_engines_for_gpu_are_torch_only():
    assert engines_for("cuda", "fp16") == ("torch", "torch-channels-last", "torch-compile")
    assert "onnxruntime" not in engines_for("cpu", "bf16")
    assert "openvino" in engines_for("cpu", "bf16")


def test_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        Backend("tensorrt")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        Backend("torch", "int8")


def test_unavailable_reason_fp16_on_cpu():
    assert unavailable_reason(Backend("torch", "fp16", "cpu")) == "fp16 does not run natively on cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_build_backend_cuda_without_gpu_raises(tiny_model):
    with pytest.raises(BackendUnavailableError, match="unavailable on cuda: CUDA is not available to torch"):
        build_backend(tiny_model, TINY_SPEC, Backend("torch", "fp16", "cuda"))


def test_available_backends_cpu_fp32_includes_reference():
    backends = available_backends("cpu", "fp32")
    assert Backend("torch", "fp32", "cpu") in backends
    assert all(backend.precision == "fp32" for backend in backends)


def test_torch_channels_last_leaves_model_unchanged(tiny_model, tiny_batch):
    expected = _raw(tiny_model, tiny_batch)
    runner = build_backend(tiny_model, TINY_SPEC, Backend("torch-channels-last"))
    assert isinstance(runner, TorchRunner)
    assert runner.model is not tiny_model
    weight = next(parameter for parameter in runner.model.parameters() if parameter.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert next(p for p in tiny_model.parameters() if p.ndim == 4).is_contiguous()
    assert np.abs(_raw(runner, tiny_batch) - expected).max() <= 1e-5


@pytest.mark.skipif(not available_backends("cpu", "bf16"), reason="this CPU has no native bfloat16 (amx_bf16, avx512_bf16)")
def test_torch_bf16_runner_returns_float32_close_to_fp32(tiny_model, tiny_batch):
    expected = _raw(tiny_model, tiny_batch)
    runner = build_backend(tiny_model, TINY_SPEC, Backend("torch-channels-last", "bf16"))
    with torch.inference_mode():
        output = runner(tiny_batch)
    assert output.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(output, torch.from_numpy(expected), dim=1)
    assert cosine.min().item() > 0.99
    assert np.abs(output.numpy() - expected).max() > 0  # bfloat16 really ran


def test_onnx_export_shared_between_backends(tiny_model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    export = OnnxExport(tiny_model, TINY_SPEC)
    first = build_backend(tiny_model, TINY_SPEC, Backend("onnxruntime"), export=export)
    second = build_backend(tiny_model, TINY_SPEC, Backend("openvino"), export=export)
    assert first.path == second.path
    assert first.backend == Backend("onnxruntime")


def test_openvino_fp32_really_runs_fp32(tiny_model, tiny_batch, tmp_path):
    pytest.importorskip("openvino")
    from magface_al.models.export import export_onnx

    path = export_onnx(tiny_model, TINY_SPEC, tmp_path / "tiny.onnx")
    model = OpenVinoModel(path, precision="fp32", threads=1)
    assert model.inference_precision == "f32"
    assert np.abs(_raw(model, tiny_batch) - _raw(tiny_model, tiny_batch)).max() <= 1e-4


def test_openvino_output_not_overwritten_by_next_call(tiny_model, tiny_batch, tmp_path):
    pytest.importorskip("openvino")
    from magface_al.models.export import export_onnx

    model = OpenVinoModel(export_onnx(tiny_model, TINY_SPEC, tmp_path / "tiny.onnx"), threads=1)
    first = model(tiny_batch[:2])
    snapshot = first.clone()
    model(tiny_batch[2:])
    assert torch.equal(first, snapshot)


@pytest.mark.skipif(not available_backends("cpu", "bf16"), reason="this CPU has no native bfloat16 (amx_bf16, avx512_bf16)")
def test_openvino_bf16_reports_bf16(tiny_model, tmp_path):
    pytest.importorskip("openvino")
    from magface_al.models.export import export_onnx

    model = OpenVinoModel(export_onnx(tiny_model, TINY_SPEC, tmp_path / "tiny.onnx"), precision="bf16", threads=1)
    assert model.inference_precision == "bf16"


def test_openvino_rejects_fp16_and_gpu(tiny_model, tmp_path):
    pytest.importorskip("openvino")
    from magface_al.models.export import export_onnx

    path = export_onnx(tiny_model, TINY_SPEC, tmp_path / "tiny.onnx")
    with pytest.raises(BackendUnavailableError, match="precision 'fp16' is not supported: use fp32 or bf16"):
        OpenVinoModel(path, precision="fp16")
    with pytest.raises(ValueError, match="runs on the CPU only, not on cuda"):
        OpenVinoModel(path, threads=1).to("cuda")


@pytest.mark.parametrize("engine", ["torch-channels-last", "onnxruntime", "openvino"])
def test_embed_images_through_backend_matches_torch(engine, tiny_model):
    if engine != "torch-channels-last":
        pytest.importorskip(engine)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    expected_features, expected_magnitudes = embed_images(tiny_model, TINY_SPEC, images, batch_size=2)
    runner = build_backend(tiny_model, TINY_SPEC, Backend(engine), threads=1)
    features, magnitudes = embed_images(runner, TINY_SPEC, images, batch_size=2)
    np.testing.assert_allclose(features, expected_features, atol=1e-5)
    np.testing.assert_allclose(magnitudes, expected_magnitudes, rtol=1e-5)


def test_copy_ahead_on_cpu_passes_batches_through():
    batches = [(torch.full((2, 3), float(i)), np.array([i, i]), np.array([2 * i, 2 * i + 1])) for i in range(3)]
    out = list(_copy_ahead(iter(batches), torch.device("cpu")))
    assert len(out) == 3
    for (batch, labels, keys), (expected, expected_labels, expected_keys) in zip(out, batches):
        assert batch is expected
        assert labels is expected_labels
        assert keys is expected_keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_copy_ahead_on_gpu_keeps_order():
    batches = [(torch.full((2, 3), float(i)).pin_memory(), np.array([i]), np.array([i])) for i in range(4)]
    out = list(_copy_ahead(iter(batches), torch.device("cuda")))
    assert [batch.device.type for batch, _, _ in out] == ["cuda"] * 4
    assert [batch[0, 0].item() for batch, _, _ in out] == [0.0, 1.0, 2.0, 3.0]


def test_configure_allocator_applies_on_glibc():
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt settings exist only in glibc")
    # A child process, because the setting lasts for the life of the process that makes it.
    code = "from magface_al.embedding.backends import configure_allocator; print(configure_allocator())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "True"


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_model, tiny_batch):
    runner = build_backend(tiny_model, TINY_SPEC, Backend("torch-compile"))
    assert np.abs(_raw(runner, tiny_batch) - _raw(tiny_model, tiny_batch)).max() <= 1e-4
