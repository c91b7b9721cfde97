"""Stage active_rounds: simulated active learning, one learning curve per selection strategy.

For each strategy, runs R rounds of select, simulated labels (with the label
noise of ``correct_rate``), fine-tune (the ``finetune`` params section) and
evaluate on the held-out test pairs. Writes:

- ``--plots``/``learning_curve.csv``: test accuracy against labels, one column
  per strategy (a DVC plot), and ``learning_curves.png`` with every curve;
- ``--plots``/``rounds.csv``: every strategy, seed and round;
- ``--metrics`` (default ``metrics/active_rounds.json``): the labels each
  strategy needs to reach the accuracy of random selection at the full budget.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from magface_al.active.rounds import RoundsConfig, learning_curves, simulate_rounds, summarize
from magface_al.active.strategies import STRATEGIES, SelectionParams
from magface_al.data.faces import FaceRecordDataset
from magface_al.pairs.splits import IdentitySplit
from magface_al.pairs.table import read_pairs_csv
from magface_al.params import load_section
from magface_al.training.finetune import FinetuneConfig
from magface_al.utils import atomic_path, setup_logging, write_json_atomic

logger = logging.getLogger("stages.active_rounds")


@dataclasses.dataclass
class ActiveRoundsParams:
    """The ``active_rounds`` section of params.yaml."""

    strategies: list[str] = dataclasses.field(default_factory=lambda: list(STRATEGIES))
    rounds: int = 5
    batch_size: int = 50  # pairs labelled per round
    correct_rate: float = 0.9  # simulated annotator: each label is right with this probability
    repeats: int = 1  # runs per strategy with seeds seed, seed + 1, ...; curves are averaged
    seed: int = 0
    quality_mode: str = "skip"
    quality_quantile: float = 0.1
    diversity_similarity: float = 0.9
    max_pairs_per_image: int = 1
    neighbours: int = 5
    farthest: int = 2
    random_count: int = 2000
    index: str = "auto"
    device: str = "auto"

    def rounds_config(self) -> RoundsConfig:
        selection = SelectionParams(
            quality_mode=self.quality_mode,
            quality_quantile=self.quality_quantile,
            diversity_similarity=self.diversity_similarity,
            max_pairs_per_image=self.max_pairs_per_image,
        )
        return RoundsConfig(
            strategies=list(self.strategies), rounds=self.rounds, batch_size=self.batch_size,
            correct_rate=self.correct_rate, repeats=self.repeats, seed=self.seed, selection=selection,
            neighbours=self.neighbours, farthest=self.farthest, random_count=self.random_count, index=self.index,
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pretrained checkpoint")
    parser.add_argument("--data", default="data/subset", help="face dataset folder")
    parser.add_argument("--pairs", default="data/pairs", help="folder with splits.json, val.csv and test.csv")
    parser.add_argument("--metrics", default="metrics/active_rounds.json", help="output summary")
    parser.add_argument("--plots", default="plots/active", help="output folder for the learning curves")
    parser.add_argument("--params", default="params.yaml", help="params file with active_rounds and finetune")
    return parser.parse_args(argv)


def write_curves(plots_dir: Path, records: list[dict[str, Any]]) -> None:
    """Write the learning-curve table, the per-round records and a PNG of all curves, as one folder."""
    curves = learning_curves(records)
    strategies = list(curves)
    with atomic_path(plots_dir, is_dir=True) as tmp:
        with (tmp / "learning_curve.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["labels", *strategies])
            labels = curves[strategies[0]][0]
            for row, count in enumerate(labels.tolist()):
                writer.writerow([int(count), *(f"{curves[s][1][row]:.6f}" for s in strategies)])
        with (tmp / "rounds.csv").open("w", newline="", encoding="utf-8") as handle:
            columns = ["strategy", "seed", "round", "labels", "test_accuracy", "validation_accuracy", "threshold",
                       "best_epoch", "selected_same", "label_errors"]
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
        _plot(tmp / "learning_curves.png", curves)


def _plot(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for strategy, (labels, accuracy) in curves.items():
        style = "--" if strategy == "random" else "-"
        axes.plot(labels, 100 * accuracy, style, marker="o", markersize=3, label=strategy)
    axes.set_xlabel("labelled pairs")
    axes.set_ylabel("held-out test accuracy (%)")
    axes.set_title("Active learning: accuracy against labels")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    # Fixed metadata keeps the PNG byte-identical across runs.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def run(args: argparse.Namespace, params: ActiveRoundsParams, finetune_config: FinetuneConfig) -> dict[str, Any]:
    from magface_al.models.device import select_device
    from magface_al.models.source import ModelSource

    config = params.rounds_config()
    dataset = FaceRecordDataset(args.data)
    pairs_dir = Path(args.pairs)
    split = IdentitySplit.from_dict(json.loads((pairs_dir / "splits.json").read_text(encoding="utf-8")))
    val_pairs = read_pairs_csv(pairs_dir / "val.csv")
    test_pairs = read_pairs_csv(pairs_dir / "test.csv")
    pool_keys = dataset.keys[np.isin(dataset.labels, split.feedback)]
    device = select_device(params.device)
    source = load_section(ModelSource, "model", args.params)
    model, spec = source.load(path=args.model, device=device)

    records = simulate_rounds(model, spec, dataset, pool_keys, val_pairs, test_pairs, config, finetune_config,
                              device=device)
    summary = summarize(records)
    summary["correct_rate"] = params.correct_rate
    summary["rounds"] = params.rounds
    summary["batch_size"] = params.batch_size
    summary["repeats"] = params.repeats
    write_curves(Path(args.plots), records)
    write_json_atomic(args.metrics, summary)
    for strategy, entry in summary["strategies"].items():
        logger.info("%s: final accuracy %.4f, labels to reach random's %.4f: %s", strategy,
                    entry["final_accuracy"], summary["target_accuracy"], entry["labels_to_reach_control"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(ActiveRoundsParams, "active_rounds", args.params)
    # The rounds fine-tune exactly as the finetune stage does.
    finetune_config = load_section(FinetuneConfig, "finetune.training", args.params)
    run(args, params, finetune_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
