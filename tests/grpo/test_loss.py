"""Clipped surrogate loss: hand-worked values, gradients, statistics, KL term."""

import math

import pytest
import torch

from lightning_grpo.grpo import clipped_surrogate_loss, gaussian_kl


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, stats = clipped_surrogate_loss(logp, logp.detach().clone(), torch.tensor([1.0, -2.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5)  # mean(-A) = mean(-1, 2)
    assert stats.ratio_mean.item() == 1.0 and stats.clip_fraction.item() == 0.0 and stats.approx_kl.item() == 0.0


def test_hand_worked_clipping():
    # sample 1: A = 1, ρ = 1.5 → max(-1.5, -1.2) = -1.2; sample 2: A = -2, ρ = 0.5 → max(1.0, 1.6) = 1.6
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5]))
    loss, stats = clipped_surrogate_loss(new, old, torch.tensor([1.0, -2.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.2)
    assert stats.clip_fraction.item() == 1.0
    assert stats.ratio_min.item() == pytest.approx(0.5) and stats.ratio_max.item() == pytest.approx(1.5)
    assert stats.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)


def test_gradient_is_zero_when_clipped_and_active_otherwise():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 1.05, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, 1.0])
    loss, _ = clipped_surrogate_loss(new, old, adv, clip_range=0.2)
    loss.backward()
    # sample 1 clipped above (A > 0): no gradient; sample 2 inside: dL/dlogp = -A·ρ/3; sample 3 (ρ < 1-ε, A > 0): unclipped
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -1.05 / 3, -0.5 / 3]))


def test_adv_clip_max_applies_before_the_surrogate():
    logp = torch.zeros(2)
    loss, _ = clipped_surrogate_loss(logp, logp, torch.tensor([10.0, -1.0]), clip_range=0.2, adv_clip_max=5.0)
    assert loss.item() == pytest.approx((-5.0 + 1.0) / 2)


def test_kl_term_is_off_by_default_and_added_with_beta():
    logp = torch.zeros(2)
    kl = torch.tensor([0.5, 1.5])
    plain, stats = clipped_surrogate_loss(logp, logp, torch.ones(2), clip_range=0.2, kl=kl)
    assert plain.item() == pytest.approx(-1.0) and stats.kl.item() == pytest.approx(1.0)
    with_kl, _ = clipped_surrogate_loss(logp, logp, torch.ones(2), clip_range=0.2, kl=kl, kl_beta=0.1)
    assert with_kl.item() == pytest.approx(-1.0 + 0.1)
    with pytest.raises(ValueError, match="KL"):
        clipped_surrogate_loss(logp, logp, torch.ones(2), clip_range=0.2, kl_beta=0.1)


def test_gaussian_kl_hand_worked():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    # ((1)^2/(2·0.25) + 0) / 2 = 1.0
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor(0.5)), torch.tensor([1.0, 0.0]))


def test_gaussian_kl_squares_differences_of_either_sign_at_a_general_std():
    """Differences −2 and 0.5 (per element) and σ = 0.8: ((4 + 0.25) / (2·0.64)) / 2 = 1.66015625;
    a second sample with differences 0.3, −0.1: ((0.09 + 0.01) / 1.28) / 2 = 0.0390625."""
    mean = torch.tensor([[-1.0, 1.5], [0.3, -0.1]])
    ref = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(gaussian_kl(mean, ref, torch.tensor(0.8)), torch.tensor([1.66015625, 0.0390625]))


def test_a_ratio_exactly_on_the_clip_boundary_is_not_counted_as_clipped():
    """clip(ρ) leaves a ratio on the boundary unchanged, so the clip fraction counts |ρ − 1| > ε
    strictly: at ε = 0 a ratio of exactly 1 is not clipped, one of e^0.1 is."""
    logp = torch.zeros(2)
    _, stats = clipped_surrogate_loss(torch.tensor([0.0, 0.1]), logp, torch.ones(2), clip_range=0.0)
    assert stats.clip_fraction.item() == 0.5
