"""Stage select: choose the next pairs of the feedback pool for a person to label.

The module is named select_pairs because a stages/select.py would shadow the
standard library's ``select`` module for every script run from stages/.

Embeds the feedback pool's images with the current model, mines candidate
pairs (nearest other-identity neighbours, farthest same-identity images and
random pairs), removes every pair that already carries a label and ranks the
rest with the configured strategy. Writes:

- ``--out`` (default ``data/select/selected.json``): ``{"strategy", "threshold",
  "pairs": [{"key1", "key2", "image1", "image2", "identity1", "identity2",
  "score", "quality", "mined_by"}]}``, the input of ``magface-al label``;
- ``--metrics`` (default ``metrics/select.json``): counts and score statistics.
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

from magface_al.active.candidates import mine_candidates
from magface_al.active.strategies import SelectionParams, select_from_embeddings
from magface_al.data.faces import MANIFEST_NAME, FaceRecordDataset
from magface_al.pairs.feedback import ImageIndex, read_feedback_json
from magface_al.pairs.splits import IdentitySplit
from magface_al.pairs.table import Pairs
from magface_al.params import load_section
from magface_al.utils import setup_logging, write_json_atomic

logger = logging.getLogger("stages.select")


@dataclasses.dataclass
class SelectParams:
    """The ``select`` section of params.yaml."""

    strategy: str = "uncertainty"  # random, uncertainty, hard, quality or diversity
    batch_size: int = 100  # pairs to ask about
    quality_mode: str = "skip"  # strategy quality: skip or prefer pairs with a low-magnitude face
    quality_quantile: float = 0.1  # magnitudes below this quantile of the pool count as low quality
    diversity_similarity: float = 0.9  # cosine at which two faces count as near-duplicates
    max_pairs_per_image: int = 1  # strategy diversity: uses of one image per batch
    neighbours: int = 5  # candidates per image: nearest images of other identities
    farthest: int = 2  # candidates per image: farthest images of the same identity
    random_count: int = 2000  # random candidate pairs, half same identity
    index: str = "auto"  # nearest-neighbour search: auto, exact, sklearn or faiss
    threshold_key: str = "calibration.threshold"  # dotted key of the threshold in --threshold-metrics
    seed: int = 0
    batch_size_embed: int = 64  # images per forward pass
    workers: int = 2  # image-decoding worker processes
    device: str = "auto"

    def selection(self) -> SelectionParams:
        return SelectionParams(
            strategy=self.strategy,
            batch_size=self.batch_size,
            quality_mode=self.quality_mode,
            quality_quantile=self.quality_quantile,
            diversity_similarity=self.diversity_similarity,
            max_pairs_per_image=self.max_pairs_per_image,
            seed=self.seed,
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint of the current model")
    parser.add_argument("--data", default="data/subset", help="face dataset folder (train.rec, train.idx, property)")
    parser.add_argument("--pairs", default="data/pairs", help="folder with splits.json and feedback.json")
    parser.add_argument(
        "--labelled",
        action="append",
        default=[],
        help="another feedback JSON whose pairs are already labelled (repeatable)",
    )
    parser.add_argument(
        "--threshold-metrics", default="metrics/baseline.json", help="metrics file holding the calibrated threshold"
    )
    parser.add_argument("--out", default="data/select/selected.json", help="output selected pairs JSON")
    parser.add_argument("--metrics", default="metrics/select.json", help="output summary metrics")
    parser.add_argument("--params", default="params.yaml", help="params file holding the select section")
    return parser.parse_args(argv)


def read_threshold(path: Path, dotted_key: str) -> float:
    """Return the number at ``dotted_key`` (``a.b`` is ``data["a"]["b"]``) of a metrics JSON file."""
    if not path.is_file():
        raise SystemExit(f"threshold metrics file not found: {path}; run the baseline stage first")
    node: Any = json.loads(path.read_text(encoding="utf-8"))
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SystemExit(f"{path}: no value at key {dotted_key!r}; set select.threshold_key in params.yaml")
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise SystemExit(f"{path}: {dotted_key} is {node!r}, not a number")
    return float(node)


def image_index(dataset: FaceRecordDataset) -> ImageIndex:
    manifest = dataset.folder / MANIFEST_NAME
    if manifest.is_file():
        return ImageIndex.from_manifest(manifest)
    return ImageIndex.from_labels(dataset.keys, dataset.labels)


def labelled_pairs(paths: Sequence[Path], index: ImageIndex) -> Pairs:
    """Read every labelled pair of the given feedback files; invalid entries are dropped with a warning."""
    parts = [read_feedback_json(path, index, on_error="drop").pairs for path in paths]
    return Pairs.concatenate(parts)


def run(args: argparse.Namespace, params: SelectParams) -> dict[str, Any]:
    # Imported here so that argument errors show without loading torch.
    from magface_al.embedding import embed_dataset
    from magface_al.models.checkpoint import load_model
    from magface_al.models.device import select_device

    selection_params = params.selection()
    dataset = FaceRecordDataset(args.data)
    pairs_dir = Path(args.pairs)
    split = IdentitySplit.from_dict(json.loads((pairs_dir / "splits.json").read_text(encoding="utf-8")))
    threshold = read_threshold(Path(args.threshold_metrics), params.threshold_key)
    index = image_index(dataset)
    feedback_files = [pairs_dir / "feedback.json", *(Path(p) for p in args.labelled)]
    labelled = labelled_pairs(feedback_files, index)

    pool_keys = dataset.keys[np.isin(dataset.labels, split.feedback)]
    device = select_device(params.device)
    model, spec = load_model(args.model, device=device)
    embeddings = embed_dataset(
        model, spec, dataset, pool_keys, batch_size=params.batch_size_embed, workers=params.workers, device=device
    )
    features = np.asarray(embeddings.features)
    candidates = mine_candidates(
        features,
        embeddings.labels,
        neighbours=params.neighbours,
        farthest=params.farthest,
        random_count=params.random_count,
        seed=params.seed,
        index=params.index,
    )
    selection = select_from_embeddings(
        embeddings.keys,
        embeddings.labels,
        features,
        embeddings.magnitudes,
        threshold=threshold,
        params=selection_params,
        candidates=candidates,
        labelled_key1=labelled.key1,
        labelled_key2=labelled.key2,
    )
    write_json_atomic(
        args.out,
        {
            "strategy": params.strategy,
            "threshold": threshold,
            "pairs": selection.records(index),
        },
    )
    same = selection.identity1 == selection.identity2
    summary = {
        "strategy": params.strategy,
        "selected": len(selection),
        "selected_same_identity": int(same.sum()),
        "pool_images": len(pool_keys),
        "candidates": len(candidates),
        "candidates_by_source": candidates.counts(),
        "already_labelled": len(labelled),
        "threshold": threshold,
        "mean_distance_to_threshold": float(np.mean(np.abs(selection.score - threshold))) if len(selection) else None,
        "selected_by_source": {
            name: int(np.sum(selection.mined_by == name)) for name in ("neighbour", "farthest", "random")
        },
    }
    if not len(selection):
        summary["mean_distance_to_threshold_reason"] = "no unlabelled candidate pairs are left"
    write_json_atomic(args.metrics, summary)
    logger.info("selected %d pairs with strategy %s; written to %s", len(selection), params.strategy, args.out)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(SelectParams, "select", args.params)
    run(args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
