"""Parity gates for inference backends, their cache, and the choice behind ``--backend auto``.

Every backend is compared with torch eager float32 (the reference) on the
raw features of real faces before it embeds anything:

- a float32 backend must match the reference within ``FP32_MAX_ABS`` (max
  absolute difference of raw features);
- a reduced-precision backend must keep the cosine similarity of each face's
  raw feature to the reference at or above ``REDUCED_MIN_COSINE``, and, when
  LFW data is given, its 10-fold LFW accuracy within ``LFW_MAX_POINTS``
  percentage points of the reference's.

Gate results and speed measurements are cached in a JSON file per model hash,
backend and device (``parity.json`` in :func:`default_cache_dir`), so a model
is gated once per backend, not on every run. An entry made with other
versions of torch, ONNX Runtime or OpenVINO is measured again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from magface_al.embedding.backends import (
    Backend,
    BackendUnavailableError,
    BACKEND_CHOICES,
    OnnxExport,
    PRECISIONS,
    available_backends,
    build_backend,
    unavailable_reason,
)
from magface_al.models.spec import ModelSpec
from magface_al.utils import write_json_atomic

logger = logging.getLogger(__name__)

FP32_MAX_ABS = 1e-4
REDUCED_MIN_COSINE = 0.9999
LFW_MAX_POINTS = 0.05  # percentage points of 10-fold accuracy
CACHE_FILE = "parity.json"
CACHE_ENV = "MAGFACE_AL_CACHE"
GATE_FACES = 16
# torch.compile takes minutes on a small CPU, so auto tries it only when asked.
OPT_IN_ENGINES = ("torch-compile",)


@dataclass
class GateResult:
    """The outcome of one backend's parity gate.

    Attributes:
        backend: the backend's name, e.g. ``openvino/bf16``.
        passed: whether every check of the gate passed.
        reason: why it passed or failed, in words.
        faces: how many faces were compared.
        max_abs: max absolute difference of raw features to the reference.
        min_cosine: the lowest per-face cosine similarity of raw features to the reference.
        lfw_accuracy: 10-fold LFW accuracy (fraction) of the backend; None when not measured.
        reference_lfw_accuracy: the same for torch eager float32.
    """

    backend: str
    passed: bool
    reason: str
    faces: int
    max_abs: float
    min_cosine: float
    lfw_accuracy: float | None = None
    reference_lfw_accuracy: float | None = None


@dataclass
class ParityOptions:
    """Settings of the gates and timings in ``select_backend``.

    Attributes:
        cache_dir: folder of the gate cache; :func:`default_cache_dir` when None.
        lfw_dir: an LFW folder (RecordIO with ``manifest.csv`` and ``pairs.txt``)
            for the accuracy part of reduced-precision gates; skipped when None.
        allow_compile: let ``auto`` try ``torch.compile`` as well.
        timing_seconds: minimum seconds of timing per backend for ``auto``.
        refresh: measure again instead of using cached results.
    """

    cache_dir: str | os.PathLike | None = None
    lfw_dir: str | os.PathLike | None = None
    allow_compile: bool = False
    timing_seconds: float = 1.0
    refresh: bool = False


@dataclass
class Choice:
    """The backend ``select_backend`` picked, and the evidence for it."""

    backend: Backend
    reason: str
    gates: dict[str, GateResult] = field(default_factory=dict)
    speeds: dict[str, float] = field(default_factory=dict)  # images/s per backend name
    rejected: dict[str, str] = field(default_factory=dict)  # backend name -> reason for rejecting it


def default_cache_dir() -> Path:
    """Return ``$MAGFACE_AL_CACHE``, else ``$XDG_CACHE_HOME/magface-al``, else ``~/.cache/magface-al``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "magface-al"


def model_hash(model: nn.Module, spec: ModelSpec) -> str:
    """Return a SHA-256 hex digest of the model specification and every state_dict tensor."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Bytes rather than values, so bfloat16 and integer buffers hash the same way as float32.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def software_versions() -> dict[str, str | None]:
    """Return the versions of the engines whose numerics a gate depends on."""
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def device_name(device_type: str) -> str:
    """Return the CPU model or the CUDA device name, which cache entries are specific to."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    for line in _read_cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


