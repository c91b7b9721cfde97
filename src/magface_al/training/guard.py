"""The no-degradation guard: promote a fine-tuned model only if a general benchmark did not get worse.

Fine-tuning on a few hundred feedback pairs can improve those identities
while hurting faces in general. Before promotion, the pretrained and the
fine-tuned model are scored on the same general benchmark pairs (an LFW-style
``pairs.txt`` over a RecordIO folder, an InsightFace ``.bin``, or held-out
pairs of the user's own data). If the fine-tuned accuracy is lower than the
pretrained one by more than a tolerance on any benchmark, the fine-tuned
model is not promoted and later stages use the pretrained one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magface_al.evaluation.verification import kfold_accuracy
from magface_al.pairs.table import Pairs
from magface_al.training.feature_cache import TrunkHeadSplit, shares_trunk, trunk_outputs

logger = logging.getLogger(__name__)


@dataclass
class GuardBenchmark:
    """One general benchmark as decoded images and index pairs into them.

    Attributes:
        name: shown in metrics, e.g. ``orl`` or ``lfw-outside-feedback``.
        images: uint8 BGR faces (M, H, W, 3).
        first: index into ``images`` of each pair's first face, int64 (N,).
        second: index into ``images`` of each pair's second face, int64 (N,).
        labels: 1 same person, 0 different, int64 (N,).
    """

    name: str
    images: np.ndarray
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.first = np.asarray(self.first, dtype=np.int64)
        self.second = np.asarray(self.second, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not len(self.first) == len(self.second) == len(self.labels):
            raise ValueError(f"benchmark {self.name!r}: pair columns differ in length")
        if len(self.labels) and (max(self.first.max(), self.second.max()) >= len(self.images)):
            raise ValueError(f"benchmark {self.name!r}: a pair refers to an image index beyond {len(self.images)}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class BenchmarkComparison:
    """Accuracy of both models on one benchmark, in percent."""

    name: str
    pairs: int
    pretrained_accuracy: float
    finetuned_accuracy: float

    @property
    def delta_points(self) -> float:
        """Fine-tuned minus pretrained accuracy, in percentage points."""
        return self.finetuned_accuracy - self.pretrained_accuracy

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping."""
        return {
            "name": self.name,
            "pairs": self.pairs,
            "pretrained_accuracy": round(self.pretrained_accuracy, 4),
            "finetuned_accuracy": round(self.finetuned_accuracy, 4),
            "delta_points": round(self.delta_points, 4),
        }


