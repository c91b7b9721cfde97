"""Embedding throughput of every inference backend and precision, against the machine's float32 peak.

One run measures, in this order:

1. the float32 matrix-multiply peak: GFLOP/s of a 2048x2048 ``torch.mm``;
2. the allocator effect: torch eager float32 at batch 64 with glibc's default
   settings, then with :func:`configure_allocator`, with minor page faults per image;
3. for each model, batch size, backend and precision that runs here: images/s
   of the forward pass on a preprocessed batch of real faces, and the same for
   ``auto`` (the backend :func:`select_backend` picks after its parity gates);
4. the JPEG decoding and preprocessing throughput of the DataLoader workers
   that feed the embedding, to compare with the model figures.

Each figure is also given as a ratio to the best float32 engine of its row
and as the fraction of the float32 peak that it uses (model GFLOP x images/s / peak).
Every measurement after the allocator comparison runs with the allocator
setting applied, as the ``magface-al`` commands do.

Run from the repository root, for example:

    .venv/bin/python benchmarks/bench_backends.py --budget 2 --models mobilefacenet iresnet18 iresnet50

Weights are random except for the MobileFaceNet, which uses the shared
pretrained checkpoint; throughput does not depend on the values. The random
iResNets get BatchNorm statistics calibrated on the faces, so their features
have a realistic scale for the parity gates. The parity
gates and their timings are cached in ``--cache`` (a fresh temporary folder
by default, so ``auto`` is measured from scratch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from magface_al.embedding.backends import (
    Backend,
    OnnxExport,
    available_backends,
    build_backend,
    configure_allocator,
    cpu_bf16_flags,
)
from magface_al.embedding.parity import ParityOptions, select_backend
from magface_al.models import ModelSpec, build_model, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
LFW_DIR = SHARED_DIR / "data" / "lfw"
CHECKPOINT = SHARED_DIR / "models" / "mobilefacenet_casia_arcface.ckpt"
MODELS = ("mobilefacenet", "iresnet18", "iresnet50", "iresnet100")
BATCH_SIZES = (1, 16, 64)


def load_faces(count: int) -> tuple[np.ndarray, str]:
    if (LFW_DIR / "train.rec").is_file():
        from magface_al.data.faces import FaceRecordDataset

        dataset = FaceRecordDataset(LFW_DIR)
        images, _, _ = dataset.load_images(dataset.keys[:count])
        return np.stack(images), "LFW faces"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, 112, 112, 3), dtype=np.uint8), "random pixels (no LFW data found)"


def make_model(name: str, faces: np.ndarray) -> tuple[torch.nn.Module, ModelSpec]:
    if name == "mobilefacenet" and CHECKPOINT.is_file():
        return load_model(CHECKPOINT, device="cpu")
    spec = ModelSpec.preset(name)
    torch.manual_seed(0)
    model = build_model(spec)
    calibrate_batchnorm(model, spec.preprocess.to_tensor(faces[:16]))
    return model.eval(), spec


def calibrate_batchnorm(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics from ``batch``, in place.

    With the initial statistics (mean 0, variance 1) the activations of a
    random deep iResNet grow layer by layer to raw features of norm about
    500,000, where float32 rounding alone exceeds the 1e-4 parity tolerance.
    Calibrated statistics give features of norm about 20, as trained MagFace
    models have, so the gates judge the engines as they would a real model.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()


def model_gflop(model: torch.nn.Module, spec: ModelSpec) -> float:
    """Return the forward pass's GFLOP per image (2 per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = spec.preprocess.input_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, height, width))
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(budget: float) -> float:
    """Return the float32 GFLOP/s of repeated 2048x2048 ``torch.mm``."""
    size = 2048
    a, b = torch.rand(size, size), torch.rand(size, size)
    torch.mm(a, b)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < budget:
        torch.mm(a, b)
        calls += 1
    return calls * 2 * size**3 / (time.perf_counter() - start) / 1e9


def measure(runner, batch: torch.Tensor, budget: float) -> tuple[float, float]:
    """Return (images/s, minor page faults per image) after one warm-up call, timing at least one call."""
    with torch.inference_mode():
        runner(batch)
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        calls, start = 0, time.perf_counter()
        while calls < 1 or time.perf_counter() - start < budget:
            runner(batch)
            calls += 1
        elapsed = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return calls * len(batch) / elapsed, faults / (calls * len(batch))


def allocator_effect(name: str, faces: np.ndarray, budget: float) -> dict:
    model, spec = make_model(name, faces)
    batch = spec.preprocess.to_tensor(faces[:64])
    default_speed, default_faults = measure(model, batch, budget)
    applied = configure_allocator()
    tuned_speed, tuned_faults = measure(model, batch, budget)
    return {
        "model": name,
        "applied": applied,
        "default": {"images_per_s": default_speed, "page_faults_per_image": default_faults},
        "configured": {"images_per_s": tuned_speed, "page_faults_per_image": tuned_faults},
    }


