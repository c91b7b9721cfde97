"""Batched embedding of face images: L2-normalized features plus MagFace magnitudes.

Flip test (``flip=True``): each face is also embedded mirrored left to right;
the raw features of the image and its mirror are added, then L2-normalized.
The magnitude always comes from the raw feature of the unflipped image,
because MagFace defines quality on one view and the sum of two views would
roughly double it.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from magface_al.embedding.store import ARRAY_FILES, Embeddings, META_FILE, PATHS_FILE, describe, load_embeddings
from magface_al.embedding.store import write_paths
from magface_al.distributed.context import broadcast_object, current_context
from magface_al.embedding.parity import GATE_FACES, ParityOptions, select_backend
from magface_al.models.spec import ModelSpec, Preprocess
from magface_al.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def embed_images(
    model: nn.Module,
    spec: ModelSpec,
    images_bgr: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    flip: bool = False,
    device: torch.device | str | None = None,
    backend: str | None = None,
    precision: str = "fp32",
    parity: ParityOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed images already in memory.

    Args:
        model: a network whose ``forward`` returns raw embeddings.
        spec: its specification; ``spec.preprocess`` prepares the pixels.
        images_bgr: uint8 BGR images, an array (N, H, W, 3) or a sequence of (H, W, 3).
        batch_size: images per forward pass.
        flip: add the raw features of the mirrored images before normalizing.
        device: where to run; ``None`` keeps the model where it is. A given
            device moves the model there.
        backend: ``None`` runs ``model`` as given; ``auto`` or an engine name
            (see :func:`magface_al.embedding.parity.select_backend`) runs it on
            that backend, gated on the first of ``images_bgr``.
        precision: ``fp32``, ``bf16`` or ``fp16``, with ``backend``.
        parity: gate cache and timing options, with ``backend``.

    Returns:
        (features float32 (N, D) L2-normalized, magnitudes float32 (N,)).
    """
    _check_batch_size(batch_size)
    device = _place(model, device)
    if backend is not None:
        faces = [np.asarray(image) for image in images_bgr[:GATE_FACES]]
        model = select_backend(model, spec, backend, precision=precision, device=device, faces=faces, options=parity)
    count = len(images_bgr)
    features = np.empty((count, spec.embedding_size), dtype=np.float32)
    magnitudes = np.empty(count, dtype=np.float32)
    with _eval_mode(model):
        for start in range(0, count, batch_size):
            batch = _to_batch_tensor(spec.preprocess, images_bgr[start : start + batch_size])
            batch_features, batch_magnitudes = embed_batch(model, batch, flip=flip, device=device)
            if batch_features.shape[1] != spec.embedding_size:
                raise ValueError(_dimension_message(batch_features.shape[1], spec.embedding_size))
            features[start : start + len(batch)] = batch_features
            magnitudes[start : start + len(batch)] = batch_magnitudes
    return features, magnitudes


