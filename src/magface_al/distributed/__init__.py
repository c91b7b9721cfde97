"""Running embedding and training as several processes with torch.distributed (torchrun)."""

from magface_al.distributed.context import (
    DistributedContext, all_gather_objects, barrier, broadcast_object, current_context, distributed_run,
    init_distributed, rank_device, shutdown,
)

__all__ = [
    "DistributedContext", "all_gather_objects", "barrier", "broadcast_object", "current_context",
    "distributed_run", "init_distributed", "rank_device", "shutdown",
]