class GateCache:
    """Gate results and speeds in one JSON file, keyed by model hash, backend and device.

    Entries made with other engine versions count as missing. Writers replace
    the whole file atomically; two processes writing at once lose one entry,
    which is then measured again.
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.path = Path(folder if folder is not None else default_cache_dir()) / CACHE_FILE
        self.versions = software_versions()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("ignoring the unreadable parity cache %s (%s); gates run again", self.path, error)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the entry stored under ``key``, or None if missing or made with other versions."""
        entry = self._load().get(key)
        if not isinstance(entry, dict) or entry.get("versions") != self.versions:
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` under ``key`` with the current versions and time."""
        data = self._load()
        data[key] = {**entry, "versions": self.versions, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_json_atomic(self.path, data)
        except OSError as error:
            logger.warning("cannot write the parity cache %s (%s); gates will run again next time", self.path, error)


def gate_key(model_digest: str, backend: Backend) -> str:
    """Return the cache key of a gate: model hash, backend name and device."""
    return f"{model_digest}|{backend.name}|{backend.device_type}|{device_name(backend.device_type)}"


def raw_features(runner: Any, batch: torch.Tensor) -> np.ndarray:
    """Return the raw float32 features of a preprocessed batch, as numpy (N, D)."""
    with torch.inference_mode():
        return runner(batch).float().cpu().numpy()


def compare_features(backend: Backend, features: np.ndarray, reference: np.ndarray) -> GateResult:
    """Apply the feature part of the gate: max abs for float32, cosine for reduced precision."""
    if features.shape != reference.shape:
        return GateResult(backend.name, False, f"feature shape {features.shape} differs from {reference.shape}", 0, np.inf, -1.0)
    max_abs = float(np.abs(features - reference).max())
    norms = np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
    min_cosine = float(np.min(np.einsum("ij,ij->i", features, reference) / np.maximum(norms, 1e-12)))
    if backend.precision == "fp32":
        passed = max_abs <= FP32_MAX_ABS
        reason = f"max abs difference {max_abs:.2e} {'<=' if passed else '>'} {FP32_MAX_ABS:g}"
    else:
        passed = min_cosine >= REDUCED_MIN_COSINE
        reason = f"min cosine {min_cosine:.6f} {'>=' if passed else '<'} {REDUCED_MIN_COSINE}"
    return GateResult(backend.name, passed, reason, len(features), max_abs, min_cosine)


def run_gate(
    runner: Any,
    spec: ModelSpec,
    backend: Backend,
    batch: torch.Tensor,
    reference: np.ndarray,
    *,
    reference_runner: Any = None,
    lfw_dir: str | os.PathLike | None = None,
    lfw_reference: float | None = None,
) -> GateResult:
    """Run the parity gate of one backend.

    Args:
        runner: the backend's model (from :func:`build_backend`).
        spec: the model specification.
        backend: which backend ``runner`` is.
        batch: preprocessed real faces (N, 3, h, w).
        reference: torch eager float32 raw features of ``batch``.
        reference_runner: the reference model, for the LFW part when ``lfw_reference`` is not known.
        lfw_dir: LFW folder for the accuracy check of reduced precision; skipped when None.
        lfw_reference: the reference's LFW accuracy, if already measured.
    """
    result = compare_features(backend, raw_features(runner, batch), reference)
    if backend.precision == "fp32":
        return result
    if lfw_dir is None:
        result.reason += "; LFW accuracy not checked (no LFW data given)"
        return result
    # Measured even after a failed cosine check, so the result shows what the precision costs in accuracy.
    if lfw_reference is None:
        lfw_reference = lfw_accuracy(reference_runner, spec, lfw_dir)
    accuracy = lfw_accuracy(runner, spec, lfw_dir)
    points = 100 * abs(accuracy - lfw_reference)
    result.lfw_accuracy, result.reference_lfw_accuracy = accuracy, lfw_reference
    # 0.05 points of 6,000 pairs is exactly 3 pairs; the slack absorbs float rounding of that boundary.
    within = points <= LFW_MAX_POINTS + 1e-9
    result.passed = result.passed and within
    result.reason += (
        f"; LFW accuracy {100 * accuracy:.2f}% vs {100 * lfw_reference:.2f}% "
        f"({points:.3f} points {'<=' if within else '>'} {LFW_MAX_POINTS})"
    )
    return result


def lfw_accuracy(runner: Any, spec: ModelSpec, lfw_dir: str | os.PathLike, *, batch_size: int = 64) -> float:
    """Return the 10-fold LFW verification accuracy (fraction) of ``runner`` on ``lfw_dir/pairs.txt``.

    Raises:
        FileNotFoundError: if ``lfw_dir`` lacks ``pairs.txt`` or the RecordIO files.
    """
    from magface_al.data.benchmarks import read_lfw_pairs
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.embedding.embed import embed_dataset
    from magface_al.evaluation.verification import kfold_accuracy

    lfw_dir = Path(lfw_dir)
    pairs_txt = lfw_dir / "pairs.txt"
    if not pairs_txt.is_file() or not (lfw_dir / "train.rec").is_file():
        raise FileNotFoundError(f"LFW data not found in {lfw_dir}: expected pairs.txt, train.rec and manifest.csv")
    pairs = read_lfw_pairs(pairs_txt, lfw_dir)
    keys = np.asarray(sorted({int(key) for first, second, _ in pairs for key in (first, second)}), dtype=np.int64)
    embeddings = embed_dataset(runner, spec, FaceRecordDataset(lfw_dir), keys, batch_size=batch_size, progress=False)
    row_of = embeddings.key_to_row()
    features = np.asarray(embeddings.features)
    rows1 = np.asarray([row_of[int(first)] for first, _, _ in pairs])
    rows2 = np.asarray([row_of[int(second)] for _, second, _ in pairs])
    scores = np.einsum("ij,ij->i", features[rows1], features[rows2])
    labels = np.asarray([same for _, _, same in pairs], dtype=np.int64)
    return float(kfold_accuracy(scores, labels, folds=10).mean)


def images_per_second(runner: Any, batch: torch.Tensor, *, min_seconds: float = 1.0) -> float:
    """Time ``runner`` on ``batch`` after one warm-up call, for at least ``min_seconds`` and two calls."""
    with torch.inference_mode():
        runner(batch)
        calls = 0
        start = time.perf_counter()
        while True:
            runner(batch)
            calls += 1
            elapsed = time.perf_counter() - start
            if calls >= 2 and elapsed >= min_seconds:
                return calls * len(batch) / elapsed


def select_backend(
    model: nn.Module,
    spec: ModelSpec,
    backend: str = "auto",
    *,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    faces: np.ndarray | Sequence[np.ndarray] | None = None,
    options: ParityOptions | None = None,
) -> Any:
    """Return ``model`` wrapped to run on the requested backend, or on the fastest one that passes its gate.

    ``auto`` gates every backend of ``precision`` that runs here (results
    cached), times those that pass on the gate batch, and picks the fastest;
    it logs its choice with the figures. A reduced precision this device
    cannot run falls back to float32, with the reason logged. A named
    backend is gated too, and a failed gate is logged as a warning.

    Args:
        model: the loaded model in eval mode, on ``device``.
        spec: its specification.
        backend: ``auto`` or an engine name from ``ENGINES``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: where to run.
        faces: uint8 BGR real faces (N, H, W, 3) for the gate; the first
            ``GATE_FACES`` are used. Random pixels when None, with a warning.
        options: cache folder, LFW folder and timing; defaults otherwise.

    Returns:
        A callable like the model with a ``backend`` attribute and a ``choice`` attribute (:class:`Choice`).

    Raises:
        ValueError: for an unknown backend or precision.
        BackendUnavailableError: if a named backend cannot run here.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKEND_CHOICES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    options = options or ParityOptions()
    device_type = torch.device(device).type
    model = model.eval()
    batch = _gate_batch(spec, faces).to(device)
    if backend != "auto":
        requested = Backend(backend, precision, device_type)
        return _select_named(model, spec, requested, batch, options)
    return _select_auto(model, spec, precision, device_type, batch, options)


def _gate_batch(spec: ModelSpec, faces: np.ndarray | Sequence[np.ndarray] | None) -> torch.Tensor:
    if faces is None or len(faces) == 0:
        logger.warning("no faces given for the parity gate; comparing backends on random pixels instead of real faces")
        height, width = spec.preprocess.input_size
        generator = np.random.default_rng(0)
        faces = generator.integers(0, 256, size=(GATE_FACES, max(height, 112), max(width, 112), 3), dtype=np.uint8)
    return spec.preprocess.to_tensor(np.stack([np.asarray(face) for face in faces[:GATE_FACES]]))


class _Session:
    """The cache, ONNX export and reference features shared while gating one model; built on first need."""

    def __init__(self, model: nn.Module, spec: ModelSpec, device_type: str, batch: torch.Tensor, options: ParityOptions):
        self.model = model
        self.spec = spec
        self.batch = batch
        self.options = options
        self.cache = GateCache(options.cache_dir)
        self.digest = model_hash(model, spec)
        self.reference_backend = Backend("torch", "fp32", device_type)
        self.reference = build_backend(model, spec, self.reference_backend)
        self.export = OnnxExport(model, spec)
        self.runners: dict[str, Any] = {}
        self._reference_features: np.ndarray | None = None
        self._lfw_reference: float | None = None

    def runner(self, backend: Backend) -> Any:
        """Build ``backend`` once and return it."""
        if backend.is_reference:
            return self.reference
        if backend.name not in self.runners:
            self.runners[backend.name] = build_backend(self.model, self.spec, backend, export=self.export)
        return self.runners[backend.name]

    def reference_features(self) -> np.ndarray:
        if self._reference_features is None:
            self._reference_features = raw_features(self.reference, self.batch)
        return self._reference_features

    def _entry(self, backend: Backend) -> tuple[str, dict[str, Any]]:
        key = gate_key(self.digest, backend)
        return key, ({} if self.options.refresh else self.cache.get(key) or {})

    def gate(self, backend: Backend) -> GateResult:
        """Return the cached gate result of ``backend``, or run the gate and cache it."""
        key, entry = self._entry(backend)
        wants_lfw = self.options.lfw_dir is not None and backend.precision != "fp32"
        cached = entry.get("gate")
        if cached is not None and not (wants_lfw and cached.get("lfw_accuracy") is None):
            return GateResult(**cached)
        if backend.is_reference:
            result = GateResult(backend.name, True, "the reference itself", len(self.batch), 0.0, 1.0)
        else:
            result = run_gate(
                self.runner(backend),
                self.spec,
                backend,
                self.batch,
                self.reference_features(),
                reference_runner=self.reference,
                lfw_dir=self.options.lfw_dir,
                lfw_reference=self._lfw_reference,
            )
            self._lfw_reference = result.reference_lfw_accuracy or self._lfw_reference
        self.cache.put(key, {**entry, "gate": asdict(result)})
        return result

    def speed(self, backend: Backend) -> float:
        """Return the cached images/s of ``backend`` at this batch size and thread count, or measure it."""
        key, entry = self._entry(backend)
        timing_key = f"images_per_s|batch {len(self.batch)}|threads {torch.get_num_threads()}"
        if timing_key in entry:
            return float(entry[timing_key])
        speed = images_per_second(self.runner(backend), self.batch, min_seconds=self.options.timing_seconds)
        self.cache.put(key, {**entry, timing_key: speed})
        return speed


def _select_named(model: nn.Module, spec: ModelSpec, backend: Backend, batch: torch.Tensor, options: ParityOptions) -> Any:
    reason = unavailable_reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend.name} is unavailable on {backend.device_type}: {reason}")
    session = _Session(model, spec, backend.device_type, batch, options)
    result = session.gate(backend)
    if result.passed:
        logger.info("embedding with %s on %s (requested; parity gate passed: %s)", backend.name, backend.device_type, result.reason)
    else:
        logger.warning(
            "embedding with %s as requested, although it failed its parity gate (%s); "
            "use --backend auto to get a backend that passes",
            backend.name,
            result.reason,
        )
    runner = session.runner(backend)
    runner.choice = Choice(backend, "requested", gates={backend.name: result})
    return runner


def _candidates(device_type: str, precision: str, options: ParityOptions) -> list[Backend]:
    backends = available_backends(device_type, precision)
    return [backend for backend in backends if options.allow_compile or backend.engine not in OPT_IN_ENGINES]


def _select_auto(
    model: nn.Module, spec: ModelSpec, precision: str, device_type: str, batch: torch.Tensor, options: ParityOptions
) -> Any:
    candidates = _candidates(device_type, precision, options)
    fallback = ""
    if not candidates:
        why = unavailable_reason(Backend("torch", precision, device_type))
        fallback = f"{precision} cannot run here ({why}), so fp32; "
        logger.warning("backend auto: precision %s cannot run on %s (%s); using fp32", precision, device_type, why)
        candidates = _candidates(device_type, "fp32", options)

    session = _Session(model, spec, device_type, batch, options)
    choice = Choice(session.reference_backend, "")
    for backend in candidates:
        try:
            result = session.gate(backend)
        except BackendUnavailableError as error:
            choice.rejected[backend.name] = str(error)
            continue
        choice.gates[backend.name] = result
        if not result.passed:
            choice.rejected[backend.name] = f"failed its parity gate: {result.reason}"
            continue
        choice.speeds[backend.name] = session.speed(backend)
    rejected = "; ".join(f"{name}: {why}" for name, why in choice.rejected.items())

    if not choice.speeds:
        # Float32 candidates include the reference, which always passes, so only reduced precision gets here.
        logger.warning("backend auto: no %s backend passed its parity gate (%s); choosing among fp32 backends", precision, rejected)
        runner = _select_auto(model, spec, "fp32", device_type, batch, options)
        runner.choice.rejected = {**choice.rejected, **runner.choice.rejected}
        runner.choice.gates = {**choice.gates, **runner.choice.gates}
        runner.choice.reason = f"no {precision} backend passed its parity gate, so fp32: {runner.choice.reason}"
        return runner

    best = max(choice.speeds, key=choice.speeds.get)
    runner = session.runner(next(backend for backend in candidates if backend.name == best))
    choice.backend = runner.backend
    ranking = ", ".join(f"{name} {speed:.1f}" for name, speed in sorted(choice.speeds.items(), key=lambda item: -item[1]))
    choice.reason = (
        f"{fallback}fastest that passed its parity gate ({choice.gates[best].reason}); "
        f"images/s at batch {len(batch)}: {ranking}"
    )
    logger.info("backend auto picked %s on %s: %s%s", best, device_type, choice.reason, f"; rejected: {rejected}" if rejected else "")
    runner.choice = choice
    return runner
