"""The on-disk embedding format: a folder of numpy files that ``numpy.load`` reads.

=================== ===================== =====================================================
file                dtype, shape          content
=================== ===================== =====================================================
``keys.npy``        int64 (N,)            image key (record key, or row number for image files)
``labels.npy``      int64 (N,)            identity label of each image
``features.npy``    float32 (N, D)        L2-normalized embeddings
``magnitudes.npy``  float32 (N,)          L2 norm of the raw (unflipped) embedding: the quality
``meta.json``       JSON                  count, dimension, flip, model specification, source
``paths.txt``       text, optional        one image path per row, for image-file input
=================== ===================== =====================================================

Rows align across files. A folder is always written complete or not at all:
it is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from magface_al.utils import atomic_path, to_strict_json, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_NAME = "magface_al.embeddings"
FORMAT_VERSION = 1
ARRAY_FILES = ("keys", "labels", "features", "magnitudes")
META_FILE = "meta.json"
PATHS_FILE = "paths.txt"


@dataclass
class Embeddings:
    """Embeddings of N images with their keys, labels and magnitudes (rows aligned).

    Attributes:
        keys: int64 (N,) image keys.
        labels: int64 (N,) identity labels.
        features: float32 (N, D) L2-normalized embeddings.
        magnitudes: float32 (N,) L2 norms of the raw embeddings (MagFace quality).
        meta: free-form description (model specification, flip, source).
        paths: image paths per row, for image-file input; None for RecordIO input.
    """

    keys: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    magnitudes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        count = len(self.keys)
        for name in ("labels", "features", "magnitudes"):
            if len(getattr(self, name)) != count:
                raise ValueError(f"embeddings: {name} has {len(getattr(self, name))} rows, keys has {count}")
        if self.paths is not None and len(self.paths) != count:
            raise ValueError(f"embeddings: paths has {len(self.paths)} rows, keys has {count}")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dimension(self) -> int:
        return int(self.features.shape[1]) if self.features.ndim == 2 else 0

    def key_to_row(self) -> dict[int, int]:
        """Return a mapping from image key to row number.

        Raises:
            ValueError: if a key occurs twice.
        """
        mapping = {int(key): row for row, key in enumerate(self.keys.tolist())}
        if len(mapping) != len(self.keys):
            raise ValueError("embeddings hold duplicate keys, so a key does not identify one row")
        return mapping


def save_embeddings(out_dir: str | os.PathLike, emb: Embeddings) -> None:
    """Write ``emb`` to the folder ``out_dir`` in the format above, atomically (replacing an old folder)."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        np.save(tmp / "keys.npy", np.asarray(emb.keys, dtype=np.int64))
        np.save(tmp / "labels.npy", np.asarray(emb.labels, dtype=np.int64))
        np.save(tmp / "features.npy", np.asarray(emb.features, dtype=np.float32))
        np.save(tmp / "magnitudes.npy", np.asarray(emb.magnitudes, dtype=np.float32))
        if emb.paths is not None:
            write_paths(tmp / PATHS_FILE, emb.paths)
        write_json_atomic(tmp / META_FILE, describe(emb.meta, len(emb), emb.dimension))
    logger.info("wrote %d embeddings of dimension %d to %s", len(emb), emb.dimension, out_dir)


def load_embeddings(out_dir: str | os.PathLike, *, mmap: bool = True) -> Embeddings:
    """Read an embedding folder written by :func:`save_embeddings` or ``embed_dataset``.

    Args:
        out_dir: the folder.
        mmap: memory-map ``features.npy`` instead of reading it into memory.

    Raises:
        FileNotFoundError: if a required file is missing.
        ValueError: if the files disagree on the number of rows or have the wrong shape.
    """
    folder = Path(out_dir)
    arrays = {}
    for name in ARRAY_FILES:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; {folder} is not a complete embedding folder")
        arrays[name] = np.load(path, mmap_mode="r" if mmap and name == "features" else None, allow_pickle=False)
    if arrays["features"].ndim != 2:
        raise ValueError(f"{folder / 'features.npy'} has shape {arrays['features'].shape}, expected (N, D)")
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    paths_path = folder / PATHS_FILE
    paths = paths_path.read_text(encoding="utf-8").splitlines() if paths_path.is_file() else None
    try:
        return Embeddings(**arrays, meta=meta, paths=paths)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}; write the folder again") from error


def describe(meta: Mapping[str, Any], count: int, dimension: int) -> dict[str, Any]:
    """Return the ``meta.json`` content: format, version, counts and the caller's fields."""
    return to_strict_json(
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "count": count, "dimension": dimension, **meta}
    )


def write_paths(path: Path, paths: list[str]) -> None:
    for item in paths:
        if "\n" in item:
            raise ValueError(f"image path {item!r} contains a line break, which {PATHS_FILE} cannot store")
    path.write_text("".join(f"{item}\n" for item in paths), encoding="utf-8")
