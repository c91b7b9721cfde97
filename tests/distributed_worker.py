"""One rank of the distributed tests, started by torchrun from tests/test_distributed.py.

Subcommands:

- ``embed DATA CHECKPOINT OUT --count N --batch-size B [--in-memory]``:
  embeds the first N images; with ``--in-memory`` the shards are gathered
  in memory and rank 0 saves the result to OUT.
- ``pretrain DATA OUT --steps S --batch-size B --accumulation A``: MagLoss
  training of a tiny iResNet; rank 0 saves the weights, head and history.
- ``finetune DATA OUT --epochs E --batch-size B``: pair fine-tuning of a tiny
  iResNet's last stage on pairs of DATA; rank 0 saves the weights and history.

A single-process reference is the same command under ``torchrun
--nproc-per-node 1``, so both runs use one thread per forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from magface_al.data.faces import FaceRecordDataset
from magface_al.distributed import current_context, distributed_run
from magface_al.embedding import embed_dataset, save_embeddings
from magface_al.models.checkpoint import load_model
from magface_al.models.spec import ModelSpec, Preprocess, build_model
from magface_al.pairs.sampling import sample_pairs
from magface_al.training.finetune import FinetuneConfig, finetune
from magface_al.training.pretrain import PretrainConfig, pretrain

TINY_SPEC = ModelSpec(
    "iresnet",
    {"layers": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "dropout": 0.0},
    embedding_size=16,
    preprocess=Preprocess(input_size=(32, 32)),
)


def run_embed(args: argparse.Namespace) -> None:
    dataset = FaceRecordDataset(args.data)
    model, spec = load_model(args.checkpoint, "mobilefacenet", device="cpu")
    keys = np.asarray(dataset.keys)[: args.count]
    out_dir = None if args.in_memory else args.out
    result = embed_dataset(
        model, spec, dataset, keys, batch_size=args.batch_size, workers=1, out_dir=out_dir, progress=False,
    )
    if args.in_memory and current_context().is_main:
        save_embeddings(args.out, result)


def run_pretrain(args: argparse.Namespace) -> None:
    dataset = FaceRecordDataset(args.data)
    config = PretrainConfig(
        epochs=100, batch_size=args.batch_size, lr=0.05, seed=3, max_steps=args.steps,
        accumulation_steps=args.accumulation, warmup_epochs=0.0,
    )
    torch.manual_seed(config.seed)
    model = build_model(TINY_SPEC)
    result = pretrain(model, TINY_SPEC, dataset, config, progress=False)
    if current_context().is_main:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state.update({f"head.{k}": v for k, v in result.head.state_dict().items()})
        torch.save(state, Path(args.out) / "weights.pt")
        (Path(args.out) / "history.json").write_text(json.dumps(result.history), encoding="utf-8")


def run_finetune(args: argparse.Namespace) -> None:
    dataset = FaceRecordDataset(args.data)
    torch.manual_seed(0)
    model = build_model(TINY_SPEC).eval()
    half = dataset.identities[: len(dataset.identities) // 2]
    rest = dataset.identities[len(dataset.identities) // 2:]
    keys, labels = np.asarray(dataset.keys), np.asarray(dataset.labels)
    train = sample_pairs(keys, labels, num_same=40, num_different=40, seed=1, identities=half)
    val = sample_pairs(keys, labels, num_same=20, num_different=20, seed=2, identities=rest)
    config = FinetuneConfig(
        train="last_stage", lr=0.01, epochs=args.epochs, batch_size=args.batch_size,
        early_stopping="none", l2sp=0.01, precision="fp32",
    )
    result = finetune(model, TINY_SPEC, dataset, train, val, config)
    if current_context().is_main:
        torch.save(result.model.state_dict(), Path(args.out) / "weights.pt")
        (Path(args.out) / "history.json").write_text(json.dumps(result.history), encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed")
    embed.add_argument("data")
    embed.add_argument("checkpoint")
    embed.add_argument("out")
    embed.add_argument("--count", type=int, required=True)
    embed.add_argument("--batch-size", type=int, required=True)
    embed.add_argument("--in-memory", action="store_true")
    embed.set_defaults(func=run_embed)
    train = commands.add_parser("pretrain")
    train.add_argument("data")
    train.add_argument("out")
    train.add_argument("--steps", type=int, required=True)
    train.add_argument("--batch-size", type=int, required=True)
    train.add_argument("--accumulation", type=int, default=1)
    train.set_defaults(func=run_pretrain)
    tune = commands.add_parser("finetune")
    tune.add_argument("data")
    tune.add_argument("out")
    tune.add_argument("--epochs", type=int, required=True)
    tune.add_argument("--batch-size", type=int, required=True)
    tune.set_defaults(func=run_finetune)
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with distributed_run(torch.device("cpu")):
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
