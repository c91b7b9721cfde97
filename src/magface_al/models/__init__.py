"""Face-recognition backbones, their specification, checkpoints and device choice.

The architectures (:mod:`.iresnet`, :mod:`.mobilefacenet`) return the raw
embedding; :class:`ModelSpec` records the architecture and preprocessing;
:mod:`.checkpoint` reads every supported checkpoint layout strictly and
writes this project's own.
"""

from magface_al.models.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from magface_al.models.device import select_device
from magface_al.models.spec import ARCHITECTURES, IRESNET_LAYERS, ModelSpec, Preprocess, build_model

__all__ = [
    "ARCHITECTURES",
    "IRESNET_LAYERS",
    "CheckpointError",
    "ModelSpec",
    "Preprocess",
    "build_model",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "select_device",
]
