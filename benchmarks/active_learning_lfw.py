"""Compare the active-learning selection strategies on LFW with the pretrained MobileFaceNet.

Run from the repository root:

    .venv/bin/python benchmarks/active_learning_lfw.py [--data ../shared/data/lfw]
        [--model ../shared/models/mobilefacenet_casia_arcface.ckpt] [--out FOLDER]
        [--repeats 8] [--rounds 8] [--batch-size 50] [--correct-rate 0.9] [--train head] [--lr 1e-3]

Only identities with two or more images take part. They are split by identity
into a feedback pool, validation and test part, as the pairs stage splits
them, and validation and test pairs are sampled the same way. Then
:func:`magface_al.active.rounds.simulate_rounds` runs every strategy
``--repeats`` times with seeds ``--seed``, ``--seed + 1``, ... The trunk runs
once per image, so a round costs only the fine-tuned head.

Writes into ``--out``:

- ``learning_curve.csv``, ``rounds.csv`` and ``learning_curves.png``: the
  files the active_rounds stage writes (mean test accuracy against labels);
- ``learning_curve_se.csv``: per strategy and round the mean, the standard
  error across repeats and the difference to random with its standard error;
- ``learning_curves_se.png``: the same curves with standard-error bands, and
  their difference to random;
- ``summary.json``: the command line, every setting, the split sizes, the
  output of :func:`magface_al.active.rounds.summarize` and the statistics
  above. Its ``first_round_questions`` describe the pairs each strategy
  selects first: the share of same-person pairs, their scores, and the share
  of the training loss that wrong labels would contribute.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magface_al.active.candidates import mine_candidates
from magface_al.active.rounds import RoundsConfig, labels_to_reach, simulate_rounds, summarize
from magface_al.active.strategies import STRATEGIES, SelectionParams, select_from_embeddings
from magface_al.data.faces import FaceRecordDataset
from magface_al.embedding import embed_dataset
from magface_al.models.source import ModelSource
from magface_al.pairs.sampling import sample_pairs
from magface_al.pairs.splits import split_identities
from magface_al.training.finetune import FinetuneConfig
from magface_al.utils import atomic_path, setup_logging, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
RESULTS_DIR = REPO_ROOT / "docs" / "results" / "active_learning_lfw"

logger = logging.getLogger("benchmarks.active_learning_lfw")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "lfw"), help="RecordIO face dataset folder")
    parser.add_argument("--model", default=str(SHARED / "models" / "mobilefacenet_casia_arcface.ckpt"),
                        help="pretrained checkpoint")
    parser.add_argument("--arch", default="mobilefacenet", help="architecture of a checkpoint without a spec")
    parser.add_argument("--out", default=None,
                        help="output folder, replaced as a whole "
                             "(default: docs/results/active_learning_lfw/correct_rate_<RATE>)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                        help="strategies to compare; random is required as the control")
    parser.add_argument("--repeats", type=int, default=8, help="runs per strategy, seeds seed .. seed + repeats - 1")
    parser.add_argument("--rounds", type=int, default=8, help="labelling rounds per run")
    parser.add_argument("--batch-size", type=int, default=50, help="pairs labelled per round")
    parser.add_argument("--correct-rate", type=float, default=0.9,
                        help="probability that a simulated label is right")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the pairs and the first repeat")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.5, 0.2, 0.3),
                        metavar=("POOL", "VALIDATION", "TEST"), help="shares of the identities per part")
    parser.add_argument("--val-pairs", type=int, default=1000, help="validation pairs, half same person")
    parser.add_argument("--test-pairs", type=int, default=4000, help="held-out test pairs, half same person")
    parser.add_argument("--train", default="head", choices=("head", "last_stage"), help="part that fine-tunes")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--epochs", type=int, default=10, help="maximum fine-tuning epochs per round")
    parser.add_argument("--patience", type=int, default=3, help="epochs without validation gain before stopping")
    parser.add_argument("--neighbours", type=int, default=5, help="mined nearest other-identity images per image")
    parser.add_argument("--farthest", type=int, default=2, help="mined farthest same-identity images per image")
    parser.add_argument("--random-count", type=int, default=2000, help="mined random pairs per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def _load_stage(name: str) -> Any:
    """Import ``stages/<name>.py``; stages is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO_ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the stage's params class is created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_parts(dataset: FaceRecordDataset, args: argparse.Namespace) -> dict[str, Any]:
    """Split the identities with two or more images and sample validation and test pairs from their parts."""
    identities, counts = np.unique(dataset.labels, return_counts=True)
    eligible = identities[counts >= 2]
    split = split_identities(eligible, tuple(args.fractions), seed=args.seed, image_counts=counts[counts >= 2])
    # Generator streams as the pairs stage uses them for validation and test.
    validation = sample_pairs(
        dataset.keys, dataset.labels, num_same=args.val_pairs // 2, num_different=args.val_pairs - args.val_pairs // 2,
        seed=np.random.default_rng([args.seed, 4]), identities=split.validation, description="the validation part",
    )
    test = sample_pairs(
        dataset.keys, dataset.labels, num_same=args.test_pairs // 2,
        num_different=args.test_pairs - args.test_pairs // 2,
        seed=np.random.default_rng([args.seed, 5]), identities=split.test, description="the test part",
    )
    pool_keys = dataset.keys[np.isin(dataset.labels, split.feedback)]
    images = {name: int(np.isin(dataset.labels, split.part(name)).sum()) for name in ("feedback", "validation", "test")}
    return {
        "split": split, "validation": validation, "test": test, "pool_keys": pool_keys,
        "description": {
            "identities_total": int(len(identities)),
            "identities_with_two_or_more_images": int(len(eligible)),
            "identities": split.to_dict()["counts"],
            "images": images,
            "validation_pairs": len(validation),
            "test_pairs": len(test),
        },
    }


