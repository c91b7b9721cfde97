"""Distributed overhead on one machine: 2 ranks x 1 thread against 1 rank x 2 threads, in one run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_distributed.py [--data ../shared/data/lfw]
        [--model ../shared/models/mobilefacenet_casia_arcface.ckpt] [--images 1024] [--steps 20]

For each layout it starts the real torchrun (gloo on the CPU) and measures,
inside the ranks, between barriers:

- embedding: ``--images`` LFW faces with the MobileFaceNet, batch 64,
  decoding in the ranks themselves (no DataLoader workers, so both layouts
  use exactly two cores), including the merge of the shards by rank 0;
- training: ``--steps`` MagLoss steps of the embedded default's small
  iResNet on generated faces, global batch 128, after 3 warm-up steps.

It prints images/s per layout and the ratio of the two-rank layout to the
one-rank layout. A ratio below 1 is the cost of the gradient exchange and
the merge. A ratio above 1 is the gain of two independent processes over
two threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
LAYOUTS = (("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1))
SMALL_IRESNET = {"layers": [1, 1, 1, 1], "widths": [16, 32, 64, 128], "dropout": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "lfw", help="RecordIO face dataset folder")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "mobilefacenet_casia_arcface.ckpt")
    parser.add_argument("--images", type=int, default=1024, help="faces to embed (default: 1024)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (default: 20)")
    parser.add_argument("--rank-task", choices=("embed", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _timed(function) -> float:
    from magface_al.distributed import barrier

    barrier()
    started = time.perf_counter()
    function()
    barrier()
    return time.perf_counter() - started


def rank_embed(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np

    from magface_al.data.faces import FaceRecordDataset
    from magface_al.embedding import embed_dataset
    from magface_al.models import load_model

    dataset = FaceRecordDataset(args.data)
    model, spec = load_model(args.model, "mobilefacenet", device="cpu")
    keys = np.asarray(dataset.keys)[: args.images]
    embed_dataset(model, spec, dataset, keys[:64], batch_size=64, workers=0, progress=False)  # warm-up
    seconds = _timed(lambda: embed_dataset(model, spec, dataset, keys, batch_size=64, workers=0, progress=False,
                                           out_dir=args.work / "embeddings"))
    return {"images": len(keys), "seconds": seconds}


def rank_train(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from magface_al.data.faces import FaceRecordDataset
    from magface_al.models.spec import ModelSpec, Preprocess, build_model
    from magface_al.training.pretrain import PretrainConfig, pretrain

    dataset = FaceRecordDataset(args.work / "faces")
    spec = ModelSpec("iresnet", SMALL_IRESNET, embedding_size=128, preprocess=Preprocess(input_size=(56, 56)))
    torch.manual_seed(0)
    model = build_model(spec)
    config = PretrainConfig(epochs=100, batch_size=128, lr=0.05, max_steps=3)
    pretrain(model, spec, dataset, config, progress=False)  # warm-up
    timed = PretrainConfig(epochs=100, batch_size=128, lr=0.05, max_steps=args.steps)
    seconds = _timed(lambda: pretrain(model, spec, dataset, timed, progress=False))
    return {"images": args.steps * timed.batch_size, "seconds": seconds}


def run_rank(args: argparse.Namespace) -> int:
    import torch

    from magface_al.distributed import current_context, distributed_run

    with distributed_run(torch.device("cpu")):
        result = rank_embed(args) if args.rank_task == "embed" else rank_train(args)
        if current_context().is_main:
            (args.work / f"{args.rank_task}.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


def measure(args: argparse.Namespace, task: str, ranks: int, threads: int, work: Path) -> dict[str, float]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
        "--max-restarts=0", __file__, "--rank-task", task, "--work", str(work),
        "--data", str(args.data), "--model", str(args.model), "--images", str(args.images), "--steps", str(args.steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads((work / f"{task}.json").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank_task:
        return run_rank(args)
    if not (args.data / "train.rec").is_file() or not args.model.is_file():
        print(f"error: need {args.data}/train.rec and {args.model}; pass --data and --model", file=sys.stderr)
        return 1
    from magface_al.data.synthetic import write_synthetic_dataset

    load = os.getloadavg()[0]
    print(f"CPU: {os.cpu_count()} logical cores, load average {load:.1f} at start; torchrun with gloo")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_synthetic_dataset(work / "faces", identities=64, images_per_identity=16, seed=0)
        print(f"{'task':<10} {'layout':<20} {'images/s':>10} {'ratio to 1x2':>13}")
        for task, label in (("embed", f"embedding {args.images} LFW faces, MobileFaceNet"),
                            ("train", f"training {args.steps} MagLoss steps, batch 128")):
            rates = {}
            for name, ranks, threads in LAYOUTS:
                result = measure(args, task, ranks, threads, work)
                rates[name] = result["images"] / result["seconds"]
            baseline = rates[LAYOUTS[0][0]]
            for name, rate in rates.items():
                print(f"{task:<10} {name:<20} {rate:10.1f} {rate / baseline:13.2f}")
            print(f"           ({label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
