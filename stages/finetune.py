"""Stage finetune: fine-tune on feedback pairs, flag suspicious labels, promote only past the guard.

Reads the pretrained ``--model``, the dataset ``--data`` and the pairs folder
``--pairs`` (``splits.json``, ``feedback_truth.csv``, ``val.csv``). Writes:

- ``--out`` (default ``models/finetuned.pt``): the promoted model. It is the
  pretrained one when the no-degradation guard rejects the fine-tuned one, and
  it stores the training params and the guard decision;
- ``--metrics`` (default ``metrics/finetune.json``): training history, the
  guard's figures and decision, and the suspicious-label summary;
- ``--suspicious`` (default ``reports/suspicious_pairs.csv``): every feedback
  pair ranked by how strongly the pretrained model contradicts its label.

With ``--noise-key KEY`` (for the label-noise sweep), the feedback labels are
re-drawn from the true labels with the rate ``sweep.noise.KEY`` of the params
file; that needs simulated feedback, whose true labels are known.
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
from torch.distributed.elastic.multiprocessing.errors import record

from magface_al.data.faces import FaceRecordDataset
from magface_al.distributed import current_context, distributed_run, rank_device
from magface_al.evaluation.calibration import calibrate_threshold
from magface_al.models.checkpoint import save_checkpoint
from magface_al.models.source import ModelSource
from magface_al.pairs.noise import flip_labels, realized_noise_rate
from magface_al.pairs.table import Pairs, read_pairs_csv
from magface_al.params import ParamsError, load_section, read_params
from magface_al.training.feature_cache import TrunkHeadSplit, compute_trunk_features
from magface_al.training.finetune import FinetuneConfig, finetune, pair_cosines
from magface_al.training.guard import GuardSource, load_guard_benchmark, run_guard
from magface_al.training.suspicious import rank_suspicious_pairs, write_suspicious_csv
from magface_al.utils import setup_logging, write_json_atomic

logger = logging.getLogger("stages.finetune")


@dataclasses.dataclass
class SuspiciousParams:
    """The ``finetune.suspicious`` section: which feedback pairs to flag and leave out."""

    flag_margin: float = 0.0  # cosine units a label must contradict the pretrained model by to be flagged
    exclude_top_k: int = 0  # leave at most this many of the most suspicious flagged pairs out of training
    exclude_top_fraction: float = 0.0  # or at most this share of all feedback pairs; the larger count applies


@dataclasses.dataclass
class GuardParams:
    """The ``finetune.guard`` section: the general benchmarks and the accepted drop."""

    tolerance_points: float = 0.2  # largest accepted accuracy drop per benchmark, in percentage points
    folds: int = 10  # folds of the k-fold accuracy protocol
    benchmarks: list[GuardSource] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FinetuneStageParams:
    """The ``finetune`` section of params.yaml."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    batch_size: int = 64  # images per forward pass for the guard benchmarks
    distill_images: int = 1000  # unlabelled feedback-pool images for distillation (used when training.distill > 0)
    noise_seed: int = 0  # seed of the re-drawn labels under --noise-key
    training: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    suspicious: SuspiciousParams = dataclasses.field(default_factory=SuspiciousParams)
    guard: GuardParams = dataclasses.field(default_factory=GuardParams)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pretrained checkpoint")
    parser.add_argument("--data", default="data/subset", help="face dataset folder")
    parser.add_argument("--pairs", default="data/pairs", help="folder with splits.json, feedback_truth.csv and val.csv")
    parser.add_argument("--out", default="models/finetuned.pt", help="output checkpoint of the promoted model")
    parser.add_argument("--metrics", default="metrics/finetune.json", help="output metrics file")
    parser.add_argument("--suspicious", default="reports/suspicious_pairs.csv", help="output ranked feedback pairs")
    parser.add_argument("--noise-key", default=None,
                        help="re-draw the feedback labels with the noise rate sweep.noise.<KEY> (e.g. n20)")
    parser.add_argument("--params", default="params.yaml", help="params file holding the finetune section")
    return parser.parse_args(argv)


def noise_rate_for(key: str, params_path: str) -> float:
    """Return the noise rate ``sweep.noise.<key>`` of the params file."""
    rates = read_params(params_path).get("sweep", {}).get("noise", {})
    if key not in rates:
        raise ParamsError(
            f"{params_path}: sweep.noise has no key {key!r}; expected one of {', '.join(map(str, rates)) or '(none)'}"
        )
    rate = float(rates[key])
    if not 0.0 <= rate <= 1.0:
        raise ParamsError(f"{params_path}: sweep.noise.{key} must be a rate in [0, 1], got {rate}")
    return rate


def relabel(feedback: Pairs, rate: float, seed: int) -> Pairs:
    """Re-draw the feedback labels from the true ones with noise ``rate``.

    The same seed draws the same uniform number per pair at every rate, so the
    pairs flipped at a lower rate are also flipped at every higher rate.
    """
    if feedback.truth is None:
        raise SystemExit(
            "--noise-key needs simulated feedback with true labels (a truth column in feedback_truth.csv); "
            "human feedback cannot be re-drawn"
        )
    labels = flip_labels(feedback.truth, 1.0 - rate, seed=seed)
    return Pairs(feedback.key1, feedback.key2, labels, feedback.identity1, feedback.identity2, truth=feedback.truth)


