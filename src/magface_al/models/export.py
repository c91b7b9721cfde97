"""ONNX export of any supported model, and an ONNX Runtime model with the ``nn.Module`` calling convention.

The exported graph takes the preprocessed float32 batch ``input`` (N, 3, h, w)
and returns the raw embedding ``embedding`` (N, D). The batch dimension is
dynamic. The model specification is stored as JSON in the ONNX metadata
under ``magface_al.model_spec``, so the file alone says how to prepare pixels.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from magface_al.models.spec import ModelSpec
from magface_al.utils import atomic_path

logger = logging.getLogger(__name__)

SPEC_METADATA_KEY = "magface_al.model_spec"
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
BACKENDS = ("auto", "torch", "onnxruntime")


def export_onnx(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (moved to the CPU, in eval mode) to an ONNX file, atomically.

    Returns:
        The path written.
    """
    import onnx  # optional dependency (extra "fast")

    path = Path(path)
    model = model.cpu().eval()
    height, width = spec.preprocess.input_size
    example = torch.zeros(1, 3, height, width)
    with atomic_path(path) as tmp:
        # NOTE: torch 2.13 marks this TorchScript exporter deprecated; the dynamo
        # exporter that replaces it needs the onnxscript package, which is not a dependency.
        # dynamo=False selects the TorchScript exporter, which needs no onnxscript.
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        graph = onnx.load(str(tmp))
        entry = graph.metadata_props.add()
        entry.key = SPEC_METADATA_KEY
        entry.value = json.dumps(spec.to_dict())
        onnx.save(graph, str(tmp))
    logger.info("exported %s to %s (opset %d)", spec.arch, path, opset)
    return path


class OnnxModel:
    """An exported model run by ONNX Runtime on the CPU, called like the ``nn.Module`` it came from.

    ``model(batch)`` takes a float32 tensor (N, 3, h, w) and returns the raw
    embedding tensor. It also has ``eval()``, ``train()`` and ``to("cpu")``, so
    the embedding functions accept it in place of a module.

    Args:
        path: the ONNX file.
        threads: intra-op threads; 0 lets ONNX Runtime choose.
    """

    training = False
    folder: tempfile.TemporaryDirectory | None = None  # set when the file is temporary

    def __init__(self, path: str | os.PathLike, *, threads: int = 0) -> None:
        import onnxruntime  # optional dependency (extra "fast")

        self.path = Path(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.spec = ModelSpec.from_dict(json.loads(metadata[SPEC_METADATA_KEY])) if SPEC_METADATA_KEY in metadata else None
        self.device = torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (output,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
        return torch.from_numpy(output)

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise ValueError("an ONNX Runtime model runs inference only and cannot be put in training mode")
        return self

    def to(self, device: torch.device | str) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the ONNX Runtime backend runs on the CPU only, not on {device}; use the torch backend")
        return self


def select_backend(
    model: nn.Module, spec: ModelSpec, backend: str = "auto", *, device: torch.device | str = "cpu"
) -> nn.Module | OnnxModel:
    """Return the model to embed with: ``model`` itself, or its ONNX export run by ONNX Runtime.

    ``auto`` picks ONNX Runtime on the CPU when ``onnx`` and ``onnxruntime``
    are installed, because it embedded faster than torch there in
    ``benchmarks/bench_embedding.py`` (about 2.5x for the MobileFaceNet on a
    2-core CPU), and torch on a GPU. The export lives in a temporary folder
    that is removed with the returned object.

    Raises:
        ValueError: for an unknown backend, or ``onnxruntime`` on a GPU or without the packages.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    installed = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
    if backend == "torch" or (backend == "auto" and (device.type != "cpu" or not installed)):
        logger.info("embedding with torch on %s", device)
        return model.to(device)
    if device.type != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU only, not on {device}; use --backend torch")
    if not installed:
        raise ValueError("the onnxruntime backend needs the onnx and onnxruntime packages (pip install 'magface-al[fast]')")
    folder = tempfile.TemporaryDirectory(prefix="magface-al-onnx-")
    path = export_onnx(model, spec, Path(folder.name) / f"{spec.arch}.onnx")
    onnx_model = OnnxModel(path, threads=torch.get_num_threads())
    onnx_model.folder = folder  # keeps the file until the model is garbage-collected
    logger.info("embedding with ONNX Runtime on the CPU")
    return onnx_model
