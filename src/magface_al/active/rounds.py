"""Simulated active-learning rounds: select, label (with noise), fine-tune, evaluate.

For each strategy, round ``r`` selects ``batch_size`` pairs from the feedback
pool with the model of round ``r - 1``. A simulated annotator labels them from
the identity annotation and is right with probability ``correct_rate``. The
pretrained model is then fine-tuned on all labels so far with
:func:`magface_al.training.finetune.finetune`, and the held-out test pairs are
measured at the threshold calibrated on the validation pairs. Round 0 is the
pretrained model, the same for every strategy.

The trunk of the model does not train (the fine-tuning part decides where the
trunk ends), so its outputs for the pool, validation and test images are
computed once and every round's embeddings cost only the head.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from magface_al.active.candidates import mine_candidates
from magface_al.active.strategies import STRATEGIES, SelectionParams, select_from_embeddings
from magface_al.evaluation.calibration import accuracy_at_threshold, best_accuracy_threshold
from magface_al.pairs.noise import flip_labels
from magface_al.pairs.table import Pairs
from magface_al.training.feature_cache import FeatureCache, TrunkHeadSplit, compute_trunk_features
from magface_al.training.finetune import FinetuneConfig, finetune

logger = logging.getLogger(__name__)


@dataclass
class RoundsConfig:
    """Settings of the simulation.

    Attributes:
        strategies: strategies to compare; "random" is the control the summary measures against.
        rounds: rounds per strategy.
        batch_size: pairs labelled per round.
        correct_rate: probability that a simulated label is right.
        repeats: runs per strategy with different seeds; curves are averaged.
        seed: first seed; repeat ``i`` uses ``seed + i``.
        selection: options shared by every strategy (its ``strategy`` and
            ``batch_size`` fields are overridden).
        neighbours, farthest, random_count, index: candidate mining, see
            :func:`magface_al.active.candidates.mine_candidates`.
    """

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    rounds: int = 5
    batch_size: int = 50
    correct_rate: float = 1.0
    repeats: int = 1
    seed: int = 0
    selection: SelectionParams = field(default_factory=SelectionParams)
    neighbours: int = 5
    farthest: int = 2
    random_count: int = 2000
    index: str = "auto"

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; expected some of {', '.join(STRATEGIES)}")
        if "random" not in self.strategies:
            raise ValueError("strategies must include 'random', the control the others are measured against")
        for name in ("rounds", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.correct_rate <= 1.0:
            raise ValueError(f"correct_rate must be in [0, 1], got {self.correct_rate}")


@dataclass
class PoolEmbedder:
    """Embeds fixed image sets with a model's head on trunk outputs computed once.

    Attributes:
        cache: trunk outputs of every image the simulation needs.
        arch: architecture name (selects the trunk/head layout).
        part: the part that trains, as in :class:`FinetuneConfig`.
    """

    cache: FeatureCache
    arch: str
    part: str

    def embed(self, model: torch.nn.Module, keys: np.ndarray, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Return (L2-normalized features (N, D) float32, magnitudes (N,) float32) of ``keys``."""
        split = TrunkHeadSplit(model, self.arch, self.part)
        model.eval()
        features, magnitudes = [], []
        with torch.inference_mode():
            for start in range(0, len(keys), batch_size):
                raw = split.head(self.cache.get(keys[start:start + batch_size])).float()
                magnitudes.append(raw.norm(dim=1).cpu().numpy())
                features.append(torch.nn.functional.normalize(raw, dim=1).cpu().numpy())
        dimension = features[0].shape[1] if features else 0
        return (
            np.concatenate(features) if features else np.zeros((0, dimension), np.float32),
            np.concatenate(magnitudes) if magnitudes else np.zeros(0, np.float32),
        )


def _pair_scores(features: np.ndarray, key_to_row: dict[int, int], pairs: Pairs) -> np.ndarray:
    rows1 = np.array([key_to_row[int(k)] for k in pairs.key1.tolist()], dtype=np.int64)
    rows2 = np.array([key_to_row[int(k)] for k in pairs.key2.tolist()], dtype=np.int64)
    return np.sum(features[rows1] * features[rows2], axis=1, dtype=np.float64)


@dataclass
class _Evaluation:
    threshold: float
    validation_accuracy: float
    test_accuracy: float
    pool_features: np.ndarray
    pool_magnitudes: np.ndarray


