"""The model specification: architecture, its arguments and the preprocessing it was trained with.

A :class:`ModelSpec` travels with every model and is stored in every
checkpoint this project writes, because a state_dict alone cannot say how
its pixels must be prepared: MagFace models read BGR pixels scaled to [0, 1],
InsightFace arcface_torch models read RGB scaled to [-1, 1] and the
MobileFaceNet reads the RGB centre 112x96 scaled by (x - 127.5) / 128. Feeding
a model the wrong one gives plausible but wrong embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import cv2
import numpy as np
import torch
from torch import nn

from magface_al.models.iresnet import iresnet
from magface_al.models.mobilefacenet import MobileFaceNet

CHANNEL_ORDERS = ("BGR", "RGB")

# Blocks per stage of the iResNet depths that MagFace and InsightFace publish.
IRESNET_LAYERS = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
}
ARCHITECTURES = (*IRESNET_LAYERS, "iresnet", "mobilefacenet")


@dataclass(frozen=True)
class Preprocess:
    """How uint8 BGR face images become the float tensor a model reads.

    The steps, in order: crop ``(top, left, height, width)`` from the aligned
    face, resize to ``input_size`` (height, width) if the crop has another
    size, reorder channels to ``channel_order``, then ``(x * scale - mean) / std``
    per channel.
    """

    channel_order: str = "BGR"
    input_size: tuple[int, int] = (112, 112)
    crop: tuple[int, int, int, int] | None = None
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"invalid channel_order {self.channel_order!r}: expected one of {CHANNEL_ORDERS}")
        # Lists arrive from JSON and YAML; store tuples so specs compare equal.
        object.__setattr__(self, "input_size", _int_tuple(self.input_size, 2, "input_size"))
        if self.crop is not None:
            object.__setattr__(self, "crop", _int_tuple(self.crop, 4, "crop"))
        object.__setattr__(self, "mean", _float_tuple(self.mean, "mean"))
        object.__setattr__(self, "std", _float_tuple(self.std, "std"))
        object.__setattr__(self, "scale", float(self.scale))
        if any(value == 0 for value in self.std):
            raise ValueError(f"invalid std {self.std}: every channel's std must be non-zero")

    def to_tensor(self, images_bgr: np.ndarray) -> torch.Tensor:
        """Convert uint8 BGR images (N, H, W, 3) to the model input, float32 (N, 3, h, w)."""
        images = np.asarray(images_bgr)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
        if self.crop is not None:
            top, left, height, width = self.crop
            if top + height > images.shape[1] or left + width > images.shape[2]:
                raise ValueError(
                    f"crop {self.crop} (top, left, height, width) does not fit images of size "
                    f"{images.shape[1]}x{images.shape[2]}; pass aligned 112x112 faces"
                )
            images = images[:, top : top + height, left : left + width]
        if images.shape[1:3] != self.input_size:
            images = _resize(images, self.input_size)
        if self.channel_order == "RGB":
            images = images[..., ::-1]

        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if self.scale != 1.0:
            tensor.mul_(self.scale)
        if any(self.mean):
            tensor.sub_(torch.tensor(self.mean).view(1, 3, 1, 1))
        if any(value != 1.0 for value in self.std):
            tensor.div_(torch.tensor(self.std).view(1, 3, 1, 1))
        return tensor.contiguous()

    def to_dict(self) -> dict[str, Any]:
        """Return plain lists and numbers, loadable with ``torch.load(weights_only=True)`` and JSON."""
        return {
            "channel_order": self.channel_order,
            "input_size": list(self.input_size),
            "crop": None if self.crop is None else list(self.crop),
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        return cls(**_known_fields(cls, data, "preprocess"))


@dataclass(frozen=True)
class ModelSpec:
    """An architecture, its constructor arguments, its embedding size and its preprocessing."""

    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    embedding_size: int = 512
    preprocess: Preprocess = field(default_factory=Preprocess)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", Preprocess.from_dict(self.preprocess))
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        object.__setattr__(self, "embedding_size", int(self.embedding_size))

    @classmethod
    def magface(cls, arch: str = "iresnet100", **arch_kwargs: Any) -> ModelSpec:
        """MagFace's iResNet: BGR, 112x112, x / 255 with no mean or std, BatchNorm eps 2e-5."""
        return cls(arch=arch, arch_kwargs=arch_kwargs, embedding_size=512, preprocess=Preprocess())

    @classmethod
    def arcface_torch(cls, arch: str = "iresnet50", **arch_kwargs: Any) -> ModelSpec:
        """InsightFace arcface_torch's iResNet: RGB, 112x112, (x / 255 - 0.5) / 0.5, BatchNorm eps 1e-5.

        Its dropout sits after the flatten and defaults to 0; both only matter
        in training, so the MagFace module tree serves for inference.
        """
        kwargs = {"bn_eps": 1e-5, "dropout": 0.0, **arch_kwargs}
        preprocess = Preprocess(channel_order="RGB", scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        return cls(arch=arch, arch_kwargs=kwargs, embedding_size=512, preprocess=preprocess)

    @classmethod
    def mobilefacenet(cls) -> ModelSpec:
        """MobileFaceNet (Chen et al. 2018): RGB, the centre 112x96 of the aligned face, (x - 127.5) / 128."""
        preprocess = Preprocess(
            channel_order="RGB",
            input_size=(112, 96),
            crop=(0, 8, 112, 96),  # columns 8..103 of the 112x112 face
            scale=1.0,
            mean=(127.5, 127.5, 127.5),
            std=(128.0, 128.0, 128.0),
        )
        return cls(arch="mobilefacenet", arch_kwargs={}, embedding_size=128, preprocess=preprocess)

    @classmethod
    def preset(cls, arch: str, variant: str = "magface") -> ModelSpec:
        """Return the preset for an architecture name; ``variant`` picks MagFace or arcface_torch for iResNets."""
        if arch == "mobilefacenet":
            return cls.mobilefacenet()
        if arch not in IRESNET_LAYERS:
            raise ValueError(
                f"no preset for architecture {arch!r}: expected mobilefacenet or one of {', '.join(IRESNET_LAYERS)}"
            )
        if variant == "magface":
            return cls.magface(arch)
        if variant == "arcface_torch":
            return cls.arcface_torch(arch)
        raise ValueError(f"unknown preset variant {variant!r}: expected 'magface' or 'arcface_torch'")

    def to_dict(self) -> dict[str, Any]:
        """Return plain dicts, lists, strings and numbers (safe for weights_only loading and JSON)."""
        return {
            "arch": self.arch,
            "arch_kwargs": _plain(self.arch_kwargs),
            "embedding_size": self.embedding_size,
            "preprocess": self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        values = _known_fields(cls, data, "model spec")
        if "preprocess" in values:
            values["preprocess"] = Preprocess.from_dict(values["preprocess"])
        return cls(**values)

    def replace(self, **changes: Any) -> ModelSpec:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the randomly initialized architecture that ``spec`` describes, in training mode.

    Its ``forward`` returns the raw embedding, whose L2 norm is the magnitude.

    Raises:
        ValueError: if ``arch_kwargs`` holds an argument the architecture does not take.
    """
    kwargs = dict(spec.arch_kwargs)
    common = {"embedding_size": spec.embedding_size, "input_size": spec.preprocess.input_size}
    try:
        if spec.arch == "mobilefacenet":
            return MobileFaceNet(**common, **kwargs)
        if spec.arch in IRESNET_LAYERS:
            layers = kwargs.pop("layers", IRESNET_LAYERS[spec.arch])
            if list(layers) != IRESNET_LAYERS[spec.arch]:
                raise ValueError(
                    f"arch {spec.arch} has layers {IRESNET_LAYERS[spec.arch]}, but arch_kwargs sets {list(layers)}; "
                    "use arch 'iresnet' for other depths"
                )
            return iresnet(layers, **common, **kwargs)
        if "layers" not in kwargs:
            raise ValueError("arch 'iresnet' needs arch_kwargs['layers'], e.g. [2, 2, 2, 2]")
        return iresnet(kwargs.pop("layers"), **common, **kwargs)
    except TypeError as error:
        raise ValueError(f"invalid arch_kwargs {spec.arch_kwargs} for {spec.arch}: {error}") from error


def _int_tuple(value: Any, length: int, name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in value)
    if len(values) != length:
        raise ValueError(f"invalid {name} {value!r}: expected {length} integers")
    return values


def _float_tuple(value: Any, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"invalid {name} {value!r}: expected one value per channel (3)")
    return values  # type: ignore[return-value]


def _known_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}: expected a subset of {sorted(names)}")
    return dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    shrinking = height < images.shape[1] or width < images.shape[2]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.stack([cv2.resize(image, (width, height), interpolation=interpolation) for image in images])
