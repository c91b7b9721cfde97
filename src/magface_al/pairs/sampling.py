"""Seeded sampling of same-person and different-person pairs, random and hard.

All pairs are drawn without replacement: no pair occurs twice, and (a, b)
counts as the same pair as (b, a). Pairs are stored with ``key1 < key2``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from magface_al.pairs.table import Pairs

logger = logging.getLogger(__name__)

# Rejection sampling of different-person pairs stalls when the request is a
# large share of all possible pairs; above this share every pair is listed.
_ENUMERATE_SHARE = 0.5


@dataclass(frozen=True)
class _Groups:
    """Images grouped by identity: ``keys[starts[g]:starts[g] + counts[g]]`` belong to ``ids[g]``."""

    ids: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    keys: np.ndarray
    labels: np.ndarray

    @property
    def same_capacity(self) -> np.ndarray:
        """Number of distinct same-person pairs per identity."""
        return self.counts * (self.counts - 1) // 2

    @property
    def different_capacity(self) -> int:
        total = int(self.counts.sum())
        return (total * total - int((self.counts**2).sum())) // 2


def _group(keys: np.ndarray, labels: np.ndarray, identities: np.ndarray | None) -> _Groups:
    keys = np.asarray(keys, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if keys.shape != labels.shape:
        raise ValueError(f"keys has shape {keys.shape} but labels {labels.shape}; align them")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("keys must be distinct record keys")
    if identities is not None:
        mask = np.isin(labels, np.asarray(identities, dtype=np.int64))
        keys, labels = keys[mask], labels[mask]
    order = np.lexsort((keys, labels))
    keys, labels = keys[order], labels[order]
    ids, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    return _Groups(ids, starts, counts, keys, labels)


def _describe(groups: _Groups, description: str) -> str:
    return f"{description} ({len(groups.ids)} identities, {len(groups.keys)} images)"


def count_same_pairs(labels: np.ndarray) -> int:
    """Return how many distinct same-person pairs the images with ``labels`` can form."""
    _, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _water_fill(capacity: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Spread ``total`` over identities as evenly as their capacities allow.

    Every identity gets ``min(capacity, level)`` for the highest level that
    fits; the few that remain go to random identities with spare capacity.
    """
    low, high = 0, int(capacity.max(initial=0))
    while low < high:
        level = (low + high + 1) // 2
        if np.minimum(capacity, level).sum() <= total:
            low = level
        else:
            high = level - 1
    allocation = np.minimum(capacity, low)
    remainder = total - int(allocation.sum())
    if remainder:
        spare = np.flatnonzero(capacity > low)
        allocation[rng.choice(spare, size=remainder, replace=False)] += 1
    return allocation


