"""Inference backends for embedding: torch (eager, channels_last, compiled), ONNX Runtime and OpenVINO.

A backend is an engine plus a numeric precision on a device, for example
``openvino/bf16`` on the CPU. :func:`build_backend` wraps a loaded model so it
runs on that backend and is called like the ``nn.Module`` it came from:
``runner(batch)`` takes the preprocessed float32 batch (N, 3, h, w) and returns
the raw float32 embedding (N, D), whatever precision runs inside.

Reduced precision runs only where the hardware computes it natively:
bfloat16 on CPUs with AMX or AVX512-BF16, float16 and bfloat16 on CUDA
GPUs. Which backend to use, and whether its features are close enough to
torch's float32 features, is decided in :mod:`magface_al.embedding.parity`.

:func:`configure_allocator` keeps glibc from returning large freed buffers to
the system, which otherwise costs page faults on every batch.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from magface_al.models.spec import ModelSpec

logger = logging.getLogger(__name__)

ENGINES = ("torch", "torch-channels-last", "torch-compile", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKEND_CHOICES = ("auto", *ENGINES)
REFERENCE_ENGINE = "torch"

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags that give native bfloat16 arithmetic: AMX tiles or AVX-512 BF16 dot products.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_ENGINE_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}


class BackendUnavailableError(ValueError):
    """A backend that this machine, its packages or the requested device cannot run."""


@dataclass(frozen=True)
class Backend:
    """An inference engine with a numeric precision on a device type (``cpu`` or ``cuda``)."""

    engine: str
    precision: str = "fp32"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown backend {self.engine!r}: expected one of {', '.join(BACKEND_CHOICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    @property
    def name(self) -> str:
        """The short form used in logs, cache keys and benchmark tables, e.g. ``openvino/bf16``."""
        return f"{self.engine}/{self.precision}"

    @property
    def is_reference(self) -> bool:
        """True for torch eager float32, the reference every other backend is compared with."""
        return self.engine == REFERENCE_ENGINE and self.precision == "fp32"


# -- hardware and package support ---------------------------------------------


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """Return the feature flags of the first CPU listed in ``cpuinfo``; empty where the file does not exist."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_bf16_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> list[str]:
    """Return which of the bfloat16 CPU flags (``amx_bf16``, ``avx512_bf16``) the CPU reports."""
    flags = cpu_flags(cpuinfo)
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def cpu_supports_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Return True where the CPU has native bfloat16 arithmetic and torch's oneDNN build can use it."""
    if not cpu_bf16_flags(cpuinfo):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    # NOTE: a private torch operator (present in torch 2.x); without it, trust the CPU flags.
    is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if is_supported is None else bool(is_supported())


def precisions_for(device_type: str, *, cpu_bf16: bool, cuda_bf16: bool = False) -> tuple[str, ...]:
    """Return the precisions that run natively on ``device_type`` given its bfloat16 support."""
    if device_type == "cuda":
        return ("fp32", "fp16", "bf16") if cuda_bf16 else ("fp32", "fp16")
    return ("fp32", "bf16") if cpu_bf16 else ("fp32",)


def engines_for(device_type: str, precision: str) -> tuple[str, ...]:
    """Return the engines that can run ``precision`` on ``device_type`` (ignoring installed packages)."""
    if device_type != "cpu":
        return ("torch", "torch-channels-last", "torch-compile")
    if precision == "fp32":
        return ENGINES
    # ONNX Runtime's CPU provider has no bfloat16 convolutions.
    return ("torch", "torch-channels-last", "torch-compile", "openvino")


