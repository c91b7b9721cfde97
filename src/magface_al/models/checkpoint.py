"""Checkpoint layouts, strict loading and this project's own checkpoint format.

Supported layouts (the backbone key prefix decides; the container may be a
dict with ``state_dict``, a dict with ``net_state_dict`` or a bare state_dict):

============== ======================== ============================================
layout         backbone key prefix      classification head (skipped by name)
============== ======================== ============================================
magface_al     ``features.module.``     none (the dict also contains ``model_spec``)
magface_ddp    ``features.module.``     ``fc.weight`` (one shard) or ``parallel_fc.weight``
magface_dp     ``module.features.``     ``module.fc.weight``
dataparallel   ``module.``              none
net_state_dict none, inside ``net_state_dict``
plain          none (also InsightFace arcface_torch ``backbone.pth``)
============== ======================== ============================================

Every file is read with ``torch.load(weights_only=True)``; a file that needs
arbitrary unpickling is rejected unless the caller passes ``allow_pickle=True``
for a file it trusts. Loading fails unless every backbone tensor of the model
is present with the right shape and the file holds no other tensor.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from magface_al.models.device import select_device
from magface_al.models.iresnet import STANDARD_WIDTHS
from magface_al.models.spec import IRESNET_LAYERS, ModelSpec, build_model
from magface_al.utils import atomic_path

logger = logging.getLogger(__name__)

FORMAT_NAME = "magface_al"
FORMAT_VERSION = 1

# The official MagFace loader strips this prefix from every key of `state_dict`.
MAGFACE_PREFIX = "features.module."

# Candidate backbone prefixes, most specific first, with the layout each one means.
PREFIX_LAYOUTS = (("features.module.", "magface_ddp"), ("module.features.", "magface_dp"), ("module.", "dataparallel"))

# Classification heads that training scripts store next to the backbone.
# They are skipped only when they sit outside the backbone prefix, because a
# bare iResNet has its own `fc.weight`.
HEAD_KEYS = frozenset(
    {"fc.weight", "fc.bias", "parallel_fc.weight", "module.fc.weight", "module.fc.bias", "module.parallel_fc.weight"}
)

MAX_LISTED_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the requested architecture."""


@dataclass
class Checkpoint:
    """The backbone tensors of a checkpoint file and what is known about them.

    Attributes:
        path: the file read.
        layout: one of the layouts in the module docstring.
        state_dict: backbone tensors, keys without the layout's prefix.
        unexpected: keys outside the backbone prefix that are not a known head.
        skipped: head keys skipped by name.
        spec: the stored model specification (this project's format only).
        epoch: the stored epoch, if any.
        extra: the stored ``extra`` dict (this project's format only).
    """

    path: Path
    layout: str
    state_dict: dict[str, torch.Tensor]
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None
    epoch: int | None = None
    extra: dict[str, Any] | None = None


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint file of any supported layout onto the CPU.

    Args:
        path: the checkpoint file.
        allow_pickle: also accept files that need arbitrary unpickling (a
            pickled ``nn.Module``, custom classes). Unpickling runs code from
            the file, so pass it only for files you trust.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file needs unpickling and ``allow_pickle`` is
            false, or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = _torch_load(path, allow_pickle)
    container, raw = _find_state_dict(payload, path)

    prefix, layout = _detect_prefix(raw)
    state_dict: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    for key, value in raw.items():
        if key.startswith(prefix):
            state_dict[key[len(prefix) :]] = value
        elif key in HEAD_KEYS:
            skipped.append(key)
        else:
            unexpected.append(key)
    if skipped:
        logger.info("%s: skipped classification head tensors %s", path, ", ".join(skipped))

    spec = None
    extra = None
    if isinstance(payload, Mapping) and "model_spec" in payload and layout == "magface_ddp":
        layout = FORMAT_NAME
        spec = ModelSpec.from_dict(payload["model_spec"])
        extra = payload.get("extra")
    elif layout is None:
        layout = "net_state_dict" if container == "net_state_dict" else "plain"
    epoch = payload.get("epoch") if isinstance(payload, Mapping) else None
    return Checkpoint(
        path=path,
        layout=layout,
        state_dict=state_dict,
        unexpected=unexpected,
        skipped=skipped,
        spec=spec,
        epoch=None if epoch is None else int(epoch),
        extra=extra,
    )


