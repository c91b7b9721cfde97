"""Fine-tune a pretrained face model on same/different feedback pairs.

What trains is a choice (:data:`TRAIN_PARTS`): the final embedding layers, the
last stage plus those, or everything. BatchNorm layers stay in eval mode by
default, because a few small batches of pairs would overwrite running
statistics learnt on hundreds of thousands of faces. Dropout stays off for the
same reason and to keep runs deterministic. With a frozen trunk the trunk
outputs are computed once (:mod:`magface_al.training.feature_cache`), so an
epoch costs only the head. After every epoch the model is scored on the
validation identities' pairs; the best epoch is kept, and that may be epoch
0, the pretrained weights.

Under torchrun the head trains as a DistributedDataParallel module: every
rank draws the same batch order from the seed, takes every W-th pair of each
global batch of ``batch_size`` pairs, and scales its loss so that DDP's
gradient average equals the gradient of the global batch's mean loss. With
BatchNorm frozen (the default) the steps are those of a single process.
When the whole model trains (``train: all``), ``precision`` may run the
forward and backward passes under bfloat16 autocast; the weights, the
optimizer and the loss stay float32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from magface_al.distributed.context import current_context
from magface_al.evaluation.calibration import best_accuracy_threshold
from magface_al.pairs.table import Pairs
from magface_al.training.feature_cache import (
    TRAIN_PARTS,
    FeatureCache,
    TrunkHeadSplit,
    compute_trunk_features,
)
from magface_al.training.losses import embedding_distillation_loss, l2sp_penalty, pair_loss

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
STOPPING_METRICS = ("accuracy", "loss", "none")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings, one field per key of the ``finetune`` params section.

    Attributes:
        train: ``head``, ``last_stage`` or ``all``.
        loss: ``cosine`` (contrastive on the cosine, the default) or ``euclidean``
            (contrastive on the distance of unit vectors, kept for comparison).
        positive_margin: cosine above which a same-person pair costs nothing.
        negative_margin: cosine below which a different-person pair costs
            nothing; keep it below the decision threshold.
        euclidean_margin: distance margin of the euclidean loss (unit vectors).
        optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: the optimizer's weight decay (decays towards zero, which
            pulls away from the pretrained weights; ``l2sp`` pulls towards them).
        epochs: maximum number of passes over the feedback pairs.
        batch_size: pairs per optimizer step.
        freeze_bn: keep BatchNorm running statistics (eval mode) while training.
        l2sp: strength of the L2-SP penalty ``sum ||w - w_pretrained||^2``.
        distill: strength of the embedding distillation ``mean(1 - cos)`` between
            current and pretrained embeddings of unlabelled images.
        distill_batch_size: unlabelled images per step for the distillation term.
        early_stopping: ``accuracy`` (validation accuracy at the threshold that
            is best on the validation pairs), ``loss`` (validation pair loss) or
            ``none`` (keep the last epoch).
        patience: epochs without improvement before stopping.
        min_delta: smallest change that counts as an improvement (accuracy as a
            fraction, or loss).
        seed: seeds the batch order, the distillation samples and torch.
        deterministic: use PyTorch's deterministic algorithms during training.
        embed_batch_size: images per forward pass when filling the trunk cache.
        cache_dir: optional folder for an on-disk copy of the trunk outputs.
        precision: ``fp32``; ``bf16`` (autocast during training; an error
            where the device has no native bfloat16); or ``auto``: bf16 when
            the whole model trains on a device with native bfloat16, else fp32.
            Validation always runs in float32.
    """

    train: Literal["head", "last_stage", "all"] = "head"
    loss: Literal["cosine", "euclidean"] = "cosine"
    positive_margin: float = 0.7
    negative_margin: float = 0.2
    euclidean_margin: float = 1.0
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    freeze_bn: bool = True
    l2sp: float = 0.0
    distill: float = 0.0
    distill_batch_size: int = 64
    early_stopping: Literal["accuracy", "loss", "none"] = "accuracy"
    patience: int = 3
    min_delta: float = 0.0
    seed: int = 0
    deterministic: bool = True
    embed_batch_size: int = 64
    cache_dir: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"finetune.precision: invalid value {self.precision!r}; expected one of {', '.join(PRECISIONS)}"
            )
        if self.train not in TRAIN_PARTS:
            raise ValueError(f"finetune.train: invalid value {self.train!r}; expected one of {', '.join(TRAIN_PARTS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"finetune.optimizer: invalid value {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.early_stopping not in STOPPING_METRICS:
            raise ValueError(
                f"finetune.early_stopping: invalid value {self.early_stopping!r}; "
                f"expected one of {', '.join(STOPPING_METRICS)}"
            )
        for name in ("epochs", "batch_size", "distill_batch_size", "embed_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"finetune.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "l2sp", "distill", "weight_decay", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"finetune.{name}: must not be negative, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a plain mapping (stored inside the checkpoint)."""
        return asdict(self)


@dataclass
class FinetuneResult:
    """The fine-tuned model and what happened on the way.

    Attributes:
        model: a copy of the input model with the best epoch's weights, in eval mode.
        history: one mapping per epoch (0 is the pretrained model) with the
            training loss terms and the validation accuracy, threshold and loss.
        best_epoch: the epoch whose weights ``model`` holds; 0 means no epoch
            beat the pretrained weights on the validation pairs.
        stopped_early: whether early stopping ended training before ``epochs``.
        train_pairs: number of feedback pairs trained on.
        cache_seconds: time spent computing trunk outputs.
        train_seconds: time spent in epochs, validation included.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    train_pairs: int = 0
    cache_seconds: float = 0.0
    train_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Return a JSON-ready summary (everything but the model).

        Wall-clock times are left out: metrics files are DVC outputs, and
        `dvc repro -f` must reproduce them byte for byte.
        """
        best = self.history[self.best_epoch] if self.history else {}
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history) - 1,
            "stopped_early": self.stopped_early,
            "train_pairs": self.train_pairs,
            "pretrained_val_accuracy": self.history[0]["val_accuracy"] if self.history else None,
            "best_val_accuracy": best.get("val_accuracy"),
            "best_val_threshold": best.get("val_threshold"),
            "history": self.history,
        }


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Switch PyTorch's deterministic algorithms on for the block, then restore the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        # warn_only: an operation without a deterministic kernel (on some GPUs) warns instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _set_train_mode(split: TrunkHeadSplit, freeze_bn: bool) -> None:
    """Put the model in eval mode, then the head's BatchNorm layers in train mode unless frozen."""
    split.model.eval()
    if freeze_bn:
        return
    for module in split.head_modules():
        for child in module.modules():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                child.train()


def _make_optimizer(config: FinetuneConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


class _HeadModule(nn.Module):
    """The trainable head as a module (``forward(trunk outputs) -> raw embeddings``), for DDP to wrap.

    It contains the whole model, whose frozen trunk parameters DDP leaves out of
    the gradient exchange because they do not require gradients.
    """

    def __init__(self, split: TrunkHeadSplit) -> None:
        super().__init__()
        self.model = split.model
        self.split = split

    def forward(self, trunk_outputs: Tensor) -> Tensor:
        return self.split.head(trunk_outputs)


class _PairEmbedder:
    """Embeds the two faces of a batch of pairs through the head, each distinct image once."""

    def __init__(self, split: TrunkHeadSplit, cache: FeatureCache) -> None:
        self.split = split
        self.cache = cache

    def embed_step(
        self, engine: nn.Module, pairs: Pairs, extra_keys: np.ndarray
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Embed a training step's pairs and extra images in one forward pass of ``engine``.

        DDP expects one forward pass per backward pass, so the pair images and
        the distillation images go through the head together.
        """
        keys = np.concatenate([pairs.key1, pairs.key2, extra_keys]).astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        embeddings = engine(self.cache.get(unique))
        inverse = torch.as_tensor(inverse, dtype=torch.long)
        count = len(pairs)
        return embeddings[inverse[:count]], embeddings[inverse[count:2 * count]], embeddings[inverse[2 * count:]]

    def embed_keys(self, keys: np.ndarray) -> Tensor:
        return self.split.head(self.cache.get(keys))

    def embed_pairs(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        unique, inverse = np.unique(np.concatenate([pairs.key1, pairs.key2]), return_inverse=True)
        embeddings = self.embed_keys(unique)
        inverse = torch.as_tensor(inverse, dtype=torch.long)
        count = len(pairs)
        return embeddings[inverse[:count]], embeddings[inverse[count:]]

    @torch.no_grad()
    def embed_pairs_batched(self, pairs: Pairs, batch_size: int) -> tuple[Tensor, Tensor]:
        firsts, seconds = [], []
        for start in range(0, len(pairs), batch_size):
            first, second = self.embed_pairs(pairs.select(slice(start, start + batch_size)))
            firsts.append(first)
            seconds.append(second)
        return torch.cat(firsts), torch.cat(seconds)


@torch.no_grad()
def pair_cosines(split: TrunkHeadSplit, cache: FeatureCache, pairs: Pairs, *, batch_size: int = 256) -> np.ndarray:
    """Return the cosine similarity of each pair under the split's current head, from cached trunk outputs."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float64)
    was_training = split.model.training
    split.model.eval()
    try:
        first, second = _PairEmbedder(split, cache).embed_pairs_batched(pairs, batch_size)
    finally:
        split.model.train(was_training)
    return F.cosine_similarity(first, second, dim=1).double().cpu().numpy()


def _labels_tensor(pairs: Pairs, device: torch.device) -> Tensor:
    return torch.as_tensor(pairs.label, dtype=torch.float32, device=device)


def _validate(
    embedder: _PairEmbedder, val_pairs: Pairs, config: FinetuneConfig, batch_size: int
) -> dict[str, float]:
    """Score the validation pairs against their true labels."""
    was = [m.training for m in embedder.split.model.modules()]
    embedder.split.model.eval()
    try:
        first, second = embedder.embed_pairs_batched(val_pairs, batch_size)
    finally:
        for module, mode in zip(embedder.split.model.modules(), was):
            module.training = mode
    labels = torch.as_tensor(val_pairs.true_labels, dtype=torch.float32, device=first.device)
    loss = pair_loss(
        config.loss, first, second, labels,
        positive_margin=config.positive_margin, negative_margin=config.negative_margin,
        euclidean_margin=config.euclidean_margin,
    ).item()
    scores = F.cosine_similarity(first, second, dim=1).cpu().numpy()
    threshold, accuracy = best_accuracy_threshold(scores, val_pairs.true_labels)
    return {"val_accuracy": accuracy, "val_threshold": threshold, "val_loss": loss}


def _improved(config: FinetuneConfig, current: dict[str, float], best: dict[str, float]) -> bool:
    if config.early_stopping == "loss":
        return current["val_loss"] < best["val_loss"] - config.min_delta
    if config.early_stopping == "accuracy":
        if current["val_accuracy"] > best["val_accuracy"] + config.min_delta:
            return True
        # An equal accuracy with a lower validation loss also counts, because accuracy on
        # a few hundred pairs moves in coarse steps and would hide steady progress.
        return current["val_accuracy"] == best["val_accuracy"] and current["val_loss"] < best["val_loss"]
    return True  # "none": the latest epoch is always kept


def _trainable_state(split: TrunkHeadSplit) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in split.head_parameters()}


def _buffer_state(split: TrunkHeadSplit) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in split.model.named_buffers()}


def _restore(split: TrunkHeadSplit, parameters: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
    named = dict(split.head_parameters())
    named_buffers = dict(split.model.named_buffers())
    with torch.no_grad():
        for name, value in parameters.items():
            named[name].copy_(value)
        for name, value in buffers.items():
            named_buffers[name].copy_(value)


def _run_epoch(
    *,
    split: TrunkHeadSplit,
    engine: nn.Module,
    embedder: _PairEmbedder,
    train_pairs: Pairs,
    config: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    reference: dict[str, Tensor],
    distill_keys: np.ndarray,
    distill_targets: Tensor | None,
    generator: torch.Generator,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Train one epoch; return the mean losses per step, over all ranks."""
    context = current_context()
    _set_train_mode(split, config.freeze_bn)
    order = torch.randperm(len(train_pairs), generator=generator).numpy()
    totals = {"train_loss": 0.0, "pair_loss": 0.0, "l2sp": 0.0, "distill": 0.0}
    steps = 0
    use_distill = config.distill > 0 and distill_targets is not None and len(distill_keys) > 0
    for start in range(0, len(order), config.batch_size):
        global_batch = order[start:start + config.batch_size]
        batch = train_pairs.select(global_batch[context.rank::context.world_size])
        pick = np.zeros(0, dtype=np.int64)
        if use_distill:
            count = min(config.distill_batch_size, len(distill_keys))
            pick = torch.randperm(len(distill_keys), generator=generator)[:count].numpy()
        local_pick = pick[context.rank::context.world_size]
        with _autocast(device, autocast_dtype):
            first, second, distilled = embedder.embed_step(engine, batch, distill_keys[local_pick])
        first, second, distilled = first.float(), second.float(), distilled.float()

        # Sums over this rank's share, scaled by W / global count: DDP's average of the
        # ranks' gradients is then the gradient of the mean over the global batch.
        pair_sum = _pair_loss_sum(config, first, second, _labels_tensor(batch, device))
        loss = pair_sum * (context.world_size / len(global_batch))
        penalty = torch.zeros((), device=device)
        if config.l2sp > 0:
            penalty = l2sp_penalty(split.head_parameters(), reference)
            loss = loss + config.l2sp * penalty
        distill_sum = torch.zeros((), device=device)
        if use_distill:
            distill_sum = embedding_distillation_loss(distilled, distill_targets[local_pick]) * len(local_pick) \
                if len(local_pick) else distilled.sum() * 0.0
            loss = loss + config.distill * distill_sum * (context.world_size / len(pick))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pair_mean, distill_mean = _global_means(
            pair_sum.detach(), len(global_batch), distill_sum.detach(), max(len(pick), 1), context.enabled
        )
        totals["pair_loss"] += pair_mean
        totals["l2sp"] += penalty.item()
        totals["distill"] += distill_mean
        totals["train_loss"] += pair_mean + config.l2sp * penalty.item() + config.distill * distill_mean
        steps += 1
    return {name: value / max(steps, 1) for name, value in totals.items()}


def _pair_loss_sum(config: FinetuneConfig, first: Tensor, second: Tensor, labels: Tensor) -> Tensor:
    if len(labels) == 0:
        # A rank with no pairs in a short last batch still joins DDP's gradient exchange.
        return first.sum() * 0.0
    mean = pair_loss(
        config.loss, first, second, labels,
        positive_margin=config.positive_margin, negative_margin=config.negative_margin,
        euclidean_margin=config.euclidean_margin,
    )
    return mean * len(labels)


def _global_means(pair_sum: Tensor, pairs: int, distill_sum: Tensor, images: int, reduce: bool) -> tuple[float, float]:
    """Mean pair loss and distillation loss of the global batch, summed over the ranks."""
    sums = torch.stack([pair_sum.float().cpu(), distill_sum.float().cpu()])
    if reduce:
        dist.all_reduce(sums)
    return float(sums[0]) / pairs, float(sums[1]) / images


def resolve_precision(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype fine-tuning uses (None for float32), following ``config.precision``.

    Raises:
        ValueError: if ``bf16`` is requested on a device without native bfloat16.
    """
    if config.precision == "fp32":
        return None
    supported = _native_bf16(device)
    if config.precision == "bf16":
        if not supported:
            raise ValueError(
                f"finetune.precision: bf16 requested, but {device} has no native bfloat16 "
                "(CPU flags amx_bf16 or avx512_bf16, or a CUDA GPU with bf16); use fp32 or auto"
            )
        return torch.bfloat16
    # auto: only a trainable trunk makes autocast worth its rounding.
    return torch.bfloat16 if supported and config.train == "all" else None


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from magface_al.embedding.backends import cpu_supports_bf16

    return cpu_supports_bf16()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def finetune(
    model: nn.Module,
    spec: Any,
    dataset: Any,
    train_pairs: Pairs,
    val_pairs: Pairs,
    config: FinetuneConfig,
    *,
    unlabelled_keys: np.ndarray | None = None,
    device: torch.device | None = None,
    trunk_cache: FeatureCache | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``train_pairs``, choosing the epoch by ``val_pairs``.

    Args:
        model: The pretrained model; it is not changed.
        spec: Its :class:`~magface_al.models.spec.ModelSpec` (architecture and preprocessing).
        dataset: A face dataset with ``image(key)`` and ``image_bytes(key)``
            holding every image of the pairs and of ``unlabelled_keys``.
        train_pairs: Feedback pairs; their ``label`` (possibly noisy) is trained on.
        val_pairs: Pairs of validation identities, scored against ``true_labels``.
        config: The settings.
        unlabelled_keys: Images for the embedding distillation term (used when
            ``config.distill > 0``); their pretrained embeddings are the targets.
        device: Where to train; CPU when None.
        trunk_cache: Trunk outputs of ``model`` for the same ``config.train``
            part, computed earlier (for example to score the feedback); they are
            reused when they hold every image needed, and computed otherwise.

    Returns:
        The result with a fine-tuned copy of the model in eval mode.
    """
    if len(train_pairs) == 0:
        raise ValueError("no feedback pairs to fine-tune on; collect feedback or lower the exclusions")
    if len(val_pairs) == 0:
        raise ValueError("no validation pairs; the validation identities must form pairs for early stopping")
    device = device or torch.device("cpu")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    tuned = copy.deepcopy(model).to(device)
    split = TrunkHeadSplit(tuned, spec.arch, config.train)
    split.freeze_trunk()
    distill_keys = np.unique(np.asarray(unlabelled_keys if unlabelled_keys is not None else [], dtype=np.int64))
    if config.distill <= 0:
        distill_keys = distill_keys[:0]

    start = time.perf_counter()
    all_keys = np.unique(np.concatenate([train_pairs.keys, val_pairs.keys, distill_keys]))
    if trunk_cache is not None and trunk_cache.part != config.train:
        raise ValueError(
            f"the trunk cache was computed for train part {trunk_cache.part!r}, but the config trains "
            f"{config.train!r}; compute it with the same part"
        )
    if trunk_cache is not None and all(int(k) in trunk_cache for k in all_keys.tolist()):
        cache = FeatureCache(trunk_cache.keys, trunk_cache.features.to(device), part=trunk_cache.part)
    else:
        cache = compute_trunk_features(
            split, spec, dataset, all_keys, batch_size=config.embed_batch_size, device=device,
            cache_dir=config.cache_dir,
        )
    cache_seconds = time.perf_counter() - start
    embedder = _PairEmbedder(split, cache)

    with _deterministic(config.deterministic):
        result = _train(split, embedder, train_pairs, val_pairs, config, distill_keys, generator, device)
    result.cache_seconds = cache_seconds
    tuned.eval()
    return result


def _train(
    split: TrunkHeadSplit,
    embedder: _PairEmbedder,
    train_pairs: Pairs,
    val_pairs: Pairs,
    config: FinetuneConfig,
    distill_keys: np.ndarray,
    generator: torch.Generator,
    device: torch.device,
) -> FinetuneResult:
    start = time.perf_counter()
    reference = _trainable_state(split)
    distill_targets = None
    if len(distill_keys):
        split.model.eval()
        with torch.no_grad():
            distill_targets = torch.cat([
                embedder.embed_keys(distill_keys[i:i + config.embed_batch_size])
                for i in range(0, len(distill_keys), config.embed_batch_size)
            ])
    optimizer = _make_optimizer(config, [p for _, p in split.head_parameters()])
    context = current_context()
    engine: nn.Module = _HeadModule(split)
    if context.enabled:
        engine = DistributedDataParallel(engine, device_ids=[device] if device.type == "cuda" else None)
    autocast_dtype = resolve_precision(config, device)
    if autocast_dtype is not None:
        logger.info("training under %s autocast on %s", autocast_dtype, device)

    best = {"epoch": 0, **_validate(embedder, val_pairs, config, config.embed_batch_size)}
    history: list[dict[str, Any]] = [dict(best)]
    best_parameters, best_buffers = reference, _buffer_state(split)
    logger.info("epoch 0 (pretrained): val accuracy %.4f at threshold %.3f, val loss %.4f",
                best["val_accuracy"], best["val_threshold"], best["val_loss"])
    stale = 0
    stopped_early = False
    for epoch in range(1, config.epochs + 1):
        stats = _run_epoch(
            split=split, engine=engine, embedder=embedder, train_pairs=train_pairs, config=config,
            optimizer=optimizer, reference=reference, distill_keys=distill_keys, distill_targets=distill_targets,
            generator=generator, device=device, autocast_dtype=autocast_dtype,
        )
        if not all(math.isfinite(v) for v in stats.values()):
            logger.warning("epoch %d: training loss is not finite (%s); stopping and keeping epoch %d",
                           epoch, stats, best["epoch"])
            stopped_early = True
            break
        record = {"epoch": epoch, **stats, **_validate(embedder, val_pairs, config, config.embed_batch_size)}
        history.append(record)
        logger.info("epoch %d: train loss %.4f, val accuracy %.4f at threshold %.3f, val loss %.4f",
                    epoch, stats["train_loss"], record["val_accuracy"], record["val_threshold"], record["val_loss"])
        if _improved(config, record, best):
            best = record
            best_parameters, best_buffers = _trainable_state(split), _buffer_state(split)
            stale = 0
        else:
            stale += 1
            if config.early_stopping != "none" and stale >= config.patience:
                stopped_early = True
                logger.info("early stopping after epoch %d; best epoch %d", epoch, best["epoch"])
                break

    _restore(split, best_parameters, best_buffers)
    return FinetuneResult(
        model=split.model,
        history=history,
        best_epoch=int(best["epoch"]),
        stopped_early=stopped_early,
        train_pairs=len(train_pairs),
        train_seconds=time.perf_counter() - start,
    )
