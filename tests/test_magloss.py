"""MagLoss against values computed by hand with the math module."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from magface_al.training.magloss import (
    MagLoss,
    MagLossSettings,
    check_lambda_g,
    lambda_g_lower_bound,
    magnitude_margin,
    magnitude_regularizer,
    margin_target_cosine,
)

DEFAULTS = MagLossSettings()


@pytest.mark.parametrize(
    ("magnitude", "expected_margin"),
    [
        (2.0, 0.45),  # below l_a: clamped to l_a, margin l_m
        (10.0, 0.45),  # exactly l_a
        (60.0, 0.45 + 0.35 * 50 / 100),  # midway: 0.625
        (110.0, 0.8),  # exactly u_a
        (500.0, 0.8),  # above u_a: clamped to u_a, margin u_m
    ],
)
def test_magnitude_margin_linear_and_clamped(magnitude: float, expected_margin: float) -> None:
    margin = magnitude_margin(torch.tensor([magnitude], dtype=torch.float64), DEFAULTS)
    assert margin.item() == pytest.approx(expected_margin, abs=1e-12)


@pytest.mark.parametrize(
    ("magnitude", "clamped"),
    [(1.0, 10.0), (10.0, 10.0), (33.0, 33.0), (110.0, 110.0), (1000.0, 110.0)],
)
def test_magnitude_regularizer_values(magnitude: float, clamped: float) -> None:
    value = magnitude_regularizer(torch.tensor([magnitude], dtype=torch.float64), DEFAULTS).item()
    assert value == pytest.approx(clamped / 110.0**2 + 1.0 / clamped, rel=1e-12)


def test_magnitude_regularizer_minimum_at_upper_magnitude() -> None:
    magnitudes = torch.linspace(10.0, 110.0, 1001, dtype=torch.float64)
    values = magnitude_regularizer(magnitudes, DEFAULTS)
    assert values.argmin().item() == 1000
    assert values.min().item() == pytest.approx(2 / 110.0, rel=1e-12)


def test_lambda_g_lower_bound_defaults() -> None:
    slope = (0.8 - 0.45) / (110 - 10)
    expected = 64 * slope * 10**2 * 110**2 / (110**2 - 10**2)
    assert lambda_g_lower_bound(DEFAULTS) == pytest.approx(expected, rel=1e-12)
    assert lambda_g_lower_bound(DEFAULTS) == pytest.approx(22.587, abs=1e-3)


def test_check_lambda_g_feasible_defaults(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="magface_al.training.magloss"):
        report = check_lambda_g(DEFAULTS)
    assert report["lambda_g_feasible"] is True
    assert report["lambda_g"] == 35.0
    assert not caplog.records


def test_check_lambda_g_warns_when_too_small(caplog: pytest.LogCaptureFixture) -> None:
    settings = MagLossSettings(lambda_g=5.0)
    with caplog.at_level(logging.WARNING, logger="magface_al.training.magloss"):
        report = check_lambda_g(settings)
    assert report["lambda_g_feasible"] is False
    assert "below its feasibility bound" in caplog.text


def test_check_lambda_g_finetune_settings_feasible() -> None:
    settings = MagLossSettings(lower_magnitude=1, upper_magnitude=51, lower_margin=0.45, upper_margin=1, lambda_g=5)
    slope = 0.55 / 50
    assert check_lambda_g(settings)["lambda_g_lower_bound"] == pytest.approx(64 * slope * 51**2 / (51**2 - 1))
    assert check_lambda_g(settings)["lambda_g_feasible"] is True


@pytest.mark.parametrize("theta", [0.0, 0.3, 1.2, 2.0])
def test_margin_target_cosine_below_pi(theta: float) -> None:
    margin = 0.5
    value = margin_target_cosine(torch.tensor([math.cos(theta)], dtype=torch.float64), torch.tensor([margin]))
    assert value.item() == pytest.approx(math.cos(theta + margin), abs=1e-6)


def test_margin_target_cosine_past_pi_continuous_and_falling() -> None:
    margin = 0.8
    switch = math.pi - margin
    thetas = torch.tensor([switch - 1e-4, switch + 1e-4, 2.8, 3.0, 3.1], dtype=torch.float64)
    values = margin_target_cosine(torch.cos(thetas), torch.full_like(thetas, margin))
    assert values[0].item() == pytest.approx(-1.0, abs=1e-6)
    assert values[1].item() == pytest.approx(-1.0, abs=1e-3)
    assert torch.all(values[1:] < values[:-1])
    assert values[3].item() == pytest.approx(math.cos(3.0) - (1 - math.cos(margin)), abs=1e-12)


def _two_class_loss(magnitude: float, angle: float, settings: MagLossSettings) -> tuple[MagLoss, torch.Tensor]:
    """A 2-D embedding at ``angle`` from class 0's centre (1, 0); class 1's centre is (0, 1)."""
    loss = MagLoss(2, 2, settings)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))  # norms must not matter
    embedding = torch.tensor([[magnitude * math.cos(angle), magnitude * math.sin(angle)]], dtype=torch.float32)
    return loss, embedding


def _hand_loss(magnitude: float, angle: float, settings: MagLossSettings) -> float:
    clamped = min(max(magnitude, settings.lower_magnitude), settings.upper_magnitude)
    margin = settings.lower_margin + (settings.upper_margin - settings.lower_margin) * (
        clamped - settings.lower_magnitude
    ) / (settings.upper_magnitude - settings.lower_magnitude)
    target = settings.scale * math.cos(angle + margin)
    other = settings.scale * math.cos(math.pi / 2 - angle)
    cross_entropy = -target + math.log(math.exp(target) + math.exp(other))
    regularizer = clamped / settings.upper_magnitude**2 + 1 / clamped
    return cross_entropy + settings.lambda_g * regularizer


@pytest.mark.parametrize("magnitude", [4.0, 10.0, 47.0, 110.0, 150.0])
def test_magloss_matches_hand_computation(magnitude: float) -> None:
    settings = MagLossSettings(scale=16.0)  # smaller s keeps exp() in float32 range with margin for error
    angle = 0.4
    loss, embedding = _two_class_loss(magnitude, angle, settings)
    output = loss(embedding, torch.tensor([0]))
    assert output.loss.item() == pytest.approx(_hand_loss(magnitude, angle, settings), rel=1e-4)
    assert output.magnitudes.item() == pytest.approx(magnitude, rel=1e-6)
    assert output.cos_theta[0, 0].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_magloss_default_scale_matches_hand_computation() -> None:
    angle = 0.2
    loss, embedding = _two_class_loss(60.0, angle, DEFAULTS)
    output = loss(embedding, torch.tensor([0]))
    assert output.loss.item() == pytest.approx(_hand_loss(60.0, angle, DEFAULTS), rel=1e-4)
    assert output.margins.item() == pytest.approx(0.625, abs=1e-6)


def test_magloss_gradient_raises_small_magnitude() -> None:
    # Below the balance point the regularizer dominates, so gradient descent grows the magnitude.
    loss, embedding = _two_class_loss(12.0, 0.1, DEFAULTS)
    embedding.requires_grad_(True)
    loss(embedding, torch.tensor([0])).loss.backward()
    direction = embedding.detach() / embedding.detach().norm()
    assert (embedding.grad * direction).sum().item() < 0


def test_magloss_rejects_wrong_embedding_size() -> None:
    loss = MagLoss(4, 3)
    with pytest.raises(ValueError, match=r"MagLoss expects embeddings of shape \(N, 4\), got \(2, 5\)"):
        loss(torch.ones(2, 5), torch.tensor([0, 1]))


def test_magloss_settings_reject_inverted_magnitudes() -> None:
    with pytest.raises(ValueError, match=r"invalid MagLoss magnitude range \[110.0, 10.0\]"):
        MagLossSettings(lower_magnitude=110.0, upper_magnitude=10.0)
