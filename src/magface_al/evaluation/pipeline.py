"""Evaluate one model on validation and test pairs: the code shared by the baseline and evaluate stages.

The threshold is calibrated on the validation pairs (best accuracy) and
applied unchanged to the test pairs. Metrics use the true labels, which are
``truth`` when the pairs carry it. Identification uses every image of the
identities in the test pairs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magface_al.embedding import Embeddings, embed_dataset, save_embeddings
from magface_al.evaluation.calibration import accuracy_at_threshold, best_accuracy_threshold
from magface_al.evaluation.identification import identification_metrics
from magface_al.evaluation.quality import ErrorRejectCurve, error_versus_reject, pair_quality
from magface_al.evaluation.verification import DEFAULT_FAR_TARGETS, cosine_scores, verification_metrics
from magface_al.pairs.table import Pairs
from magface_al.utils import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingSettings:
    """How a model embeds the evaluation images; the ``baseline`` section of params.yaml.

    The baseline and evaluate stages both read it, so the pretrained and the
    fine-tuned model are embedded the same way (flip test included).
    """

    batch_size: int = 64
    workers: int = 2  # image-decoding worker processes
    flip: bool = False  # add the features of the mirrored image
    device: str = "auto"  # auto, cpu, cuda or cuda:N


@dataclass
class EvaluationOptions:
    """Metric settings; the ``evaluation`` section of params.yaml."""

    fixed_threshold: float = 0.4  # the conventional cosine threshold, reported for comparison
    folds: int = 10  # folds of the k-fold accuracy protocol
    far_targets: list[float] = field(default_factory=lambda: list(DEFAULT_FAR_TARGETS))
    erc_fmr: float = 1e-3  # false match rate that fixes the error-versus-reject threshold
    erc_step: float = 0.05  # reject fraction increment
    erc_max_reject: float = 0.5  # largest reject fraction
    identification: bool = True  # rank-k identification on all images of the test identities
    identification_ranks: list[int] = field(default_factory=lambda: [1, 5, 10])
    identification_seed: int = 0  # seed of the gallery image choice


@dataclass
class EvaluationResult:
    """Metrics and the per-pair data behind them.

    Attributes:
        metrics: strict-JSON-ready mapping (see :func:`evaluate_embeddings`).
        threshold: the operating threshold (calibrated, or the fixed one as a fallback).
        test_pairs: the test pairs scored.
        test_scores: cosine similarity per test pair.
        test_magnitude1: magnitude of each pair's first face.
        test_magnitude2: magnitude of each pair's second face.
        erc: the error-versus-reject curve of the test pairs.
        embeddings: the embeddings evaluated (validation and test keys).
    """

    metrics: dict[str, Any]
    threshold: float
    test_pairs: Pairs
    test_scores: np.ndarray
    test_magnitude1: np.ndarray
    test_magnitude2: np.ndarray
    erc: ErrorRejectCurve
    embeddings: Embeddings


def _calibrate(val_scores: np.ndarray, val_labels: np.ndarray, fixed_threshold: float) -> tuple[float, dict]:
    """Return the operating threshold and the ``calibration`` section of the metrics."""
    section: dict[str, Any] = {"num_validation_pairs": int(len(val_scores))}
    if len(val_scores) and len(np.unique(val_labels)) == 2:
        threshold, accuracy = best_accuracy_threshold(val_scores, val_labels)
        section.update(source="validation", threshold=threshold, validation_accuracy=accuracy)
        return threshold, section
    reason = "validation pairs are missing or hold a single class"
    logger.warning("cannot calibrate the threshold (%s); using the fixed threshold %g", reason, fixed_threshold)
    validation_accuracy = accuracy_at_threshold(val_scores, val_labels, fixed_threshold) if len(val_scores) else None
    section.update(
        source="fixed", threshold=fixed_threshold, source_reason=reason, validation_accuracy=validation_accuracy
    )
    if validation_accuracy is None:
        section["validation_accuracy_reason"] = "there are no validation pairs"
    return fixed_threshold, section


def _magnitude_summary(magnitudes: np.ndarray) -> dict[str, float]:
    return {
        "magnitude_mean": float(np.mean(magnitudes)),
        "magnitude_std": float(np.std(magnitudes)),
        "magnitude_min": float(np.min(magnitudes)),
        "magnitude_max": float(np.max(magnitudes)),
    }


def evaluate_embeddings(
    embeddings: Embeddings,
    val_pairs: Pairs,
    test_pairs: Pairs,
    *,
    options: EvaluationOptions | None = None,
    test_identities: np.ndarray | None = None,
) -> EvaluationResult:
    """Calibrate on validation pairs, then measure the test pairs.

    Args:
        embeddings: must contain every key of both pair sets (and, for
            identification, the images of the test identities).
        val_pairs: pairs for threshold calibration.
        test_pairs: held-out pairs to measure.
        options: metric settings; defaults when None.
        test_identities: identities for identification; those of ``test_pairs`` when None.

    Returns:
        The result. ``metrics`` contains every key of :func:`verification_metrics`
        for the test pairs at the calibrated operating threshold, plus
        ``calibration`` (threshold, source, validation accuracy),
        ``identification`` (``top_<k>``) and ``quality`` (ERC summary and
        magnitude statistics of the test faces).
    """
    options = options or EvaluationOptions()
    key_to_row = embeddings.key_to_row()
    features = np.asarray(embeddings.features)
    magnitudes = np.asarray(embeddings.magnitudes, dtype=np.float64)

    val_scores = cosine_scores(features, key_to_row, val_pairs)
    threshold, calibration = _calibrate(val_scores, val_pairs.true_labels, options.fixed_threshold)

    test_scores = cosine_scores(features, key_to_row, test_pairs)
    test_labels = test_pairs.true_labels
    metrics = verification_metrics(
        test_scores,
        test_labels,
        fixed_threshold=options.fixed_threshold,
        folds=options.folds,
        threshold=threshold,
        far_targets=tuple(options.far_targets),
    )
    metrics["calibration"] = calibration

    if options.identification:
        identities = test_pairs.identities if test_identities is None else np.asarray(test_identities)
        rows = np.flatnonzero(np.isin(np.asarray(embeddings.labels), identities))
        metrics["identification"] = identification_metrics(
            features[rows],
            np.asarray(embeddings.labels)[rows],
            ranks=tuple(options.identification_ranks),
            seed=options.identification_seed,
        )

    quality = pair_quality(magnitudes, key_to_row, test_pairs)
    erc = error_versus_reject(
        test_scores,
        test_labels,
        quality,
        fmr=options.erc_fmr,
        step=options.erc_step,
        max_reject=options.erc_max_reject,
        accuracy_threshold=threshold,
    )
    test_rows = np.array([key_to_row[k] for k in test_pairs.keys.tolist()], dtype=np.int64)
    metrics["quality"] = {
        **erc.summary(),
        **(_magnitude_summary(magnitudes[test_rows]) if len(test_rows) else {}),
    }
    rows1 = np.array([key_to_row[k] for k in test_pairs.key1.tolist()], dtype=np.int64)
    rows2 = np.array([key_to_row[k] for k in test_pairs.key2.tolist()], dtype=np.int64)
    logger.info(
        "test pairs: %d-fold accuracy %s, accuracy %s at threshold %.4f, AUC %s",
        options.folds, _format(metrics.get("accuracy")), _format(metrics.get("accuracy_at_operating_threshold")),
        threshold, _format(metrics.get("auc")),
    )
    return EvaluationResult(
        metrics=metrics,
        threshold=threshold,
        test_pairs=test_pairs,
        test_scores=test_scores,
        test_magnitude1=magnitudes[rows1],
        test_magnitude2=magnitudes[rows2],
        erc=erc,
        embeddings=embeddings,
    )


def _format(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def keys_to_embed(dataset: Any, val_pairs: Pairs, test_pairs: Pairs, *, identification: bool = True) -> np.ndarray:
    """Return the sorted keys an evaluation needs: all pair keys plus every image of the test identities."""
    keys = [val_pairs.keys, test_pairs.keys]
    if identification:
        labels = np.asarray(dataset.labels)
        keys.append(np.asarray(dataset.keys)[np.isin(labels, test_pairs.identities)])
    return np.unique(np.concatenate(keys))


def evaluate_model(
    model: Any,
    spec: Any,
    dataset: Any,
    val_pairs: Pairs,
    test_pairs: Pairs,
    *,
    options: EvaluationOptions | None = None,
    batch_size: int = 64,
    workers: int = 2,
    flip: bool = False,
    device: Any = None,
    progress: bool = True,
) -> EvaluationResult:
    """Embed what the evaluation needs with ``model`` and run :func:`evaluate_embeddings`.

    Args:
        model: network returning raw embeddings, in eval mode.
        spec: its ``ModelSpec``.
        dataset: ``FaceRecordDataset`` holding the pair keys.
        val_pairs: calibration pairs.
        test_pairs: held-out pairs.
        options: metric settings.
        batch_size: images per forward pass.
        workers: image-decoding worker processes.
        flip: add the features of the mirrored images.
        device: where to run; the model's device when None.
        progress: show a progress bar.
    """
    options = options or EvaluationOptions()
    keys = keys_to_embed(dataset, val_pairs, test_pairs, identification=options.identification)
    logger.info("embedding %d images for evaluation", len(keys))
    embeddings = embed_dataset(
        model, spec, dataset, keys, batch_size=batch_size, workers=workers, flip=flip, device=device, progress=progress
    )
    return evaluate_embeddings(embeddings, val_pairs, test_pairs, options=options)


def subset_embeddings(embeddings: Embeddings, keys: np.ndarray) -> Embeddings:
    """Return the rows of ``embeddings`` for ``keys`` (sorted, distinct)."""
    key_to_row = embeddings.key_to_row()
    rows = np.array([key_to_row[int(k)] for k in np.unique(keys).tolist()], dtype=np.int64)
    return Embeddings(
        keys=np.asarray(embeddings.keys)[rows],
        labels=np.asarray(embeddings.labels)[rows],
        features=np.asarray(embeddings.features)[rows],
        magnitudes=np.asarray(embeddings.magnitudes)[rows],
        meta=dict(embeddings.meta),
    )


def write_evaluation(
    result: EvaluationResult,
    *,
    metrics_path: str | os.PathLike,
    plots_dir: str | os.PathLike,
    features_dir: str | os.PathLike | None = None,
    val_pairs: Pairs | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> None:
    """Write the metrics file, the plot tables and (optionally) the embeddings, each atomically.

    The metrics file is strict JSON with ``extra_metrics`` first. The plot
    tables ``roc.csv``, ``score_histogram.csv`` and ``error_reject.csv`` in
    ``plots_dir`` use the report's table format. ``features_dir/test`` gets
    the test pair keys and every image of the test identities, and
    ``features_dir/val`` the validation pair keys when ``val_pairs`` is given.
    """
    # Imported here because the report package builds on this one.
    from magface_al.report.plots import write_plot_tables
    from magface_al.report.scored import ScoredPairs

    write_json_atomic(metrics_path, {**(extra_metrics or {}), **result.metrics})
    scored = ScoredPairs.from_pairs(
        result.test_pairs, result.test_scores, result.test_magnitude1, result.test_magnitude2, result.threshold
    )
    write_plot_tables(plots_dir, scored, fmr=result.erc.fmr)
    if features_dir is not None:
        features_dir = Path(features_dir)
        test_labels = np.asarray(result.embeddings.labels)
        test_keys = np.asarray(result.embeddings.keys)[np.isin(test_labels, result.test_pairs.identities)]
        save_embeddings(features_dir / "test", subset_embeddings(result.embeddings, np.union1d(test_keys, result.test_pairs.keys)))
        if val_pairs is not None:
            save_embeddings(features_dir / "val", subset_embeddings(result.embeddings, val_pairs.keys))
    logger.info("wrote %s and plot tables in %s", metrics_path, plots_dir)