def _decode_triangle(flat: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Map indices into the row-major list of pairs (i < j) of ``count`` items to (i, j)."""
    rows = np.arange(count, dtype=np.int64)
    # offsets[i]: number of pairs whose first index is below i
    offsets = rows * (2 * count - rows - 1) // 2
    first = np.searchsorted(offsets, flat, side="right") - 1
    second = flat - offsets[first] + first + 1
    return first, second


def _make_pairs(groups: _Groups, index1: np.ndarray, index2: np.ndarray, label: int) -> Pairs:
    key1, key2 = groups.keys[index1], groups.keys[index2]
    swap = key1 > key2
    key1, key2 = np.where(swap, key2, key1), np.where(swap, key1, key2)
    identity1 = np.where(swap, groups.labels[index2], groups.labels[index1])
    identity2 = np.where(swap, groups.labels[index1], groups.labels[index2])
    return Pairs(key1, key2, np.full(len(key1), label), identity1, identity2)


def _pair_codes(key1: np.ndarray, key2: np.ndarray) -> np.ndarray:
    """Encode unordered key pairs as one int64 each (keys are below 2**31)."""
    low, high = np.minimum(key1, key2), np.maximum(key1, key2)
    return (low << 32) | high


def _excluded_by_group(groups: _Groups, exclude: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Split excluded pair codes into same-person ones per identity and a count of different-person ones."""
    if len(exclude) == 0:
        return {}, 0
    by_key = np.argsort(groups.keys)
    sorted_keys = groups.keys[by_key]

    def position(key: np.ndarray) -> np.ndarray:
        index = np.clip(np.searchsorted(sorted_keys, key), 0, max(len(sorted_keys) - 1, 0))
        found = sorted_keys[index] == key if len(sorted_keys) else np.zeros(len(key), bool)
        return np.where(found, by_key[index] if len(by_key) else -1, -1)

    low, high = position(exclude >> 32), position(exclude & 0xFFFFFFFF)
    inside = (low >= 0) & (high >= 0)
    same = inside & (groups.labels[low] == groups.labels[high])
    group = np.searchsorted(groups.ids, groups.labels[low[same]])
    per_group = {int(g): exclude[same][group == g] for g in np.unique(group)}
    return per_group, int((inside & ~same).sum())


def sample_same_pairs(
    groups: _Groups, count: int, rng: np.random.Generator, *, description: str, exclude: np.ndarray
) -> Pairs:
    """Draw ``count`` distinct same-person pairs, spread evenly over identities."""
    excluded, _ = _excluded_by_group(groups, exclude)
    capacity = groups.same_capacity.copy()
    for g, codes in excluded.items():
        capacity[g] -= len(codes)

    available = int(capacity.sum())
    if count > available:
        raise ValueError(
            f"{_describe(groups, description)} can form only {available} distinct same-person pairs, "
            f"but {count} were requested; lower the number of same-person pairs or give this part "
            "a larger fraction of the identities"
        )
    allocation = _water_fill(capacity, count, rng)
    index1, index2 = [], []
    for g in np.flatnonzero(allocation):
        n, start = int(groups.counts[g]), int(groups.starts[g])
        taken = excluded.get(int(g), np.zeros(0, np.int64))
        # Drawing need + len(taken) distinct pairs leaves at least need that are not taken.
        flat = rng.choice(n * (n - 1) // 2, size=int(allocation[g]) + len(taken), replace=False)
        first, second = _decode_triangle(flat, n)
        codes = _pair_codes(groups.keys[start + first], groups.keys[start + second])
        chosen = np.flatnonzero(~np.isin(codes, taken))[: int(allocation[g])]
        index1.append(start + first[chosen])
        index2.append(start + second[chosen])
    if not index1:
        return Pairs.empty()
    return _make_pairs(groups, np.concatenate(index1), np.concatenate(index2), 1)


def _all_different_pairs(groups: _Groups) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.triu_indices(len(groups.keys), k=1)
    different = groups.labels[first] != groups.labels[second]
    return first[different], second[different]


def sample_different_pairs(
    groups: _Groups, count: int, rng: np.random.Generator, *, description: str, exclude: np.ndarray
) -> Pairs:
    """Draw ``count`` distinct different-person pairs.

    Two distinct identities are drawn uniformly, then one image of each, so
    identities with many images do not dominate.
    """
    _, excluded_different = _excluded_by_group(groups, exclude)
    capacity = groups.different_capacity - excluded_different
    if count > capacity:
        raise ValueError(
            f"{_describe(groups, description)} can form only {capacity} distinct different-person "
            f"pairs, but {count} were requested; lower the number of different-person pairs"
        )
    if count == 0:
        return Pairs.empty()
    if count > _ENUMERATE_SHARE * capacity:
        first, second = _all_different_pairs(groups)
        codes = _pair_codes(groups.keys[first], groups.keys[second])
        keep = np.flatnonzero(~np.isin(codes, exclude))
        chosen = rng.choice(keep, size=count, replace=False)
        return _make_pairs(groups, first[chosen], second[chosen], 0)

    chosen1: list[np.ndarray] = []
    chosen2: list[np.ndarray] = []
    seen = set(exclude.tolist())
    need = count
    while need:
        batch = 2 * need + 16
        group1 = rng.integers(0, len(groups.ids), size=batch)
        # Offset in 1..G-1 so that the second identity always differs from the first.
        group2 = (group1 + rng.integers(1, len(groups.ids), size=batch)) % len(groups.ids)
        index1 = groups.starts[group1] + (rng.random(batch) * groups.counts[group1]).astype(np.int64)
        index2 = groups.starts[group2] + (rng.random(batch) * groups.counts[group2]).astype(np.int64)
        codes = _pair_codes(groups.keys[index1], groups.keys[index2])
        _, first_seen = np.unique(codes, return_index=True)
        first_seen.sort()
        code_list = codes.tolist()
        fresh = [i for i in first_seen.tolist() if code_list[i] not in seen][:need]
        seen.update(code_list[i] for i in fresh)
        chosen1.append(index1[fresh])
        chosen2.append(index2[fresh])
        need -= len(fresh)
    return _make_pairs(groups, np.concatenate(chosen1), np.concatenate(chosen2), 0)


def _shuffled(pairs: Pairs, rng: np.random.Generator) -> Pairs:
    return pairs.select(rng.permutation(len(pairs)))


def sample_pairs(
    keys: np.ndarray,
    labels: np.ndarray,
    *,
    num_same: int,
    num_different: int,
    seed: int | np.random.Generator,
    identities: np.ndarray | None = None,
    exclude: Pairs | None = None,
    description: str = "the selected identities",
) -> Pairs:
    """Sample balanced random pairs among the images of ``identities``.

    Args:
        keys: record keys of all images.
        labels: identity id of each image, aligned with ``keys``.
        num_same: number of same-person pairs (label 1).
        num_different: number of different-person pairs (label 0).
        seed: seed or generator; the same seed and inputs give the same pairs.
        identities: restrict to these identities (one part of a split); all when None.
        exclude: pairs that must not be drawn again (for example mined hard pairs).
        description: names the identity set in error messages, e.g. "validation part".

    Returns:
        ``num_same + num_different`` distinct pairs in random order.

    Raises:
        ValueError: the identities cannot form that many distinct pairs.
    """
    if num_same < 0 or num_different < 0:
        raise ValueError(f"pair counts must be non-negative, got {num_same} same and {num_different} different")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    groups = _group(keys, labels, identities)
    excluded = np.unique(_pair_codes(exclude.key1, exclude.key2)) if exclude is not None else np.zeros(0, np.int64)
    same = sample_same_pairs(groups, num_same, rng, description=description, exclude=excluded)
    different = sample_different_pairs(groups, num_different, rng, description=description, exclude=excluded)
    pairs = _shuffled(Pairs.concatenate([same, different]), rng)
    logger.info(
        "sampled %d same-person and %d different-person pairs from %s",
        num_same, num_different, _describe(groups, description),
    )
    return pairs


def _top_k(values: np.ndarray, count: int, *, largest: bool) -> np.ndarray:
    """Indices of the ``count`` largest (or smallest) values, best first, ties by index."""
    count = min(count, len(values))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    signed = -values if largest else values
    part = np.argpartition(signed, count - 1)[:count] if count < len(values) else np.arange(len(values))
    return part[np.lexsort((part, signed[part]))]


def mine_hard_pairs(
    keys: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    *,
    num_same: int,
    num_different: int,
    identities: np.ndarray | None = None,
    block_size: int = 512,
) -> Pairs:
    """Mine the least similar same-person pairs and the most similar different-person pairs.

    Args:
        keys: record keys of all images.
        labels: identity id of each image, aligned with ``keys``.
        features: L2-normalized embeddings (N, D), aligned with ``keys``.
        num_same: number of hardest same-person pairs (lowest cosine).
        num_different: number of hardest different-person pairs (highest cosine).
        identities: restrict to these identities; all when None.
        block_size: rows per similarity block; memory is about block_size * N * 4 bytes.

    Returns:
        Distinct pairs, same-person ones first, each group hardest first.
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(keys):
        raise ValueError(f"features must have shape ({len(keys)}, D), got {features.shape}")
    groups = _group(keys, labels, identities)
    row_of_key = {int(k): i for i, k in enumerate(np.asarray(keys, dtype=np.int64).tolist())}
    rows = np.array([row_of_key[int(k)] for k in groups.keys], dtype=np.int64)
    feats = features[rows]

    if num_same > int(groups.same_capacity.sum()):
        raise ValueError(
            f"{_describe(groups, 'the selected identities')} can form only "
            f"{int(groups.same_capacity.sum())} same-person pairs, but {num_same} hard ones were requested"
        )
    # Least similar same-person pairs: each identity's pairs, then a global selection.
    same_scores, same1, same2 = [], [], []
    for g in np.flatnonzero(groups.counts >= 2):
        start, n = int(groups.starts[g]), int(groups.counts[g])
        first, second = np.triu_indices(n, k=1)
        block = feats[start:start + n]
        scores = np.einsum("ij,ij->i", block[first], block[second])
        keep = _top_k(scores, num_same, largest=False)
        same_scores.append(scores[keep])
        same1.append(start + first[keep])
        same2.append(start + second[keep])
    same = Pairs.empty()
    if same_scores and num_same:
        scores = np.concatenate(same_scores)
        keep = _top_k(scores, num_same, largest=False)
        same = _make_pairs(groups, np.concatenate(same1)[keep], np.concatenate(same2)[keep], 1)

    # Most similar different-person pairs: blocks of rows against later rows only,
    # so each unordered pair is scored once.
    best_scores = np.zeros(0, dtype=np.float32)
    best1 = best2 = np.zeros(0, dtype=np.int64)
    for start in range(0, len(feats), block_size):
        stop = min(start + block_size, len(feats))
        scores = feats[start:stop] @ feats.T
        row_index = np.arange(start, stop)[:, None]
        invalid = (np.arange(len(feats))[None, :] <= row_index) | (
            groups.labels[start:stop, None] == groups.labels[None, :]
        )
        scores[invalid] = -np.inf
        flat = _top_k(scores.ravel(), num_different, largest=True)
        flat = flat[np.isfinite(scores.ravel()[flat])]
        rows_in_block, columns = np.divmod(flat, len(feats))
        best_scores = np.concatenate([best_scores, scores.ravel()[flat]])
        best1 = np.concatenate([best1, start + rows_in_block])
        best2 = np.concatenate([best2, columns])
        keep = _top_k(best_scores, num_different, largest=True)
        best_scores, best1, best2 = best_scores[keep], best1[keep], best2[keep]
    if len(best_scores) < num_different:
        raise ValueError(
            f"{_describe(groups, 'the selected identities')} can form only {len(best_scores)} "
            f"different-person pairs, but {num_different} hard ones were requested"
        )
    different = _make_pairs(groups, best1, best2, 0)
    logger.info("mined %d hard same-person and %d hard different-person pairs", len(same), len(different))
    return Pairs.concatenate([same, different])
