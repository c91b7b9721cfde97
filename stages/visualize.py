"""Stage visualize: error folders, the HTML report and the plot tables of the baseline and the fine-tuned model.

Reads the test pairs, each model's test-set embeddings and metrics file, and
writes (each output atomically, as a whole folder):

- ``<out>/baseline/`` and ``<out>/finetuned/``: ``false_positives/``,
  ``false_negatives/``, samples of ``true_positives/`` and
  ``true_negatives/``, and ``error_summary.json``;
- ``<out>/html/report.html`` with its ``figures/`` and ``faces/``;
- ``<plots>/<model>/roc.csv``, ``score_histogram.csv`` and ``error_reject.csv``
  for ``dvc plots``.

Pass an empty ``--finetuned-features`` to report on the baseline alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from magface_al.data.faces import FaceRecordDataset, read_manifest
from magface_al.embedding import load_embeddings
from magface_al.evaluation.verification import cosine_scores
from magface_al.pairs.table import Pairs, read_pairs_csv
from magface_al.params import load_section
from magface_al.report import FaceCache, ModelResult, ScoredPairs, write_error_folders, write_html_report
from magface_al.report.plots import write_plot_tables
from magface_al.utils import atomic_path, setup_logging

logger = logging.getLogger("stages.visualize")


@dataclasses.dataclass
class VisualizeParams:
    """The ``visualize`` section of params.yaml."""

    threshold_key: str = "operating_threshold"  # dotted key of the decision threshold in each metrics file
    samples_per_correct: int = 20  # true positives and true negatives that get a folder each
    max_error_folders: int | None = None  # folders per error kind, worst first; None writes all
    gallery_limit: int = 48  # pairs shown per gallery of the HTML report
    seed: int = 0  # seed of the sample of correct pairs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/subset", help="face dataset folder (train.rec, train.idx, property)")
    parser.add_argument("--pairs", default="data/pairs/test.csv", help="test pairs CSV")
    parser.add_argument("--baseline-features", default="features/baseline/test", help="baseline embeddings folder")
    parser.add_argument("--baseline-metrics", default="metrics/baseline.json", help="baseline metrics file")
    parser.add_argument("--finetuned-features", default="features/finetuned/test",
                        help="fine-tuned embeddings folder; empty to report on the baseline alone")
    parser.add_argument("--finetuned-metrics", default="metrics/finetuned.json", help="fine-tuned metrics file")
    parser.add_argument("--out", default="reports", help="output folder for error folders and the HTML report")
    parser.add_argument("--plots", default="plots/visualize", help="output folder for the DVC plot tables")
    parser.add_argument("--params", default="params.yaml", help="params file holding the visualize section")
    return parser.parse_args(argv)


def lookup_metric(metrics: dict[str, Any], dotted_key: str, path: Path) -> Any:
    """Return the value at ``dotted_key`` (``a.b`` means ``metrics["a"]["b"]``) of a metrics file."""
    node: Any = metrics
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(
                f"{path}: no value at key {dotted_key!r}; set visualize.threshold_key in params.yaml "
                f"to the key holding the decision threshold (top-level keys: {', '.join(metrics)})"
            )
        node = node[part]
    return node


def read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}; run the stage that writes it first")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(metrics).__name__}")
    return metrics


def identity_names(data_dir: Path) -> dict[int, str]:
    """Map identity labels to person names from the dataset's manifest.csv; empty when there is none."""
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        logger.info("%s not found; the report shows identity numbers instead of names", manifest)
        return {}
    return {int(row["label"]): str(row["identity"]) for row in read_manifest(manifest)}


def _names(identities: np.ndarray, names: dict[int, str]) -> np.ndarray:
    return np.array([names.get(int(identity), str(int(identity))) for identity in identities], dtype=object)


def score_model(name: str, features_dir: Path, metrics_path: Path, pairs: Pairs,
                names: dict[int, str], threshold_key: str) -> ModelResult:
    """Score ``pairs`` with one model's embeddings and read its threshold from its metrics file."""
    metrics = read_metrics(metrics_path)
    threshold = lookup_metric(metrics, threshold_key, metrics_path)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ValueError(f"{metrics_path}: {threshold_key} is {threshold!r}, expected a number (the cosine threshold)")

    embeddings = load_embeddings(features_dir)
    key_to_row = {int(key): row for row, key in enumerate(embeddings.keys.tolist())}
    scores = cosine_scores(embeddings.features, key_to_row, pairs)
    magnitudes = np.asarray(embeddings.magnitudes, dtype=np.float64)
    rows1 = np.array([key_to_row[int(key)] for key in pairs.key1], dtype=np.int64)
    rows2 = np.array([key_to_row[int(key)] for key in pairs.key2], dtype=np.int64)

    scored = ScoredPairs(
        key1=pairs.key1,
        key2=pairs.key2,
        label=pairs.true_labels,
        identity1=_names(pairs.identity1, names),
        identity2=_names(pairs.identity2, names),
        score=scores,
        magnitude1=magnitudes[rows1],
        magnitude2=magnitudes[rows2],
        threshold=float(threshold),
    )
    return ModelResult(name=name, scored=scored, metrics=metrics)


def run(args: argparse.Namespace, params: VisualizeParams) -> list[ModelResult]:
    """Write every output of the stage; return the models it reported on."""
    data_dir = Path(args.data)
    dataset = FaceRecordDataset(data_dir)
    pairs = read_pairs_csv(args.pairs)
    names = identity_names(data_dir)

    inputs = [("baseline", "baseline", args.baseline_features, args.baseline_metrics)]
    if args.finetuned_features:
        inputs.append(("fine-tuned", "finetuned", args.finetuned_features, args.finetuned_metrics))
    models = [score_model(name, Path(features), Path(metrics), pairs, names, params.threshold_key)
              for name, _, features, metrics in inputs]
    slugs = [slug for _, slug, _, _ in inputs]

    cache = FaceCache(dataset)
    with atomic_path(args.out, is_dir=True) as tmp:
        for slug, model in zip(slugs, models):
            write_error_folders(
                tmp / slug, model.scored, cache,
                samples_per_correct=params.samples_per_correct,
                max_error_folders=params.max_error_folders,
                seed=params.seed,
            )
        write_html_report(
            tmp / "html", models, cache,
            gallery_limit=params.gallery_limit,
            title="Face verification: baseline and fine-tuned" if len(models) > 1 else "Face verification: baseline",
            notes=[f"{len(pairs)} test pairs from {args.pairs}; faces from {data_dir}"]
            + [f"{model.name}: threshold {model.scored.threshold:.4f} ({params.threshold_key})" for model in models],
        )
    with atomic_path(args.plots, is_dir=True) as tmp:
        for slug, model in zip(slugs, models):
            write_plot_tables(tmp / slug, model.scored)
    return models


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(VisualizeParams, "visualize", args.params)
    run(args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
