"""Stage evaluate: score the promoted model on the baseline's validation and test pairs.

``python stages/evaluate.py --model models/finetuned.pt`` writes ``--metrics``
(default ``metrics/finetuned.json``) with exactly the keys of
``metrics/baseline.json``, so that ``dvc metrics diff`` lines them up, the plot
tables in ``--plots`` (default ``plots/finetuned``) and the embeddings in
``--features`` (default ``features/finetuned``). The threshold is calibrated
on the validation pairs, never on the test pairs, by the same library
function the baseline stage calls, with the embedding settings of the
``baseline`` params section.

``python stages/evaluate.py summarize`` writes the label-noise sweep table:
baseline against fine-tuned per noise key, from each key's metrics files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from magface_al.data.faces import FaceRecordDataset
from magface_al.distributed import current_context, distributed_run, rank_device
from magface_al.evaluation.pipeline import EmbeddingSettings, EvaluationOptions, evaluate_model, write_evaluation
from magface_al.models.checkpoint import load_model
from magface_al.pairs.table import read_pairs_csv
from magface_al.params import ParamsError, load_section, read_params
from magface_al.utils import atomic_path, setup_logging, write_json_atomic, write_text_atomic

logger = logging.getLogger("stages.evaluate")

# Metrics compared per noise key in the sweep table: k-fold test accuracy,
# accuracy at the validation-calibrated threshold, and AUC.
SUMMARY_METRICS = ("accuracy", "accuracy_at_operating_threshold", "auc")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")

    summary = commands.add_parser("summarize", help="write the label-noise sweep table")
    summary.add_argument("--baseline", default="metrics/baseline.json", help="baseline metrics file")
    summary.add_argument("--sweep-dir", default="metrics/sweep",
                         help="folder with <key>/finetune.json and <key>/finetuned.json per noise key")
    summary.add_argument("--out", default="metrics/noise_sweep.json", help="output table (JSON)")
    summary.add_argument("--markdown", default="reports/noise_sweep.md", help="output table (Markdown)")
    summary.add_argument("--params", default="params.yaml", help="params file holding sweep.noise")

    parser.add_argument("--model", default="models/finetuned.pt", help="promoted checkpoint to evaluate")
    parser.add_argument("--data", default="data/subset", help="face dataset folder")
    parser.add_argument("--pairs", default="data/pairs", help="folder with val.csv and test.csv")
    parser.add_argument("--metrics", default="metrics/finetuned.json", help="output metrics file")
    parser.add_argument("--plots", default="plots/finetuned", help="output folder for the plot tables")
    parser.add_argument("--features", default="features/finetuned", help="output folder for the embeddings")
    parser.add_argument("--params", default="params.yaml", help="params file with the baseline and evaluation sections")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Embed and score on every rank of the run; only rank 0 writes."""
    settings = load_section(EmbeddingSettings, "baseline", args.params)
    options = load_section(EvaluationOptions, "evaluation", args.params)
    dataset = FaceRecordDataset(args.data)
    val_pairs = read_pairs_csv(Path(args.pairs) / "val.csv")
    test_pairs = read_pairs_csv(Path(args.pairs) / "test.csv")
    # The promoted checkpoint is always written by the finetune stage, so it
    # carries its model specification and needs no model section.
    model, spec = load_model(args.model, device=rank_device(settings.device))
    result = evaluate_model(
        model, spec, dataset, val_pairs, test_pairs, options=options,
        batch_size=settings.batch_size, workers=settings.workers, flip=settings.flip,
    )
    if not current_context().is_main:
        return result.metrics
    # The same extra keys as the baseline stage writes, so both files have identical keys.
    extra = {"model": str(args.model), "arch": spec.arch, "flip": settings.flip}
    with atomic_path(args.plots, is_dir=True) as plots_tmp, atomic_path(args.features, is_dir=True) as features_tmp:
        write_evaluation(
            result, metrics_path=args.metrics, plots_dir=plots_tmp, features_dir=features_tmp,
            val_pairs=val_pairs, extra_metrics=extra,
        )
    return result.metrics


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}; run the sweep stages first (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))


def sweep_rows(baseline: dict[str, Any], sweep_dir: Path, rates: dict[str, float]) -> list[dict[str, Any]]:
    """Build one row per noise key: its rate, promotion, baseline and fine-tuned test metrics and deltas."""
    rows = []
    for key, rate in rates.items():
        training = _read_json(sweep_dir / key / "finetune.json")
        tuned = _read_json(sweep_dir / key / "finetuned.json")
        row: dict[str, Any] = {
            "key": key,
            "noise_rate": float(rate),
            "realized_noise_rate": training.get("noise", {}).get("realized_rate"),
            "promoted": training.get("promoted"),
            "flagged_precision": training.get("suspicious", {}).get("flagged_precision"),
        }
        for name in SUMMARY_METRICS:
            before, after = baseline.get(name), tuned.get(name)
            row[f"baseline_{name}"] = before
            row[f"finetuned_{name}"] = after
            row[f"delta_{name}"] = None if before is None or after is None else after - before
        for benchmark in training.get("guard", {}).get("benchmarks", []):
            row[f"guard_delta_points_{benchmark['name']}"] = benchmark["delta_points"]
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    columns = ["key", "noise_rate", "promoted", "flagged_precision"]
    columns += [f"{prefix}_{name}" for name in SUMMARY_METRICS for prefix in ("baseline", "finetuned", "delta")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(args: argparse.Namespace) -> list[dict[str, Any]]:
    rates = read_params(args.params).get("sweep", {}).get("noise")
    if not isinstance(rates, dict) or not rates:
        raise ParamsError(f"{args.params}: sweep.noise must map noise keys (such as n00) to rates")
    rows = sweep_rows(_read_json(Path(args.baseline)), Path(args.sweep_dir), rates)
    # Keyed by noise key, so that `dvc metrics show` lists each key's figures.
    write_json_atomic(args.out, {row["key"]: row for row in rows})
    write_text_atomic(args.markdown, _markdown(rows))
    logger.info("wrote the sweep table of %d noise keys to %s and %s", len(rows), args.out, args.markdown)
    return rows


@record
def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.command == "summarize":
        summarize(args)
        return 0
    device = rank_device(load_section(EmbeddingSettings, "baseline", args.params).device)
    with distributed_run(device):
        evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