def input_throughput(seconds: float, workers: int) -> float | None:
    """Return images/s of JPEG decoding and preprocessing in DataLoader workers over the LFW RecordIO."""
    if not (LFW_DIR / "train.rec").is_file():
        return None
    from torch.utils.data import DataLoader

    from magface_al.data.faces import FaceRecordDataset
    from magface_al.embedding.embed import _Collate, _init_worker

    dataset = FaceRecordDataset(LFW_DIR)
    loader = DataLoader(
        dataset, batch_size=64, num_workers=workers, collate_fn=_Collate(ModelSpec.magface("iresnet50").preprocess),
        worker_init_fn=_init_worker if workers else None,
    )
    count, start = 0, time.perf_counter()
    for batch, _, _ in loader:
        count += len(batch)
        if time.perf_counter() - start > seconds:
            break
    return count / (time.perf_counter() - start)


def benchmark_model(name: str, faces: np.ndarray, args: argparse.Namespace, peak: float) -> list[dict]:
    model, spec = make_model(name, faces)
    gflop = model_gflop(model, spec)
    backends = [b for b in available_backends("cpu") if args.compile or b.engine != "torch-compile"]
    export = OnnxExport(model, spec)
    runners = {backend.name: build_backend(model, spec, backend, threads=args.threads, export=export) for backend in backends}
    options = ParityOptions(cache_dir=args.cache, timing_seconds=min(args.budget, 1.0), allow_compile=args.compile)
    gate_faces = faces[:16]
    for precision in ("fp32", "bf16"):
        chosen = select_backend(model, spec, "auto", precision=precision, faces=gate_faces, options=options)
        runners[f"auto/{precision}"] = chosen
        print(f"# {name}: auto/{precision} -> {chosen.backend.name} ({chosen.choice.reason})", flush=True)

    rows = []
    for batch_size in args.batches:
        batch = spec.preprocess.to_tensor(faces[:batch_size])
        for label, runner in runners.items():
            speed, _ = measure(runner, batch, args.budget)
            rows.append({
                "model": name, "gflop_per_image": gflop, "batch": batch_size, "backend": label,
                "chosen": runner.backend.name if label.startswith("auto") else label, "images_per_s": speed,
                "peak_fraction": gflop * speed / peak,
            })
            print(f"{name:14s} batch {batch_size:3d} {label:26s} {speed:9.1f} images/s", flush=True)
    for batch_size in args.batches:
        same = [row for row in rows if row["batch"] == batch_size]
        best_fp32 = max(row["images_per_s"] for row in same if row["backend"].endswith("/fp32") and not row["backend"].startswith("auto"))
        eager = next(row["images_per_s"] for row in same if row["backend"] == "torch/fp32")
        for row in same:
            row["vs_best_fp32"] = row["images_per_s"] / best_fp32
            row["vs_torch_eager"] = row["images_per_s"] / eager
    return rows


def print_table(rows: list[dict], peak: float) -> None:
    print(f"\n{'model':14s} {'batch':>5s} {'backend':26s} {'images/s':>9s} {'x best fp32':>11s} {'x eager':>8s} {'of peak':>8s}")
    for row in rows:
        label = row["backend"] if not row["backend"].startswith("auto") else f"{row['backend']} ({row['chosen']})"
        print(
            f"{row['model']:14s} {row['batch']:5d} {label:26s} {row['images_per_s']:9.1f} "
            f"{row['vs_best_fp32']:11.2f} {row['vs_torch_eager']:8.2f} {100 * row['peak_fraction']:7.0f}%"
        )
    print(f"(of peak: model GFLOP x images/s / {peak:.0f} GFLOP/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to measure (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCH_SIZES), help="batch sizes (default: 1 16 64)")
    parser.add_argument("--budget", type=float, default=2.0, help="minimum seconds of timing per measurement (default: 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every engine")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (compiles for minutes)")
    parser.add_argument("--cache", type=Path, default=None, help="parity gate cache folder (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    folder = tempfile.TemporaryDirectory(prefix="bench-backends-")
    args.cache = args.cache or Path(folder.name)
    faces, source = load_faces(max(max(args.batches), 16))
    started = time.perf_counter()
    print(
        f"CPU: {os.cpu_count()} logical cores, {args.threads} threads, bf16 flags {cpu_bf16_flags() or 'none'}; "
        f"torch {torch.__version__}; {source}; {args.budget:g} s per measurement; load average {os.getloadavg()[0]:.1f} "
        "(other work may share the cores, so figures vary between runs)"
    )
    peak = matmul_peak_gflops(args.budget)
    print(f"float32 peak: {peak:.0f} GFLOP/s (2048x2048 torch.mm)")
    allocator = allocator_effect(args.models[-1], faces, args.budget)
    default, tuned = allocator["default"], allocator["configured"]
    print(
        f"allocator ({allocator['model']}, torch eager fp32, batch 64): glibc default {default['images_per_s']:.2f} images/s, "
        f"{default['page_faults_per_image']:.0f} page faults/image; configured {tuned['images_per_s']:.2f} images/s, "
        f"{tuned['page_faults_per_image']:.0f} page faults/image"
    )
    decode = input_throughput(min(args.budget * 2, 10.0), workers=2)
    if decode is not None:
        print(f"input: JPEG decoding and preprocessing in 2 DataLoader workers: {decode:.0f} images/s")

    rows = []
    for name in args.models:
        rows.extend(benchmark_model(name, faces, args, peak))
    print_table(rows, peak)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        report = {"peak_gflops": peak, "allocator": allocator, "input_images_per_s": decode, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
