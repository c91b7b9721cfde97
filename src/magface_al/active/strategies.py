"""Selection strategies: which candidate pairs to ask a person about next.

Every strategy works on plain arrays with one entry per candidate pair:
the cosine ``scores`` of the current model, ``same_identity`` (whether the
dataset's identity annotation puts both faces under one identity), the pair ``quality``
(the smaller MagFace magnitude of the two faces), and the rows of both
images in an embedding matrix. Pairs that already carry a label are removed
before any strategy ranks, so a pair is never asked twice.

Strategies:
    random: a uniform sample of the candidates; the control.
    uncertainty: scores nearest the calibrated threshold first.
    hard: pairs on which the model most strongly contradicts the identity
        annotation first (different identities scored far above the threshold,
        same identity far below it).
    quality: uncertainty ranking with the MagFace magnitude: ``skip`` drops pairs
        with an unrecognisable face (magnitude below a quantile of the pool),
        ``prefer`` asks about those pairs first.
    diversity: uncertainty ranking without near-duplicate questions: no image
        is used more than ``max_pairs_per_image`` times in a batch, and a pair
        whose two faces are both near-identical to an already chosen pair's
        faces is skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from magface_al.active.candidates import Candidates

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "uncertainty", "hard", "quality", "diversity")
QUALITY_MODES = ("skip", "prefer")

Strategy = Literal["random", "uncertainty", "hard", "quality", "diversity"]


@dataclass
class SelectionParams:
    """Options of :func:`select_batch`.

    Attributes:
        strategy: one of ``STRATEGIES``.
        batch_size: pairs to select.
        quality_mode: "skip" or "prefer" pairs with a low-quality face (strategy "quality").
        quality_quantile: magnitudes below this quantile of the pool's images count as low quality.
        diversity_similarity: cosine at or above which two faces count as near-duplicates.
        max_pairs_per_image: times one image may appear in a batch (strategy "diversity").
        seed: seeds the random strategy.
    """

    strategy: str = "uncertainty"
    batch_size: int = 100
    quality_mode: str = "skip"
    quality_quantile: float = 0.1
    diversity_similarity: float = 0.9
    max_pairs_per_image: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if self.quality_mode not in QUALITY_MODES:
            raise ValueError(f"unknown quality_mode {self.quality_mode!r}; expected one of {', '.join(QUALITY_MODES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.quality_quantile < 1.0:
            raise ValueError(f"quality_quantile must be in [0, 1), got {self.quality_quantile}")
        if not -1.0 <= self.diversity_similarity <= 1.0:
            raise ValueError(f"diversity_similarity is a cosine in [-1, 1], got {self.diversity_similarity}")
        if self.max_pairs_per_image < 1:
            raise ValueError(f"max_pairs_per_image must be at least 1, got {self.max_pairs_per_image}")


# -- labelled pairs ----------------------------------------------------------


def pair_codes(key1: np.ndarray, key2: np.ndarray) -> np.ndarray:
    """Encode unordered key pairs as int64 codes, so that (a, b) and (b, a) get the same code."""
    key1 = np.asarray(key1, dtype=np.int64).reshape(-1)
    key2 = np.asarray(key2, dtype=np.int64).reshape(-1)
    if len(key1) and (min(key1.min(), key2.min()) < 0 or max(key1.max(), key2.max()) >= 2**31):
        raise ValueError("record keys must lie in [0, 2**31) to be encoded as pair codes")
    return (np.minimum(key1, key2) << 32) | np.maximum(key1, key2)


def unlabelled_mask(
    key1: np.ndarray, key2: np.ndarray, labelled_key1: np.ndarray, labelled_key2: np.ndarray
) -> np.ndarray:
    """Return True for each pair (key1, key2) that is not among the labelled pairs, in either order."""
    return ~np.isin(pair_codes(key1, key2), pair_codes(labelled_key1, labelled_key2))


# -- rankings ----------------------------------------------------------------


def rank_random(count: int, rng: np.random.Generator) -> np.ndarray:
    """Return a uniformly random order of ``count`` candidates."""
    return rng.permutation(count)


def rank_uncertainty(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Order candidates by the distance of their score from ``threshold``, nearest first."""
    distance = np.abs(np.asarray(scores, dtype=np.float64) - threshold)
    return np.argsort(distance, kind="stable")


def hardness(scores: np.ndarray, threshold: float, same_identity: np.ndarray) -> np.ndarray:
    """Return how strongly the model contradicts the identity annotation, per pair.

    Positive values are errors at ``threshold``: a different-identity pair
    scored ``h`` above the threshold, or a same-identity pair ``h`` below it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    sign = np.where(np.asarray(same_identity, dtype=bool), -1.0, 1.0)
    return sign * (scores - threshold)


def rank_hard(scores: np.ndarray, threshold: float, same_identity: np.ndarray) -> np.ndarray:
    """Order candidates by :func:`hardness`, most confusing first."""
    return np.argsort(-hardness(scores, threshold, same_identity), kind="stable")


def quality_cutoff(image_magnitudes: np.ndarray, quantile: float) -> float:
    """Return the magnitude below which a face counts as low quality: a quantile of the pool's images."""
    magnitudes = np.asarray(image_magnitudes, dtype=np.float64)
    if len(magnitudes) == 0:
        raise ValueError("cannot compute a quality cutoff from no magnitudes")
    return float(np.quantile(magnitudes, quantile))