# -- statistics over repeats ----------------------------------------------------------


def _standard_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def curve_statistics(records: list[dict[str, Any]], *, control: str = "random") -> list[dict[str, Any]]:
    """Return per strategy and round the mean, standard error and difference to the control across seeds.

    The difference's standard error treats the strategies' runs as independent,
    because they share no selection or label-noise draws.
    """
    rows = []
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    rounds = sorted({r["round"] for r in records})
    by_key: dict[tuple[str, int], np.ndarray] = {}
    for strategy in strategies:
        for round_number in rounds:
            values = [r["test_accuracy"] for r in records if r["strategy"] == strategy and r["round"] == round_number]
            by_key[(strategy, round_number)] = np.asarray(values, dtype=np.float64)
    for strategy in strategies:
        for round_number in rounds:
            values = by_key[(strategy, round_number)]
            reference = by_key[(control, round_number)]
            labels = [r["labels"] for r in records if r["strategy"] == strategy and r["round"] == round_number]
            mean, se = float(values.mean()), _standard_error(values)
            reference_se = _standard_error(reference)
            rows.append({
                "strategy": strategy,
                "round": round_number,
                "labels": float(np.mean(labels)),
                "runs": len(values),
                "mean_accuracy": mean,
                "se_accuracy": se,
                "min_accuracy": float(values.min()),
                "max_accuracy": float(values.max()),
                "difference_to_control": mean - float(reference.mean()),
                "se_difference": float(np.hypot(se, reference_se)) if round_number else 0.0,
            })
    return rows


def strategy_details(records: list[dict[str, Any]], statistics: list[dict[str, Any]], target: float) -> dict:
    """Return per strategy the figures the summary table shows, beyond :func:`summarize`."""
    details = {}
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        rows = [s for s in statistics if s["strategy"] == strategy]
        labels = np.asarray([s["labels"] for s in rows])
        means = np.asarray([s["mean_accuracy"] for s in rows])
        final = rows[-1]
        later = [r for r in records if r["strategy"] == strategy and r["round"] > 0]
        asked = sum(r["round_labels"] for r in later)
        per_seed_final = [r["test_accuracy"] for r in records if r["strategy"] == strategy
                          and r["round"] == final["round"]]
        per_seed_reach = []
        for seed in sorted({r["seed"] for r in records}):
            curve = sorted((r for r in records if r["strategy"] == strategy and r["seed"] == seed),
                           key=lambda r: r["round"])
            per_seed_reach.append(labels_to_reach(np.asarray([r["labels"] for r in curve]),
                                                  np.asarray([r["test_accuracy"] for r in curve]), target))
        details[strategy] = {
            "final_mean_accuracy": final["mean_accuracy"],
            "final_se_accuracy": final["se_accuracy"],
            "final_difference_to_random": final["difference_to_control"],
            "final_se_difference": final["se_difference"],
            "final_accuracy_per_seed": per_seed_final,
            "labels_to_reach_control_per_seed": per_seed_reach,
            "peak_mean_accuracy": float(means.max()),
            "peak_labels": int(labels[int(np.argmax(means))]),
            "selected_same_fraction": sum(r["selected_same"] for r in later) / max(asked, 1),
            "label_error_fraction": sum(r["label_errors"] for r in later) / max(asked, 1),
            "labels_per_run": int(final["labels"]),
            "rounds_keeping_pretrained_weights": int(sum(r["best_epoch"] == 0 for r in later)),
            "rounds": len(later),
        }
    return details


