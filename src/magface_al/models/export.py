"""ONNX export of any supported model, and an ONNX Runtime model with the ``nn.Module`` calling convention.

The exported graph takes the preprocessed float32 batch ``input`` (N, 3, h, w)
and returns the raw embedding ``embedding`` (N, D). The batch dimension is
dynamic. The model specification is stored as JSON in the ONNX metadata
under ``magface_al.model_spec``, so the file alone says how to prepare pixels.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

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
    model: nn.Module,
    spec: ModelSpec,
    backend: str = "auto",
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    faces: np.ndarray | None = None,
) -> Any:
    """Return the model to embed with; kept for callers of this module.

    The backends, their parity gates and the ``auto`` choice live in
    :mod:`magface_al.embedding.backends` and :mod:`magface_al.embedding.parity`;
    this calls :func:`magface_al.embedding.parity.select_backend`.
    """
    from magface_al.embedding.parity import select_backend as select

    return select(model, spec, backend, precision=precision, device=device, faces=faces)
