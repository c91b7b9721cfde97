"""Embedding throughput on the CPU: torch (batched), ONNX Runtime (batched) and a one-image-at-a-time loop.

Every engine starts from uint8 BGR faces and ends with L2-normalized
features, so preprocessing is part of each figure. The loop embeds one image
per forward pass under ``torch.no_grad()``, the way a per-image script does.
Its figure does not depend on the batch size, so it is printed once per model.

Run from the repository root:

    .venv/bin/python benchmarks/bench_embedding.py [--budget 3] [--models mobilefacenet iresnet18 iresnet50]

Weights are random except for the MobileFaceNet, which uses the shared
pretrained checkpoint when present; throughput does not depend on the values.
Faces come from the shared LFW subset when present, otherwise random pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from magface_al.embedding import embed_images
from magface_al.models import ModelSpec, build_model, load_model
from magface_al.models.export import OnnxModel, export_onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
BATCH_SIZES = (1, 16, 64)


def load_faces(count: int) -> tuple[np.ndarray, str]:
    lfw = SHARED_DIR / "data" / "lfw"
    if (lfw / "train.rec").is_file():
        from magface_al.data.faces import FaceRecordDataset

        dataset = FaceRecordDataset(lfw)
        images, _, _ = dataset.load_images(dataset.keys[:count])
        return np.stack(images), "LFW faces"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, 112, 112, 3), dtype=np.uint8), "random pixels"


def make_model(name: str) -> tuple[torch.nn.Module, ModelSpec]:
    checkpoint = SHARED_DIR / "models" / "mobilefacenet_casia_arcface.ckpt"
    if name == "mobilefacenet" and checkpoint.is_file():
        return load_model(checkpoint, device="cpu")
    spec = ModelSpec.preset(name)
    torch.manual_seed(0)
    return build_model(spec).eval(), spec


def images_per_second(run, count: int, budget: float) -> float:
    """Time ``run`` after one warm-up call, repeating until ``budget`` seconds have passed (at least once)."""
    run()
    calls = 0
    start = time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return calls * count / elapsed


def one_at_a_time(model: torch.nn.Module, spec: ModelSpec, faces: np.ndarray) -> None:
    with torch.no_grad():
        for face in faces:
            raw = model(spec.preprocess.to_tensor(face[None]))
            torch.nn.functional.normalize(raw, dim=1)


def benchmark_model(name: str, faces: np.ndarray, budget: float, threads: int, folder: Path) -> list[dict]:
    model, spec = make_model(name)
    onnx_model = OnnxModel(export_onnx(model, spec, folder / f"{name}.onnx"), threads=threads)
    rows = []
    for batch_size in BATCH_SIZES:
        batch = faces[:batch_size]
        for engine, runner in (("torch", model), ("onnxruntime", onnx_model)):
            speed = images_per_second(
                lambda: embed_images(runner, spec, batch, batch_size=batch_size), batch_size, budget
            )
            rows.append({"model": name, "engine": engine, "batch": batch_size, "images_per_s": speed})
            print(f"{name:14s} {engine:12s} batch {batch_size:3d}: {speed:8.1f} images/s", flush=True)
    loop_faces = faces[:16]
    speed = images_per_second(lambda: one_at_a_time(model, spec, loop_faces), len(loop_faces), budget)
    rows.append({"model": name, "engine": "loop", "batch": 1, "images_per_s": speed})
    print(f"{name:14s} {'loop':12s} one by one: {speed:8.1f} images/s", flush=True)
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\nmodel           batch   torch   onnxruntime   torch/faster   loop")
    for name in dict.fromkeys(row["model"] for row in rows):
        loop = next(row["images_per_s"] for row in rows if row["model"] == name and row["engine"] == "loop")
        for batch_size in BATCH_SIZES:
            speed = {
                row["engine"]: row["images_per_s"]
                for row in rows
                if row["model"] == name and row["batch"] == batch_size and row["engine"] != "loop"
            }
            ratio = speed["torch"] / max(speed.values())
            print(
                f"{name:14s} {batch_size:5d} {speed['torch']:8.1f} {speed['onnxruntime']:12.1f} "
                f"{ratio:13.2f} {loop:7.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilefacenet", "iresnet18", "iresnet50"])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per measurement (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for torch and ONNX Runtime")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    faces, source = load_faces(max(BATCH_SIZES))
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, {source}, {args.budget:g} s per measurement")
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows.extend(benchmark_model(name, faces, args.budget, args.threads, Path(folder)))
    print_summary(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