def load_model(
    path: str | os.PathLike,
    spec: ModelSpec | str | None = None,
    *,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Load a checkpoint strictly into its architecture, in eval mode.

    The specification comes from the checkpoint when this project wrote it.
    Otherwise ``spec`` decides: a :class:`ModelSpec`, or an architecture name
    that selects its preset (MagFace preprocessing for iResNets); with no
    ``spec`` the architecture is read from the tensor names and shapes. The
    choice is logged, and for a bare iResNet state_dict a warning names the
    arcface_torch alternative, because the file cannot tell the two apart.

    Args:
        path: the checkpoint file.
        spec: the model specification or architecture name, see above.
        allow_pickle: accept files that need arbitrary unpickling (trusted files only).
        device: where to put the model; ``None`` picks CUDA if it works, else the CPU.

    Returns:
        The model in eval mode on ``device`` and the specification used.

    Raises:
        CheckpointError: if a backbone tensor is missing, unexpected or has
            another shape, or the architecture cannot be determined.
    """
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    spec = resolve_spec(checkpoint, spec)
    model = build_model(spec)
    load_backbone_weights(
        model, checkpoint.state_dict, source=str(checkpoint.path), target=spec.arch, unexpected=checkpoint.unexpected
    )
    if device is None:
        device = select_device()
    return model.to(device).eval(), spec


def resolve_spec(checkpoint: Checkpoint, spec: ModelSpec | str | None) -> ModelSpec:
    """Choose the model specification for a checkpoint, logging where it came from.

    Raises:
        CheckpointError: if an architecture name contradicts the stored
            specification, or no architecture can be determined.
    """
    if checkpoint.spec is not None:
        stored = checkpoint.spec
        if isinstance(spec, str) and spec != stored.arch:
            raise CheckpointError(
                f"{checkpoint.path} holds a {stored.arch} model, but architecture {spec!r} was requested; "
                "drop the architecture argument to use the stored specification"
            )
        if isinstance(spec, ModelSpec) and spec != stored:
            logger.warning("%s: using the given specification instead of the stored one %s", checkpoint.path, stored)
            return spec
        logger.info("%s: using the stored specification (%s)", checkpoint.path, stored.arch)
        return stored

    if isinstance(spec, ModelSpec):
        logger.info("%s (%s layout): using the given specification", checkpoint.path, checkpoint.layout)
        return spec
    if isinstance(spec, str):
        chosen = ModelSpec.preset(spec)
        how = f"architecture {spec!r}"
    else:
        chosen = infer_spec(checkpoint.state_dict)
        if chosen is None:
            raise CheckpointError(
                f"cannot tell the architecture of {checkpoint.path} ({checkpoint.layout} layout) from its tensors; "
                "pass the architecture (--arch) or a ModelSpec"
            )
        how = "the tensor names and shapes"
    _log_default(checkpoint, chosen, how)
    return chosen


def infer_spec(state_dict: Mapping[str, torch.Tensor]) -> ModelSpec | None:
    """Return the preset of the standard architecture these backbone tensors belong to, or None."""
    if "dw_conv1.conv.weight" in state_dict and "linear1.conv.weight" in state_dict:
        spec = ModelSpec.mobilefacenet()
        return spec.replace(embedding_size=int(state_dict["linear1.conv.weight"].shape[0]))
    if "layer1.0.conv1.weight" not in state_dict or "fc.weight" not in state_dict:
        return None
    layers = []
    for stage in range(1, 5):
        blocks = {key.split(".")[1] for key in state_dict if key.startswith(f"layer{stage}.")}
        layers.append(len(blocks))
    widths = tuple(int(state_dict[f"layer{stage}.0.conv1.weight"].shape[0]) for stage in range(1, 5))
    fc_shape = tuple(state_dict["fc.weight"].shape)
    for arch, arch_layers in IRESNET_LAYERS.items():
        # 7x7 is the last feature map of a 112x112 input.
        if layers == arch_layers and widths == STANDARD_WIDTHS and fc_shape == (512, 512 * 7 * 7):
            return ModelSpec.magface(arch)
    return None


def load_backbone_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state_dict",
    target: str | None = None,
    unexpected: list[str] | tuple[str, ...] = (),
) -> None:
    """Copy every backbone tensor into ``model``, or fail naming what does not fit.

    ``num_batches_tracked`` counters that are absent (files written by
    PyTorch < 0.4.1) are tolerated and logged, because inference never reads them.

    Raises:
        CheckpointError: listing the missing, unexpected and shape-mismatched
            keys (the first few of each, then the counts).
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    absent_counters = [key for key in missing if key.endswith("num_batches_tracked")]
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    unexpected = list(unexpected) + [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(value.shape)} (model {tuple(expected[key].shape)})"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        arch = target or type(model).__name__
        raise CheckpointError(
            f"checkpoint {source} does not fit {arch}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape-mismatched tensors. "
            + _list_keys("missing", missing)
            + _list_keys("unexpected", unexpected)
            + _list_keys("shape-mismatched", mismatched)
            + "Check that the architecture and its arguments match the checkpoint."
        )
    model.load_state_dict(state_dict, strict=not absent_counters)
    loaded = len(expected) - len(absent_counters)
    if absent_counters:
        logger.info(
            "loaded %d/%d tensors from %s (%d BatchNorm num_batches_tracked counters absent; inference ignores them)",
            loaded,
            len(expected),
            source,
            len(absent_counters),
        )
    else:
        logger.info("loaded %d/%d tensors from %s", loaded, len(expected), source)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    spec: ModelSpec,
    *,
    epoch: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` in this project's format, atomically.

    The file is a dict with ``state_dict`` (keys ``features.module.<name>``,
    as MagFace's DistributedDataParallel training writes them, so the
    official MagFace loader reads every tensor), ``arch``, ``epoch``,
    ``model_spec`` (plain types) and, if given, ``extra``. It loads with
    ``torch.load(weights_only=True)``.

    Raises:
        ValueError: if ``model`` does not have the tensors ``spec`` describes,
            or ``extra`` holds something other than dicts, lists, strings,
            numbers, booleans, None and tensors.
    """
    module = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    state = module.state_dict()
    _check_matches_spec(state, spec)
    payload: dict[str, Any] = {
        "state_dict": {MAGFACE_PREFIX + key: value.detach().cpu().clone() for key, value in state.items()},
        "arch": spec.arch,
        "epoch": int(epoch),
        "model_spec": spec.to_dict(),
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
    }
    if extra is not None:
        _check_plain(extra, "extra")
        payload["extra"] = dict(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    logger.info("saved %s (%s, %d tensors, epoch %d)", path, spec.arch, len(state), epoch)


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    try:
        # map_location: files saved on a GPU would otherwise need CUDA to open.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        if not allow_pickle:
            raise CheckpointError(
                f"{path} cannot be read with torch.load(weights_only=True) ({reason}). It needs arbitrary "
                "unpickling, which can run code stored in the file. If you trust the file, pass "
                "allow_pickle=True (command line: --allow-pickle)."
            ) from error
    logger.warning("%s: unpickling with weights_only=False because allow_pickle was given", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _find_state_dict(payload: Any, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(payload, nn.Module):
        return "module", payload.state_dict()
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a state_dict or a dict holding one")
    for container in ("state_dict", "net_state_dict"):
        if isinstance(payload.get(container), Mapping):
            raw = payload[container]
            break
    else:
        container, raw = "bare", payload
    tensors = {key: value for key, value in raw.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(payload)[:10]))}); "
            "expected a state_dict, or a dict with 'state_dict' or 'net_state_dict'"
        )
    return container, tensors


def _detect_prefix(raw: Mapping[str, torch.Tensor]) -> tuple[str, str | None]:
    """Return the backbone prefix covering the most non-head keys (ties go to the more specific)."""
    body = [key for key in raw if key not in HEAD_KEYS]
    best_prefix, best_layout, best_count = "", None, 0
    for prefix, layout in PREFIX_LAYOUTS:
        count = sum(key.startswith(prefix) for key in body)
        if count > best_count:
            best_prefix, best_layout, best_count = prefix, layout, count
    return best_prefix, best_layout


def _log_default(checkpoint: Checkpoint, spec: ModelSpec, how: str) -> None:
    preprocess = spec.preprocess
    description = (
        f"{spec.arch}, {preprocess.channel_order}, scale {preprocess.scale:.6g}, mean {list(preprocess.mean)}, "
        f"std {list(preprocess.std)}, arch_kwargs {spec.arch_kwargs}"
    )
    bare_layout = checkpoint.layout in ("plain", "dataparallel", "net_state_dict")
    if spec.arch.startswith("iresnet") and bare_layout and "layer1.0.conv1.weight" in checkpoint.state_dict:
        hint = ""
        features_weight = checkpoint.state_dict.get("features.weight")
        if features_weight is not None and bool(torch.all(features_weight == 1)):
            hint = " Its features.weight is all ones, as arcface_torch training leaves it."
        logger.warning(
            "%s is a bare iResNet state_dict, which may be a MagFace model (BGR, x/255, BatchNorm eps 2e-5) or an "
            "InsightFace arcface_torch backbone.pth (RGB, (x/255 - 0.5)/0.5, eps 1e-5); using %s from %s.%s "
            "For arcface_torch pass ModelSpec.arcface_torch(arch) (command line: --preset arcface_torch).",
            checkpoint.path,
            description,
            how,
            hint,
        )
    else:
        logger.info("%s (%s layout): using %s from %s", checkpoint.path, checkpoint.layout, description, how)


def _check_matches_spec(state: Mapping[str, torch.Tensor], spec: ModelSpec) -> None:
    with torch.device("meta"):  # shapes only, no memory or initialization cost
        reference = build_model(spec).state_dict()
    missing = [key for key in reference if key not in state]
    unexpected = [key for key in state if key not in reference]
    mismatched = [
        key for key in state if key in reference and tuple(state[key].shape) != tuple(reference[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the model does not match its specification {spec.arch} {spec.arch_kwargs}: "
            + _list_keys("missing", missing)
            + _list_keys("unexpected", unexpected)
            + _list_keys("shape-mismatched", mismatched)
            + "Save the specification the model was built from."
        )


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"{where} has a key of type {type(key).__name__}; use strings or integers")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read; "
        "convert it to a dict, list, string, number, boolean, None or tensor"
    )


def _list_keys(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return f"{what.capitalize()}: {listed}{more}. "
