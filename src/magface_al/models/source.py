"""The pretrained model a pipeline run starts from: the ``model`` section of params.yaml."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
from torch import nn

from magface_al.models.checkpoint import load_model
from magface_al.models.spec import ModelSpec, Preprocess

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSource:
    """The checkpoint to load, and how to read it when it stores no model specification.

    Checkpoints written by this project carry their specification and ignore
    ``arch``, ``variant`` and ``preprocess``. Official MagFace files and other
    plain state_dicts do not, so the user names the architecture, and the
    preprocessing when it is not MagFace's (BGR, 112x112, x / 255).

    Attributes:
        checkpoint: path of the checkpoint file.
        arch: ``iresnet18``/``34``/``50``/``100`` or ``mobilefacenet``; null
            infers it from the tensor names and shapes where that is unambiguous.
        variant: preset for an iResNet: ``magface`` (BGR, x / 255, BatchNorm
            eps 2e-5) or ``arcface_torch`` (RGB, (x / 255 - 0.5) / 0.5, eps 1e-5).
        preprocess: fields of the preprocessing to override, e.g.
            ``{channel_order: RGB}``; keys as in :class:`Preprocess`.
        allow_pickle: load files that need arbitrary unpickling. Only for
            checkpoints you trust: unpickling can run any code.
    """

    checkpoint: str = "models/pretrained.pt"
    arch: str | None = None
    variant: Literal["magface", "arcface_torch"] = "magface"
    preprocess: dict[str, Any] = dataclasses.field(default_factory=dict)
    allow_pickle: bool = False

    def spec(self) -> ModelSpec | None:
        """Return the specification to use when the checkpoint has none, or None to infer it."""
        if self.arch is None:
            if self.preprocess:
                raise ValueError(
                    "model.preprocess is set but model.arch is null: name the architecture "
                    "(e.g. iresnet100) so the preprocessing override has a model to apply to"
                )
            return None
        spec = ModelSpec.preset(self.arch, self.variant)
        if self.preprocess:
            merged = {**spec.preprocess.to_dict(), **self.preprocess}
            spec = spec.replace(preprocess=Preprocess.from_dict(merged))
        return spec

    def load(self, *, device: torch.device | str | None = None, path: str | None = None) -> tuple[nn.Module, ModelSpec]:
        """Load the model in eval mode; ``path`` replaces ``checkpoint`` (e.g. a fine-tuned file)."""
        return load_model(path or self.checkpoint, self.spec(), allow_pickle=self.allow_pickle, device=device)
