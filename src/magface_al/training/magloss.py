"""MagLoss: the magnitude-aware angular margin loss of MagFace (Meng et al., CVPR 2021).

For an embedding x of class y, with a = ||x|| clamped to [l_a, u_a] and
theta_j the angle between x and the class centre W_j:

* the margin grows linearly with the magnitude,
  ``m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m``;
* the target logit is ``s * cos(theta_y + m(a))`` and every other logit is
  ``s * cos(theta_j)``;
* the loss is the cross entropy of those logits plus ``lambda_g * mean(g(a))``
  with ``g(a) = a / u_a**2 + 1 / a``, which is smallest at a = u_a and so
  rewards large magnitudes, while the margin penalises them. The balance
  ranks faces by how easily they are recognized: the magnitude becomes a
  quality score.

The optimal magnitude of a sample lies inside [l_a, u_a], where the margin
and the regularizer balance, only when lambda_g is large enough
(:func:`lambda_g_lower_bound`); :class:`MagLoss` logs a warning when its
settings violate that bound.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Floor of sin(theta)^2 = 1 - cos^2: keeps the gradient of the square root finite at theta = 0.
_SIN_EPS = 1e-12


@dataclass(frozen=True)
class MagLossSettings:
    """The hyper-parameters of MagLoss, defaulting to MagFace's training from scratch.

    For fine-tuning a model trained with ArcFace the MagFace authors suggest
    ``lower_magnitude=1, upper_magnitude=51, lower_margin=0.45, upper_margin=1,
    lambda_g=5``.
    """

    scale: float = 64.0  # s
    lower_magnitude: float = 10.0  # l_a
    upper_magnitude: float = 110.0  # u_a
    lower_margin: float = 0.45  # l_m, radians
    upper_margin: float = 0.8  # u_m, radians
    lambda_g: float = 35.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"invalid MagLoss scale {self.scale}: expected a positive number")
        if not 0 < self.lower_magnitude < self.upper_magnitude:
            raise ValueError(
                f"invalid MagLoss magnitude range [{self.lower_magnitude}, {self.upper_magnitude}]: "
                "expected 0 < lower_magnitude < upper_magnitude"
            )
        if not 0 <= self.lower_margin <= self.upper_margin < math.pi:
            raise ValueError(
                f"invalid MagLoss margin range [{self.lower_margin}, {self.upper_margin}]: "
                "expected 0 <= lower_margin <= upper_margin < pi (radians)"
            )
        if self.lambda_g < 0:
            raise ValueError(f"invalid MagLoss lambda_g {self.lambda_g}: expected a non-negative number")

    @property
    def margin_slope(self) -> float:
        """K = (u_m - l_m) / (u_a - l_a), the margin added per unit of magnitude."""
        return (self.upper_margin - self.lower_margin) / (self.upper_magnitude - self.lower_magnitude)

    def to_dict(self) -> dict[str, float]:
        """Return the settings as a plain dict (for checkpoints and metrics)."""
        return asdict(self)


def lambda_g_lower_bound(settings: MagLossSettings) -> float:
    """Return the lambda_g above which every sample's optimal magnitude lies inside [l_a, u_a].

    Derivation. For a fixed direction, the loss of one sample as a function of
    its magnitude is ``L(a) = CE(a) + lambda_g * g(a)``. The cross-entropy
    term grows with a: ``CE'(a) = (1 - p) * s * sin(theta + m(a)) * K`` where
    p is the softmax probability of the true class, so ``0 <= CE'(a) <= s * K``.
    The regularizer falls until u_a: ``g'(a) = 1 / u_a**2 - 1 / a**2``, which
    is 0 at u_a. At u_a, therefore, ``L'(u_a) = CE'(u_a) >= 0``. The optimum
    lies inside the interval for every sample when ``L'(l_a) <= 0`` even for
    the largest ``CE'``, i.e. ``s * K + lambda_g * (1 / u_a**2 - 1 / l_a**2) <= 0``:

        lambda_g >= s * K * l_a**2 * u_a**2 / (u_a**2 - l_a**2)

    MagFace's defaults (s 64, l_a 10, u_a 110, l_m 0.45, u_m 0.8) give about
    22.6, below their lambda_g of 35. The bound is sufficient, not necessary,
    because it assumes the worst case p = 0 and sin(theta + m) = 1.
    """
    lower, upper = settings.lower_magnitude, settings.upper_magnitude
    return settings.scale * settings.margin_slope * lower**2 * upper**2 / (upper**2 - lower**2)


def check_lambda_g(settings: MagLossSettings) -> dict[str, Any]:
    """Compare lambda_g with its lower bound, log a warning when it is too small and return the comparison.

    Returns:
        ``{"lambda_g", "lambda_g_lower_bound", "lambda_g_feasible"}``, strict-JSON ready.
    """
    bound = lambda_g_lower_bound(settings)
    feasible = settings.lambda_g >= bound
    if not feasible:
        logger.warning(
            "MagLoss lambda_g %.4g is below its feasibility bound %.4g "
            "(s * K * l_a^2 * u_a^2 / (u_a^2 - l_a^2)): magnitudes may not settle inside [%g, %g] "
            "and stop ranking faces by quality; raise lambda_g or lower the margin slope K",
            settings.lambda_g,
            bound,
            settings.lower_magnitude,
            settings.upper_magnitude,
        )
    return {"lambda_g": settings.lambda_g, "lambda_g_lower_bound": bound, "lambda_g_feasible": feasible}


def magnitude_margin(magnitudes: Tensor, settings: MagLossSettings) -> Tensor:
    """Return m(a) in radians for raw magnitudes, which are clamped to [l_a, u_a] first."""
    clamped = magnitudes.clamp(settings.lower_magnitude, settings.upper_magnitude)
    return settings.margin_slope * (clamped - settings.lower_magnitude) + settings.lower_margin


def magnitude_regularizer(magnitudes: Tensor, settings: MagLossSettings) -> Tensor:
    """Return g(a) = a / u_a^2 + 1 / a per sample, with a clamped to [l_a, u_a]."""
    clamped = magnitudes.clamp(settings.lower_magnitude, settings.upper_magnitude)
    return clamped / settings.upper_magnitude**2 + 1.0 / clamped


def margin_target_cosine(cos_theta: Tensor, margins: Tensor) -> Tensor:
    """Return cos(theta + m) for the target class, continued monotonically past theta + m = pi.

    cos(theta + m) rises again once theta + m passes pi, which would reward a
    sample for moving away from its class centre. For theta > pi - m this
    function uses ``cos(theta) - (1 - cos(m))`` instead: it equals -1 at
    theta = pi - m (so the logit is continuous), keeps falling as theta grows
    and keeps a gradient. InsightFace's ArcFace code switches to
    ``cos(theta) - m * sin(m)`` there, which is not continuous; both only
    matter for samples almost opposite their class centre.
    """
    cos_m, sin_m = torch.cos(margins), torch.sin(margins)
    sin_theta = torch.sqrt((1.0 - cos_theta * cos_theta).clamp(min=_SIN_EPS))
    with_margin = cos_theta * cos_m - sin_theta * sin_m
    # theta > pi - m  <=>  cos(theta) < cos(pi - m) = -cos(m)
    past_pi = cos_theta < -cos_m
    return torch.where(past_pi, cos_theta - (1.0 - cos_m), with_margin)


class MagLossOutput(NamedTuple):
    """The parts of one MagLoss evaluation; tensors keep their graph for backpropagation."""

    loss: Tensor  # scalar: classification + lambda_g * regularizer
    classification: Tensor  # scalar cross entropy
    regularizer: Tensor  # scalar mean g(a)
    cos_theta: Tensor  # (N, C) cosine to every class centre, no margin
    magnitudes: Tensor  # (N,) raw, unclamped L2 norms
    margins: Tensor  # (N,) m(a) in radians


class MagLoss(nn.Module):
    """MagLoss with its own class centres: ``forward(embeddings, labels) -> MagLossOutput``.

    Args:
        embedding_size: D, the size of the raw embeddings.
        num_classes: C, the number of identities in the training set.
        settings: the MagLoss hyper-parameters.
    """

    def __init__(self, embedding_size: int, num_classes: int, settings: MagLossSettings | None = None) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(
                f"invalid MagLoss shape: embedding_size {embedding_size}, num_classes {num_classes}; "
                "expected a positive embedding size and at least 2 classes"
            )
        self.settings = settings or MagLossSettings()
        self.feasibility = check_lambda_g(self.settings)
        # Class centres (C, D); only their direction matters.
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: Tensor, labels: Tensor) -> MagLossOutput:
        """Compute MagLoss for raw embeddings (N, D) and integer class labels (N,)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"MagLoss expects embeddings of shape (N, {self.weight.shape[1]}), got {tuple(embeddings.shape)}"
            )
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"MagLoss expects labels of shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        settings = self.settings
        magnitudes = embeddings.norm(dim=1)
        margins = magnitude_margin(magnitudes, settings)
        cos_theta = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1.0, 1.0)

        target_cos = cos_theta.gather(1, labels[:, None]).squeeze(1)
        target_with_margin = margin_target_cosine(target_cos, margins)
        logits = cos_theta.scatter(1, labels[:, None], target_with_margin[:, None]) * settings.scale

        classification = F.cross_entropy(logits, labels)
        regularizer = magnitude_regularizer(magnitudes, settings).mean()
        loss = classification + settings.lambda_g * regularizer
        return MagLossOutput(loss, classification, regularizer, cos_theta, magnitudes, margins)
