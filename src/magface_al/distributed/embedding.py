"""Embedding split across the ranks of a torchrun run, merged into exactly the single-process output.

Every rank takes a contiguous run of whole batches of the requested images.
These are the batches a single process would form, so each image goes
through the same forward pass with the same neighbours in its batch. The
merged rows therefore equal the single-process rows bit for bit, given the
same device and thread count per forward pass.

With an output folder, each rank streams its shard into a folder of its own
beside it; after a barrier rank 0 concatenates the shards in rank order into
the output (written atomically, as a single process does) and deletes them.
A rank that dies before the merge leaves only the hidden shard folder, which
DVC does not track and the next run removes. Without an output folder, the
shards travel between the ranks in memory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from magface_al.distributed.context import all_gather_objects, barrier, current_context
from magface_al.embedding.store import (
    ARRAY_FILES, META_FILE, PATHS_FILE, Embeddings, describe, load_embeddings, write_paths,
)
from magface_al.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

# meta.json fields describe() derives from the arrays; a merge recomputes them.
_DERIVED_META = ("format", "format_version", "count", "dimension")


def shard_range(count: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the rows ``[start, stop)`` of ``count`` that ``rank`` embeds: whole batches, contiguous.

    The batches are split as evenly as possible; when there are fewer batches
    than ranks, the last ranks get an empty range.
    """
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}: expected a positive number of images")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    batches = -(-count // batch_size)
    first = rank * batches // world_size
    last = (rank + 1) * batches // world_size
    return min(first * batch_size, count), min(last * batch_size, count)


def shard_folder(out_dir: Path, rank: int) -> Path:
    """Return the folder ``rank`` writes its shard to, hidden beside ``out_dir`` (see :func:`shards_root`)."""
    return shards_root(out_dir) / f"rank-{rank:05d}"


def shards_root(out_dir: Path) -> Path:
    """Return the hidden folder next to ``out_dir`` that contains the shards until rank 0 merges them."""
    return out_dir.with_name(f".{out_dir.name}.shards")


def embed_sharded(
    embed_local: Callable[..., Embeddings],
    keys: np.ndarray,
    *,
    batch_size: int,
    out_dir: str | Path | None,
    **options: Any,
) -> Embeddings:
    """Embed ``keys`` across all ranks with ``embed_local`` (one rank's embedding function).

    Args:
        embed_local: called as ``embed_local(keys=..., out_dir=..., **options)``
            for this rank's shard; :func:`magface_al.embedding.embed_dataset`
            passes itself restricted to one process.
        keys: every image key to embed, in output order, the same on every rank.
        batch_size: images per forward pass; shards hold whole batches.
        out_dir: the merged output folder, or None to merge in memory.
        options: passed to ``embed_local`` (model, dataset, batch size, ...).

    Returns:
        The merged embeddings, the same on every rank.
    """
    context = current_context()
    if len(keys) == 0:
        # Nothing to split: every rank returns the same empty result.
        return embed_local(keys=keys, out_dir=out_dir if context.is_main else None, batch_size=batch_size, **options)
    start, stop = shard_range(len(keys), batch_size, context.rank, context.world_size)
    # One progress bar per run, not one per rank.
    options["progress"] = bool(options.get("progress", True)) and context.is_main
    logger.info("rank %d of %d embeds rows %d to %d of %d", context.rank, context.world_size, start, stop, len(keys))
    if out_dir is None:
        shard = embed_local(keys=keys[start:stop], out_dir=None, batch_size=batch_size, **options)
        return _concatenate(all_gather_objects(_plain(shard)))
    out_dir = Path(out_dir)
    root = shards_root(out_dir)
    if context.is_main and root.exists():
        logger.warning("removing %s, left by an earlier run that did not finish", root)
        shutil.rmtree(root)
    barrier()
    if stop > start:
        embed_local(keys=keys[start:stop], out_dir=shard_folder(out_dir, context.rank), batch_size=batch_size, **options)
    barrier()
    if context.is_main:
        merge_shards(_expected_shards(out_dir, len(keys), batch_size, context.world_size), out_dir)
        shutil.rmtree(root, ignore_errors=True)
    barrier()
    return load_embeddings(out_dir)


def _expected_shards(out_dir: Path, count: int, batch_size: int, world_size: int) -> list[Path]:
    """Return the shard folders of the ranks that had rows, checking that each exists.

    Raises:
        FileNotFoundError: if a rank's shard is missing, which happens when the
            ranks of several machines do not share the output's file system.
    """
    folders = []
    for rank in range(world_size):
        start, stop = shard_range(count, batch_size, rank, world_size)
        if stop == start:
            continue
        folder = shard_folder(out_dir, rank)
        if not (folder / "features.npy").is_file():
            raise FileNotFoundError(
                f"the shard of rank {rank} is missing at {folder}; all ranks must write to one file system "
                "(on several machines, put the project on shared storage)"
            )
        folders.append(folder)
    return folders


def merge_shards(folders: Sequence[Path], out_dir: Path) -> None:
    """Concatenate embedding folders in order into ``out_dir``, atomically, one shard in memory at a time."""
    shards = [load_embeddings(folder) for folder in folders]
    if not shards:
        raise ValueError(f"no shards to merge into {out_dir}")
    count = sum(len(shard) for shard in shards)
    dimension = shards[0].dimension
    for folder, shard in zip(folders, shards):
        if shard.dimension != dimension:
            raise ValueError(
                f"invalid shard {folder}: {shard.dimension}-d embeddings, expected {dimension}-d as in the first "
                "shard; embed again with one model"
            )
    meta = {name: value for name, value in shards[0].meta.items() if name not in _DERIVED_META}
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name in ARRAY_FILES:
            first = getattr(shards[0], name)
            shape = (count, *np.shape(first)[1:])
            merged = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=first.dtype, shape=shape)
            row = 0
            for shard in shards:
                part = getattr(shard, name)
                merged[row:row + len(part)] = part
                row += len(part)
            merged.flush()
            del merged  # close the memory map before the folder is renamed
        if shards[0].paths is not None:
            write_paths(tmp / PATHS_FILE, [path for shard in shards for path in shard.paths or []])
        write_json_atomic(tmp / META_FILE, describe(meta, count, dimension))
    logger.info("merged %d shards into %d embeddings in %s", len(shards), count, out_dir)


def _plain(shard: Embeddings) -> dict[str, Any]:
    """Return the shard as plain arrays, so that gathering does not pickle memory maps."""
    return {
        "keys": np.asarray(shard.keys), "labels": np.asarray(shard.labels),
        "features": np.ascontiguousarray(shard.features), "magnitudes": np.asarray(shard.magnitudes),
        "meta": shard.meta, "paths": shard.paths,
    }


def _concatenate(parts: list[dict[str, Any]]) -> Embeddings:
    arrays = {name: np.concatenate([part[name] for part in parts]) for name in ARRAY_FILES}
    meta = {name: value for name, value in parts[0]["meta"].items() if name not in _DERIVED_META}
    paths = None if parts[0]["paths"] is None else [path for part in parts for path in part["paths"] or []]
    count, dimension = len(arrays["keys"]), arrays["features"].shape[1]
    return Embeddings(**arrays, meta=describe(meta, count, dimension), paths=paths)