@dataclass
class GuardResult:
    """The promotion decision with its reason and the per-benchmark figures."""

    promoted: bool
    reason: str
    tolerance_points: float
    benchmarks: list[BenchmarkComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping for the metrics file."""
        return {
            "promoted": self.promoted,
            "reason": self.reason,
            "tolerance_points": self.tolerance_points,
            "benchmarks": [b.to_dict() for b in self.benchmarks],
        }


def benchmark_from_pairs(name: str, dataset: Any, pairs: Pairs) -> GuardBenchmark:
    """Build a benchmark from pairs over a face dataset (``image(key)``), each image decoded once.

    The pairs are scored against ``pairs.true_labels``.
    """
    keys = pairs.keys
    row = {int(k): i for i, k in enumerate(keys.tolist())}
    images = np.stack([dataset.image(int(k)) for k in keys.tolist()]) if len(keys) else np.zeros((0, 112, 112, 3), np.uint8)
    first = np.array([row[int(k)] for k in pairs.key1.tolist()], dtype=np.int64)
    second = np.array([row[int(k)] for k in pairs.key2.tolist()], dtype=np.int64)
    return GuardBenchmark(name, images, first, second, pairs.true_labels)


GUARD_KINDS = ("lfw_pairs", "bin", "pairs_csv", "sampled")


@dataclass
class GuardSource:
    """The source of one general benchmark, as written in the guard params.

    Attributes:
        name: shown in metrics.
        kind: ``lfw_pairs`` (an LFW-style ``pairs.txt`` resolved through the
            ``manifest.csv`` of the RecordIO folder ``images``), ``bin`` (an
            InsightFace verification ``.bin``), ``pairs_csv`` (a pairs CSV of
            this project over ``images``) or ``sampled`` (balanced pairs drawn
            with ``seed`` among all identities of ``images``).
        path: the ``pairs.txt``, ``.bin`` or CSV file; unused for ``sampled``.
        images: the RecordIO dataset folder; unused for ``bin``.
        exclude_feedback_identities: leave out pairs with an identity of the
            feedback pool (only meaningful when ``images`` is the folder the
            feedback pairs come from, since identity ids are compared).
        num_same: same-person pairs for ``sampled``.
        num_different: different-person pairs for ``sampled``.
        seed: seed for ``sampled``.
    """

    name: str
    kind: str
    path: str = ""
    images: str = ""
    exclude_feedback_identities: bool = False
    num_same: int = 1000
    num_different: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GUARD_KINDS:
            raise ValueError(
                f"guard benchmark {self.name!r}: invalid kind {self.kind!r}; expected one of {', '.join(GUARD_KINDS)}"
            )
        if self.kind != "sampled" and not self.path:
            raise ValueError(f"guard benchmark {self.name!r}: kind {self.kind!r} needs a path to its pairs file")
        if self.kind != "bin" and not self.images:
            raise ValueError(f"guard benchmark {self.name!r}: kind {self.kind!r} needs the RecordIO folder in images")


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{where}: an image does not decode; the file is damaged, copy it again")
    return image


def load_guard_benchmark(source: GuardSource, *, feedback_identities: np.ndarray | None = None) -> GuardBenchmark:
    """Read one general benchmark described by ``source``.

    Args:
        source: The benchmark description from the params.
        feedback_identities: Identity ids of the feedback pool, left out when
            ``source.exclude_feedback_identities`` is set.

    Returns:
        The benchmark's images and pairs.
    """
    from magface_al.data.benchmarks import load_bin, read_lfw_pairs
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.pairs.sampling import sample_pairs
    from magface_al.pairs.table import read_pairs_csv

    if source.kind == "bin":
        encoded, same = load_bin(source.path)
        images = np.stack([_decode_jpeg(data, source.path) for data in encoded])
        index = np.arange(len(same), dtype=np.int64)
        return GuardBenchmark(source.name, images, 2 * index, 2 * index + 1, same.astype(np.int64))

    dataset = FaceRecordDataset(source.images)
    if source.kind == "lfw_pairs":
        resolved = read_lfw_pairs(source.path, source.images, skip_missing=True)
        key1 = np.array([int(first) for first, _, _ in resolved], dtype=np.int64)
        key2 = np.array([int(second) for _, second, _ in resolved], dtype=np.int64)
        labels = np.array([int(same) for _, _, same in resolved], dtype=np.int64)
        identity1 = np.array([dataset.label_of(int(k)) for k in key1], dtype=np.int64)
        identity2 = np.array([dataset.label_of(int(k)) for k in key2], dtype=np.int64)
        pairs = Pairs(key1, key2, labels, identity1, identity2)
    elif source.kind == "pairs_csv":
        pairs = read_pairs_csv(source.path)
    else:
        pairs = sample_pairs(dataset.keys, dataset.labels, num_same=source.num_same,
                             num_different=source.num_different, seed=source.seed,
                             description=f"guard benchmark {source.name!r}")
    if source.exclude_feedback_identities:
        if feedback_identities is None:
            raise ValueError(
                f"guard benchmark {source.name!r} excludes the feedback pool, but no feedback identities were given"
            )
        outside = ~(np.isin(pairs.identity1, feedback_identities) | np.isin(pairs.identity2, feedback_identities))
        logger.info("guard benchmark %s: kept %d of %d pairs whose identities are outside the feedback pool",
                    source.name, int(outside.sum()), len(pairs))
        pairs = pairs.select(np.flatnonzero(outside))
    return benchmark_from_pairs(source.name, dataset, pairs)


def decide_promotion(comparisons: list[BenchmarkComparison], tolerance_points: float) -> GuardResult:
    """Decide whether the fine-tuned model may replace the pretrained one.

    Args:
        comparisons: Accuracy of both models per benchmark.
        tolerance_points: Largest accepted drop in accuracy, in percentage
            points, on each benchmark.

    Returns:
        ``promoted`` is false when there is no benchmark or when any benchmark
        dropped by more than the tolerance; ``reason`` names the benchmark and figures.
    """
    if tolerance_points < 0:
        raise ValueError(f"guard tolerance must not be negative, got {tolerance_points} points")
    if not comparisons:
        return GuardResult(
            promoted=False,
            reason="no general benchmark was given, so the fine-tuned model cannot be shown not to degrade; "
            "name a benchmark in the guard params",
            tolerance_points=tolerance_points,
        )
    # A tiny epsilon keeps a drop of exactly the tolerance (up to rounding) accepted.
    failed = [c for c in comparisons if c.delta_points < -tolerance_points - 1e-9]
    if failed:
        details = "; ".join(
            f"{c.name}: {c.finetuned_accuracy:.2f}% vs pretrained {c.pretrained_accuracy:.2f}% "
            f"({c.delta_points:+.2f} points)"
            for c in failed
        )
        reason = f"accuracy dropped by more than {tolerance_points:g} points on {details}; the pretrained model is kept"
        return GuardResult(False, reason, tolerance_points, comparisons)
    details = "; ".join(f"{c.name}: {c.delta_points:+.2f} points" for c in comparisons)
    reason = f"no benchmark dropped by more than {tolerance_points:g} points ({details})"
    return GuardResult(True, reason, tolerance_points, comparisons)


@torch.no_grad()
def benchmark_scores(
    model: nn.Module, spec: Any, benchmark: GuardBenchmark, *, batch_size: int = 64, device: torch.device | None = None
) -> np.ndarray:
    """Return the cosine similarity of every benchmark pair under ``model``."""
    from magface_al.embedding import embed_images

    features, _ = embed_images(model, spec, benchmark.images, batch_size=batch_size, device=device)
    features = np.asarray(features, dtype=np.float64)
    return np.einsum("ij,ij->i", features[benchmark.first], features[benchmark.second])


def _head_scores(split: TrunkHeadSplit, trunk: torch.Tensor, benchmark: GuardBenchmark, batch_size: int) -> np.ndarray:
    split.model.eval()
    with torch.no_grad():
        raw = torch.cat([split.head(trunk[i:i + batch_size]) for i in range(0, len(trunk), batch_size)])
    features = F.normalize(raw.double(), dim=1).cpu().numpy()
    return np.einsum("ij,ij->i", features[benchmark.first], features[benchmark.second])


def _score_both(
    pretrained: nn.Module, finetuned: nn.Module, spec: Any, benchmark: GuardBenchmark, *,
    shared_trunk_part: str | None, batch_size: int, device: torch.device | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score the benchmark under both models, running a shared frozen trunk only once."""
    if shared_trunk_part is not None:
        splits = [TrunkHeadSplit(m, spec.arch, shared_trunk_part) for m in (pretrained, finetuned)]
        if shares_trunk(*splits):
            trunk = trunk_outputs(splits[0], spec, benchmark.images, batch_size=batch_size, device=device)
            return tuple(_head_scores(split, trunk, benchmark, batch_size) for split in splits)  # type: ignore[return-value]
        logger.warning("the two models differ in the trunk of part %r; scoring each model in full", shared_trunk_part)
    return tuple(  # type: ignore[return-value]
        benchmark_scores(m, spec, benchmark, batch_size=batch_size, device=device) for m in (pretrained, finetuned)
    )


def run_guard(
    pretrained: nn.Module,
    finetuned: nn.Module,
    spec: Any,
    benchmarks: list[GuardBenchmark],
    *,
    tolerance_points: float,
    folds: int = 10,
    batch_size: int = 64,
    device: torch.device | None = None,
    shared_trunk_part: str | None = None,
) -> GuardResult:
    """Score both models on every benchmark and decide the promotion.

    Accuracy is the standard verification protocol: the threshold is chosen on
    ``folds - 1`` folds and accuracy measured on the remaining one, averaged.
    With ``shared_trunk_part`` (the fine-tuning part, ``head`` or
    ``last_stage``) and identical trunk weights, the trunk runs once per image.
    """
    comparisons = []
    for benchmark in benchmarks:
        scores = _score_both(pretrained, finetuned, spec, benchmark, shared_trunk_part=shared_trunk_part,
                             batch_size=batch_size, device=device)
        accuracies = [100.0 * _kfold_accuracy(s, benchmark.labels, folds, benchmark.name) for s in scores]
        comparison = BenchmarkComparison(benchmark.name, len(benchmark), accuracies[0], accuracies[1])
        logger.info("guard benchmark %s (%d pairs): pretrained %.2f%%, fine-tuned %.2f%% (%+.2f points)",
                    benchmark.name, len(benchmark), comparison.pretrained_accuracy,
                    comparison.finetuned_accuracy, comparison.delta_points)
        comparisons.append(comparison)
    result = decide_promotion(comparisons, tolerance_points)
    logger.info("guard: %s: %s", "promoted" if result.promoted else "not promoted", result.reason)
    return result


def _kfold_accuracy(scores: np.ndarray, labels: np.ndarray, folds: int, name: str) -> float:
    result = kfold_accuracy(scores, labels, folds=folds)
    if not len(result.accuracies):
        raise ValueError(
            f"benchmark {name!r}: {folds}-fold accuracy cannot be measured; it needs at least two "
            f"same-person and two different-person pairs"
        )
    return result.mean
