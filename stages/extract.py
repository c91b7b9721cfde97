"""Stage extract: write a seeded subset of a RecordIO face dataset as a compact RecordIO plus manifest.

Keeping the subset as a few large files (``train.rec``, ``train.idx``,
``property``, ``manifest.csv``) rather than one file per image matters
because DVC hashes every file it tracks. The subset's identities are
relabelled 0..N-1; ``manifest.csv`` keeps the source key and label.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from magface_al.data.faces import FaceRecordDataset
from magface_al.data.pack import write_subset
from magface_al.pairs.splits import sample_identity_subset
from magface_al.params import load_section
from magface_al.utils import atomic_path, setup_logging, write_json_atomic

logger = logging.getLogger("stages.extract")


@dataclasses.dataclass
class ExtractParams:
    """The ``extract`` section of params.yaml."""

    seed: int = 0
    num_identities: int | None = None  # identities to keep; 0 or null keeps every eligible one
    images_per_identity: int | None = None  # at most this many images per identity; 0 or null keeps all
    min_images_per_identity: int = 1  # identities with fewer images are left out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="RecordIO dataset folder (train.rec, train.idx, property)")
    parser.add_argument("--out", default="data/subset", help="output dataset folder")
    parser.add_argument("--metrics", default="metrics/extract.json", help="output counts file")
    parser.add_argument("--params", default="params.yaml", help="params file holding the extract section")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, params: ExtractParams) -> dict:
    dataset = FaceRecordDataset(args.source)
    keys = sample_identity_subset(
        dataset.keys,
        dataset.labels,
        num_identities=params.num_identities,
        images_per_identity=params.images_per_identity,
        min_images_per_identity=params.min_images_per_identity,
        seed=params.seed,
    )
    if len(keys) == 0:
        raise SystemExit(
            f"no images of {args.source} match the extract params (min_images_per_identity "
            f"{params.min_images_per_identity}); lower it in params.yaml"
        )
    with atomic_path(args.out, is_dir=True) as tmp:
        rows = write_subset(dataset, keys, tmp, progress=True)

    labels = np.array([row["label"] for row in rows])
    _, per_identity = np.unique(labels, return_counts=True)
    counts = {
        "source_images": int(len(dataset.keys)),
        "source_identities": int(len(dataset.identities)),
        "images": int(len(rows)),
        "identities": int(len(per_identity)),
        "identities_with_two_or_more_images": int((per_identity >= 2).sum()),
        "same_person_pairs_available": int((per_identity * (per_identity - 1) // 2).sum()),
        "images_per_identity_min": int(per_identity.min()),
        "images_per_identity_max": int(per_identity.max()),
        "images_per_identity_mean": float(per_identity.mean()),
    }
    write_json_atomic(args.metrics, counts)
    logger.info("wrote %d images of %d identities to %s", counts["images"], counts["identities"], Path(args.out))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(ExtractParams, "extract", args.params)
    run(args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
