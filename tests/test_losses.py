"""Tests for the pair losses and the forgetting regularizers, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from magface_al.training.losses import (
    cosine_contrastive_loss,
    embedding_distillation_loss,
    euclidean_contrastive_loss,
    l2sp_penalty,
    pair_loss,
)


def _unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def _pairs(angles: list[float], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # The first face of every pair lies on the x axis, the second at the given angle,
    # so the cosine of pair i is cos(angles[i]).
    emb1 = torch.tensor([[scale, 0.0]] * len(angles), dtype=torch.float64)
    emb2 = torch.tensor([_unit(a) for a in angles], dtype=torch.float64) * 3.0
    return emb1, emb2


def test_cosine_loss_same_pair_pulled_to_one():
    emb1, emb2 = _pairs([60.0])  # cos 0.5
    loss = cosine_contrastive_loss(emb1, emb2, torch.tensor([1]), positive_margin=1.0)
    assert loss.item() == pytest.approx((1.0 - 0.5) ** 2)


def test_cosine_loss_different_pair_hinge():
    emb1, emb2 = _pairs([60.0, 90.0])  # cos 0.5 and 0.0
    loss = cosine_contrastive_loss(emb1, emb2, torch.tensor([0, 0]), negative_margin=0.3)
    # Only the first pair lies above the margin: (0.5 - 0.3)^2 / 2 pairs.
    assert loss.item() == pytest.approx(0.04 / 2)


def test_cosine_loss_mixed_batch_mean():
    emb1, emb2 = _pairs([0.0, 60.0, 0.0])  # cos 1, 0.5, 1
    labels = torch.tensor([1, 1, 0])
    loss = cosine_contrastive_loss(emb1, emb2, labels, positive_margin=0.9, negative_margin=0.2)
    expected = (0.0 + (0.9 - 0.5) ** 2 + (1.0 - 0.2) ** 2) / 3
    assert loss.item() == pytest.approx(expected)


def test_cosine_loss_ignores_magnitude():
    emb1, emb2 = _pairs([45.0], scale=1.0)
    emb1_big, emb2_big = _pairs([45.0], scale=40.0)
    labels = torch.tensor([1])
    small = cosine_contrastive_loss(emb1, emb2, labels)
    big = cosine_contrastive_loss(emb1_big, emb2_big, labels)
    assert small.item() == pytest.approx(big.item())


def test_cosine_loss_rejects_margins_out_of_order():
    emb1, emb2 = _pairs([10.0])
    with pytest.raises(ValueError, match="negative_margin=0.5, positive_margin=0.4"):
        cosine_contrastive_loss(emb1, emb2, torch.tensor([1]), positive_margin=0.4, negative_margin=0.5)


def test_euclidean_loss_hand_values():
    # cos 0.5 -> d = sqrt(2 - 2 * 0.5) = 1; cos 0 -> d = sqrt(2).
    emb1, emb2 = _pairs([60.0, 90.0, 90.0])
    labels = torch.tensor([1, 1, 0])
    loss = euclidean_contrastive_loss(emb1, emb2, labels, margin=1.5)
    expected = (1.0 + 2.0 + (1.5 - math.sqrt(2.0)) ** 2) / 3
    assert loss.item() == pytest.approx(expected)


def test_euclidean_loss_margin_one_stops_at_cosine_half():
    # A different-person pair at cosine 0.5 (distance 1) already satisfies margin 1,
    # which is why this loss leaves such pairs above a 0.4 threshold.
    emb1, emb2 = _pairs([60.0])
    loss = euclidean_contrastive_loss(emb1, emb2, torch.tensor([0]), margin=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    cosine_loss = cosine_contrastive_loss(emb1, emb2, torch.tensor([0]), negative_margin=0.3)
    assert cosine_loss.item() > 0.0


def test_pair_loss_rejects_unknown_name():
    emb1, emb2 = _pairs([10.0])
    with pytest.raises(ValueError, match="unknown loss 'triplet'; expected one of cosine, euclidean"):
        pair_loss("triplet", emb1, emb2, torch.tensor([1]))


def test_pair_loss_rejects_label_shape():
    emb1, emb2 = _pairs([10.0, 20.0])
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\); got \(3,\)"):
        pair_loss("cosine", emb1, emb2, torch.tensor([1, 0, 1]))


def test_cosine_loss_gradient_moves_different_pair_apart():
    emb1, emb2 = _pairs([30.0])
    emb2 = emb2.clone().requires_grad_(True)
    loss = cosine_contrastive_loss(emb1, emb2, torch.tensor([0]))
    loss.backward()
    with torch.no_grad():
        moved = emb2 - 0.1 * emb2.grad
    before = torch.cosine_similarity(emb1, emb2.detach(), dim=1).item()
    after = torch.cosine_similarity(emb1, moved, dim=1).item()
    assert after < before


def test_l2sp_penalty_hand_value():
    layer = nn.Linear(2, 1, bias=True)
    reference = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with torch.no_grad():
        layer.weight += torch.tensor([[1.0, 2.0]])
        layer.bias += torch.tensor([0.5])
    penalty = l2sp_penalty(layer.named_parameters(), reference)
    assert penalty.item() == pytest.approx(1.0 + 4.0 + 0.25)


def test_l2sp_penalty_zero_without_parameters():
    assert l2sp_penalty([], {}).item() == 0.0


def test_l2sp_penalty_missing_reference():
    layer = nn.Linear(2, 1)
    with pytest.raises(KeyError, match="no pretrained value for parameter 'weight'"):
        l2sp_penalty(layer.named_parameters(), {})


def test_distillation_loss_hand_value():
    current = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pretrained = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    # Pair 0 unchanged direction (cos 1), pair 1 orthogonal (cos 0): mean of 0 and 1.
    assert embedding_distillation_loss(current, pretrained).item() == pytest.approx(0.5)
