"""Warnings for metrics that cannot be measured on the given input."""

from __future__ import annotations

import warnings


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (empty, one class only, constant scores, too few pairs)."""


def warn_undefined(message: str, *, stacklevel: int = 3) -> None:
    """Warn that a metric is undefined; the caller then returns NaN."""
    warnings.warn(message, UndefinedMetricWarning, stacklevel=stacklevel)