class _Evaluator:
    """Scores a model on the validation and test pairs and embeds the pool."""

    def __init__(self, embedder: PoolEmbedder, pool_keys: np.ndarray, val_pairs: Pairs, test_pairs: Pairs) -> None:
        self.embedder = embedder
        self.pool_keys = pool_keys
        self.val_pairs = val_pairs
        self.test_pairs = test_pairs
        self.pair_keys = np.unique(np.concatenate([val_pairs.keys, test_pairs.keys]))
        self.key_to_row = {int(k): i for i, k in enumerate(self.pair_keys.tolist())}

    def __call__(self, model: torch.nn.Module) -> _Evaluation:
        features, _ = self.embedder.embed(model, self.pair_keys)
        val_scores = _pair_scores(features, self.key_to_row, self.val_pairs)
        threshold, val_accuracy = best_accuracy_threshold(val_scores, self.val_pairs.true_labels)
        test_scores = _pair_scores(features, self.key_to_row, self.test_pairs)
        test_accuracy = accuracy_at_threshold(test_scores, self.test_pairs.true_labels, threshold)
        pool_features, pool_magnitudes = self.embedder.embed(model, self.pool_keys)
        return _Evaluation(threshold, val_accuracy, test_accuracy, pool_features, pool_magnitudes)


def _simulate_labels(selected: Any, correct_rate: float, rng: np.random.Generator) -> Pairs:
    truth = (selected.identity1 == selected.identity2).astype(np.int64)
    labels = flip_labels(truth, correct_rate, seed=rng)
    return Pairs(selected.key1, selected.key2, labels, selected.identity1, selected.identity2, truth=truth)


