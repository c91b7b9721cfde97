"""Stage pretrain: train the embedded default's small iResNet with MagLoss on the synthetic sample.

Reads ``--data`` (default ``data/sample``, written by the sample stage):
trains on ``pretrain/``, measures verification on the unseen source-domain
identities of ``heldout/`` and on the target-domain identities of
``target/``. Writes the checkpoint ``--out`` (default
``models/pretrained.pt``) in the project's format, with the model
specification and the training settings. Writes ``--metrics`` (default
``metrics/pretrain.json``) with the final loss, training accuracy, magnitude
statistics and the lambda_g feasibility check. Per held-out set, it adds the
accuracy at a calibrated threshold and the error-versus-reject summary.
``--plots``, when given, receives the error-versus-reject curves as CSV.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from magface_al.data.faces import FaceRecordDataset
from magface_al.distributed import current_context, distributed_run, rank_device
from magface_al.models.spec import ModelSpec, Preprocess, build_model
from magface_al.params import load_section
from magface_al.training.pretrain import PretrainConfig, heldout_verification, pretrain, save_pretrained
from magface_al.utils import atomic_path, setup_logging, write_json_atomic

logger = logging.getLogger("stages.pretrain")


@dataclasses.dataclass
class ModelParams:
    """The architecture to train: an iResNet of any depth and width, at a square input size."""

    arch: str = "iresnet"
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 1, 1, 1])
    widths: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])
    embedding_size: int = 128
    input_size: int = 56  # the 112x112 faces are resized to this many pixels per side
    dropout: float = 0.4

    def spec(self) -> ModelSpec:
        """Return the model specification: MagFace preprocessing (BGR, x / 255) at ``input_size``."""
        arch_kwargs = {"layers": list(self.layers), "widths": list(self.widths), "dropout": self.dropout}
        preprocess = Preprocess(input_size=(self.input_size, self.input_size))
        return ModelSpec(self.arch, arch_kwargs, self.embedding_size, preprocess)


@dataclasses.dataclass
class HeldoutParams:
    """Settings of the held-out verification: pair counts, the ERC's FMR and the seed."""

    pairs_per_class: int = 2000  # same and different pairs in each half (calibration, test)
    erc_fmr: float = 1e-3
    seed: int = 0


@dataclasses.dataclass
class PretrainParams:
    """The ``pretrain`` section of params.yaml."""

    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    train: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    heldout: HeldoutParams = dataclasses.field(default_factory=HeldoutParams)
    device: str = "auto"  # auto, cpu, cuda or cuda:N


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sample", help="sample folder with pretrain/, heldout/ and target/")
    parser.add_argument("--out", default="models/pretrained.pt", help="output checkpoint")
    parser.add_argument("--metrics", default="metrics/pretrain.json", help="output metrics file")
    parser.add_argument("--plots", default=None, help="optional output folder for the error-versus-reject curves (CSV)")
    parser.add_argument("--params", default="params.yaml", help="params file with the pretrain section")
    return parser.parse_args(argv)


def _write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _evaluation_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Keep the scalars of a held-out evaluation; the curve goes to the plots folder."""
    verification = evaluation["verification"]
    summary = {key: value for key, value in evaluation.items() if key not in ("verification", "error_versus_reject_curve")}
    for key in ("accuracy", "accuracy_std", "auc", "eer", "best_threshold_accuracy", "tar_at_far_1e-2", "tar_at_far_1e-3"):
        if key in verification:
            summary[f"kfold_{key}" if key in ("accuracy", "accuracy_std") else key] = verification[key]
    summary["accuracy_by_reject_fraction"] = {
        f"{row['reject_fraction']:.2f}": row["accuracy"] for row in evaluation["error_versus_reject_curve"]
    }
    return summary


def run(args: argparse.Namespace, params: PretrainParams, device: torch.device) -> dict[str, Any]:
    """Train and measure on every rank; only rank 0 writes the checkpoint, metrics and plots."""
    data = Path(args.data)
    spec = params.model.spec()
    torch.manual_seed(params.train.seed)
    model = build_model(spec).to(device)

    train_set = FaceRecordDataset(data / "pretrain")
    result = pretrain(model, spec, train_set, params.train, device=device)

    evaluations = {}
    for name in ("heldout", "target"):
        started = time.perf_counter()
        evaluations[name] = heldout_verification(
            model,
            spec,
            FaceRecordDataset(data / name),
            pairs_per_class=params.heldout.pairs_per_class,
            seed=params.heldout.seed,
            erc_fmr=params.heldout.erc_fmr,
        )
        logger.info(
            "%s identities: accuracy %.4f at calibrated threshold %.3f, %.4f with the lowest-quality %.0f%% of pairs rejected (%.1f s)",
            name,
            evaluations[name]["accuracy"],
            evaluations[name]["threshold"],
            evaluations[name]["accuracy_at_max_reject"],
            100 * evaluations[name]["max_reject_fraction"],
            time.perf_counter() - started,
        )

    metrics = {
        "model_spec": spec.to_dict(),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "train_images": len(train_set),
        "train_identities": len(train_set.identities),
        "steps": result.steps,
        **{f"final_{key}": value for key, value in result.final.items() if key not in ("epoch", "steps")},
        **result.feasibility,
        "heldout_source": _evaluation_summary(evaluations["heldout"]),
        "target_domain": _evaluation_summary(evaluations["target"]),
        "history": result.history,
    }
    if not current_context().is_main:
        return metrics
    save_pretrained(args.out, model, spec, params.train, result, extra={"data": str(data)})
    write_json_atomic(args.metrics, metrics)
    if args.plots:
        with atomic_path(args.plots, is_dir=True) as tmp:
            for name, evaluation in evaluations.items():
                _write_curve(Path(tmp) / f"error_reject_{name}.csv", evaluation["error_versus_reject_curve"])
    return metrics


@record
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(PretrainParams, "pretrain", args.params)
    device = rank_device(params.device)
    with distributed_run(device):
        run(args, params, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
