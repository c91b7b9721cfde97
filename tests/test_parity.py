"""Parity gates: feature comparison, the gate cache, and the backend choice of ``auto``, on real faces."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from magface_al.data.faces import FaceRecordDataset
from magface_al.embedding import embed_dataset, embed_images
from magface_al.embedding.backends import Backend, BackendUnavailableError, available_backends, build_backend
from magface_al.embedding.parity import (
    FP32_MAX_ABS,
    LFW_MAX_POINTS,
    REDUCED_MIN_COSINE,
    GateCache,
    ParityOptions,
    compare_features,
    gate_key,
    model_hash,
    raw_features,
    run_gate,
    select_backend,
)
from magface_al.models import load_model

HAS_BF16 = bool(available_backends("cpu", "bf16"))


@pytest.fixture(scope="module")
def mobilefacenet(mobilefacenet_ckpt):
    return load_model(mobilefacenet_ckpt, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run torch on one thread: on a 2-core machine shared with other jobs, two OpenMP threads
    waiting for each other made the MobileFaceNet over 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faces(lfw_dir) -> np.ndarray:
    dataset = FaceRecordDataset(lfw_dir)
    images, _, _ = dataset.load_images(dataset.keys[::600])  # 13 people spread over the alphabet
    return np.stack(images)


@pytest.fixture(scope="module")
def few_faces(faces) -> np.ndarray:
    """Four faces: enough for the backend choice, fast enough for torch eager on a busy 2-core machine."""
    return faces[::3][:4]


@pytest.fixture(scope="module")
def shared_options(tmp_path_factory) -> ParityOptions:
    """One gate cache for the tests that only need some cached choice."""
    return ParityOptions(cache_dir=tmp_path_factory.mktemp("parity-cache"), timing_seconds=0.05)


def test_compare_features_fp32_threshold():
    reference = np.ones((3, 4), dtype=np.float32)
    close = reference + np.float32(FP32_MAX_ABS / 2)
    far = reference.copy()
    far[1, 2] += 3 * FP32_MAX_ABS
    assert compare_features(Backend("onnxruntime"), close, reference).passed
    result = compare_features(Backend("onnxruntime"), far, reference)
    assert not result.passed
    assert result.max_abs == pytest.approx(3 * FP32_MAX_ABS, rel=1e-3)
    assert result.reason.startswith("max abs difference 3.00e-04 > ")


def test_compare_features_reduced_uses_min_cosine():
    reference = np.eye(3, dtype=np.float32) * 10
    features = reference.copy()
    features[2, 0] = 0.5  # one face turned by about 0.05 rad: cosine 0.9988
    result = compare_features(Backend("openvino", "bf16"), features, reference)
    assert not result.passed
    assert result.min_cosine == pytest.approx(10 / np.hypot(10, 0.5), abs=1e-6)
    assert compare_features(Backend("openvino", "bf16"), reference * 1.01, reference).passed


def test_compare_features_shape_mismatch_fails():
    result = compare_features(Backend("openvino"), np.zeros((2, 3)), np.zeros((2, 4)))
    assert not result.passed
    assert result.reason == "feature shape (2, 3) differs from (2, 4)"


def test_model_hash_follows_weights(mobilefacenet):
    model, spec = mobilefacenet
    twin = copy.deepcopy(model)
    assert model_hash(twin, spec) == model_hash(model, spec)
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-3
    assert model_hash(twin, spec) != model_hash(model, spec)


def test_gate_cache_ignores_other_versions(tmp_path):
    cache = GateCache(tmp_path)
    cache.put("key", {"gate": {"passed": True}})
    assert cache.get("key")["gate"] == {"passed": True}
    data = json.loads(cache.path.read_text())
    data["key"]["versions"]["torch"] = "0.0.0"
    cache.path.write_text(json.dumps(data))
    assert cache.get("key") is None


def test_gate_cache_survives_unreadable_file(tmp_path, caplog):
    cache = GateCache(tmp_path)
    cache.path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert cache.get("key") is None
    assert "ignoring the unreadable parity cache" in caplog.text


@pytest.mark.parametrize("engine", ["torch-channels-last", "onnxruntime", "openvino"])
def test_fp32_backends_pass_gate_on_real_faces(engine, mobilefacenet, few_faces):
    faces = few_faces
    if engine != "torch-channels-last":
        pytest.importorskip(engine)
    model, spec = mobilefacenet
    batch = spec.preprocess.to_tensor(faces)
    backend = Backend(engine)
    result = run_gate(build_backend(model, spec, backend), spec, backend, batch, raw_features(model, batch))
    assert result.passed, result.reason
    assert result.max_abs <= FP32_MAX_ABS
    assert result.faces == len(faces)


def test_gate_rejects_changed_weights(mobilefacenet, few_faces):
    faces = few_faces
    model, spec = mobilefacenet
    batch = spec.preprocess.to_tensor(faces)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.linear1.bn.bias.add_(1e-3)  # shifts every output feature by about 1e-3
    backend = Backend("torch-channels-last")
    result = run_gate(build_backend(changed, spec, backend), spec, backend, batch, raw_features(model, batch))
    assert not result.passed
    assert result.max_abs > FP32_MAX_ABS


def test_select_auto_fp32_picks_gated_fastest_and_caches(mobilefacenet, few_faces, tmp_path, caplog):
    faces = few_faces
    model, spec = mobilefacenet
    options = ParityOptions(cache_dir=tmp_path, timing_seconds=0.05)
    with caplog.at_level(logging.INFO, logger="magface_al.embedding.parity"):
        runner = select_backend(model, spec, "auto", faces=faces, options=options)
    choice = runner.choice
    assert choice.backend == runner.backend
    assert choice.gates[choice.backend.name].passed
    assert choice.speeds[choice.backend.name] == max(choice.speeds.values())
    assert f"backend auto picked {choice.backend.name} on cpu" in caplog.text

    cache = json.loads((tmp_path / "parity.json").read_text())
    key = gate_key(model_hash(model, spec), choice.backend)
    assert cache[key]["gate"]["passed"] is True
    stamps = {name: entry["time"] for name, entry in cache.items()}

    again = select_backend(model, spec, "auto", faces=faces, options=options)
    assert again.backend == runner.backend
    assert again.choice.speeds == choice.speeds  # read from the cache, not measured again
    assert {name: entry["time"] for name, entry in json.loads((tmp_path / "parity.json").read_text()).items()} == stamps

    features, _ = embed_images(runner, spec, faces)
    reference, _ = embed_images(model, spec, faces)
    np.testing.assert_allclose(features, reference, atol=1e-5)


def test_select_auto_bf16_only_keeps_passing_precision(mobilefacenet, few_faces, shared_options):
    model, spec = mobilefacenet
    runner = select_backend(model, spec, "auto", precision="bf16", faces=few_faces, options=shared_options)
    choice = runner.choice
    bf16_gates = {name: gate for name, gate in choice.gates.items() if name.endswith("/bf16")}
    if not HAS_BF16:
        assert runner.backend.precision == "fp32"
        assert choice.reason.startswith("bf16 cannot run here")
    elif runner.backend.precision == "bf16":
        assert bf16_gates[runner.backend.name].min_cosine >= REDUCED_MIN_COSINE
    else:
        assert bf16_gates and not any(gate.passed for gate in bf16_gates.values())
        assert choice.reason.startswith("no bf16 backend passed its parity gate, so fp32")


def test_select_named_failed_gate_warns(mobilefacenet, few_faces, tmp_path, caplog):
    if not HAS_BF16:
        pytest.skip("this CPU has no native bfloat16 (amx_bf16, avx512_bf16)")
    model, spec = mobilefacenet
    with caplog.at_level(logging.INFO, logger="magface_al.embedding.parity"):
        runner = select_backend(model, spec, "torch", precision="bf16", faces=few_faces, options=ParityOptions(cache_dir=tmp_path))
    result = runner.choice.gates["torch/bf16"]
    assert runner.backend == Backend("torch", "bf16")
    if result.passed:
        assert "parity gate passed" in caplog.text
    else:
        assert "although it failed its parity gate" in caplog.text


def test_select_backend_rejects_bad_requests(mobilefacenet, tmp_path):
    model, spec = mobilefacenet
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        select_backend(model, spec, "tensorrt")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        select_backend(model, spec, "auto", precision="fp8")
    with pytest.raises(BackendUnavailableError, match="backend onnxruntime/fp16 is unavailable on cpu"):
        select_backend(model, spec, "onnxruntime", precision="fp16", options=ParityOptions(cache_dir=tmp_path))


def test_embed_dataset_auto_records_backend(mobilefacenet, orl_dir, shared_options):
    model, spec = mobilefacenet
    dataset = FaceRecordDataset(orl_dir)
    keys = dataset.keys[:4]  # as many as the cached choice was timed with
    embeddings = embed_dataset(
        model, spec, dataset, keys, batch_size=2, workers=0, progress=False, backend="auto", parity=shared_options
    )
    reference = embed_dataset(model, spec, dataset, keys, batch_size=8, workers=0, progress=False)
    assert embeddings.meta["backend"].endswith("/fp32")
    np.testing.assert_allclose(embeddings.features, reference.features, atol=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_lfw_gate_bf16_on_lfw(mobilefacenet, faces, lfw_dir):
    if not HAS_BF16:
        pytest.skip("this CPU has no native bfloat16 (amx_bf16, avx512_bf16)")
    pytest.importorskip("openvino")
    model, spec = mobilefacenet
    batch = spec.preprocess.to_tensor(faces)
    backend = Backend("openvino", "bf16")
    runner = build_backend(model, spec, backend)
    result = run_gate(runner, spec, backend, batch, raw_features(model, batch), reference_runner=model, lfw_dir=lfw_dir)
    # The published single-view float32 figure of this checkpoint on this LFW subset is 98.47%.
    assert result.reference_lfw_accuracy == pytest.approx(0.9847, abs=0.003)
    assert result.lfw_accuracy is not None
    assert "LFW accuracy" in result.reason
    points = 100 * abs(result.lfw_accuracy - result.reference_lfw_accuracy)
    expected = points <= LFW_MAX_POINTS and result.min_cosine >= REDUCED_MIN_COSINE
    assert result.passed == expected


def test_embed_command_backend_and_precision(mobilefacenet_ckpt, orl_dir, tmp_path):
    from magface_al.cli import main

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(" ".join(str(key) for key in FaceRecordDataset(orl_dir).keys[:4]))
    out_dir = tmp_path / "out"
    code = main(
        ["embed", "--checkpoint", str(mobilefacenet_ckpt), "--data", str(orl_dir), "--out", str(out_dir)]
        + ["--keys", str(keys_file), "--workers", "0", "--no-progress", "--device", "cpu"]
        + ["--backend", "onnxruntime", "--precision", "fp32", "--parity-cache", str(tmp_path / "cache")]
    )
    assert code == 0
    assert json.loads((out_dir / "meta.json").read_text())["backend"] == "onnxruntime/fp32"
    assert (tmp_path / "cache" / "parity.json").is_file()


def test_embed_command_fp16_on_cpu_fails(mobilefacenet_ckpt, orl_dir, tmp_path, capsys):
    from magface_al.cli import main

    code = main(
        ["embed", "--checkpoint", str(mobilefacenet_ckpt), "--data", str(orl_dir), "--out", str(tmp_path / "out")]
        + ["--device", "cpu", "--backend", "torch", "--precision", "fp16", "--parity-cache", str(tmp_path / "cache")]
    )
    assert code == 1
    assert "backend torch/fp16 is unavailable on cpu: fp16 does not run natively on cpu" in capsys.readouterr().err