def rank_quality(
    scores: np.ndarray, threshold: float, quality: np.ndarray, cutoff: float, mode: str
) -> np.ndarray:
    """Order candidates by uncertainty, skipping or preferring pairs with quality below ``cutoff``.

    With ``mode="skip"`` the low-quality pairs are left out of the order
    entirely, so it can be shorter than the candidate list.
    """
    if mode not in QUALITY_MODES:
        raise ValueError(f"unknown quality mode {mode!r}; expected one of {', '.join(QUALITY_MODES)}")
    order = rank_uncertainty(scores, threshold)
    low = np.asarray(quality)[order] < cutoff
    if mode == "skip":
        return order[~low]
    return np.concatenate([order[low], order[~low]])


def select_diverse(
    order: np.ndarray,
    rows1: np.ndarray,
    rows2: np.ndarray,
    features: np.ndarray,
    batch_size: int,
    *,
    similarity: float = 0.9,
    max_pairs_per_image: int = 1,
) -> np.ndarray:
    """Walk ``order`` and keep pairs that are not near-duplicates of pairs already kept.

    A pair (a, b) duplicates a kept pair (c, d) when both of its faces are
    near-identical to the kept pair's faces: cos(a, c) and cos(b, d), or
    cos(a, d) and cos(b, c), at or above ``similarity``.

    Returns:
        Up to ``batch_size`` candidate indices, in the order they were kept.
    """
    rows1 = np.asarray(rows1)
    rows2 = np.asarray(rows2)
    chosen: list[int] = []
    kept1 = np.zeros((batch_size, features.shape[1]), dtype=np.float32)
    kept2 = np.zeros_like(kept1)
    uses: dict[int, int] = {}
    for candidate in np.asarray(order).tolist():
        if len(chosen) == batch_size:
            break
        first, second = int(rows1[candidate]), int(rows2[candidate])
        if uses.get(first, 0) >= max_pairs_per_image or uses.get(second, 0) >= max_pairs_per_image:
            continue
        count = len(chosen)
        if count:
            face1 = features[first]
            face2 = features[second]
            straight = (kept1[:count] @ face1 >= similarity) & (kept2[:count] @ face2 >= similarity)
            crossed = (kept2[:count] @ face1 >= similarity) & (kept1[:count] @ face2 >= similarity)
            if np.any(straight | crossed):
                continue
        kept1[count] = features[first]
        kept2[count] = features[second]
        chosen.append(candidate)
        uses[first] = uses.get(first, 0) + 1
        uses[second] = uses.get(second, 0) + 1
    return np.asarray(chosen, dtype=np.int64)


# -- the dispatcher ----------------------------------------------------------


