"""Candidate pairs for active learning, mined from embeddings.

Asking about every pair of a pool is quadratic, so selection starts from a
few informative candidates per image:

- the nearest neighbours among images of other identities (the likeliest
  false matches),
- the farthest images of the image's own identity (the likeliest false
  non-matches),
- random pairs, half of the same identity and half of different ones, so
  that the candidates also hold pairs that mining would not pick.

The random control strategy draws uniformly from all candidates, the mined
ones included. It therefore selects mostly hard pairs and is a strong control,
not a sample of all possible pairs.

Nearest neighbours come from an exact blockwise search in numpy for small
pools, or from an approximate index (faiss HNSW when it is installed) or
scikit-learn's ``NearestNeighbors`` for large ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

SOURCE_NAMES = ("neighbour", "farthest", "random")
SOURCE_NEIGHBOUR, SOURCE_FARTHEST, SOURCE_RANDOM = range(3)

IndexKind = Literal["auto", "exact", "sklearn", "faiss"]
INDEX_KINDS = ("auto", "exact", "sklearn", "faiss")

# Above this many images "auto" leaves the exact search, which costs
# N * N * D multiply-adds (about 2.6e13 at 100,000 images of dimension 512).
EXACT_SEARCH_LIMIT = 50_000

# Memory for one block of the exact similarity matrix, in float32 values (256 MiB).
BLOCK_VALUES = 64 * 1024 * 1024


@dataclass
class Candidates:
    """Candidate pairs as row indices into one embedding matrix.

    Attributes:
        row1: int64 (M,) first row of each pair; always smaller than ``row2``.
        row2: int64 (M,) second row.
        source: int8 (M,) how the pair was found, an index into ``SOURCE_NAMES``.
    """

    row1: np.ndarray
    row2: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.row1)

    def source_names(self) -> np.ndarray:
        """Return the source of each pair as a string array."""
        return np.asarray(SOURCE_NAMES)[self.source]

    def counts(self) -> dict[str, int]:
        """Return the number of pairs from each source."""
        return {name: int(np.sum(self.source == code)) for code, name in enumerate(SOURCE_NAMES)}


def _check_inputs(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {features.shape}")
    if len(features) != len(labels):
        raise ValueError(f"features has {len(features)} rows but labels {len(labels)}; pass one label per row")
    norms = np.linalg.norm(features, axis=1)
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(
            "features must be L2-normalized (cosine similarity is their dot product); "
            f"row norms range from {norms.min():.4f} to {norms.max():.4f}"
        )
    return features, labels


def _top_k_masked(similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the columns and values of the ``k`` largest entries per row, in descending order."""
    k = min(k, similarities.shape[1])
    columns = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(similarities, columns, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1), np.take_along_axis(values, order, axis=1)


