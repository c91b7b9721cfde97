"""Device choice: CUDA when it is present and actually runs, otherwise the CPU."""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to run models on.

    Args:
        preference: ``"auto"`` (CUDA if it works, else CPU with a warning when
            a GPU is present but unusable), ``"cpu"``, or ``"cuda"`` /
            ``"cuda:N"`` (an error if that GPU does not work).

    Raises:
        ValueError: for an unknown preference.
        RuntimeError: if CUDA was requested explicitly and does not work.
    """
    preference = preference.strip().lower()
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "auto":
        if not torch.cuda.is_available():
            logger.info("CUDA is not available; running on the CPU")
            return torch.device("cpu")
        problem = _cuda_problem("cuda")
        if problem:
            logger.warning("the GPU cannot run this torch build (%s); falling back to the CPU", problem)
            return torch.device("cpu")
        return torch.device("cuda")
    if preference.startswith("cuda"):
        try:
            device = torch.device(preference)
        except RuntimeError as error:
            raise ValueError(f"invalid device {preference!r}: expected auto, cpu, cuda or cuda:N") from error
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {preference!r} requested, but CUDA is not available; use --device auto or cpu")
        problem = _cuda_problem(str(device))
        if problem:
            raise RuntimeError(f"device {preference!r} does not work with this torch build: {problem}")
        return device
    raise ValueError(f"invalid device {preference!r}: expected auto, cpu, cuda or cuda:N")


@functools.lru_cache(maxsize=None)
def _cuda_problem(device: str) -> str | None:
    """Run a tiny convolution on ``device``; return the error text, or None if it worked.

    ``torch.cuda.is_available()`` is true even for a GPU whose compute
    capability this build has no kernels for; such a GPU fails only when a
    kernel launches.
    """
    try:
        x = torch.ones(1, 1, 4, 4, device=device)
        weight = torch.ones(1, 1, 3, 3, device=device)
        value = torch.nn.functional.conv2d(x, weight).sum().item()
    except RuntimeError as error:  # torch.AcceleratorError subclasses RuntimeError
        return str(error).strip().splitlines()[0]
    if value != 36.0:
        return f"a test convolution returned {value} instead of 36"
    return None
