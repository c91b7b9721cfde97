"""Run a stage under torchrun with the process counts of params.yaml's ``distributed`` section.

Usage, as a DVC stage command::

    python -m magface_al.distributed.launch [--params params.yaml] stages/pretrain.py --data ...

The section (all keys optional)::

    distributed:
      nproc_per_node: 1        # processes per machine: one per GPU, or CPU ranks
      nnodes: 1                # machines; above 1 a rendezvous endpoint is needed
      rdzv_endpoint: null      # host:port every node reaches; MAGFACE_AL_RDZV_ENDPOINT overrides it
      rdzv_id: magface-al      # names the run at the rendezvous
      threads_per_process: null  # torch CPU threads per rank; null shares the cores evenly

With one node the rendezvous is local (``torchrun --standalone``). Every
node of a multi-node run starts the same command; torchrun assigns the
ranks. No restarts are attempted: a rank that fails stops the run, and
torchrun's exit status and its report of the failed rank's error become
the stage's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence

from magface_al.params import load_section
from magface_al.utils import setup_logging

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLE = "MAGFACE_AL_RDZV_ENDPOINT"


@dataclass
class DistributedParams:
    """The ``distributed`` section of params.yaml."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str = "magface-al"
    threads_per_process: int | None = None

    def __post_init__(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"distributed.{name}: must be at least 1, got {getattr(self, name)}")
        if self.threads_per_process is not None and self.threads_per_process < 1:
            raise ValueError(
                f"distributed.threads_per_process: must be at least 1 or null, got {self.threads_per_process}"
            )


def torchrun_arguments(params: DistributedParams, script: str, script_args: Sequence[str]) -> list[str]:
    """Return torchrun's command-line arguments for ``script`` with ``params``."""
    arguments = [f"--nnodes={params.nnodes}", f"--nproc-per-node={params.nproc_per_node}", "--max-restarts=0"]
    if params.nnodes == 1:
        arguments.append("--standalone")
    else:
        # The job's variable wins: the endpoint changes from job to job, params.yaml does not.
        endpoint = os.environ.get(ENDPOINT_VARIABLE) or params.rdzv_endpoint
        if not endpoint:
            raise ValueError(
                f"distributed.nnodes is {params.nnodes}, but no rendezvous endpoint is set; set "
                f"distributed.rdzv_endpoint or the environment variable {ENDPOINT_VARIABLE} to host:port "
                "of a machine every node reaches (for example the first node of the job)"
            )
        arguments += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={params.rdzv_id}"]
    return [*arguments, script, *script_args]


def threads_per_process(params: DistributedParams) -> int:
    """Return the torch CPU threads per rank: the setting, or this machine's cores shared evenly."""
    if params.threads_per_process is not None:
        return params.threads_per_process
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // params.nproc_per_node)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m magface_al.distributed.launch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file with the distributed section")
    parser.add_argument("script", help="the stage script to run on every rank")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments of the stage script")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        params = load_section(DistributedParams, "distributed", args.params)
        arguments = torchrun_arguments(params, args.script, args.script_args)
    except ValueError as error:  # ParamsError is a ValueError too
        logger.error("%s: %s", args.params, error)
        return 2
    # torchrun would set OMP_NUM_THREADS=1 for several ranks. An explicit threads_per_process wins over
    # the environment (clusters often export OMP_NUM_THREADS=1); otherwise the environment's value does.
    if params.threads_per_process is not None:
        os.environ["OMP_NUM_THREADS"] = str(params.threads_per_process)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(params)))
    logger.info("torchrun %s (OMP_NUM_THREADS=%s)", " ".join(arguments), os.environ["OMP_NUM_THREADS"])
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(arguments)
    except Exception as error:  # torchrun raises ChildFailedError after printing the failed rank's report
        logger.error("the distributed run failed: %s", type(error).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