def exact_other_identity_neighbours(
    features: np.ndarray, labels: np.ndarray, k: int, *, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Find each row's ``k`` most similar rows of other identities by exact search.

    Returns:
        ``(rows, similarities)``, both (N, k); a slot is -1 (with similarity
        -inf) where fewer than ``k`` rows of other identities exist.
    """
    features, labels = _check_inputs(features, labels)
    count = len(features)
    rows = np.full((count, k), -1, dtype=np.int64)
    values = np.full((count, k), -np.inf, dtype=np.float32)
    if count == 0 or k == 0:
        return rows, values
    if block_rows is None:
        block_rows = max(1, BLOCK_VALUES // max(count, 1))
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        similarities = features[start:stop] @ features.T  # (block, N)
        similarities[labels[start:stop, None] == labels[None, :]] = -np.inf
        columns, top = _top_k_masked(similarities, k)
        found = np.isfinite(top)
        rows[start:stop, : columns.shape[1]] = np.where(found, columns, -1)
        values[start:stop, : columns.shape[1]] = top
    return rows, values


def _filter_same_identity(
    labels: np.ndarray, query_rows: np.ndarray, found: np.ndarray, similarities: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the first ``k`` results per query row whose identity differs; report rows left short."""
    valid = (found >= 0) & (labels[np.clip(found, 0, None)] != labels[query_rows, None])
    rows = np.full((len(query_rows), k), -1, dtype=np.int64)
    values = np.full((len(query_rows), k), -np.inf, dtype=np.float32)
    # Stable sort moves the valid results to the front and keeps their similarity order.
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(valid, order, axis=1)
    width = order.shape[1]
    rows[:, :width] = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
    values[:, :width] = np.where(kept, np.take_along_axis(similarities, order, axis=1), -np.inf)
    short = kept.sum(axis=1) < k
    return rows, values, short


class _IndexSearch:
    """Widening k-NN search over an index, until every row has ``k`` neighbours of other identities."""

    def __init__(self, search, count: int, labels: np.ndarray) -> None:
        self.search = search  # callable(query_rows, width) -> (found rows, similarities)
        self.count = count
        self.labels = labels

    def run(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.full((self.count, k), -1, dtype=np.int64)
        values = np.full((self.count, k), -np.inf, dtype=np.float32)
        pending = np.arange(self.count)
        _, class_sizes = np.unique(self.labels, return_counts=True)
        largest_class = int(class_sizes.max()) if len(class_sizes) else 0
        width = k + min(largest_class, 16)
        while len(pending):
            width = min(width, self.count)
            found, similarities = self.search(pending, width)
            found_rows, found_values, short = _filter_same_identity(self.labels, pending, found, similarities, k)
            rows[pending] = found_rows
            values[pending] = found_values
            # A row is done when it has k results, or when the search already
            # covered every row that could be among its neighbours.
            exhausted = width >= min(self.count, k + largest_class)
            if exhausted:
                break
            pending = pending[short]
            width *= 2
        return rows, values


def _sklearn_search(features: np.ndarray, workers: int):
    from sklearn.neighbors import NearestNeighbors

    # Euclidean distance on unit vectors orders pairs exactly as cosine similarity does.
    model = NearestNeighbors(algorithm="brute", metric="euclidean", n_jobs=workers).fit(features)

    def search(query_rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        distances, found = model.kneighbors(features[query_rows], n_neighbors=width)
        return found.astype(np.int64), (1.0 - distances.astype(np.float32) ** 2 / 2.0)

    return search


def faiss_available() -> bool:
    """Return whether the optional ``faiss`` package is importable."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_search(features: np.ndarray, *, hnsw_neighbours: int = 32, ef_search: int = 128):
    import faiss

    index = faiss.IndexHNSWFlat(features.shape[1], hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = ef_search
    index.add(np.ascontiguousarray(features, dtype=np.float32))

    def search(query_rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        index.hnsw.efSearch = max(ef_search, width)
        similarities, found = index.search(np.ascontiguousarray(features[query_rows]), width)
        return found.astype(np.int64), similarities.astype(np.float32)

    return search


def resolve_index_kind(kind: IndexKind, count: int) -> str:
    """Return the search actually used for ``kind`` on ``count`` images ("auto" decides by size)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown nearest-neighbour index {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    if kind == "faiss" and not faiss_available():
        raise ValueError("index 'faiss' was requested but faiss is not installed; pip install faiss-cpu or use 'sklearn'")
    if kind != "auto":
        return kind
    if count <= EXACT_SEARCH_LIMIT:
        return "exact"
    return "faiss" if faiss_available() else "sklearn"


def other_identity_neighbours(
    features: np.ndarray, labels: np.ndarray, k: int, *, index: IndexKind = "auto", workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Find each row's ``k`` most similar rows of other identities.

    Args:
        features: (N, D) L2-normalized embeddings.
        labels: (N,) identity of each row.
        k: neighbours per row.
        index: "exact" (blockwise numpy), "sklearn" (brute-force ``NearestNeighbors``
            with bounded memory), "faiss" (approximate HNSW), or "auto".
        workers: threads for scikit-learn.

    Returns:
        ``(rows, similarities)``, both (N, k), most similar first; -1 and -inf
        fill slots that could not be filled.
    """
    features, labels = _check_inputs(features, labels)
    kind = resolve_index_kind(index, len(features))
    logger.debug("nearest neighbours of %d images by %s search", len(features), kind)
    if kind == "exact":
        return exact_other_identity_neighbours(features, labels, k)
    search = _sklearn_search(features, workers) if kind == "sklearn" else _faiss_search(features)
    return _IndexSearch(search, len(features), labels).run(k)


def farthest_same_identity(features: np.ndarray, labels: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Find each row's ``m`` least similar rows of its own identity.

    Returns:
        ``(rows, similarities)``, both (N, m), least similar first; -1 and +inf
        fill the slots of identities with fewer than ``m + 1`` images.
    """
    features, labels = _check_inputs(features, labels)
    count = len(features)
    rows = np.full((count, m), -1, dtype=np.int64)
    values = np.full((count, m), np.inf, dtype=np.float32)
    if m == 0:
        return rows, values
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, boundaries):
        if len(members) < 2:
            continue
        group = features[members]
        similarities = group @ group.T
        np.fill_diagonal(similarities, np.inf)
        width = min(m, len(members) - 1)
        columns, negated = _top_k_masked(-similarities, width)
        rows[members, :width] = members[columns]
        values[members, :width] = -negated
    return rows, values


def random_pairs(labels: np.ndarray, count: int, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw about ``count`` random pairs of distinct rows, half same identity and half different.

    Repeated draws are removed, so fewer pairs come back when the pool is small.
    """
    labels = np.asarray(labels).reshape(-1)
    if count <= 0 or len(labels) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g for g in np.split(order, boundaries) if len(g) >= 2]

    first, second = [], []
    same_count = count // 2 if groups else 0
    if same_count:
        # Identities are drawn in proportion to their images, as a random image would be.
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        chosen = rng.choice(len(groups), size=same_count, p=sizes / sizes.sum())
        for group_index in chosen:
            a, b = rng.choice(groups[group_index], size=2, replace=False)
            first.append(a)
            second.append(b)
    different_count = count - same_count
    if len(np.unique(labels)) >= 2:
        a = rng.integers(0, len(labels), size=4 * different_count)
        b = rng.integers(0, len(labels), size=4 * different_count)
        keep = np.flatnonzero(labels[a] != labels[b])[:different_count]
        first.extend(a[keep])
        second.extend(b[keep])
    return np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)


def _canonical_unique(
    first: np.ndarray, second: np.ndarray, source: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order each pair (smaller row first), drop self pairs and keep one of each pair.

    When a pair was found several ways it keeps the lowest source code
    (neighbour before farthest before random).
    """
    keep = (first >= 0) & (second >= 0) & (first != second)
    low = np.minimum(first, second)[keep]
    high = np.maximum(first, second)[keep]
    source = source[keep]
    order = np.lexsort((source, high, low))
    low, high, source = low[order], high[order], source[order]
    first_of_pair = np.ones(len(low), dtype=bool)
    first_of_pair[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
    return low[first_of_pair], high[first_of_pair], source[first_of_pair]


def mine_candidates(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    neighbours: int = 5,
    farthest: int = 2,
    random_count: int = 1000,
    seed: int = 0,
    index: IndexKind = "auto",
    workers: int = 1,
) -> Candidates:
    """Mine candidate pairs from embeddings of one identity-labelled pool.

    Args:
        features: (N, D) L2-normalized embeddings.
        labels: (N,) identity of each row.
        neighbours: nearest other-identity images per image.
        farthest: farthest same-identity images per image.
        random_count: random pairs added (half same identity, half different).
        seed: seeds the random pairs.
        index: nearest-neighbour search, see :func:`other_identity_neighbours`.
        workers: threads for the scikit-learn search.

    Returns:
        Distinct pairs, each once with the smaller row first, sorted by rows.
    """
    features, labels = _check_inputs(features, labels)
    for name, value in (("neighbours", neighbours), ("farthest", farthest), ("random_count", random_count)):
        if value < 0:
            raise ValueError(f"{name} must be zero or positive, got {value}")
    count = len(features)
    rng = np.random.default_rng(seed)
    near_rows, _ = other_identity_neighbours(features, labels, neighbours, index=index, workers=workers)
    far_rows, _ = farthest_same_identity(features, labels, farthest)
    random_first, random_second = random_pairs(labels, random_count, rng=rng)

    anchors = np.arange(count, dtype=np.int64)
    first = np.concatenate([np.repeat(anchors, neighbours), np.repeat(anchors, farthest), random_first])
    second = np.concatenate([near_rows.reshape(-1), far_rows.reshape(-1), random_second])
    source = np.concatenate(
        [
            np.full(count * neighbours, SOURCE_NEIGHBOUR, dtype=np.int8),
            np.full(count * farthest, SOURCE_FARTHEST, dtype=np.int8),
            np.full(len(random_first), SOURCE_RANDOM, dtype=np.int8),
        ]
    )
    row1, row2, source = _canonical_unique(first, second, source)
    candidates = Candidates(row1, row2, source)
    logger.info("mined %d candidate pairs from %d images: %s", len(candidates), count, candidates.counts())
    return candidates