def select_batch(
    params: SelectionParams,
    *,
    scores: np.ndarray,
    threshold: float,
    same_identity: np.ndarray,
    quality: np.ndarray,
    rows1: np.ndarray,
    rows2: np.ndarray,
    features: np.ndarray,
    image_magnitudes: np.ndarray,
    available: np.ndarray | None = None,
) -> np.ndarray:
    """Choose the next batch of candidates to ask about.

    Args:
        params: the strategy and its options.
        scores: (M,) cosine similarity of each candidate under the current model.
        threshold: the calibrated decision threshold.
        same_identity: (M,) bool, whether the dataset annotates both faces as one identity.
        quality: (M,) pair quality, the smaller magnitude of the two faces.
        rows1, rows2: (M,) rows of the two faces in ``features``.
        features: (N, D) L2-normalized embeddings of the pool.
        image_magnitudes: (N,) magnitudes of the pool's images (for the quality cutoff).
        available: (M,) bool, False for candidates that already carry a label;
            those are never selected.

    Returns:
        Up to ``params.batch_size`` candidate indices in asking order.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    count = len(scores)
    for name, values in (("same_identity", same_identity), ("quality", quality), ("rows1", rows1), ("rows2", rows2)):
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries but scores {count}; pass one per candidate")
    if available is None:
        available = np.ones(count, dtype=bool)
    available = np.asarray(available, dtype=bool)
    if len(available) != count:
        raise ValueError(f"available has {len(available)} entries but scores {count}")

    open_rows = np.flatnonzero(available)
    sub = {
        "scores": scores[open_rows],
        "same_identity": np.asarray(same_identity)[open_rows],
        "quality": np.asarray(quality)[open_rows],
        "rows1": np.asarray(rows1)[open_rows],
        "rows2": np.asarray(rows2)[open_rows],
    }
    strategy = params.strategy
    if strategy == "random":
        order = rank_random(len(open_rows), np.random.default_rng(params.seed))
    elif strategy == "uncertainty":
        order = rank_uncertainty(sub["scores"], threshold)
    elif strategy == "hard":
        order = rank_hard(sub["scores"], threshold, sub["same_identity"])
    elif strategy == "quality":
        cutoff = quality_cutoff(image_magnitudes, params.quality_quantile)
        order = rank_quality(sub["scores"], threshold, sub["quality"], cutoff, params.quality_mode)
    else:
        order = rank_uncertainty(sub["scores"], threshold)
        order = select_diverse(
            order,
            sub["rows1"],
            sub["rows2"],
            np.asarray(features, dtype=np.float32),
            params.batch_size,
            similarity=params.diversity_similarity,
            max_pairs_per_image=params.max_pairs_per_image,
        )
    chosen = open_rows[order[: params.batch_size]]
    if len(chosen) < params.batch_size:
        logger.warning(
            "strategy %s found only %d of %d requested pairs among %d unlabelled candidates",
            strategy, len(chosen), params.batch_size, len(open_rows),
        )
    return chosen


# -- selection from embeddings -------------------------------------------------


@dataclass
class Selection:
    """Selected pairs in asking order: record keys, identities, scores and quality.

    Attributes:
        key1, key2: int64 (B,) record keys.
        identity1, identity2: int64 (B,) identity ids from the dataset's annotation.
        score: float64 (B,) cosine similarity under the current model.
        quality: float64 (B,) the smaller magnitude of the two faces.
        mined_by: (B,) str, the candidate source ("neighbour", "farthest", "random").
    """

    key1: np.ndarray
    key2: np.ndarray
    identity1: np.ndarray
    identity2: np.ndarray
    score: np.ndarray
    quality: np.ndarray
    mined_by: np.ndarray

    def __len__(self) -> int:
        return len(self.key1)

    def records(self, images: Any | None = None) -> list[dict[str, Any]]:
        """Return one JSON-ready record per pair, the layout ``magface-al label`` reads.

        Args:
            images: an optional :class:`magface_al.pairs.feedback.ImageIndex`;
                with it, ``image1``/``image2`` are manifest file names and
                ``identity1``/``identity2`` identity names.
        """
        records = []
        for i in range(len(self)):
            key1, key2 = int(self.key1[i]), int(self.key2[i])
            record: dict[str, Any] = {"key1": key1, "key2": key2}
            if images is not None and key1 in images and key2 in images:
                first, second = images.info(key1), images.info(key2)
                record.update(
                    image1=first.source_file, image2=second.source_file,
                    identity1=first.identity, identity2=second.identity,
                )
            else:
                record.update(
                    image1=str(key1), image2=str(key2),
                    identity1=int(self.identity1[i]), identity2=int(self.identity2[i]),
                )
            record.update(
                score=round(float(self.score[i]), 6),
                quality=round(float(self.quality[i]), 4),
                mined_by=str(self.mined_by[i]),
            )
            records.append(record)
        return records


def select_from_embeddings(
    keys: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    magnitudes: np.ndarray,
    *,
    threshold: float,
    params: SelectionParams,
    candidates: Candidates,
    labelled_key1: np.ndarray | None = None,
    labelled_key2: np.ndarray | None = None,
) -> Selection:
    """Score mined candidates with the current embeddings and choose the next batch.

    Args:
        keys, labels, features, magnitudes: the pool's embeddings, rows aligned
            (the layout of :class:`magface_al.embedding.Embeddings`).
        threshold: the calibrated decision threshold of the current model.
        params: the strategy and its options.
        candidates: pairs of rows mined by :func:`magface_al.active.candidates.mine_candidates`.
        labelled_key1, labelled_key2: record keys of pairs that already carry a
            label; none of them is selected again.
    """
    keys = np.asarray(keys, dtype=np.int64)
    labels = np.asarray(labels)
    features = np.asarray(features, dtype=np.float32)
    magnitudes = np.asarray(magnitudes, dtype=np.float64)
    rows1, rows2 = candidates.row1, candidates.row2
    scores = np.sum(features[rows1] * features[rows2], axis=1, dtype=np.float64)
    quality = np.minimum(magnitudes[rows1], magnitudes[rows2])
    available = None
    if labelled_key1 is not None and labelled_key2 is not None and len(labelled_key1):
        available = unlabelled_mask(keys[rows1], keys[rows2], labelled_key1, labelled_key2)
    chosen = select_batch(
        params,
        scores=scores,
        threshold=threshold,
        same_identity=labels[rows1] == labels[rows2],
        quality=quality,
        rows1=rows1,
        rows2=rows2,
        features=features,
        image_magnitudes=magnitudes,
        available=available,
    )
    return Selection(
        key1=keys[rows1[chosen]],
        key2=keys[rows2[chosen]],
        identity1=labels[rows1[chosen]].astype(np.int64),
        identity2=labels[rows2[chosen]].astype(np.int64),
        score=scores[chosen],
        quality=quality[chosen],
        mined_by=candidates.source_names()[chosen],
    )
