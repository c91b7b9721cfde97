"""Time fine-tuning of the head on cached trunk outputs against fine-tuning every layer, in one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_finetune.py [--data ../shared/data/lfw]
        [--model ../shared/models/mobilefacenet_casia_arcface.ckpt] [--threads 2] [--skip-full]

Both runs train on the same 200 feedback pairs of the LFW feedback-pool
identities for 10 epochs. They validate after every epoch on pairs of other
identities and keep the best epoch. Each model is then scored on held-out
test pairs of a third identity set, at the threshold calibrated on the
validation pairs.
Prints one JSON object: the seconds spent computing the trunk cache and the
seconds spent in the epochs (target for the head: <= 20 s on 2 CPU cores),
and the test accuracy of the pretrained, head-tuned and fully tuned models.

With ``--sweep`` it instead measures the label-noise sweep the way the
finetune stage runs it, with the head only and the default params. For each
noise rate, and for the euclidean loss, it reports the guard's figures, the
promotion, the change in test accuracy and the precision of the flagged
pairs. The guard's general benchmark is ORL (sampled pairs) plus the LFW
``pairs.txt`` pairs outside the feedback pool.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from magface_al.data.faces import FaceRecordDataset
from magface_al.embedding import embed_dataset
from magface_al.evaluation.calibration import accuracy_at_threshold, calibrate_threshold
from magface_al.evaluation.verification import cosine_scores, kfold_accuracy
from magface_al.models import load_model
from magface_al.pairs.noise import simulate_feedback
from magface_al.pairs.sampling import mine_hard_pairs, sample_pairs
from magface_al.pairs.splits import split_identities
from magface_al.pairs.table import Pairs
from magface_al.training.feature_cache import TrunkHeadSplit, compute_trunk_features
from magface_al.training.finetune import FinetuneConfig, finetune, pair_cosines
from magface_al.training.guard import GuardSource, load_guard_benchmark, run_guard
from magface_al.training.suspicious import rank_suspicious_pairs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "lfw"), help="RecordIO face dataset folder")
    parser.add_argument("--model", default=str(SHARED / "models" / "mobilefacenet_casia_arcface.ckpt"))
    parser.add_argument("--arch", default="mobilefacenet", help="architecture of a checkpoint without a spec")
    parser.add_argument("--pairs", type=int, default=200, help="feedback pairs (half same, half different)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--val-pairs", type=int, default=200, help="validation pairs for early stopping")
    parser.add_argument("--test-pairs", type=int, default=600, help="held-out test pairs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is for 2 cores)")
    parser.add_argument("--skip-full", action="store_true", help="time the head only")
    parser.add_argument("--sweep", action="store_true", help="measure the noise sweep and the guard instead")
    parser.add_argument("--orl", default=str(SHARED / "data" / "orl"), help="ORL RecordIO folder for the guard")
    parser.add_argument("--hard-fraction", type=float, default=0.0,
                        help="share of feedback pairs mined as the pretrained model's hardest pairs (--sweep)")
    return parser.parse_args(argv)


def held_out_accuracy(model: torch.nn.Module, spec, dataset, val: Pairs, test: Pairs) -> float:
    """Return the test accuracy (percent) at the threshold calibrated on ``val``."""
    embeddings = embed_dataset(model, spec, dataset, np.union1d(val.keys, test.keys), workers=0, progress=False)
    rows = embeddings.key_to_row()
    threshold = calibrate_threshold(cosine_scores(np.asarray(embeddings.features), rows, val), val.true_labels)
    scores = cosine_scores(np.asarray(embeddings.features), rows, test)
    return 100.0 * accuracy_at_threshold(scores, test.true_labels, threshold)


def run_one(name: str, part: str, model, spec, dataset, feedback: Pairs, val: Pairs, test: Pairs,
            epochs: int) -> dict:
    # Patience equal to the epoch count: every run does all epochs, and the best one is kept.
    config = FinetuneConfig(train=part, epochs=epochs, lr=1e-3 if part == "head" else 1e-4,
                            early_stopping="accuracy", patience=epochs)
    start = time.perf_counter()
    result = finetune(model, spec, dataset, feedback, val, config, device=torch.device("cpu"))
    total = time.perf_counter() - start
    return {
        "name": name,
        "train": part,
        "cache_seconds": round(result.cache_seconds, 2),
        "epoch_seconds": round(result.train_seconds, 2),
        "total_seconds": round(total, 2),
        "best_epoch": result.best_epoch,
        "test_accuracy": round(held_out_accuracy(result.model, spec, dataset, val, test), 3),
    }


def noise_sweep(args: argparse.Namespace, model, spec, dataset, split, feedback: Pairs, val: Pairs,
                test: Pairs) -> dict:
    """Fine-tune at each noise rate (and once with the euclidean loss) and apply the guard."""
    device = torch.device("cpu")
    trunk = TrunkHeadSplit(model, spec.arch, "head")
    cache = compute_trunk_features(trunk, spec, dataset, np.concatenate([feedback.keys, val.keys, test.keys]))
    threshold = calibrate_threshold(pair_cosines(trunk, cache, val), val.true_labels)
    benchmarks = [
        load_guard_benchmark(GuardSource(name="orl", kind="sampled", images=args.orl, num_same=1000,
                                         num_different=1000, seed=0)),
        load_guard_benchmark(GuardSource(name="lfw-outside-feedback", kind="lfw_pairs",
                                         path=str(Path(args.data) / "pairs.txt"), images=args.data,
                                         exclude_feedback_identities=True),
                             feedback_identities=split.feedback),
    ]

    def scored(candidate) -> dict:
        head = TrunkHeadSplit(candidate, spec.arch, "head")
        calibrated = calibrate_threshold(pair_cosines(head, cache, val), val.true_labels)
        scores = pair_cosines(head, cache, test)
        return {"test_accuracy": 100.0 * accuracy_at_threshold(scores, test.true_labels, calibrated),
                "test_kfold_accuracy": 100.0 * kfold_accuracy(scores, test.true_labels).mean}

    baseline = scored(model)
    runs = [(rate, "cosine") for rate in (0.0, 0.1, 0.2, 0.4)] + [(0.0, "euclidean"), (0.2, "euclidean")]
    rows = []
    for rate, loss in runs:
        noisy = simulate_feedback(feedback, 1.0 - rate, seed=5)
        ranking = rank_suspicious_pairs(noisy, pair_cosines(trunk, cache, noisy), threshold)
        result = finetune(model, spec, dataset, noisy, val, FinetuneConfig(loss=loss), device=device,
                          trunk_cache=cache)
        guard = run_guard(model, result.model, spec, benchmarks, tolerance_points=0.2, device=device,
                          shared_trunk_part="head")
        promoted = scored(result.model if guard.promoted else model)
        candidate = scored(result.model)
        summary = ranking.summary()
        rows.append({
            "noise_rate": rate,
            "loss": loss,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.train_seconds, 2),
            "promoted": guard.promoted,
            "guard": [b.to_dict() for b in guard.benchmarks],
            "candidate_test_delta_points": round(candidate["test_accuracy"] - baseline["test_accuracy"], 3),
            "promoted_test_delta_points": round(promoted["test_accuracy"] - baseline["test_accuracy"], 3),
            "promoted_kfold_delta_points": round(promoted["test_kfold_accuracy"] - baseline["test_kfold_accuracy"], 3),
            "flagged": summary["flagged"],
            "mislabelled": summary["mislabelled"],
            "flagged_precision": summary.get("flagged_precision"),
            "flagged_recall": summary.get("flagged_recall"),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"baseline": {k: round(v, 3) for k, v in baseline.items()}, "threshold": round(threshold, 4),
            "hard_fraction": args.hard_fraction, "rows": rows}


def _feedback_pairs(args: argparse.Namespace, model, spec, dataset, split) -> Pairs:
    """Sample the feedback pairs, a ``hard_fraction`` share of them mined as the hardest pairs."""
    half = args.pairs // 2
    hard_same = hard_different = int(round(args.hard_fraction * half))
    hard = Pairs.empty()
    if hard_same:
        pool = dataset.keys[np.isin(dataset.labels, split.feedback)]
        embeddings = embed_dataset(model, spec, dataset, pool, workers=0, progress=False)
        hard = mine_hard_pairs(embeddings.keys, embeddings.labels, np.asarray(embeddings.features),
                               num_same=hard_same, num_different=hard_different)
    random_pairs = sample_pairs(dataset.keys, dataset.labels, num_same=half - hard_same,
                                num_different=args.pairs - half - hard_different, seed=1,
                                identities=split.feedback, exclude=hard)
    return Pairs.concatenate([hard, random_pairs])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    dataset = FaceRecordDataset(args.data)
    model, spec = load_model(args.model, args.arch, device="cpu")

    identities, counts = np.unique(dataset.labels, return_counts=True)
    split = split_identities(identities, (0.5, 0.2, 0.3), seed=0, image_counts=counts)
    feedback = _feedback_pairs(args, model, spec, dataset, split)
    val = sample_pairs(dataset.keys, dataset.labels, num_same=args.val_pairs // 2,
                       num_different=args.val_pairs - args.val_pairs // 2, seed=2, identities=split.validation)
    test = sample_pairs(dataset.keys, dataset.labels, num_same=args.test_pairs // 2,
                        num_different=args.test_pairs - args.test_pairs // 2, seed=3, identities=split.test)

    if args.sweep:
        json.dump(noise_sweep(args, model, spec, dataset, split, feedback, val, test), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    report = {
        "threads": args.threads,
        "feedback_pairs": len(feedback),
        "epochs": args.epochs,
        "pretrained_test_accuracy": round(held_out_accuracy(model, spec, dataset, val, test), 3),
        "runs": [run_one("head, cached trunk", "head", model, spec, dataset, feedback, val, test, args.epochs)],
    }
    if not args.skip_full:
        report["runs"].append(run_one("all layers", "all", model, spec, dataset, feedback, val, test, args.epochs))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