def _add_round_labels(records: list[dict[str, Any]]) -> None:
    """Store in each record how many pairs its own round labelled (``round_labels``)."""
    previous: dict[tuple[str, int], int] = {}
    for record in sorted(records, key=lambda r: (r["strategy"], r["seed"], r["round"])):
        key = (record["strategy"], record["seed"])
        record["round_labels"] = record["labels"] - previous.get(key, 0)
        previous[key] = record["labels"]


# -- the first round's questions ----------------------------------------------------


def _cosine_pair_losses(scores: np.ndarray, same: np.ndarray, config: FinetuneConfig) -> np.ndarray:
    """Return the cosine contrastive loss of each pair labelled ``same`` (1) or different (0)."""
    positive = np.maximum(config.positive_margin - scores, 0.0) ** 2
    negative = np.maximum(scores - config.negative_margin, 0.0) ** 2
    return np.where(same.astype(bool), positive, negative)


def first_round_analysis(
    model: torch.nn.Module, spec: Any, dataset: FaceRecordDataset, pool_keys: np.ndarray, threshold: float,
    config: RoundsConfig, finetune_config: FinetuneConfig,
) -> dict[str, dict[str, float]]:
    """Describe the pairs each strategy selects first, as round 1 of the first repeat selects them.

    Besides the mean score and the share of same-person pairs, it reports
    ``flipped_label_loss_share``: the expected share of the batch's training
    loss (at the pretrained weights) that comes from wrongly labelled pairs when
    each label is right with probability ``correct_rate``.
    """
    if finetune_config.loss != "cosine":
        raise ValueError(f"the analysis computes the cosine loss, but the fine-tuning loss is {finetune_config.loss!r}")
    embeddings = embed_dataset(model, spec, dataset, np.unique(pool_keys), workers=0, progress=False)
    features = np.asarray(embeddings.features)
    candidates = mine_candidates(features, embeddings.labels, neighbours=config.neighbours, farthest=config.farthest,
                                 random_count=config.random_count, seed=config.seed + 1, index=config.index)
    analysis = {}
    for strategy in config.strategies:
        params = SelectionParams(**{**vars(config.selection), "strategy": strategy, "batch_size": config.batch_size,
                                    "seed": config.seed})
        chosen = select_from_embeddings(embeddings.keys, embeddings.labels, features, np.asarray(embeddings.magnitudes),
                                        threshold=threshold, params=params, candidates=candidates)
        same = (chosen.identity1 == chosen.identity2).astype(np.int64)
        correct = _cosine_pair_losses(chosen.score, same, finetune_config)
        flipped = _cosine_pair_losses(chosen.score, 1 - same, finetune_config)
        wrong_weight = (1.0 - config.correct_rate) * flipped.sum()
        total = wrong_weight + config.correct_rate * correct.sum()
        analysis[strategy] = {
            "pairs": len(chosen),
            "same_fraction": float(same.mean()),
            "mean_score": float(chosen.score.mean()),
            "mean_distance_to_threshold": float(np.abs(chosen.score - threshold).mean()),
            "pretrained_error_fraction": float(np.mean((chosen.score >= threshold) != same.astype(bool))),
            "mean_loss_correct_label": float(correct.mean()),
            "mean_loss_flipped_label": float(flipped.mean()),
            "flipped_label_loss_share": float(wrong_weight / total) if total > 0 else 0.0,
        }
    return analysis


# -- outputs ------------------------------------------------------------------------


