"""The process group a run belongs to: rank, world size and device, from torchrun's environment.

``torchrun`` starts one process per rank and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed`
reads them and joins the process group: NCCL when the rank has a working
GPU, gloo otherwise. Without them, or with ``WORLD_SIZE=1``, a run is a
single process and nothing is initialized. Library code asks
:func:`current_context` for its rank, so the same function runs alone or as
one rank of many.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from magface_al.models.device import select_device

logger = logging.getLogger(__name__)

# How long a collective waits for the slowest rank: long enough for one rank
# to embed a large shard while the others wait at the merge barrier. On one
# node a crash ends the run sooner, because torchrun stops the other ranks.
DEFAULT_TIMEOUT_MINUTES = 120.0


@dataclass(frozen=True)
class DistributedContext:
    """The position of this process in its run.

    Attributes:
        rank: global rank, 0 to world_size - 1.
        world_size: number of processes; 1 for a run without torchrun.
        local_rank: rank on this node (selects the GPU).
        backend: ``gloo``, ``nccl``, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when other ranks take part, so collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one rank that writes checkpoints, metrics and plots."""
        return self.rank == 0


def current_context() -> DistributedContext:
    """Return the context of the initialized process group, or the single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; torchrun sets it") from error


def rank_device(preference: str = "auto") -> torch.device:
    """Return this rank's device: ``cuda:LOCAL_RANK`` when a GPU is chosen, else the CPU.

    ``preference`` is a device setting of params.yaml (``auto``, ``cpu``,
    ``cuda``); ``cuda`` without an index means the GPU of this local rank.
    """
    device = select_device(preference)
    if device.type == "cuda" and device.index is None:
        local_rank = _environment_int("LOCAL_RANK", 0)
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: torch.device, *, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistributedContext:
    """Join the process group torchrun described, or return the single-process context.

    Args:
        device: this rank's device (see :func:`rank_device`); a CUDA device
            selects NCCL, the CPU selects gloo.
        timeout_minutes: the maximum time a collective waits for the other ranks.

    Raises:
        RuntimeError: if ``WORLD_SIZE`` > 1 but torchrun's rendezvous
            variables are missing.
    """
    world_size = _environment_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext()
    if dist.is_initialized():
        return current_context()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; start the run with torchrun "
            "(or python -m magface_al.distributed.launch), which sets them"
        )
    # NOTE: only gloo on one machine has run; NCCL and multi-node rendezvous are untested.
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    context = current_context()
    logger.info("rank %d of %d joined the %s process group on %s", context.rank, context.world_size, backend, device)
    return context


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_run(device: torch.device, **options: Any) -> Iterator[DistributedContext]:
    """Join the process group for the length of a block and leave it afterwards, also on errors."""
    context = init_distributed(device, **options)
    quieted = context.enabled and not context.is_main
    if quieted:
        # Rank 0 speaks for the run; the others report only warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield context
    finally:
        shutdown()


def barrier() -> None:
    """Wait until every rank arrives; nothing for a single process."""
    if current_context().enabled:
        dist.barrier()


def all_gather_objects(value: Any) -> list[Any]:
    """Return every rank's ``value`` in rank order (``[value]`` for a single process).

    Values travel pickled between the ranks of one run, which trust each other.
    """
    context = current_context()
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    """Return rank 0's ``value`` on every rank."""
    if not current_context().enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