def embed_batch(
    model: nn.Module, batch: torch.Tensor, *, flip: bool = False, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Embed one preprocessed batch (N, 3, h, w); return normalized features and magnitudes as numpy."""
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    with torch.inference_mode():
        raw = model(batch).float()  # (N, D)
        magnitudes = raw.norm(dim=1)
        combined = raw + model(torch.flip(batch, dims=[3])).float() if flip else raw
        features = torch.nn.functional.normalize(combined, dim=1)
    return features.cpu().numpy(), magnitudes.cpu().numpy()


def embed_dataset(
    model: nn.Module,
    spec: ModelSpec,
    dataset: Any,
    keys: Sequence[int] | np.ndarray | None = None,
    *,
    batch_size: int = 64,
    workers: int = 2,
    flip: bool = False,
    device: torch.device | str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    backend: str | None = None,
    precision: str = "fp32",
    parity: ParityOptions | None = None,
    distribute: bool = True,
) -> Embeddings:
    """Embed a face dataset, decoding images in ``workers`` background processes.

    Under torchrun (an initialized process group with more than one rank)
    every rank must call this with the same arguments: each embeds its share
    of whole batches and every rank gets the merged result, identical to a
    single process's (see :mod:`magface_al.distributed.embedding`).

    Args:
        model: a network whose ``forward`` returns raw embeddings.
        spec: its specification.
        dataset: a ``FaceRecordDataset`` or :class:`ImageFileDataset`
            (``keys``, ``labels``, ``dataset[i] -> (image BGR, label, key)``).
        keys: embed only these image keys, in this order; all images by default.
        batch_size: images per forward pass.
        workers: DataLoader worker processes that decode and preprocess; 0 decodes in this process.
        flip: add the raw features of the mirrored images before normalizing.
        device: where to run; ``None`` keeps the model where it is.
        out_dir: stream the result into this folder (format in
            :mod:`magface_al.embedding.store`) chunk by chunk, so memory stays
            constant; the returned features are then memory-mapped from it.
        progress: show a progress bar.
        meta: extra fields for ``meta.json``.
        backend: ``None`` runs ``model`` as given; ``auto`` or an engine name
            (see :func:`magface_al.embedding.parity.select_backend`) runs it on
            that backend, gated on the first requested images.
        precision: ``fp32``, ``bf16`` or ``fp16``, with ``backend``.
        parity: gate cache, LFW folder and timing options, with ``backend``.
        distribute: split the work across the ranks of a torchrun run; False
            embeds everything in this process even then.

    Raises:
        ValueError: if a requested key is not an image of ``dataset``.
    """
    _check_batch_size(batch_size)
    if workers < 0:
        raise ValueError(f"invalid workers {workers}: expected 0 or more DataLoader worker processes")
    device = _place(model, device)
    positions = _positions(dataset, keys)
    info = {"flip": bool(flip), "model_spec": spec.to_dict(), **(meta or {})}
    if backend is not None:
        faces = [dataset[int(position)][0] for position in positions[:GATE_FACES]]
        model = _select_backend_for_all_ranks(model, spec, backend, precision, device, faces, parity)
    if distribute and current_context().enabled:
        # Imported here: the sharding module builds on this package's store.
        from magface_al.distributed.embedding import embed_sharded

        # Every rank runs the engine chosen above (see _select_backend_for_all_ranks).
        return embed_sharded(
            functools.partial(embed_dataset, model, spec, dataset, distribute=False),
            np.asarray(dataset.keys, dtype=np.int64)[positions], batch_size=batch_size, out_dir=out_dir,
            workers=workers, flip=flip, device=device, progress=progress, meta=meta,
        )
    chosen = getattr(model, "backend", None)
    if chosen is not None:
        info["backend"] = chosen.name
    paths = getattr(dataset, "paths", None)
    selected_paths = None if paths is None else [str(paths[int(position)]) for position in positions]
    loader = DataLoader(
        _Selection(dataset, positions),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(spec.preprocess),
        pin_memory=device.type == "cuda",
        worker_init_fn=_init_worker if workers else None,
    )
    batches = _embed_loader(model, loader, flip=flip, device=device, total=len(positions), progress=progress)
    if out_dir is None:
        return _collect(batches, len(positions), spec.embedding_size, info, selected_paths)
    _stream(batches, Path(out_dir), len(positions), spec.embedding_size, info, selected_paths)
    return load_embeddings(out_dir)


def _select_backend_for_all_ranks(model, spec, backend, precision, device, faces, parity):
    """Choose the backend; under torchrun rank 0 chooses and the other ranks run its choice.

    ``auto`` decides by timing, which differs between processes, and ranks
    running different engines would not merge into a single process's output.
    """
    context = current_context()
    if backend != "auto" or not context.enabled:
        return select_backend(model, spec, backend, precision=precision, device=device, faces=faces, options=parity)
    chosen = None
    if context.is_main:
        chosen = select_backend(model, spec, backend, precision=precision, device=device, faces=faces, options=parity)
    engine, chosen_precision = broadcast_object(
        (chosen.backend.engine, chosen.backend.precision) if chosen is not None else None
    )
    if chosen is not None:
        return chosen
    return select_backend(model, spec, engine, precision=chosen_precision, device=device, faces=faces, options=parity)


class ImageFileDataset:
    """Aligned face images stored as files, with the interface ``embed_dataset`` reads.

    Attributes:
        paths: image paths.
        labels: int64 identity label per image.
        keys: int64 key per image (the row number unless given).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        keys: Sequence[int] | None = None,
    ) -> None:
        self.paths = [Path(path) for path in paths]
        count = len(self.paths)
        self.labels = np.full(count, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        self.keys = np.arange(count, dtype=np.int64) if keys is None else np.asarray(keys, dtype=np.int64)
        if len(self.labels) != count or len(self.keys) != count:
            raise ValueError(f"got {count} paths, {len(self.labels)} labels and {len(self.keys)} keys; expected as many of each")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ImageFileDataset:
        """List ``folder/<identity>/<image>`` files; identities sorted by name get labels 0, 1, 2, ...

        Raises:
            ValueError: if the folder contains no image in identity sub-folders.
        """
        folder = Path(folder)
        identities = sorted(path for path in folder.iterdir() if path.is_dir())
        paths: list[Path] = []
        labels: list[int] = []
        for label, identity in enumerate(identities):
            files = sorted(path for path in identity.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
            paths.extend(files)
            labels.extend([label] * len(files))
        if not paths:
            raise ValueError(
                f"no images found in {folder}: expected one sub-folder per identity holding "
                f"{', '.join(IMAGE_SUFFIXES)} files"
            )
        return cls(paths, labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        path = self.paths[index]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot decode image {path}; replace or remove the file")
        return image, int(self.labels[index]), int(self.keys[index])


class EncodedImageDataset:
    """Encoded images (JPEG, PNG) held in memory, decoded on access, e.g. the images of a ``.bin`` benchmark.

    Attributes:
        keys: int64 row numbers.
        labels: int64 labels (-1 when unknown).
    """

    def __init__(self, blobs: Sequence[bytes], labels: Sequence[int] | None = None) -> None:
        self.blobs = list(blobs)
        self.keys = np.arange(len(self.blobs), dtype=np.int64)
        self.labels = np.full(len(self.blobs), -1, dtype=np.int64) if labels is None else np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        image = cv2.imdecode(np.frombuffer(self.blobs[index], dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"encoded image {index} ({len(self.blobs[index])} bytes) does not decode")
        return image, int(self.labels[index]), index


class _Selection(torch.utils.data.Dataset):
    """The items of ``dataset`` at ``positions``; picklable for worker processes."""

    def __init__(self, dataset: Any, positions: np.ndarray) -> None:
        self.dataset = dataset
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        return self.dataset[int(self.positions[index])]


class _Collate:
    """Stack decoded images and preprocess them inside the worker process."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, items: list[tuple[np.ndarray, int, int]]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        images = [item[0] for item in items]
        labels = np.asarray([item[1] for item in items], dtype=np.int64)
        keys = np.asarray([item[2] for item in items], dtype=np.int64)
        return _to_batch_tensor(self.preprocess, images), labels, keys


def _to_batch_tensor(preprocess: Preprocess, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        return preprocess.to_tensor(images)
    if len({image.shape for image in images}) == 1:
        return preprocess.to_tensor(np.stack(images))
    # Mixed sizes cannot be stacked; each image is cropped and resized alone.
    return torch.cat([preprocess.to_tensor(image[None]) for image in images])


def _init_worker(_worker_id: int) -> None:
    # Parallelism comes from the worker processes; threads inside each would oversubscribe the cores.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _embed_loader(
    model: nn.Module, loader: DataLoader, *, flip: bool, device: torch.device, total: int, progress: bool
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (features, magnitudes, labels, keys) per batch, in dataset order."""
    with _eval_mode(model), tqdm(total=total, unit="img", desc="embedding", disable=not progress) as bar:
        for batch, labels, keys in _copy_ahead(loader, device):
            features, magnitudes = embed_batch(model, batch, flip=flip, device=device)
            bar.update(len(keys))
            yield features, magnitudes, labels, keys


def _copy_ahead(batches, device: torch.device) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """Yield the loader's batches; on a GPU, each already on the device, the next copy running meanwhile.

    The copy of batch i+1 is issued on a side stream before batch i is
    handed out, so it overlaps batch i's forward pass. The batches must come
    from pinned memory for the copy to be asynchronous. On other devices the
    batches pass through unchanged.
    """
    if device.type != "cuda":
        yield from batches
        return
    # NOTE: written for CUDA without a GPU to run it on; only the CPU branch above is tested.
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    pending = None
    for batch, labels, keys in batches:
        with torch.cuda.stream(side):
            on_device = batch.to(device, non_blocking=True)
        copied = side.record_event()
        if pending is not None:
            yield _after_copy(main, *pending)
        pending = (on_device, labels, keys, copied)
    if pending is not None:
        yield _after_copy(main, *pending)


def _after_copy(main, on_device: torch.Tensor, labels: np.ndarray, keys: np.ndarray, copied) -> tuple:
    main.wait_event(copied)
    # The tensor was allocated on the side stream; its memory must not be reused before the main stream is done.
    on_device.record_stream(main)
    return on_device, labels, keys


def _collect(batches, count: int, dimension: int, info: dict, paths: list[str] | None) -> Embeddings:
    arrays = _allocate(count, dimension, lambda name, shape, dtype: np.empty(shape, dtype=dtype))
    _fill(arrays, batches)
    return Embeddings(**arrays, meta=describe(info, count, arrays["features"].shape[1]), paths=paths)


def _stream(batches, out_dir: Path, count: int, dimension: int, info: dict, paths: list[str] | None) -> None:
    with atomic_path(out_dir, is_dir=True) as tmp:
        arrays = _allocate(
            count,
            dimension,
            lambda name, shape, dtype: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape),
        )
        _fill(arrays, batches)
        for array in arrays.values():
            array.flush()
        dimension = arrays["features"].shape[1]
        del arrays  # close the memory maps before the folder is renamed
        if paths is not None:
            write_paths(tmp / PATHS_FILE, paths)
        write_json_atomic(tmp / META_FILE, describe(info, count, dimension))
    logger.info("wrote %d embeddings of dimension %d to %s", count, dimension, out_dir)


def _allocate(count: int, dimension: int, make) -> dict[str, np.ndarray]:
    shapes = {"keys": (count,), "labels": (count,), "features": (count, dimension), "magnitudes": (count,)}
    dtypes = {"keys": np.int64, "labels": np.int64, "features": np.float32, "magnitudes": np.float32}
    return {name: make(name, shapes[name], dtypes[name]) for name in ARRAY_FILES}


def _fill(arrays: dict[str, np.ndarray], batches) -> None:
    start = 0
    for features, magnitudes, labels, keys in batches:
        if features.shape[1] != arrays["features"].shape[1]:
            raise ValueError(_dimension_message(features.shape[1], arrays["features"].shape[1]))
        stop = start + len(keys)
        arrays["features"][start:stop] = features
        arrays["magnitudes"][start:stop] = magnitudes
        arrays["labels"][start:stop] = labels
        arrays["keys"][start:stop] = keys
        start = stop


def _positions(dataset: Any, keys: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """Map requested image keys to dataset positions (all positions when ``keys`` is None)."""
    if keys is None:
        return np.arange(len(dataset), dtype=np.int64)
    requested = np.asarray(keys, dtype=np.int64).reshape(-1)
    available = np.asarray(dataset.keys, dtype=np.int64)
    order = np.argsort(available, kind="stable")
    sorted_keys = available[order]
    found = np.searchsorted(sorted_keys, requested)
    known = found < len(sorted_keys)
    known[known] = sorted_keys[found[known]] == requested[known]
    if not known.all():
        unknown = requested[~known]
        first_unknown = ", ".join(str(key) for key in unknown[:5].tolist())
        raise ValueError(
            f"{len(unknown)} requested keys are not images of the dataset (first: {first_unknown}); "
            "check that the key list was made for this dataset"
        )
    return order[found].astype(np.int64)


def _place(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    parameter = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device(getattr(model, "device", "cpu"))


class _eval_mode:
    """Put a model in eval mode for the duration of a block and restore its previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        if self.was_training:
            self.model.train()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}: expected a positive number of images")


def _dimension_message(returned: int, declared: int) -> str:
    return (
        f"the model returns {returned}-d embeddings but its specification says {declared}; "
        "fix embedding_size in the ModelSpec"
    )