def _run_strategy(
    strategy: str,
    seed: int,
    *,
    model: torch.nn.Module,
    spec: Any,
    dataset: Any,
    pool_keys: np.ndarray,
    pool_labels: np.ndarray,
    val_pairs: Pairs,
    config: RoundsConfig,
    finetune_config: FinetuneConfig,
    evaluate: _Evaluator,
    start: _Evaluation,
    cache: FeatureCache,
    device: torch.device | None,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    params = SelectionParams(**{**vars(config.selection), "strategy": strategy, "batch_size": config.batch_size,
                                "seed": seed})
    current = start
    labelled = Pairs.empty()
    points = [{"strategy": strategy, "seed": seed, "round": 0, "labels": 0,
               "test_accuracy": start.test_accuracy, "threshold": start.threshold,
               "validation_accuracy": start.validation_accuracy}]
    for round_number in range(1, config.rounds + 1):
        candidates = mine_candidates(
            current.pool_features, pool_labels, neighbours=config.neighbours, farthest=config.farthest,
            random_count=config.random_count, seed=seed + round_number, index=config.index,
        )
        selected = select_from_embeddings(
            pool_keys, pool_labels, current.pool_features, current.pool_magnitudes,
            threshold=current.threshold, params=params, candidates=candidates,
            labelled_key1=labelled.key1, labelled_key2=labelled.key2,
        )
        new_pairs = _simulate_labels(selected, config.correct_rate, rng)
        labelled = Pairs.concatenate([labelled, new_pairs])
        # The cache contains every pool and validation image, so fine-tuning runs only the head.
        tuned = finetune(model, spec, dataset, labelled, val_pairs, finetune_config, device=device,
                         trunk_cache=cache)
        current = evaluate(tuned.model)
        point = {
            "strategy": strategy, "seed": seed, "round": round_number, "labels": len(labelled),
            "test_accuracy": current.test_accuracy, "threshold": current.threshold,
            "validation_accuracy": current.validation_accuracy, "best_epoch": tuned.best_epoch,
            "selected_same": int(new_pairs.truth.sum()), "label_errors": int((new_pairs.label != new_pairs.truth).sum()),
        }
        points.append(point)
        logger.info("%s seed %d round %d: %d labels, test accuracy %.4f (best epoch %d)",
                    strategy, seed, round_number, len(labelled), current.test_accuracy, tuned.best_epoch)
    return points


def simulate_rounds(
    model: torch.nn.Module,
    spec: Any,
    dataset: Any,
    pool_keys: np.ndarray,
    val_pairs: Pairs,
    test_pairs: Pairs,
    config: RoundsConfig,
    finetune_config: FinetuneConfig,
    *,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Run ``config.rounds`` rounds of every strategy and return one record per strategy, seed and round.

    Args:
        model: the pretrained model; every round fine-tunes a fresh copy of it.
        spec: its model specification.
        dataset: face dataset holding the pool, validation and test images.
        pool_keys: record keys of the feedback pool's images.
        val_pairs: validation pairs (threshold calibration and early stopping).
        test_pairs: held-out pairs, scored against their true labels.
        config: the simulation settings.
        finetune_config: the fine-tuning settings used in every round.
        device: where to run; CPU when None.

    Returns:
        Records with ``strategy``, ``seed``, ``round``, ``labels``, ``test_accuracy``,
        ``threshold`` and ``validation_accuracy`` (plus selection counts after round 0).
    """
    pool_keys = np.unique(np.asarray(pool_keys, dtype=np.int64))
    pool_labels = np.array([dataset.label_of(int(k)) for k in pool_keys.tolist()], dtype=np.int64)
    started = time.perf_counter()
    split = TrunkHeadSplit(model, spec.arch, finetune_config.train)
    all_keys = np.unique(np.concatenate([pool_keys, val_pairs.keys, test_pairs.keys]))
    cache = compute_trunk_features(
        split, spec, dataset, all_keys, batch_size=finetune_config.embed_batch_size, device=device
    )
    logger.info("trunk outputs of %d images in %.1f s", len(all_keys), time.perf_counter() - started)
    evaluate = _Evaluator(PoolEmbedder(cache, spec.arch, finetune_config.train), pool_keys, val_pairs, test_pairs)
    start = evaluate(model)
    logger.info("pretrained model: test accuracy %.4f at threshold %.4f", start.test_accuracy, start.threshold)

    records: list[dict[str, Any]] = []
    for repeat in range(config.repeats):
        for strategy in config.strategies:
            records.extend(
                _run_strategy(
                    strategy, config.seed + repeat, model=model, spec=spec, dataset=dataset, pool_keys=pool_keys,
                    pool_labels=pool_labels, val_pairs=val_pairs, config=config, finetune_config=finetune_config,
                    evaluate=evaluate, start=start, cache=cache, device=device,
                )
            )
    return records


def learning_curves(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Average the records over seeds: strategy -> (labels, mean test accuracy), by round."""
    curves = {}
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        rounds = sorted({r["round"] for r in records if r["strategy"] == strategy})
        labels, accuracy = [], []
        for round_number in rounds:
            points = [r for r in records if r["strategy"] == strategy and r["round"] == round_number]
            labels.append(np.mean([p["labels"] for p in points]))
            accuracy.append(np.mean([p["test_accuracy"] for p in points]))
        curves[strategy] = (np.asarray(labels), np.asarray(accuracy))
    return curves


def labels_to_reach(labels: np.ndarray, accuracy: np.ndarray, target: float, *, tolerance: float = 1e-9) -> int | None:
    """Return the fewest labels from which a curve stays at or above ``target``, or None if its end is below.

    A noisy curve that touches the target once and falls back does not count
    until it stays there, so the result is the first point after the last one
    below the target. Round 0 (no labels) counts only if the whole curve is
    at or above the target.
    """
    below = np.flatnonzero(np.asarray(accuracy) < target - tolerance)
    if not len(below):
        return int(labels[0])
    if below[-1] == len(accuracy) - 1:
        return None
    return int(labels[below[-1] + 1])


def summarize(records: list[dict[str, Any]], *, control: str = "random") -> dict[str, Any]:
    """Compare strategies with the control: the labels each needs to reach the control's final accuracy.

    Returns:
        A strict-JSON-ready mapping with the control's final accuracy and
        label budget, and per strategy its final accuracy and
        ``labels_to_reach_control`` (None with a reason when the curve does
        not end at the target, or when the control gained nothing over the
        pretrained model, so that there is no gain to reach).
    """
    curves = learning_curves(records)
    if control not in curves:
        raise ValueError(f"no records of the control strategy {control!r}; include it in the strategies")
    control_labels, control_accuracy = curves[control]
    target = float(control_accuracy[-1])
    summary: dict[str, Any] = {
        "control": control,
        "budget": int(control_labels[-1]),
        "target_accuracy": target,
        "pretrained_accuracy": float(control_accuracy[0]),
        "strategies": {},
    }
    no_gain = target <= float(control_accuracy[0])
    for strategy, (labels, accuracy) in curves.items():
        needed = None if no_gain else labels_to_reach(labels, accuracy, target)
        entry: dict[str, Any] = {
            "final_accuracy": float(accuracy[-1]),
            "labels_to_reach_control": needed,
        }
        if no_gain:
            entry["labels_to_reach_control_reason"] = (
                f"{control} selection ended at {target:.4f}, no better than the pretrained "
                f"{float(control_accuracy[0]):.4f}, so there is no gain to reach"
            )
        elif needed is None:
            entry["labels_to_reach_control_reason"] = (
                f"the curve ends below {target:.4f} at {int(labels[-1])} labels"
            )
        else:
            entry["label_fraction_of_control"] = needed / max(int(control_labels[-1]), 1)
        summary["strategies"][strategy] = entry
    return summary
