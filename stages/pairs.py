"""Stage pairs: split identities, sample feedback, validation and test pairs, add feedback labels.

Writes the folder ``--out`` (default ``data/pairs``) as a whole, atomically:

- ``splits.json``: the identity ids of the feedback pool, validation and test parts;
- ``feedback.json``: feedback records (simulated with label noise, or imported
  from ``feedback_file``);
- ``feedback_truth.csv``: the feedback pairs with the given label and, for
  simulated feedback, the true label in ``truth``;
- ``val.csv`` and ``test.csv``: pairs with true labels;
- ``import_report.json``: entries dropped on import and why (empty when simulated).

and ``--metrics`` (default ``metrics/pairs.json``) with the counts and the realized noise rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from magface_al.data.faces import MANIFEST_NAME, FaceRecordDataset
from magface_al.pairs.feedback import (
    SOURCE_HUMAN,
    SOURCE_SIMULATED,
    FeedbackImport,
    ImageIndex,
    read_feedback_json,
    write_feedback_json,
)
from magface_al.pairs.noise import realized_noise_rate, simulate_feedback
from magface_al.pairs.sampling import mine_hard_pairs, sample_pairs
from magface_al.pairs.splits import IdentitySplit, split_identities
from magface_al.pairs.table import Pairs, write_pairs_csv
from magface_al.params import load_section
from magface_al.utils import atomic_path, setup_logging, write_json_atomic

logger = logging.getLogger("stages.pairs")


@dataclasses.dataclass
class PairsParams:
    """The ``pairs`` section of params.yaml."""

    seed: int = 0
    feedback_fraction: float = 0.6  # share of identities in the feedback pool
    validation_fraction: float = 0.2  # share of identities for threshold calibration and early stopping
    test_fraction: float = 0.2  # share of identities held out for the final metrics
    feedback_same: int = 1000  # same-person feedback pairs
    feedback_different: int = 1000  # different-person feedback pairs
    validation_same: int = 300
    validation_different: int = 300
    test_same: int = 1000
    test_different: int = 1000
    correct_rate: float = 0.9  # simulated annotator: each label is right with this probability
    feedback_file: str | None = None  # human feedback JSON to import instead of simulating
    on_error: Literal["raise", "drop"] = "raise"  # for invalid entries of feedback_file
    hard_fraction: float = 0.0  # share of simulated feedback pairs mined as hard pairs
    hard_model: str | None = None  # checkpoint that embeds the feedback pool for hard mining
    hard_batch_size: int = 64
    hard_device: str = "auto"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/subset", help="face dataset folder with manifest.csv")
    parser.add_argument("--out", default="data/pairs", help="output folder")
    parser.add_argument("--metrics", default="metrics/pairs.json", help="output counts file")
    parser.add_argument("--params", default="params.yaml", help="params file holding the pairs section")
    return parser.parse_args(argv)


def _image_index(dataset: FaceRecordDataset) -> ImageIndex:
    manifest = dataset.folder / MANIFEST_NAME
    if manifest.is_file():
        return ImageIndex.from_manifest(manifest)
    logger.warning("%s not found; feedback images are named by record key", manifest)
    return ImageIndex.from_labels(dataset.keys, dataset.labels)


def _split(dataset: FaceRecordDataset, params: PairsParams) -> IdentitySplit:
    identities, counts = np.unique(dataset.labels, return_counts=True)
    fractions = (params.feedback_fraction, params.validation_fraction, params.test_fraction)
    return split_identities(identities, fractions, seed=params.seed, image_counts=counts)


def _hard_pairs(dataset: FaceRecordDataset, pool: np.ndarray, params: PairsParams) -> Pairs:
    """Mine hard feedback pairs with ``hard_model``; no pairs when hard mining is off."""
    num_same = int(round(params.hard_fraction * params.feedback_same))
    num_different = int(round(params.hard_fraction * params.feedback_different))
    if not (num_same or num_different):
        return Pairs.empty()
    if not params.hard_model:
        raise SystemExit("pairs.hard_fraction is above 0 but pairs.hard_model is empty; set both or neither")
    # Imported here so that the stage does not load torch unless hard mining is on.
    from magface_al.embedding import embed_dataset
    from magface_al.models.checkpoint import load_model
    from magface_al.models.device import select_device

    model, spec = load_model(params.hard_model, device=select_device(params.hard_device))
    keys = dataset.keys[np.isin(dataset.labels, pool)]
    embeddings = embed_dataset(model, spec, dataset, keys, batch_size=params.hard_batch_size)
    return mine_hard_pairs(
        embeddings.keys, embeddings.labels, np.asarray(embeddings.features),
        num_same=num_same, num_different=num_different,
    )


def _simulated_feedback(dataset: FaceRecordDataset, split: IdentitySplit, params: PairsParams) -> Pairs:
    hard = _hard_pairs(dataset, split.feedback, params)
    num_hard_same = int(hard.label.sum())
    random_pairs = sample_pairs(
        dataset.keys, dataset.labels,
        num_same=params.feedback_same - num_hard_same,
        num_different=params.feedback_different - (len(hard) - num_hard_same),
        seed=np.random.default_rng([params.seed, 1]),
        identities=split.feedback,
        exclude=hard,
        description="the feedback pool",
    )
    pairs = Pairs.concatenate([hard, random_pairs])
    pairs = pairs.select(np.random.default_rng([params.seed, 2]).permutation(len(pairs)))
    return simulate_feedback(pairs, params.correct_rate, seed=np.random.default_rng([params.seed, 3]))


FEEDBACK_FOLDER = Path("feedback")


def _warn_outside_feedback_folder(feedback_file: str) -> None:
    """Warn when DVC cannot see changes of the feedback file: only the feedback/ folder is a dependency."""
    path = Path(feedback_file).resolve()
    if FEEDBACK_FOLDER.resolve() not in path.parents:
        logger.warning(
            "pairs.feedback_file %s is outside %s/, which is the folder dvc.yaml declares as a dependency; "
            "DVC will not rerun this stage when the file changes. Move the file into %s/",
            feedback_file, FEEDBACK_FOLDER, FEEDBACK_FOLDER,
        )


def run(args: argparse.Namespace, params: PairsParams) -> dict:
    dataset = FaceRecordDataset(args.data)
    index = _image_index(dataset)
    split = _split(dataset, params)

    # Independent generator streams per part, so changing one part's size leaves the others unchanged.
    validation = sample_pairs(
        dataset.keys, dataset.labels, num_same=params.validation_same, num_different=params.validation_different,
        seed=np.random.default_rng([params.seed, 4]), identities=split.validation, description="the validation part",
    )
    test = sample_pairs(
        dataset.keys, dataset.labels, num_same=params.test_same, num_different=params.test_different,
        seed=np.random.default_rng([params.seed, 5]), identities=split.test, description="the test part",
    )

    if params.feedback_file:
        _warn_outside_feedback_folder(params.feedback_file)
        imported = read_feedback_json(
            params.feedback_file, index, on_error=params.on_error, allowed_identities=split.feedback
        )
        feedback, source = imported.pairs, SOURCE_HUMAN
    else:
        imported = FeedbackImport(Pairs.empty(), [])
        feedback, source = _simulated_feedback(dataset, split, params), SOURCE_SIMULATED

    with atomic_path(args.out, is_dir=True) as tmp:
        write_json_atomic(tmp / "splits.json", {"seed": params.seed, **split.to_dict()})
        write_feedback_json(tmp / "feedback.json", feedback, index, source=source)
        write_pairs_csv(tmp / "feedback_truth.csv", feedback)
        write_pairs_csv(tmp / "val.csv", validation)
        write_pairs_csv(tmp / "test.csv", test)
        write_json_atomic(tmp / "import_report.json", {"feedback_file": params.feedback_file, **imported.report()})

    noise = realized_noise_rate(feedback)
    metrics = {
        "identities": split.to_dict()["counts"],
        "feedback_source": source,
        "feedback_pairs": len(feedback),
        "feedback_labelled_same": int((feedback.label == 1).sum()),
        "feedback_labelled_different": int((feedback.label == 0).sum()),
        "feedback_true_same": int((feedback.truth == 1).sum()) if feedback.truth is not None else None,
        "validation_pairs": len(validation),
        "test_pairs": len(test),
        "requested_noise_rate": round(1.0 - params.correct_rate, 12) if source == SOURCE_SIMULATED else None,
        "realized_noise_rate": noise,
        "import_dropped": len(imported.dropped),
    }
    if source == SOURCE_HUMAN:
        metrics["requested_noise_rate_reason"] = "human feedback has no simulated noise"
        metrics["feedback_true_same_reason"] = "the true labels of human feedback are unknown"
        metrics["realized_noise_rate_reason"] = "the true labels of human feedback are unknown"
    write_json_atomic(args.metrics, metrics)
    logger.info("wrote pairs to %s", Path(args.out))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(PairsParams, "pairs", args.params)
    run(args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
