"""Stage sample: render the embedded synthetic sample that the default pipeline runs on.

Writes ``--out`` (default ``data/sample``) with three RecordIO dataset folders
(``train.rec``, ``train.idx``, ``property``, ``manifest.csv`` each), drawn
from one seed with disjoint identities:

- ``pretrain/``: source-domain identities the pretrain stage trains on;
- ``heldout/``: other source-domain identities, for the pretrained model's
  held-out verification accuracy;
- ``target/``: target-domain identities (dim, colour-cast light, masks and
  sunglasses) that stand for the user's own data: the rest of the pipeline
  extracts, pairs, fine-tunes and evaluates on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from magface_al.data.synthetic import write_synthetic_dataset
from magface_al.params import load_section
from magface_al.utils import atomic_path, setup_logging, write_json_atomic

logger = logging.getLogger("stages.sample")


@dataclasses.dataclass
class SampleParams:
    """The ``sample`` section of params.yaml: identity and image counts per part."""

    seed: int = 0
    pretrain_identities: int = 300
    pretrain_images_per_identity: int = 20
    heldout_identities: int = 100
    heldout_images_per_identity: int = 10
    target_identities: int = 200
    target_images_per_identity: int = 10
    jpeg_quality: int = 95


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sample", help="output folder for the pretrain/, heldout/ and target/ datasets")
    parser.add_argument("--params", default="params.yaml", help="params file with the sample section")
    return parser.parse_args(argv)


def parts(params: SampleParams) -> list[dict]:
    """Return the datasets to render: name, domain, identity block and images per identity.

    Identity blocks follow each other, so no person appears in two parts.
    """
    counts = [
        ("pretrain", "source", params.pretrain_identities, params.pretrain_images_per_identity),
        ("heldout", "source", params.heldout_identities, params.heldout_images_per_identity),
        ("target", "target", params.target_identities, params.target_images_per_identity),
    ]
    first = 0
    result = []
    for name, domain, identities, images in counts:
        result.append(
            {"name": name, "domain": domain, "first_identity": first, "identities": identities, "images_per_identity": images}
        )
        first += identities
    return result


def run(args: argparse.Namespace, params: SampleParams) -> dict:
    summary = {"seed": params.seed, "parts": {}}
    started = time.perf_counter()
    with atomic_path(args.out, is_dir=True) as tmp:
        for part in parts(params):
            write_synthetic_dataset(
                Path(tmp) / part["name"],
                identities=part["identities"],
                images_per_identity=part["images_per_identity"],
                domain=part["domain"],
                seed=params.seed,
                first_identity=part["first_identity"],
                jpeg_quality=params.jpeg_quality,
                progress=True,
            )
            summary["parts"][part["name"]] = {**part, "images": part["identities"] * part["images_per_identity"]}
        write_json_atomic(Path(tmp) / "sample.json", summary)
    logger.info("rendered the synthetic sample into %s in %.1f s", args.out, time.perf_counter() - started)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    params = load_section(SampleParams, "sample", args.params)
    run(args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
