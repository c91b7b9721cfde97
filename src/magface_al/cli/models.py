"""``magface-al embed``, ``verify`` and ``export``: run a face model from a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The same names as magface_al.embedding.backends, repeated so that `--help` need not import torch.
BACKEND_CHOICES = ("auto", "torch", "torch-channels-last", "torch-compile", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16")

# The summary that `verify --json` prints, in this order.
VERIFY_KEYS = ("accuracy", "accuracy_std", "auc", "eer", "tar_at_far_1e-3")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed``, ``verify`` and ``export`` subcommands."""
    embed = subparsers.add_parser(
        "embed", help="write L2-normalized embeddings, magnitudes, keys and labels of a dataset to a folder"
    )
    _add_model_arguments(embed)
    embed.add_argument(
        "--data",
        type=Path,
        required=True,
        help="RecordIO dataset folder (train.rec, train.idx) or a folder with one sub-folder of images per identity",
    )
    embed.add_argument(
        "--out", type=Path, required=True, help="output folder: keys.npy, labels.npy, features.npy, magnitudes.npy, meta.json"
    )
    embed.add_argument("--keys", type=Path, default=None, help="text file of image keys to embed (default: all images)")
    _add_run_arguments(embed)
    embed.set_defaults(func=run_embed)

    verify = subparsers.add_parser(
        "verify", help="10-fold verification accuracy, ROC AUC, EER and TAR at FAR 1e-3 on a pairs benchmark"
    )
    _add_model_arguments(verify)
    verify.add_argument(
        "--pairs", type=Path, required=True, help="LFW-style pairs.txt (resolved against --data) or an InsightFace .bin"
    )
    verify.add_argument(
        "--data",
        type=Path,
        default=None,
        help="for pairs.txt: a RecordIO dataset folder with manifest.csv, a manifest.csv, or a folder of name/name_000n images",
    )
    verify.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    _add_run_arguments(verify)
    verify.set_defaults(func=run_verify)

    export = subparsers.add_parser("export", help="export a checkpoint to ONNX and check it against torch")
    _add_model_arguments(export)
    export.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    export.set_defaults(func=run_export)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from magface_al.models.spec import IRESNET_LAYERS

    names = ["mobilefacenet", *IRESNET_LAYERS]
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (.pth, .ckpt)")
    parser.add_argument(
        "--arch",
        choices=names,
        default=None,
        help="architecture; required unless the checkpoint stores its specification or is a standard model",
    )
    parser.add_argument(
        "--preset",
        choices=("magface", "arcface_torch"),
        default=None,
        help="preprocessing and BatchNorm eps of an iResNet: magface (BGR, x/255, eps 2e-5; the default) or "
        "arcface_torch (RGB, (x/255-0.5)/0.5, eps 1e-5)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load checkpoints that need arbitrary unpickling; this runs code from the file, so only for trusted files",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    parser.add_argument("--flip", action="store_true", help="add the features of the mirrored image before normalizing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="inference engine; auto gates every engine that runs here against torch float32 on the first faces "
        "(results cached) and uses the fastest that passes (default: auto)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="numeric precision: fp32, bf16 (CPUs with AMX or AVX512-BF16, GPUs) or fp16 (GPUs); a reduced "
        "precision is used only where it passes its parity gate (default: fp32)",
    )
    parser.add_argument(
        "--parity-lfw",
        type=Path,
        default=None,
        help="LFW RecordIO folder with pairs.txt; reduced-precision gates then also require the 10-fold LFW "
        "accuracy within 0.05 points of float32",
    )
    parser.add_argument(
        "--parity-cache",
        type=Path,
        default=None,
        help="folder of the parity gate cache (default: $MAGFACE_AL_CACHE or ~/.cache/magface-al)",
    )


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the keyword arguments that pass --backend, --precision and the gate options to the embedding."""
    from magface_al.embedding import ParityOptions

    parity = ParityOptions(cache_dir=args.parity_cache, lfw_dir=args.parity_lfw)
    return {"backend": args.backend, "precision": args.precision, "parity": parity}


def _load(args: argparse.Namespace):
    """Load the checkpoint and return (model on the chosen device, spec)."""
    from magface_al.distributed import rank_device
    from magface_al.models import ModelSpec, load_model

    spec: Any = args.arch
    if args.preset is not None:
        if args.arch is None:
            raise ValueError("--preset needs --arch, e.g. --arch iresnet50 --preset arcface_torch")
        spec = ModelSpec.preset(args.arch, args.preset)
    # Under torchrun each rank takes the GPU of its local rank.
    device = rank_device(args.device)
    model, spec = load_model(args.checkpoint, spec, allow_pickle=args.allow_pickle, device=device)
    return model, spec


def _fail(error: BaseException) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError, KeyError)


def run_embed(args: argparse.Namespace) -> int:
    """Embed a dataset; under torchrun every rank embeds its share and rank 0 writes the merged folder."""
    from magface_al.distributed import distributed_run, rank_device

    try:
        device = rank_device(args.device)
    except (ValueError, RuntimeError) as error:
        return _fail(error)
    with distributed_run(device):
        return _embed(args)


def _embed(args: argparse.Namespace) -> int:
    from magface_al.embedding import ImageFileDataset, embed_dataset

    try:
        model, spec = _load(args)
        dataset = _open_dataset(args.data)
        keys = None if args.keys is None else read_keys(args.keys)
        embeddings = embed_dataset(
            model,
            spec,
            dataset,
            keys,
            batch_size=args.batch_size,
            workers=args.workers,
            flip=args.flip,
            out_dir=args.out,
            progress=not args.no_progress,
            meta={"checkpoint": str(args.checkpoint), "data": str(args.data)},
            **_backend_options(args),
        )
    except _user_errors() as error:
        return _fail(error)
    kind = "image files" if isinstance(dataset, ImageFileDataset) else "RecordIO"
    logger.info("embedded %d images (%s) into %s", len(embeddings), kind, args.out)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        model, spec = _load(args)
        scores, labels = score_benchmark(
            model,
            spec,
            args.pairs,
            args.data,
            batch_size=args.batch_size,
            workers=args.workers,
            flip=args.flip,
            progress=not args.no_progress,
            **_backend_options(args),
        )
    except _user_errors() as error:
        return _fail(error)
    summary = summarize_verification(scores, labels)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    else:
        print(format_verification(summary, len(scores), args.flip))
    return 0


def run_export(args: argparse.Namespace) -> int:
    import torch

    from magface_al.models.export import OnnxModel, export_onnx

    try:
        model, spec = _load(args)
        path = export_onnx(model, spec, args.out, opset=args.opset)
    except _user_errors() as error:
        return _fail(error)
    height, width = spec.preprocess.input_size
    batch = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = (OnnxModel(path)(batch) - model.cpu()(batch)).abs().max().item()
    print(f"wrote {path}; max abs difference to torch on a random batch: {difference:.2e}")
    return 0


def score_benchmark(
    model: Any,
    spec: Any,
    pairs_path: Path,
    data: Path | None,
    *,
    batch_size: int = 64,
    workers: int = 2,
    flip: bool = False,
    progress: bool = True,
    backend: str | None = None,
    precision: str = "fp32",
    parity: Any = None,
):
    """Embed the images of a pairs benchmark and return (cosine scores, labels) in file order.

    ``backend``, ``precision`` and ``parity`` go to ``embed_dataset``; ``backend=None`` runs the model as given.

    Raises:
        ValueError: if ``pairs.txt`` comes without ``data``.
    """
    import numpy as np

    from magface_al.data.benchmarks import load_bin, read_lfw_pairs
    from magface_al.embedding import EncodedImageDataset, ImageFileDataset, embed_dataset

    options = {
        "batch_size": batch_size,
        "workers": workers,
        "flip": flip,
        "progress": progress,
        "backend": backend,
        "precision": precision,
        "parity": parity,
    }
    if pairs_path.suffix.lower() == ".bin":
        blobs, same = load_bin(pairs_path)
        embeddings = embed_dataset(model, spec, EncodedImageDataset(blobs), **options)
        features = np.asarray(embeddings.features)
        first, second = features[0::2], features[1::2]
        return np.einsum("ij,ij->i", first, second), same.astype(np.int64)

    if data is None:
        raise ValueError(f"{pairs_path} is a pairs.txt, which needs --data: the dataset or image folder it names")
    pairs = read_lfw_pairs(pairs_path, data)
    labels = np.asarray([same for _, _, same in pairs], dtype=np.int64)
    images = sorted({image for first, second, _ in pairs for image in (first, second)}, key=str)
    if isinstance(images[0], (int, np.integer)):
        dataset = _open_dataset(data if data.is_dir() else data.parent)
        keys = np.asarray(sorted(int(image) for image in images), dtype=np.int64)
        embeddings = embed_dataset(model, spec, dataset, keys, **options)
        row_of = embeddings.key_to_row()
    else:
        embeddings = embed_dataset(model, spec, ImageFileDataset(images), **options)
        row_of = {image: row for row, image in enumerate(images)}
    features = np.asarray(embeddings.features)
    rows1 = np.asarray([row_of[first] for first, _, _ in pairs])
    rows2 = np.asarray([row_of[second] for _, second, _ in pairs])
    return np.einsum("ij,ij->i", features[rows1], features[rows2]), labels


def summarize_verification(scores, labels) -> dict[str, Any]:
    """Return accuracy (10-fold mean), accuracy_std, auc, eer and tar_at_far_1e-3, with reasons for any None."""
    from magface_al.evaluation.verification import verification_metrics
    from magface_al.utils import to_strict_json

    metrics = verification_metrics(scores, labels, far_targets=(1e-3,))
    summary: dict[str, Any] = {}
    for key in VERIFY_KEYS:
        summary[key] = metrics.get(key)
        if summary[key] is None and f"{key}_reason" in metrics:
            summary[f"{key}_reason"] = metrics[f"{key}_reason"]
    return to_strict_json(summary)


def format_verification(summary: dict[str, Any], num_pairs: int, flip: bool) -> str:
    def percent(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{100 * value:.2f}%"

    std = summary.get("accuracy_std")
    std_text = "" if std is None else f" +- {100 * std:.2f}"
    auc = summary.get("auc")
    return (
        f"pairs: {num_pairs} ({'image + mirror' if flip else 'single view'})\n"
        f"accuracy (10-fold): {percent('accuracy')}{std_text}\n"
        f"ROC AUC: {'n/a' if auc is None else f'{auc:.4f}'}\n"
        f"EER: {percent('eer')}\n"
        f"TAR at FAR=1e-3: {percent('tar_at_far_1e-3')}"
    )


def read_keys(path: Path):
    """Read image keys from a text file: integers separated by whitespace or line breaks.

    Raises:
        ValueError: naming the line of a token that is not an integer.
    """
    import numpy as np

    keys = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        for token in line.split():
            try:
                keys.append(int(token))
            except ValueError:
                raise ValueError(f"{path}, line {number}: {token!r} is not an integer image key") from None
    return np.asarray(keys, dtype=np.int64)


def _open_dataset(data: Path):
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.embedding import ImageFileDataset

    if not data.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    if (data / "train.rec").is_file():
        return FaceRecordDataset(data)
    return ImageFileDataset.from_folder(data)
