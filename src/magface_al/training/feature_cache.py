"""Split a face model into a frozen trunk and a trainable head, and cache the trunk's outputs.

When only the head trains, the trunk's output for an image never changes, so
it is computed once per image and every epoch afterwards runs only the head.
The split is defined here by module names per architecture (a small table),
and checked once against the model's own ``forward`` so that a model whose
forward differs from the table is rejected instead of trained wrongly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from magface_al.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

TRAIN_PARTS = ("head", "last_stage", "all")

# Pseudo step between the last 4-D map and the first layer that takes a vector.
FLATTEN = "<flatten>"


@dataclass(frozen=True)
class ArchLayout:
    """Forward order of one architecture family, by module name.

    Attributes:
        steps: module names in the order ``forward`` applies them, with
            ``FLATTEN`` where the map becomes a vector. A name ending in ``.*``
            stands for each child of that module, in order.
        head_start: name of the first step of the ``head`` part.
        last_stage_start: name of the first step of the ``last_stage`` part; a
            name like ``blocks.-2`` counts children from the end.
    """

    steps: tuple[str, ...]
    head_start: str
    last_stage_start: str


# iResNet (MagFace): the head is the 25088-to-512 `fc` and the `features` BatchNorm1d,
# and the last stage is `layer4` (7x7 maps).
# MobileFaceNet: the head is the global depthwise conv `linear7` plus the 1x1
# projection `linear1`. Its last stage is the final group of bottlenecks (two
# blocks at stride 1) and `conv2`.
ARCH_LAYOUTS: dict[str, ArchLayout] = {
    "iresnet": ArchLayout(
        steps=("conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4", "bn2", "dropout",
               FLATTEN, "fc", "features"),
        head_start="fc",
        last_stage_start="layer4",
    ),
    "mobilefacenet": ArchLayout(
        steps=("conv1", "dw_conv1", "blocks.*", "conv2", "linear7", "linear1", FLATTEN),
        head_start="linear7",
        last_stage_start="blocks.-2",
    ),
}


def layout_for(arch: str) -> ArchLayout:
    """Return the layout of architecture ``arch`` (``iresnet18`` to ``iresnet100``, ``mobilefacenet``)."""
    for family, layout in ARCH_LAYOUTS.items():
        if arch.lower().startswith(family):
            return layout
    raise ValueError(
        f"no trunk/head split is defined for architecture {arch!r}; "
        f"known families: {', '.join(ARCH_LAYOUTS)}. Use train part 'all' or add a layout."
    )


def _expand_steps(model: nn.Module, layout: ArchLayout) -> list[str]:
    modules = dict(model.named_modules())
    steps: list[str] = []
    for step in layout.steps:
        if step.endswith(".*"):
            parent = step[:-2]
            if parent not in modules:
                raise ValueError(f"model has no module {parent!r} required by its trunk/head layout")
            steps.extend(f"{parent}.{name}" for name, _ in modules[parent].named_children())
        else:
            if step != FLATTEN and step not in modules:
                raise ValueError(f"model has no module {step!r} required by its trunk/head layout")
            steps.append(step)
    return steps


def _resolve_start(steps: list[str], start: str) -> int:
    if start in steps:
        return steps.index(start)
    parent, _, index = start.rpartition(".")
    children = [s for s in steps if s.startswith(parent + ".") and s.count(".") == parent.count(".") + 1]
    if parent and index.lstrip("-").isdigit() and children:
        return steps.index(children[int(index)])
    raise ValueError(f"layout start {start!r} matches no step in {steps}")


class TrunkHeadSplit:
    """A face model viewed as ``head(trunk(x))`` at a point chosen by the part that trains.

    ``part`` is ``head`` (only the final embedding layers), ``last_stage`` (the
    last stage plus the head) or ``all`` (the trunk is empty and its output is
    the preprocessed image tensor).
    """

    def __init__(self, model: nn.Module, arch: str, part: str) -> None:
        if part not in TRAIN_PARTS:
            raise ValueError(f"unknown train part {part!r}; expected one of {', '.join(TRAIN_PARTS)}")
        self.model = model
        self.part = part
        self.arch = arch
        if part == "all":
            self.trunk_steps: list[str] = []
            self.head_steps: list[str] = []
            return
        layout = layout_for(arch)
        steps = _expand_steps(model, layout)
        start = layout.head_start if part == "head" else layout.last_stage_start
        cut = _resolve_start(steps, start)
        self.trunk_steps = steps[:cut]
        self.head_steps = steps[cut:]

    def _run(self, steps: list[str], x: Tensor) -> Tensor:
        modules = dict(self.model.named_modules())
        for step in steps:
            x = torch.flatten(x, 1) if step == FLATTEN else modules[step](x)
        return x

    def trunk(self, x: Tensor) -> Tensor:
        """Run the frozen trunk on preprocessed images (N, 3, H, W)."""
        if self.part == "all":
            return x
        return self._run(self.trunk_steps, x)

    def head(self, z: Tensor) -> Tensor:
        """Run the trainable head on trunk outputs; returns raw embeddings (N, D)."""
        if self.part == "all":
            return self.model(z)
        return self._run(self.head_steps, z)

    def head_modules(self) -> list[nn.Module]:
        """Return the modules whose parameters train (the whole model for part ``all``)."""
        if self.part == "all":
            return [self.model]
        modules = dict(self.model.named_modules())
        return [modules[s] for s in self.head_steps if s != FLATTEN]

    def head_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ``(name, parameter)`` of the trainable part, names as in the model's state_dict."""
        if self.part == "all":
            yield from self.model.named_parameters()
            return
        for step in self.head_steps:
            if step == FLATTEN:
                continue
            module = dict(self.model.named_modules())[step]
            for name, parameter in module.named_parameters():
                yield f"{step}.{name}", parameter

    def freeze_trunk(self) -> None:
        """Set ``requires_grad`` to train only the head's parameters."""
        trainable = {id(p) for _, p in self.head_parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    @torch.no_grad()
    def check_against_forward(self, x: Tensor, *, atol: float = 1e-4) -> None:
        """Check that ``head(trunk(x))`` equals ``model(x)`` in eval mode.

        Raises:
            RuntimeError: the model's forward differs from the layout, for
                example because its module order changed.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            expected = self.model(x)
            got = self.head(self.trunk(x))
        finally:
            self.model.train(was_training)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=1e-4):
            difference = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
            raise RuntimeError(
                f"trunk/head split of {self.arch!r} at part {self.part!r} does not reproduce the model's "
                f"forward (max difference {difference:.3g}); the layout table no longer matches the model"
            )


class FeatureCache:
    """Trunk outputs of a set of images, addressed by record key.

    ``part`` records which split produced them (``head``, ``last_stage`` or
    ``all``), so a cache is never fed to the head of another split.
    """

    def __init__(self, keys: np.ndarray, features: Tensor, *, part: str | None = None) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) != len(features):
            raise ValueError(f"{len(keys)} keys but {len(features)} feature rows")
        self.keys = keys
        self.features = features
        self.part = part
        self._row = {int(k): i for i, k in enumerate(keys.tolist())}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return int(key) in self._row

    def rows(self, keys: np.ndarray) -> Tensor:
        """Return the row index of each key as a LongTensor."""
        try:
            return torch.as_tensor([self._row[int(k)] for k in np.asarray(keys).tolist()], dtype=torch.long)
        except KeyError as error:
            raise KeyError(f"image key {error.args[0]} is not in the feature cache") from None

    def get(self, keys: np.ndarray) -> Tensor:
        """Return the cached trunk outputs of ``keys`` in the given order."""
        return self.features[self.rows(keys)]


@torch.no_grad()
def trunk_outputs(
    split: TrunkHeadSplit, spec: Any, images_bgr: np.ndarray, *, batch_size: int = 64,
    device: torch.device | None = None,
) -> Tensor:
    """Run the trunk (eval mode) on uint8 BGR images (N, H, W, 3) held in memory; float32 outputs."""
    device = device or torch.device("cpu")
    split.model.eval()
    chunks = [
        split.trunk(spec.preprocess.to_tensor(images_bgr[start:start + batch_size]).to(device)).float()
        for start in range(0, len(images_bgr), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros((0,), dtype=torch.float32, device=device)


def shares_trunk(first: TrunkHeadSplit, second: TrunkHeadSplit) -> bool:
    """Return whether two splits at the same part have identical trunk weights and buffers."""
    if first.part != second.part or first.trunk_steps != second.trunk_steps:
        return False
    prefixes = tuple(s + "." for s in first.trunk_steps if s != FLATTEN)
    state1, state2 = first.model.state_dict(), second.model.state_dict()
    return all(torch.equal(value, state2[name]) for name, value in state1.items() if name.startswith(prefixes))


def _load_images(dataset: Any, keys: np.ndarray) -> np.ndarray:
    return np.stack([dataset.image(int(k)) for k in keys])


def _fingerprint(split: TrunkHeadSplit, preprocess: dict[str, Any], dataset: Any, keys: np.ndarray) -> str:
    """Hash everything the trunk outputs depend on: trunk weights, preprocessing and image bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"arch": split.arch, "part": split.part, "trunk": split.trunk_steps,
                              "preprocess": preprocess}, sort_keys=True, default=str).encode())
    trunk_prefixes = tuple(s + "." for s in split.trunk_steps if s != FLATTEN)
    for name, tensor in split.model.state_dict().items():
        if name.startswith(trunk_prefixes):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for key in keys.tolist():
        digest.update(int(key).to_bytes(8, "little", signed=True))
        digest.update(dataset.image_bytes(int(key)))
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_trunk_features(
    split: TrunkHeadSplit,
    spec: Any,
    dataset: Any,
    keys: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    check: bool = True,
) -> FeatureCache:
    """Compute (or read from ``cache_dir``) the trunk outputs of the images ``keys``.

    Args:
        split: The model split; its trunk runs in eval mode.
        spec: The model specification; ``spec.preprocess.to_tensor`` prepares images.
        dataset: A face dataset with ``image(key)`` and ``image_bytes(key)``.
        keys: Record keys of the images; duplicates are removed and order sorted.
        batch_size: Images per forward pass.
        device: Where the trunk runs; the cache is kept on this device.
        cache_dir: Optional folder for an on-disk copy, named by a hash of the
            trunk weights, preprocessing and image bytes, so a stale copy is never read.
        check: Compare ``head(trunk(x))`` with ``model(x)`` on the first batch.

    Returns:
        The cache of trunk outputs, float32.
    """
    keys = np.unique(np.asarray(keys, dtype=np.int64))
    device = device or torch.device("cpu")
    preprocess = spec.preprocess
    disk_folder = None
    if cache_dir is not None:
        preprocess_dict = preprocess.to_dict() if hasattr(preprocess, "to_dict") else vars(preprocess)
        disk_folder = Path(cache_dir) / _fingerprint(split, preprocess_dict, dataset, keys)
        if (disk_folder / "features.npy").is_file():
            features = torch.from_numpy(np.load(disk_folder / "features.npy", allow_pickle=False))
            cached_keys = np.load(disk_folder / "keys.npy", allow_pickle=False)
            if np.array_equal(cached_keys, keys):
                logger.info("read %d cached trunk outputs from %s", len(keys), disk_folder)
                return FeatureCache(keys, features.to(device), part=split.part)
            logger.warning("ignoring trunk cache %s: its keys differ from the request", disk_folder)

    split.model.eval()
    chunks = []
    for start in range(0, len(keys), batch_size):
        batch_keys = keys[start:start + batch_size]
        images = preprocess.to_tensor(_load_images(dataset, batch_keys)).to(device)
        if check and start == 0:
            split.check_against_forward(images[: min(4, len(images))])
        chunks.append(split.trunk(images).float())
    if chunks:
        features = torch.cat(chunks)
    else:
        features = torch.zeros((0,), dtype=torch.float32, device=device)
    logger.info("computed trunk outputs of %d images, shape %s", len(keys), tuple(features.shape[1:]))

    if disk_folder is not None:
        with atomic_path(disk_folder, is_dir=True) as tmp:
            np.save(tmp / "features.npy", features.cpu().numpy(), allow_pickle=False)
            np.save(tmp / "keys.npy", keys, allow_pickle=False)
            write_json_atomic(tmp / "meta.json", {"arch": split.arch, "part": split.part,
                                                  "count": len(keys), "shape": list(features.shape)})
    return FeatureCache(keys, features, part=split.part)
