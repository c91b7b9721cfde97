"""Split identities (never images or pairs) into feedback pool, validation and test parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PART_NAMES = ("feedback", "validation", "test")


@dataclass(frozen=True)
class IdentitySplit:
    """Disjoint, sorted int64 arrays of identity ids, one per part."""

    feedback: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        for name in PART_NAMES:
            object.__setattr__(self, name, np.sort(np.asarray(getattr(self, name), dtype=np.int64)))
        for i, first in enumerate(PART_NAMES):
            for second in PART_NAMES[i + 1:]:
                shared = np.intersect1d(getattr(self, first), getattr(self, second))
                if len(shared):
                    raise ValueError(
                        f"identity split is not disjoint: {len(shared)} identities are in both "
                        f"{first} and {second} (for example {shared[:5].tolist()})"
                    )

    def part(self, name: str) -> np.ndarray:
        """Return the identities of part ``name`` (feedback, validation or test)."""
        if name not in PART_NAMES:
            raise ValueError(f"unknown split part {name!r}; expected one of {', '.join(PART_NAMES)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping with counts and the identity lists."""
        return {
            "counts": {name: int(len(self.part(name))) for name in PART_NAMES},
            **{name: self.part(name).tolist() for name in PART_NAMES},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentitySplit:
        """Rebuild a split from :meth:`to_dict` output."""
        missing = [name for name in PART_NAMES if name not in data]
        if missing:
            raise ValueError(f"identity split is missing part(s) {', '.join(missing)}")
        return cls(*(np.asarray(data[name], dtype=np.int64) for name in PART_NAMES))


def _part_sizes(count: int, fractions: tuple[float, float, float]) -> list[int]:
    """Round ``count * fraction`` per part so the sizes sum to ``count`` (largest remainder)."""
    exact = np.asarray(fractions) * count
    sizes = np.floor(exact).astype(int)
    remainder = count - sizes.sum()
    # Stable order, so equal remainders go to the earlier part deterministically.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return sizes.tolist()


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"expected three fractions (feedback, validation, test), got {fractions!r}")
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0, atol=1e-6):
        raise ValueError(
            f"split fractions must be non-negative and sum to 1, got {fractions!r}; "
            "adjust the feedback, validation and test fractions in params.yaml"
        )
    return tuple(float(f) for f in fractions)


def split_identities(
    identities: np.ndarray,
    fractions: tuple[float, float, float],
    *,
    seed: int,
    image_counts: np.ndarray | None = None,
) -> IdentitySplit:
    """Assign each identity to exactly one of feedback pool, validation and test.

    Args:
        identities: distinct identity ids.
        fractions: (feedback, validation, test) shares of the identities; they sum to 1.
        seed: seed of the random permutation.
        image_counts: images per identity, aligned with ``identities``. When given,
            identities with two or more images and those with one are split
            separately, so every part receives its share of the identities that
            can form same-person pairs.

    Returns:
        The split; sizes are rounded so that every identity is assigned.
    """
    fractions = _check_fractions(fractions)
    identities = np.asarray(identities, dtype=np.int64)
    if len(np.unique(identities)) != len(identities):
        raise ValueError("identities must be distinct; pass np.unique(labels)")
    if image_counts is None:
        strata = [identities]
    else:
        image_counts = np.asarray(image_counts)
        if image_counts.shape != identities.shape:
            raise ValueError(
                f"image_counts has shape {image_counts.shape}, identities {identities.shape}; align them"
            )
        strata = [identities[image_counts >= 2], identities[image_counts < 2]]

    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for stratum in strata:
        shuffled = rng.permutation(np.sort(stratum))
        bounds = np.cumsum([0] + _part_sizes(len(shuffled), fractions))
        for i in range(3):
            parts[i].append(shuffled[bounds[i]:bounds[i + 1]])
    split = IdentitySplit(*(np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts))
    logger.info(
        "split %d identities: %s",
        len(identities),
        ", ".join(f"{name} {len(split.part(name))}" for name in PART_NAMES),
    )
    return split


def sample_identity_subset(
    keys: np.ndarray,
    labels: np.ndarray,
    *,
    num_identities: int | None,
    images_per_identity: int | None,
    min_images_per_identity: int = 1,
    seed: int,
) -> np.ndarray:
    """Choose a seeded subset of a dataset's images by identity.

    Args:
        keys: record keys of all images.
        labels: identity id per image, aligned with ``keys``.
        num_identities: identities to keep among the eligible ones; 0 or None keeps all.
        images_per_identity: at most this many images per identity, chosen at
            random; 0 or None keeps all.
        min_images_per_identity: identities with fewer images are left out.
        seed: seed of both choices.

    Returns:
        The chosen keys, sorted.

    Raises:
        ValueError: fewer eligible identities than ``num_identities``.
    """
    keys = np.asarray(keys, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    identities, counts = np.unique(labels, return_counts=True)
    eligible = identities[counts >= max(min_images_per_identity, 1)]
    if num_identities:
        if num_identities > len(eligible):
            raise ValueError(
                f"requested {num_identities} identities, but only {len(eligible)} of {len(identities)} have at "
                f"least {min_images_per_identity} images; lower num_identities or min_images_per_identity"
            )
        eligible = np.sort(rng.choice(eligible, size=num_identities, replace=False))
    # Group once instead of scanning all labels per identity.
    order = np.lexsort((keys, labels))
    sorted_labels, sorted_keys = labels[order], keys[order]
    starts = np.searchsorted(sorted_labels, eligible, side="left")
    stops = np.searchsorted(sorted_labels, eligible, side="right")
    chosen = []
    for start, stop in zip(starts.tolist(), stops.tolist()):
        own = sorted_keys[start:stop]
        if images_per_identity and len(own) > images_per_identity:
            own = np.sort(rng.choice(own, size=images_per_identity, replace=False))
        chosen.append(own)
    result = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    logger.info("chose %d images of %d identities", len(result), len(eligible))
    return result