def _distill_keys(dataset: FaceRecordDataset, pool: np.ndarray, feedback: Pairs, count: int, seed: int) -> np.ndarray:
    """Draw unlabelled images of the feedback pool (not in any feedback pair) for distillation."""
    candidates = dataset.keys[np.isin(dataset.labels, pool) & ~np.isin(dataset.keys, feedback.keys)]
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))


def run(args: argparse.Namespace, source: ModelSource, params: FinetuneStageParams) -> dict[str, Any]:
    """Score, fine-tune and guard on every rank of the run; only rank 0 writes."""
    config = params.training
    device = rank_device(params.device)
    writes = current_context().is_main
    dataset = FaceRecordDataset(args.data)
    pairs_dir = Path(args.pairs)
    splits = json.loads((pairs_dir / "splits.json").read_text(encoding="utf-8"))
    feedback_pool = np.asarray(splits["feedback"], dtype=np.int64)
    feedback = read_pairs_csv(pairs_dir / "feedback_truth.csv")
    val_pairs = read_pairs_csv(pairs_dir / "val.csv")

    noise: dict[str, Any] = {"key": args.noise_key}
    if args.noise_key:
        noise["requested_rate"] = noise_rate_for(args.noise_key, args.params)
        noise["applied"] = feedback.truth is not None
        if noise["applied"]:
            feedback = relabel(feedback, noise["requested_rate"], params.noise_seed)
        else:
            # Human feedback has no true labels to re-draw. The sweep then trains every noise key on
            # the labels as given, so that `dvc repro` still completes.
            noise["applied_reason"] = "human feedback has no true labels; trained on the labels as given"
            logger.warning("sweep key %s: %s", args.noise_key, noise["applied_reason"])
    noise["realized_rate"] = realized_noise_rate(feedback)
    if feedback.truth is None:
        noise["realized_rate_reason"] = "the feedback has no true labels"

    pretrained, spec = source.load(path=args.model, device=device)
    distill_keys = np.zeros(0, dtype=np.int64)
    if config.distill > 0:
        distill_keys = _distill_keys(dataset, feedback_pool, feedback, params.distill_images, config.seed)

    # The trunk outputs serve both the suspicion scores and the training.
    split = TrunkHeadSplit(pretrained, spec.arch, config.train)
    cache_keys = np.unique(np.concatenate([feedback.keys, val_pairs.keys, distill_keys]))
    cache = compute_trunk_features(split, spec, dataset, cache_keys, batch_size=config.embed_batch_size,
                                   device=device, cache_dir=config.cache_dir)
    threshold = calibrate_threshold(pair_cosines(split, cache, val_pairs), val_pairs.true_labels)
    ranking = rank_suspicious_pairs(
        feedback, pair_cosines(split, cache, feedback), threshold,
        flag_margin=params.suspicious.flag_margin,
        exclude_top_k=params.suspicious.exclude_top_k,
        exclude_top_fraction=params.suspicious.exclude_top_fraction,
    )
    if writes:
        write_suspicious_csv(args.suspicious, ranking)

    result = finetune(pretrained, spec, dataset, ranking.kept_pairs(), val_pairs, config,
                      unlabelled_keys=distill_keys, device=device, trunk_cache=cache)

    benchmarks = [load_guard_benchmark(source, feedback_identities=feedback_pool)
                  for source in params.guard.benchmarks]
    guard = run_guard(pretrained, result.model, spec, benchmarks, tolerance_points=params.guard.tolerance_points,
                      folds=params.guard.folds, batch_size=params.batch_size, device=device,
                      shared_trunk_part=None if config.train == "all" else config.train)
    promoted_model = result.model if guard.promoted else pretrained
    metrics = {
        "promoted": guard.promoted,
        "promoted_reason": guard.reason,
        "guard": guard.to_dict(),
        "noise": noise,
        "feedback_pairs": len(feedback),
        "suspicious": ranking.summary(),
        "training": result.summary(),
    }
    if not writes:
        return metrics
    save_checkpoint(
        args.out, promoted_model, spec, epoch=result.best_epoch if guard.promoted else 0,
        extra={
            "source_model": str(args.model),
            "promoted": guard.promoted,
            "guard_reason": guard.reason,
            "noise_key": args.noise_key,
            "finetune": dataclasses.asdict(params),
        },
    )
    write_json_atomic(args.metrics, metrics)
    logger.info("wrote %s (%s) and %s", args.out, "fine-tuned" if guard.promoted else "pretrained kept", args.metrics)
    return metrics


@record
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    source = load_section(ModelSource, "model", args.params)
    params = load_section(FinetuneStageParams, "finetune", args.params)
    with distributed_run(rank_device(params.device)):
        run(args, source, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
