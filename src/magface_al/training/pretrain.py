"""Train a face model with MagLoss on identity-labelled RecordIO data.

:func:`pretrain` trains a freshly built model (the embedded default's small
iResNet on the synthetic sample) or continues a loaded checkpoint, for
example on CASIA-WebFace. It follows MagFace's recipe: SGD with momentum and
weight decay on the backbone and the MagLoss class centres, horizontal flip
as the only augmentation, and a learning-rate schedule (step, cosine or
constant, with an optional linear warm-up). Images are decoded in a
background thread while the model trains on the previous batch.

:func:`heldout_verification` measures the result on identities the model
never saw: verification accuracy with a threshold calibrated on other
identities, and the error-versus-reject curve that shows whether the
magnitude ranks faces by quality.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from magface_al.data.faces import FaceRecordDataset
from magface_al.embedding import embed_dataset
from magface_al.evaluation.calibration import calibrate_threshold
from magface_al.evaluation.quality import error_versus_reject, pair_quality
from magface_al.evaluation.verification import cosine_scores, verification_metrics
from magface_al.models.checkpoint import save_checkpoint
from magface_al.pairs.sampling import sample_pairs
from magface_al.models.spec import ModelSpec
from magface_al.training.magloss import MagLoss, MagLossSettings

logger = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine", "constant")


@dataclass
class PretrainConfig:
    """Training settings, one field per key of the ``pretrain`` params section (``loss`` nested).

    Attributes:
        epochs: passes over the training images.
        batch_size: images per SGD step.
        lr: peak learning rate (MagFace: 0.1).
        momentum: SGD momentum (MagFace: 0.9).
        weight_decay: SGD weight decay on every parameter (MagFace: 5e-4).
        schedule: ``step`` (multiply by ``gamma`` at each of ``milestones``,
            counted in epochs), ``cosine`` (to 0 at the end) or ``constant``.
        milestones: epochs at which the step schedule lowers the rate.
        gamma: the step schedule's factor.
        warmup_epochs: linear warm-up from ``lr / 10`` over this many epochs (may be fractional).
        flip: mirror each training image with probability 0.5.
        seed: seeds batch order, flips and the MagLoss class centres.
        max_steps: stop after this many steps (for quick checks); None trains all epochs.
        threads: PyTorch CPU threads while training; None keeps the current setting.
        loss: MagLoss hyper-parameters.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["step", "cosine", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    flip: bool = True
    seed: int = 0
    max_steps: int | None = None
    threads: int | None = None
    loss: MagLossSettings = field(default_factory=MagLossSettings)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = MagLossSettings(**self.loss)
        if self.epochs < 1:
            raise ValueError(f"invalid pretrain epochs {self.epochs}: expected at least 1")
        if self.batch_size < 2:
            raise ValueError(f"invalid pretrain batch_size {self.batch_size}: expected at least 2")
        if self.lr <= 0:
            raise ValueError(f"invalid pretrain lr {self.lr}: expected a positive learning rate")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"invalid pretrain schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"invalid pretrain warmup_epochs {self.warmup_epochs}: expected 0 or more")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"invalid pretrain max_steps {self.max_steps}: expected at least 1, or null for all epochs")

    def to_dict(self) -> dict[str, Any]:
        """Return plain values (for checkpoints and metrics)."""
        return asdict(self)


@dataclass
class PretrainResult:
    """The record of a training run: per-epoch statistics, the trained MagLoss head and timings.

    Attributes:
        history: one mapping per epoch with ``epoch``, ``steps``, ``lr`` (at the
            epoch's end), ``loss``, ``classification_loss``, ``regularizer``,
            ``train_accuracy`` (argmax of the cosines, no margin) and the
            magnitude statistics of the epoch's training embeddings.
        head: the MagLoss module with the learnt class centres.
        steps: SGD steps taken.
        seconds: wall-clock training time.
        feasibility: the lambda_g check (:func:`magface_al.training.magloss.check_lambda_g`).
    """

    history: list[dict[str, Any]]
    head: MagLoss
    steps: int
    seconds: float
    feasibility: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        """Return the last epoch's statistics (empty before any step)."""
        return dict(self.history[-1]) if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        """Return a strict-JSON-ready summary without the head's weights.

        The wall-clock time is left out too, so that a rerun with the same
        seed writes identical artifacts.
        """
        return {
            "steps": self.steps,
            "final": self.final,
            "lambda_g_check": self.feasibility,
            "history": self.history,
        }


def learning_rate_at(config: PretrainConfig, epoch_progress: float) -> float:
    """Return the learning rate after ``epoch_progress`` epochs (fractional) of training."""
    if config.warmup_epochs > 0 and epoch_progress < config.warmup_epochs:
        start = config.lr / 10
        return start + (config.lr - start) * epoch_progress / config.warmup_epochs
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        passed = sum(1 for milestone in config.milestones if epoch_progress >= milestone)
        return config.lr * config.gamma**passed
    span = max(config.epochs - config.warmup_epochs, 1e-9)
    fraction = min(max((epoch_progress - config.warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * config.lr * (1 + math.cos(math.pi * fraction))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set PyTorch's CPU thread count for the block, then restore it."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"invalid pretrain threads {threads}: expected at least 1, or null to keep the default")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _BatchLoader:
    """Decode, flip and preprocess batches in a background thread, one batch ahead.

    OpenCV's JPEG decoder and the resize release the GIL, so decoding
    overlaps the previous batch's forward and backward pass.
    """

    def __init__(self, dataset: FaceRecordDataset, spec: ModelSpec, config: PretrainConfig) -> None:
        self.dataset = dataset
        self.preprocess = spec.preprocess
        self.config = config
        # MagLoss needs classes 0..C-1; identity ids may have gaps.
        self.classes = np.searchsorted(dataset.identities, dataset.labels).astype(np.int64)

    def _load(self, positions: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([self.dataset[int(position)][0] for position in positions])
        images[flips] = images[flips, :, ::-1]  # (N, H, W, 3): mirror the width axis
        return self.preprocess.to_tensor(images), torch.from_numpy(self.classes[positions])

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (N, 3, h, w), classes (N,)) for one shuffled epoch; the last partial batch is dropped."""
        rng = np.random.default_rng([self.config.seed, epoch])
        order = rng.permutation(len(self.dataset))
        flips = rng.random(len(order)) < 0.5 if self.config.flip else np.zeros(len(order), dtype=bool)
        size = self.config.batch_size
        batches = [slice(start, start + size) for start in range(0, len(order) - size + 1, size)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
            pending = executor.submit(self._load, order[batches[0]], flips[batches[0]]) if batches else None
            for index in range(len(batches)):
                batch = pending.result()
                if index + 1 < len(batches):
                    following = batches[index + 1]
                    pending = executor.submit(self._load, order[following], flips[following])
                yield batch

    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.config.batch_size


class _EpochStats:
    """Running sums of one epoch's losses, accuracy and magnitudes."""

    def __init__(self) -> None:
        self.steps = 0
        self.samples = 0
        self.sums = {"loss": 0.0, "classification_loss": 0.0, "regularizer": 0.0}
        self.correct = 0
        self.magnitudes: list[np.ndarray] = []

    def add(self, output, classes: torch.Tensor) -> None:
        count = len(classes)
        self.steps += 1
        self.samples += count
        self.sums["loss"] += output.loss.item() * count
        self.sums["classification_loss"] += output.classification.item() * count
        self.sums["regularizer"] += output.regularizer.item() * count
        self.correct += int((output.cos_theta.argmax(dim=1) == classes).sum())
        self.magnitudes.append(output.magnitudes.detach().cpu().numpy())

    def running(self) -> dict[str, float]:
        latest = self.magnitudes[-1] if self.magnitudes else np.zeros(1)
        return {
            "loss": self.sums["loss"] / max(self.samples, 1),
            "acc": self.correct / max(self.samples, 1),
            "mag": float(latest.mean()),
        }

    def summary(self) -> dict[str, Any]:
        magnitudes = np.concatenate(self.magnitudes) if self.magnitudes else np.zeros(0)
        summary: dict[str, Any] = {name: total / max(self.samples, 1) for name, total in self.sums.items()}
        summary["train_accuracy"] = self.correct / max(self.samples, 1)
        summary.update(magnitude_statistics(magnitudes))
        return summary


def magnitude_statistics(magnitudes: np.ndarray) -> dict[str, float | None]:
    """Return mean, std, min, 5th/50th/95th percentile and max of embedding magnitudes."""
    if not len(magnitudes):
        return {name: None for name in ("magnitude_mean", "magnitude_std", "magnitude_min", "magnitude_p05",
                                         "magnitude_median", "magnitude_p95", "magnitude_max")}
    p05, median, p95 = np.percentile(magnitudes, [5, 50, 95])
    return {
        "magnitude_mean": float(magnitudes.mean()),
        "magnitude_std": float(magnitudes.std()),
        "magnitude_min": float(magnitudes.min()),
        "magnitude_p05": float(p05),
        "magnitude_median": float(median),
        "magnitude_p95": float(p95),
        "magnitude_max": float(magnitudes.max()),
    }


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def pretrain(
    model: nn.Module,
    spec: ModelSpec,
    dataset: FaceRecordDataset,
    config: PretrainConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Train ``model`` with MagLoss on the identities of ``dataset``.

    The model is switched to training mode (BatchNorm and dropout active)
    and left in eval mode afterwards. A new MagLoss head with one class
    centre per identity of ``dataset`` is created, seeded by ``config.seed``.

    Args:
        model: a network whose ``forward`` returns raw embeddings of size
            ``spec.embedding_size``; freshly built or loaded from a checkpoint.
        spec: its specification; ``spec.preprocess`` prepares the pixels.
        dataset: identity-labelled RecordIO images (at least 2 identities).
        config: training settings.
        device: where to train; None keeps the model where it is.
        progress: show a progress bar per epoch.

    Returns:
        The per-epoch history, the trained head and timings.

    Raises:
        ValueError: if the dataset has fewer than 2 identities or fewer images than one batch.
    """
    if len(dataset.identities) < 2:
        raise ValueError(
            f"{dataset.folder} contains {len(dataset.identities)} identity; MagLoss training needs at least 2"
        )
    if len(dataset) < config.batch_size:
        raise ValueError(
            f"{dataset.folder} contains {len(dataset)} images, fewer than one batch of {config.batch_size}; "
            "lower pretrain.batch_size"
        )
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device

    torch.manual_seed(config.seed)
    head = MagLoss(spec.embedding_size, len(dataset.identities), config.loss).to(device)
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    loader = _BatchLoader(dataset, spec, config)
    steps_per_epoch = loader.steps_per_epoch()
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    logger.info(
        "MagLoss training: %d images of %d identities, %d epochs of %d steps (batch %d), %s schedule from lr %g",
        len(dataset), len(dataset.identities), config.epochs, steps_per_epoch, config.batch_size,
        config.schedule, config.lr,
    )

    history: list[dict[str, Any]] = []
    step = 0
    started = time.perf_counter()
    model.train()
    head.train()
    with _torch_threads(config.threads):
        for epoch in range(config.epochs):
            if step >= total_steps:
                break
            stats = _EpochStats()
            bar = tqdm(
                total=min(steps_per_epoch, total_steps - step),
                desc=f"pretrain epoch {epoch + 1}/{config.epochs}",
                unit="step",
                disable=not progress,
            )
            for images, classes in loader.epoch(epoch):
                if step >= total_steps:
                    break
                lr = learning_rate_at(config, step / steps_per_epoch)
                _set_lr(optimizer, lr)
                images, classes = images.to(device), classes.to(device)
                output = head(model(images), classes)
                if not torch.isfinite(output.loss):
                    raise FloatingPointError(
                        f"MagLoss became {output.loss.item()} at step {step}; lower pretrain.lr or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                output.loss.backward()
                optimizer.step()
                stats.add(output, classes)
                step += 1
                bar.update()
                bar.set_postfix({name: f"{value:.3g}" for name, value in stats.running().items()})
            bar.close()
            summary = {"epoch": epoch + 1, "steps": step, "lr": learning_rate_at(config, step / steps_per_epoch)}
            summary.update(stats.summary())
            history.append(summary)
            logger.info(
                "epoch %d: loss %.4f (cross entropy %.4f, g %.5f), train accuracy %.4f, magnitude %.2f +- %.2f",
                epoch + 1, summary["loss"], summary["classification_loss"], summary["regularizer"],
                summary["train_accuracy"], summary["magnitude_mean"] or 0.0, summary["magnitude_std"] or 0.0,
            )
    model.eval()
    head.eval()
    seconds = time.perf_counter() - started
    logger.info("MagLoss training took %.1f s for %d steps", seconds, step)
    return PretrainResult(history=history, head=head, steps=step, seconds=seconds, feasibility=head.feasibility)


def save_pretrained(
    path: str,
    model: nn.Module,
    spec: ModelSpec,
    config: PretrainConfig,
    result: PretrainResult,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save the trained backbone in the project's checkpoint format with its training record.

    ``extra["pretrain"]`` contains the config, the final statistics and the
    lambda_g check; the MagLoss class centres are not saved, because
    verification never needs them.
    """
    record = {"config": config.to_dict(), **result.to_dict()}
    record.pop("history")
    save_checkpoint(path, model, spec, epoch=len(result.history), extra={"pretrain": record, **(extra or {})})


def heldout_verification(
    model: nn.Module,
    spec: ModelSpec,
    dataset: FaceRecordDataset,
    *,
    pairs_per_class: int = 2000,
    seed: int = 0,
    erc_fmr: float = 1e-3,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure verification on identities the model never saw, with a calibrated threshold.

    The identities are split in two halves. The threshold with the best
    accuracy on pairs of the calibration half is applied unchanged to pairs
    of the test half, so the reported accuracy is that of a deployed
    threshold. The error-versus-reject curve on the test pairs (pair quality
    = the smaller magnitude) shows whether rejecting low-magnitude pairs
    lowers the error.

    Args:
        model: the trained model.
        spec: its specification.
        dataset: held-out identities, each with at least 2 images.
        pairs_per_class: same-person and different-person pairs drawn in each half.
        seed: seeds the identity split and the pair sampling.
        erc_fmr: the false match rate that fixes the ERC's FNMR threshold;
            each half needs at least ``1 / erc_fmr`` different-person pairs.
        batch_size: images per forward pass.
        device: where to run; None keeps the model where it is.
        progress: show a progress bar while embedding.

    Returns:
        Strict-JSON-ready metrics. ``accuracy`` is the test half's accuracy
        at the calibrated ``threshold``, and ``verification`` has the test
        half's other metrics (k-fold accuracy, AUC, EER, TAR at FAR). The
        rest are magnitude statistics of the held-out images, the ERC rows
        and summary, and the accuracy with the largest share of low-quality
        pairs rejected.

    Raises:
        ValueError: if there are fewer than 4 identities.
    """
    identities = np.asarray(dataset.identities)
    if len(identities) < 4:
        raise ValueError(
            f"{dataset.folder} contains {len(identities)} identities; held-out verification needs at least 4 "
            "(two halves that each form different-person pairs)"
        )
    embeddings = embed_dataset(model, spec, dataset, batch_size=batch_size, workers=0, device=device, progress=progress)
    key_to_row = embeddings.key_to_row()
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(identities)
    halves = {"calibration": np.sort(shuffled[: len(shuffled) // 2]), "test": np.sort(shuffled[len(shuffled) // 2 :])}
    pairs = {
        name: sample_pairs(
            embeddings.keys,
            embeddings.labels,
            num_same=pairs_per_class,
            num_different=pairs_per_class,
            seed=rng,
            identities=members,
            description=f"the held-out {name} identities",
        )
        for name, members in halves.items()
    }
    scores = {name: cosine_scores(embeddings.features, key_to_row, part) for name, part in pairs.items()}
    labels = {name: part.label for name, part in pairs.items()}

    threshold = calibrate_threshold(scores["calibration"], labels["calibration"])
    test_metrics = verification_metrics(scores["test"], labels["test"], threshold=threshold)
    quality = pair_quality(embeddings.magnitudes, key_to_row, pairs["test"])
    curve = error_versus_reject(scores["test"], labels["test"], quality, fmr=erc_fmr, accuracy_threshold=threshold)
    return {
        "identities": len(identities),
        "images": len(embeddings),
        "calibration_identities": len(halves["calibration"]),
        "test_identities": len(halves["test"]),
        "threshold": threshold,
        "accuracy": test_metrics["accuracy_at_operating_threshold"],
        "accuracy_at_max_reject": float(curve.accuracy[-1]),
        "max_reject_fraction": float(curve.reject_fraction[-1]),
        "verification": test_metrics,
        "magnitudes": magnitude_statistics(np.asarray(embeddings.magnitudes)),
        "error_versus_reject": curve.summary(),
        "error_versus_reject_curve": curve.rows(),
    }