def unavailable_reason(backend: Backend) -> str | None:
    """Return why ``backend`` cannot run on this machine, or None when it can."""
    device_type = backend.device_type
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available to torch"
    if device_type not in ("cpu", "cuda"):
        return f"device type {device_type!r} is not supported; use cpu or cuda"
    cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    cpu_bf16 = device_type == "cpu" and cpu_supports_bf16()
    if backend.precision not in precisions_for(device_type, cpu_bf16=cpu_bf16, cuda_bf16=cuda_bf16):
        if device_type == "cpu" and backend.precision == "bf16":
            return "this CPU has no native bfloat16 arithmetic (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo)"
        return f"{backend.precision} does not run natively on {device_type}"
    if backend.engine not in engines_for(device_type, backend.precision):
        if device_type != "cpu":
            return f"{backend.engine} runs on the CPU only"
        return f"{backend.engine} has no {backend.precision} CPU kernels"
    missing = [name for name in _ENGINE_PACKAGES.get(backend.engine, ()) if importlib.util.find_spec(name) is None]
    if missing:
        return f"the {' and '.join(missing)} package(s) are not installed (pip install 'magface-al[fast]')"
    return None


def available_backends(device: torch.device | str = "cpu", precision: str | None = None) -> list[Backend]:
    """Return the backends that can run here on ``device``, optionally only those of one ``precision``."""
    device_type = torch.device(device).type
    precisions = PRECISIONS if precision is None else (precision,)
    candidates = [Backend(engine, name, device_type) for name in precisions for engine in ENGINES]
    return [backend for backend in candidates if unavailable_reason(backend) is None]


# -- runners --------------------------------------------------------------------


class TorchRunner(nn.Module):
    """A torch model run with optional channels_last memory layout, autocast precision and ``torch.compile``.

    The wrapped model is used as is for plain eager float32; channels_last and
    compiled variants work on a deep copy, so the caller's model keeps its
    layout and can still serve as the float32 reference.
    """

    def __init__(self, model: nn.Module, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        channels_last = backend.engine in ("torch-channels-last", "torch-compile")
        if channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.channels_last = channels_last
        self.autocast_dtype = _AUTOCAST_DTYPES.get(backend.precision)
        # torch.compile returns at once; the compilation happens on the first call (minutes on a small CPU).
        self._forward = torch.compile(self.model) if backend.engine == "torch-compile" else self.model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self._forward(batch)
        with torch.autocast(batch.device.type, dtype=self.autocast_dtype):
            return self._forward(batch).float()


class OpenVinoModel:
    """An exported ONNX model compiled by OpenVINO for the CPU, called like the ``nn.Module`` it came from.

    OpenVINO runs bfloat16 by default on CPUs with native bfloat16 support,
    so the precision is always requested explicitly and checked after
    compiling: an ``fp32`` model really runs float32.

    Args:
        path: the ONNX file (see :func:`magface_al.models.export.export_onnx`).
        precision: ``fp32`` or ``bf16``.
        threads: inference threads; 0 lets OpenVINO choose.

    Raises:
        BackendUnavailableError: if OpenVINO compiled another precision than requested.
    """

    training = False
    folder: tempfile.TemporaryDirectory | None = None  # set when the ONNX file is temporary

    _OPENVINO_TYPES = {"fp32": "f32", "bf16": "bf16"}

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int = 0) -> None:
        import openvino  # optional dependency (extra "fast")

        if precision not in self._OPENVINO_TYPES:
            raise BackendUnavailableError(f"OpenVINO backend precision {precision!r} is not supported: use fp32 or bf16")
        self.path = Path(path)
        self.precision = precision
        requested = self._OPENVINO_TYPES[precision]
        # One stream using every thread suits a loop that sends one batch at a time.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": requested, "PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        # The Core must outlive its compiled model and requests: when it is
        # garbage-collected first, the CPU plugin is unloaded under them.
        self.core = openvino.Core()
        self.compiled = self.core.compile_model(self.core.read_model(str(self.path)), "CPU", config)
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        if actual.get_type_name() != requested:
            raise BackendUnavailableError(
                f"OpenVINO compiled {self.path} with inference precision {actual} instead of the requested {requested}; "
                "use another backend"
            )
        self.inference_precision = actual.get_type_name()
        self.request = self.compiled.create_infer_request()
        self.device = torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        self.request.infer({0: inputs})
        # The request reuses its output buffer on the next call, so the result is copied out.
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True))

    def eval(self) -> OpenVinoModel:
        return self

    def train(self, mode: bool = True) -> OpenVinoModel:
        if mode:
            raise ValueError("an OpenVINO model runs inference only and cannot be put in training mode")
        return self

    def to(self, device: torch.device | str) -> OpenVinoModel:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the OpenVINO backend runs on the CPU only, not on {device}; use a torch backend")
        return self