def write_statistics_csv(path: Path, statistics: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(statistics[0]), lineterminator="\n")
            writer.writeheader()
            for row in statistics:
                writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_with_errors(path: Path, statistics: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Draw mean accuracy with standard-error bands, and each strategy's difference to random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 8), dpi=120, sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    for strategy in dict.fromkeys(s["strategy"] for s in statistics):
        rows = [s for s in statistics if s["strategy"] == strategy]
        labels = np.asarray([s["labels"] for s in rows])
        mean = 100 * np.asarray([s["mean_accuracy"] for s in rows])
        se = 100 * np.nan_to_num(np.asarray([s["se_accuracy"] for s in rows]))
        difference = 100 * np.asarray([s["difference_to_control"] for s in rows])
        difference_se = 100 * np.nan_to_num(np.asarray([s["se_difference"] for s in rows]))
        style = "--" if strategy == "random" else "-"
        line, = top.plot(labels, mean, style, marker="o", markersize=3, label=strategy)
        top.fill_between(labels, mean - se, mean + se, color=line.get_color(), alpha=0.15)
        if strategy != "random":
            bottom.plot(labels, difference, style, marker="o", markersize=3, color=line.get_color(), label=strategy)
            bottom.fill_between(labels, difference - difference_se, difference + difference_se,
                                color=line.get_color(), alpha=0.15)
    top.axhline(100 * summary["target_accuracy"], color="grey", linewidth=0.8, linestyle=":",
                label="random at the full budget")
    top.set_ylabel("held-out test accuracy (%)")
    top.set_title(f"LFW, MobileFaceNet: mean of {summary['repeats']} runs, bands are one standard error")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.axhline(0.0, color="grey", linewidth=0.8)
    bottom.set_xlabel("labelled pairs")
    bottom.set_ylabel("difference to random (points)")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


# -- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS_DIR / f"correct_rate_{args.correct_rate:g}")
    setup_logging()
    torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    started = time.perf_counter()
    write_curves = _load_stage("active_rounds").write_curves

    dataset = FaceRecordDataset(args.data)
    parts = build_parts(dataset, args)
    logger.info("parts: %s", json.dumps(parts["description"]))
    device = torch.device("cpu")
    model, spec = ModelSource(checkpoint=args.model, arch=args.arch).load(device=device)

    config = RoundsConfig(
        strategies=list(args.strategies), rounds=args.rounds, batch_size=args.batch_size,
        correct_rate=args.correct_rate, repeats=args.repeats, seed=args.seed, selection=SelectionParams(),
        neighbours=args.neighbours, farthest=args.farthest, random_count=args.random_count,
    )
    finetune_config = FinetuneConfig(train=args.train, lr=args.lr, epochs=args.epochs, patience=args.patience)
    records = simulate_rounds(model, spec, dataset, parts["pool_keys"], parts["validation"], parts["test"],
                              config, finetune_config, device=device)
    _add_round_labels(records)
    pretrained_threshold = next(r["threshold"] for r in records if r["round"] == 0)
    first_round = first_round_analysis(model, spec, dataset, parts["pool_keys"], pretrained_threshold, config,
                                       finetune_config)
    elapsed = time.perf_counter() - started

    summary = summarize(records)
    summary["repeats"] = args.repeats
    statistics = curve_statistics(records)
    details = strategy_details(records, statistics, summary["target_accuracy"])
    for strategy, entry in summary["strategies"].items():
        entry.update(details[strategy])
    summary = {
        "command": command,
        "wall_seconds": round(elapsed, 1),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                 "machine": platform.machine()},
        "settings": {
            "arguments": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "rounds_config": {**{k: v for k, v in dataclasses.asdict(config).items() if k != "selection"},
                              "selection": dataclasses.asdict(config.selection)},
            "finetune_config": finetune_config.to_dict(),
        },
        "data": parts["description"],
        **summary,
        "first_round_questions": first_round,
    }

    out = Path(args.out)
    # write_curves replaces the folder as a whole, so it runs first.
    write_curves(out, records)
    write_statistics_csv(out / "learning_curve_se.csv", statistics)
    plot_with_errors(out / "learning_curves_se.png", statistics, summary)
    write_json_atomic(out / "summary.json", summary)

    logger.info("finished in %.0f s; wrote %s", elapsed, out)
    for strategy, entry in summary["strategies"].items():
        logger.info(
            "%-11s final %.2f%% +- %.2f, difference to random %+.2f +- %.2f points; labels to reach random's "
            "%.2f%%: %s",
            strategy, 100 * entry["final_mean_accuracy"], 100 * entry["final_se_accuracy"],
            100 * entry["final_difference_to_random"], 100 * entry["final_se_difference"],
            100 * summary["target_accuracy"], entry["labels_to_reach_control"],
        )
    for strategy, entry in first_round.items():
        logger.info("%-11s first batch: %.0f%% same person, mean score %.3f, %.0f%% errors of the pretrained model, "
                    "%.0f%% of the expected loss from wrong labels", strategy, 100 * entry["same_fraction"],
                    entry["mean_score"], 100 * entry["pretrained_error_fraction"],
                    100 * entry["flipped_label_loss_share"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
