"""Train a face model with MagLoss on identity-labelled RecordIO data.

:func:`pretrain` trains a freshly built model (the embedded default's small
iResNet on the synthetic sample) or continues a loaded checkpoint, for
example on CASIA-WebFace. It follows MagFace's recipe: SGD with momentum and
weight decay on the backbone and the MagLoss class centres, horizontal flip
as the only augmentation, and a learning-rate schedule (step, cosine or
constant, with an optional linear warm-up). Images are decoded in a
background thread while the model trains on the previous batch.

Under torchrun the model and the class centres train as one
DistributedDataParallel module: a DistributedSampler seeded with
``config.seed`` gives each rank its share of every global batch of
``batch_size`` images, and DDP averages the gradients. BatchNorm normalizes
each rank's share separately (there is no SyncBatchNorm on the CPU), so a
single process with ``accumulation_steps`` equal to the number of ranks takes
exactly the same steps.

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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from magface_al.data.faces import FaceRecordDataset
from magface_al.distributed.context import DistributedContext, all_gather_objects, current_context
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
        accumulation_steps: split each rank's share of a batch into this many
            chunks, run one after the other with their gradients summed (less
            memory; BatchNorm then normalizes one chunk at a time).
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
    accumulation_steps: int = 1
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
        if self.accumulation_steps < 1:
            raise ValueError(f"invalid pretrain accumulation_steps {self.accumulation_steps}: expected at least 1")
        if self.batch_size % self.accumulation_steps:
            raise ValueError(
                f"pretrain batch_size {self.batch_size} is not a multiple of accumulation_steps "
                f"{self.accumulation_steps}; every chunk must hold the same number of images"
            )
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
    """This rank's share of each global batch, decoded, flipped and preprocessed one batch ahead.

    The order comes from a DistributedSampler seeded with ``config.seed``, and
    its ``set_epoch`` reshuffles every epoch. The global batch of step ``i`` is
    positions ``i * B`` to ``(i + 1) * B`` of the epoch's permutation. Rank
    ``r`` of ``W`` takes every ``W``-th of them from the ``r``-th on. The
    flips are drawn per image from the seed and the epoch, so they do not
    depend on the number of ranks. OpenCV's JPEG decoder and the resize
    release the GIL, so decoding overlaps the previous batch's forward and
    backward pass.
    """

    def __init__(
        self, dataset: FaceRecordDataset, spec: ModelSpec, config: PretrainConfig, context: DistributedContext
    ) -> None:
        self.dataset = dataset
        self.preprocess = spec.preprocess
        self.config = config
        self.context = context
        self.local_batch = config.batch_size // context.world_size
        self.sampler = DistributedSampler(
            range(len(dataset)), num_replicas=context.world_size, rank=context.rank,
            shuffle=True, seed=config.seed, drop_last=True,
        )
        # MagLoss needs classes 0..C-1; identity ids may have gaps.
        self.classes = np.searchsorted(dataset.identities, dataset.labels).astype(np.int64)

    def _load(self, positions: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([self.dataset[int(position)][0] for position in positions])
        images[flips] = images[flips, :, ::-1]  # (N, H, W, 3): mirror the width axis
        return self.preprocess.to_tensor(images), torch.from_numpy(self.classes[positions])

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (n, 3, h, w), classes (n,)) of this rank for one epoch; a last partial batch is dropped."""
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        rng = np.random.default_rng([self.config.seed, epoch])
        flips = rng.random(len(self.dataset)) < 0.5 if self.config.flip else np.zeros(len(self.dataset), dtype=bool)
        size = self.local_batch
        batches = [order[start:start + size] for start in range(0, self.steps_per_epoch() * size, size)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
            pending = executor.submit(self._load, batches[0], flips[batches[0]]) if batches else None
            for index in range(len(batches)):
                batch = pending.result()
                if index + 1 < len(batches):
                    following = batches[index + 1]
                    pending = executor.submit(self._load, following, flips[following])
                yield batch

    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.config.batch_size


class _Trainee(nn.Module):
    """The backbone and the MagLoss head as one module, so that one DDP wrapper syncs both."""

    def __init__(self, model: nn.Module, head: MagLoss) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, images: torch.Tensor, classes: torch.Tensor):
        return self.head(self.model(images), classes)


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

    def merged(self) -> _EpochStats:
        """Return the statistics of every rank together (this rank's alone for a single process)."""
        parts = all_gather_objects((self.samples, self.sums, self.correct, self.magnitudes))
        merged = _EpochStats()
        merged.steps = self.steps
        for samples, sums, correct, magnitudes in parts:
            merged.samples += samples
            merged.correct += correct
            merged.magnitudes.extend(magnitudes)
            for name, total in sums.items():
                merged.sums[name] += total
        return merged

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

    context = current_context()
    _check_global_batch(config, context)
    torch.manual_seed(config.seed)
    head = MagLoss(spec.embedding_size, len(dataset.identities), config.loss).to(device)
    trainee = _Trainee(model, head)
    # Every rank built the same centres from the same seed; DDP also broadcasts rank 0's at the start.
    engine = DistributedDataParallel(trainee, device_ids=[device] if device.type == "cuda" else None) \
        if context.enabled else trainee
    optimizer = torch.optim.SGD(
        trainee.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    loader = _BatchLoader(dataset, spec, config, context)
    steps_per_epoch = loader.steps_per_epoch()
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    logger.info(
        "MagLoss training: %d images of %d identities, %d epochs of %d steps (batch %d over %d process%s), "
        "%s schedule from lr %g",
        len(dataset), len(dataset.identities), config.epochs, steps_per_epoch, config.batch_size,
        context.world_size, "" if context.world_size == 1 else "es", config.schedule, config.lr,
    )

    history: list[dict[str, Any]] = []
    step = 0
    started = time.perf_counter()
    trainee.train()
    with _torch_threads(config.threads):
        for epoch in range(config.epochs):
            if step >= total_steps:
                break
            stats = _EpochStats()
            bar = tqdm(
                total=min(steps_per_epoch, total_steps - step),
                desc=f"pretrain epoch {epoch + 1}/{config.epochs}",
                unit="step",
                disable=not (progress and context.is_main),
            )
            for images, classes in loader.epoch(epoch):
                if step >= total_steps:
                    break
                _set_lr(optimizer, learning_rate_at(config, step / steps_per_epoch))
                optimizer.zero_grad(set_to_none=True)
                _train_step(engine, images.to(device), classes.to(device), config.accumulation_steps, stats, step)
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix({name: f"{value:.3g}" for name, value in stats.running().items()})
            bar.close()
            summary = {"epoch": epoch + 1, "steps": step, "lr": learning_rate_at(config, step / steps_per_epoch)}
            summary.update(stats.merged().summary())
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


def _check_global_batch(config: PretrainConfig, context: DistributedContext) -> None:
    chunks = context.world_size * config.accumulation_steps
    if config.batch_size % chunks:
        raise ValueError(
            f"pretrain batch_size {config.batch_size} does not split into {context.world_size} processes x "
            f"{config.accumulation_steps} accumulation steps; choose a batch size that is a multiple of {chunks}"
        )


def _train_step(
    engine: nn.Module, images: torch.Tensor, classes: torch.Tensor, chunks: int, stats: _EpochStats, step: int
) -> None:
    """Accumulate the gradients of one rank's share of a batch, in ``chunks`` strided chunks.

    Chunk ``c`` contains every ``chunks``-th image from the ``c``-th on, the
    share a rank of a ``chunks``-times larger run would get. DDP exchanges
    gradients only after the last chunk.
    """
    for chunk in range(chunks):
        last = chunk == chunks - 1
        sync = contextlib.nullcontext() if last or not hasattr(engine, "no_sync") else engine.no_sync()
        with sync:
            output = engine(images[chunk::chunks], classes[chunk::chunks])
            if not torch.isfinite(output.loss):
                raise FloatingPointError(
                    f"MagLoss became {output.loss.item()} at step {step}; lower pretrain.lr or check the data"
                )
            (output.loss / chunks).backward()
        stats.add(output, classes[chunk::chunks])


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