class OnnxExport:
    """A lazily written ONNX export of one model in a temporary folder, shared by the ONNX-based backends."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        self.model = model
        self.spec = spec
        self.folder: tempfile.TemporaryDirectory | None = None
        self._path: Path | None = None

    def path(self) -> Path:
        """Export on first use and return the file."""
        if self._path is None:
            from magface_al.models.export import export_onnx

            self.folder = tempfile.TemporaryDirectory(prefix="magface-al-onnx-")
            # export_onnx moves its argument to the CPU, so a copy keeps a GPU model where it is.
            source = self.model if _device_of(self.model).type == "cpu" else copy.deepcopy(self.model)
            self._path = export_onnx(source, self.spec, Path(self.folder.name) / f"{self.spec.arch}.onnx")
        return self._path


def build_backend(
    model: nn.Module,
    spec: ModelSpec,
    backend: Backend,
    *,
    threads: int | None = None,
    export: OnnxExport | None = None,
) -> Any:
    """Wrap ``model`` (in eval mode, on ``backend.device_type``) to run on ``backend``.

    Args:
        model: the loaded model; it is not modified.
        spec: its specification (stored in the ONNX export).
        backend: what to run on.
        threads: CPU threads for ONNX Runtime and OpenVINO; torch's setting by default.
        export: an ONNX export to reuse across backends; a new one by default.

    Returns:
        A callable with ``eval()`` and ``to()``, whose ``backend`` attribute is ``backend``.

    Raises:
        BackendUnavailableError: if this machine cannot run ``backend`` (the message says why).
    """
    reason = unavailable_reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend.name} is unavailable on {backend.device_type}: {reason}")
    if backend.engine.startswith("torch"):
        return TorchRunner(model, backend)

    threads = torch.get_num_threads() if threads is None else threads
    export = OnnxExport(model, spec) if export is None else export
    if backend.engine == "onnxruntime":
        from magface_al.models.export import OnnxModel

        runner: Any = OnnxModel(export.path(), threads=threads)
    else:
        runner = OpenVinoModel(export.path(), precision=backend.precision, threads=threads)
    runner.folder = export.folder  # keeps the ONNX file as long as the runner lives
    runner.backend = backend
    return runner


def _device_of(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device(getattr(model, "device", "cpu"))


# -- allocator --------------------------------------------------------------------

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Freed heap memory is kept up to this size instead of being trimmed back to the system (bytes; a C int).
_TRIM_THRESHOLD_BYTES = 2**31 - 1


def configure_allocator() -> bool:
    """Make glibc keep large freed blocks in the heap instead of returning them to the system.

    glibc serves every allocation above its mmap threshold (at most 32 MiB on
    64-bit) with a fresh ``mmap`` and unmaps it on free, so each batch's
    activation tensors are faulted in page by page again. Setting
    ``M_MMAP_MAX`` to 0 and a high ``M_TRIM_THRESHOLD`` at run time has the
    effect of ``MALLOC_MMAP_MAX_=0`` in the environment, which glibc reads only
    at process start. The price: the process's peak memory stays reserved
    until it exits.

    Call it at the start of a process that embeds or trains, never from
    library code that another program imports.

    Returns:
        True if the settings were applied, False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("allocator settings skipped: the C library (%s) has no mallopt", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    if applied:
        logger.debug("glibc allocator: large blocks stay in the heap (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)")
    else:
        logger.info("allocator settings rejected by mallopt; large tensors keep using mmap")
    return applied
