"""Stage baseline: embed with the pretrained model, calibrate on validation pairs, measure the test pairs.

Writes ``--metrics`` (default ``metrics/baseline.json``), the plot tables
``roc.csv``, ``score_histogram.csv`` and ``error_reject.csv`` in ``--plots``
(default ``plots/baseline``), and the embeddings used in ``--features``
(default ``features/baseline``: ``test/`` and ``val/``). The evaluate stage
writes the same keys for the fine-tuned model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from magface_al.data.faces import FaceRecordDataset
from magface_al.distributed import current_context, distributed_run, rank_device
from magface_al.evaluation.pipeline import EmbeddingSettings, EvaluationOptions, evaluate_model, write_evaluation
from magface_al.models.source import ModelSource
from magface_al.pairs.table import read_pairs_csv
from magface_al.params import load_section
from magface_al.utils import atomic_path, setup_logging

logger = logging.getLogger("stages.baseline")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pretrained checkpoint (model.checkpoint); the model section says how to read it")
    parser.add_argument("--data", default="data/subset", help="face dataset folder")
    parser.add_argument("--pairs", default="data/pairs", help="folder with val.csv and test.csv")
    parser.add_argument("--metrics", default="metrics/baseline.json", help="output metrics file")
    parser.add_argument("--plots", default="plots/baseline", help="output folder for the plot tables")
    parser.add_argument("--features", default="features/baseline", help="output folder for the embeddings")
    parser.add_argument("--params", default="params.yaml", help="params file with the baseline and evaluation sections")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, source: ModelSource, params: EmbeddingSettings, options: EvaluationOptions) -> dict:
    """Embed and score on every rank of the run; only rank 0 writes."""
    dataset = FaceRecordDataset(args.data)
    val_pairs = read_pairs_csv(Path(args.pairs) / "val.csv")
    test_pairs = read_pairs_csv(Path(args.pairs) / "test.csv")
    model, spec = source.load(path=args.model, device=rank_device(params.device))
    result = evaluate_model(
        model, spec, dataset, val_pairs, test_pairs,
        options=options, batch_size=params.batch_size, workers=params.workers, flip=params.flip,
    )
    if not current_context().is_main:
        return result.metrics
    extra = {"model": str(args.model), "arch": spec.arch, "flip": params.flip}
    with atomic_path(args.plots, is_dir=True) as plots_tmp, atomic_path(args.features, is_dir=True) as features_tmp:
        write_evaluation(
            result, metrics_path=args.metrics, plots_dir=plots_tmp, features_dir=features_tmp,
            val_pairs=val_pairs, extra_metrics=extra,
        )
    return result.metrics


@record
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    source = load_section(ModelSource, "model", args.params)
    params = load_section(EmbeddingSettings, "baseline", args.params)
    options = load_section(EvaluationOptions, "evaluation", args.params)
    with distributed_run(rank_device(params.device)):
        run(args, source, params, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
