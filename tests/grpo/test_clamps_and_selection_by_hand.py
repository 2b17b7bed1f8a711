"""Both signs of every clamp, the multi-reward sum clamp against per-reward clamps, and best-of-n
with keep_top = 0 or keep_bottom = 0, all by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo.grpo import best_of_n_indices, clipped_surrogate_loss, group_advantages, multi_reward_advantages

# nine zeros and a 10 (mean 1, unbiased std sqrt(10)): the 10 gets 9/sqrt(10) = 2.84605, a zero −1/sqrt(10)
TOP = 9 / math.sqrt(10)
LOW = -1 / math.sqrt(10)


def test_group_clamp_cuts_both_signs():
    rewards = torch.tensor([0.0] * 9 + [10.0] + [0.0] * 9 + [-10.0])  # the second group mirrors the first
    clipped = group_advantages(rewards, 10, clip_max=2.0)
    expected = torch.tensor([LOW] * 9 + [2.0] + [-LOW] * 9 + [-2.0])
    torch.testing.assert_close(clipped, expected)
    unclipped = group_advantages(rewards, 10)
    assert unclipped[9].item() == pytest.approx(TOP, rel=1e-6) and unclipped[19].item() == pytest.approx(-TOP, rel=1e-6)


def test_group_clamp_bound_is_inclusive_and_leaves_smaller_values():
    # (1, 2, 3): advantages (−1, 0, 1); a bound of exactly 1 changes nothing, 0.5 cuts both ends
    rewards = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(group_advantages(rewards, 3, clip_max=1.0), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(group_advantages(rewards, 3, clip_max=0.5), torch.tensor([-0.5, 0.0, 0.5]))


def test_loss_advantage_clamp_cuts_both_signs():
    # ratio 1: loss = mean(−clamp(A, −5, 5)) = mean(−5, 5, −3, 2) = −0.25; its gradient is −A_clamped / 4
    logp = torch.zeros(4, requires_grad=True)
    loss, _ = clipped_surrogate_loss(logp, torch.zeros(4), torch.tensor([10.0, -10.0, 3.0, -2.0]), clip_range=0.2, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-0.25)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-5.0, 5.0, -3.0, 2.0]) / 4)


def test_ratio_clip_both_signs_of_the_advantage():
    """ρ = exp(Δ): A > 0 clips ρ above 1 + ε (no gradient) but not below; A < 0 clips below 1 − ε but not above.

    ε = 0.1, ρ = (1.3, 0.6, 1.3, 0.6), A = (2, 2, −2, −2):
      1: max(−2.6, −2.2) = −2.2 (clipped)   2: max(−1.2, −1.8) = −1.2 (unclipped, ρ < 1 − ε)
      3: max(2.6, 2.2) = 2.6 (unclipped)    4: max(1.2, 1.8) = 1.8 (clipped)
    loss = (−2.2 − 1.2 + 2.6 + 1.8)/4 = 0.25; gradients −A·ρ/4 where unclipped: (0, −0.3, 0.65, 0)
    """
    new = torch.log(torch.tensor([1.3, 0.6, 1.3, 0.6])).requires_grad_()
    loss, stats = clipped_surrogate_loss(new, torch.zeros(4), torch.tensor([2.0, 2.0, -2.0, -2.0]), clip_range=0.1)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.3, 0.65, 0.0]))
    assert stats.clip_fraction.item() == 1.0  # every |ρ − 1| > ε
    assert stats.ratio_mean.item() == pytest.approx(0.95)


def test_ratio_inside_the_clip_range_keeps_the_full_gradient():
    # |ρ − 1| ≤ ε: both branches agree, gradient −A·ρ/B for either sign; clip fraction counts neither
    new = torch.log(torch.tensor([1.05, 0.95])).requires_grad_()
    loss, stats = clipped_surrogate_loss(new, torch.zeros(2), torch.tensor([1.5, -0.5]), clip_range=0.1)
    assert loss.item() == pytest.approx((-1.5 * 1.05 + 0.5 * 0.95) / 2)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([-1.5 * 1.05, 0.5 * 0.95]) / 2)
    assert stats.clip_fraction.item() == 0.0


def test_multi_reward_clamps_the_sum_not_each_reward():
    # a = (0, 1, 0, 0) -> (−0.5, 1.5, −0.5, −0.5);  b = (1, 0, 1, 1) -> (0.5, −1.5, 0.5, 0.5)
    a, b = torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    # a + a = (−1, 3, −1, −1): the sum is cut at +2 although each reward (1.5) is below the bound
    total, per = multi_reward_advantages({"x": a, "y": a}, {"x": 1.0, "y": 1.0}, 4, clip_max=2.0)
    torch.testing.assert_close(total, torch.tensor([-1.0, 2.0, -1.0, -1.0]))
    torch.testing.assert_close(per["x"], torch.tensor([-0.5, 1.5, -0.5, -0.5]))  # per-reward values are not clamped
    # b + b = (1, −3, 1, 1): cut at −2
    total, _ = multi_reward_advantages({"x": b, "y": b}, {"x": 1.0, "y": 1.0}, 4, clip_max=2.0)
    torch.testing.assert_close(total, torch.tensor([1.0, -2.0, 1.0, 1.0]))


def test_multi_reward_does_not_clamp_each_reward_before_weighting():
    # one reward alone beyond the bound (2.846 > 2), weighted by 0.5: the sum 1.423 is within ±2, so
    # nothing is cut; clamping the reward first would give 0.5·2 = 1.0
    spike = torch.tensor([0.0] * 9 + [10.0])
    flat = torch.full((10,), 3.0)  # zero variance: A = 0
    total, per = multi_reward_advantages({"spike": spike, "flat": flat}, {"spike": 0.5, "flat": 2.0}, 10, clip_max=2.0)
    assert total[9].item() == pytest.approx(0.5 * TOP, rel=1e-6)
    assert total[0].item() == pytest.approx(0.5 * LOW, rel=1e-6)
    assert per["flat"].tolist() == [0.0] * 10
    # and negative: the mirrored spike gives −1.423, also uncut
    total, _ = multi_reward_advantages({"spike": -spike, "flat": flat}, {"spike": 0.5, "flat": 2.0}, 10, clip_max=2.0)
    assert total[9].item() == pytest.approx(-0.5 * TOP, rel=1e-6)


def test_multi_reward_weights_and_std_options_pass_through():
    # global std: a = (0, 2 | 0, 0): group means (1, 0), batch std of (0, 2, 0, 0) = 1 (unbiased)
    a = torch.tensor([0.0, 2.0, 0.0, 0.0])
    total, per = multi_reward_advantages({"a": a}, {"a": 3.0}, 2, std_mode="global")
    torch.testing.assert_close(per["a"], torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(total, torch.tensor([-3.0, 3.0, 0.0, 0.0]))
    # population std of (0, 2) is 1, unbiased sqrt(2): unbiased=False gives ±1, the default ±1/sqrt(2)
    total, _ = multi_reward_advantages({"a": a[:2]}, {"a": 1.0}, 2, unbiased=False)
    torch.testing.assert_close(total, torch.tensor([-1.0, 1.0]))
    total, _ = multi_reward_advantages({"a": a[:2]}, {"a": 1.0}, 2)
    torch.testing.assert_close(total, torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    # eps is added to the std: std 1, eps 1 halves the advantage
    total, _ = multi_reward_advantages({"a": a[:2]}, {"a": 1.0}, 2, unbiased=False, eps=1.0)
    torch.testing.assert_close(total, torch.tensor([-0.5, 0.5]))


def test_group_eps_is_added_to_the_std():
    # (1, 3): population std 1; eps 0.25 -> ±1/1.25
    adv = group_advantages(torch.tensor([1.0, 3.0]), 2, unbiased=False, eps=0.25)
    torch.testing.assert_close(adv, torch.tensor([-0.8, 0.8]))


SCORES = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.0, 9.0, 4.0, 7.0])  # two groups of 4


def test_best_of_n_top_only():
    # group 1 sorted: 5 (0), 3 (2), 2 (3), 1 (1); group 2: 9 (5), 7 (7), 4 (6), 0 (4)
    assert best_of_n_indices(SCORES, 4, keep_top=2, keep_bottom=0).tolist() == [0, 2, 5, 7]
    assert best_of_n_indices(SCORES, 4, keep_top=1, keep_bottom=0).tolist() == [0, 5]


def test_best_of_n_bottom_only():
    # the worst two of each group, best → worst: (2, 1) and (4, 0)
    assert best_of_n_indices(SCORES, 4, keep_top=0, keep_bottom=2).tolist() == [3, 1, 6, 4]
    assert best_of_n_indices(SCORES, 4, keep_top=0, keep_bottom=1).tolist() == [1, 4]


def test_best_of_n_whole_group_is_the_sorted_group():
    assert best_of_n_indices(SCORES, 4, keep_top=4, keep_bottom=0).tolist() == [0, 2, 3, 1, 5, 7, 6, 4]
    assert best_of_n_indices(SCORES, 4, keep_top=0, keep_bottom=4).tolist() == [0, 2, 3, 1, 5, 7, 6, 4]
    assert best_of_n_indices(SCORES, 4, keep_top=3, keep_bottom=1).tolist() == [0, 2, 3, 1, 5, 7, 6, 4]


@pytest.mark.parametrize("top, bottom", [(5, 0), (0, 5), (3, 2)])
def test_best_of_n_refuses_more_than_the_group(top, bottom):
    with pytest.raises(ValueError, match="group_size=4"):
        best_of_n_indices(SCORES, 4, top, bottom)


def test_best_of_n_refuses_scores_that_do_not_split():
    with pytest.raises(ValueError, match="groups of 3"):
        best_of_n_indices(SCORES, 3, 1, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        best_of_n_indices(SCORES.view(2, 4), 4, 1, 1)


def test_best_of_n_ties_keep_batch_order_in_large_groups():
    # 64 tied scores per group (torch's unstable sort reorders ties from about this size): the stable
    # sort keeps batch order, so the "best" are the first samples and the "worst" the last ones
    scores = torch.cat([torch.zeros(64), torch.tensor([0.0, 1.0] * 32)])
    chosen = best_of_n_indices(scores, 64, keep_top=2, keep_bottom=2)
    # group 2: the 32 ones (odd positions) lead in order, the 32 zeros (even positions) close it
    assert chosen.tolist() == [0, 1, 62, 63, 64 + 1, 64 + 3, 64 + 60, 64 + 62]


def test_best_of_n_stays_on_the_device_of_the_scores():
    # the "meta" device stands in for a GPU: offsets made on the CPU could not be added to the indices
    chosen = best_of_n_indices(torch.zeros(8, device="meta"), 4, keep_top=1, keep_bottom=1)
    assert chosen.device.type == "meta" and chosen.shape == (4,)


def test_kl_penalty_by_hand_and_off_at_beta_zero():
    # ratio 1, A = (1, −1): surrogate 0; KL (0.5, 2.5) has mean 1.5, β = 0.2 adds 0.3
    logp = torch.zeros(2)
    loss, stats = clipped_surrogate_loss(logp, logp, torch.tensor([1.0, -1.0]), clip_range=0.2, kl=torch.tensor([0.5, 2.5]), kl_beta=0.2)
    assert loss.item() == pytest.approx(0.3) and stats.loss.item() == pytest.approx(0.3) and stats.kl.item() == pytest.approx(1.5)
    # β = 0 never adds the KL, even a non-finite one
    loss, _ = clipped_surrogate_loss(logp, logp, torch.tensor([1.0, -1.0]), clip_range=0.2, kl=torch.tensor([float("inf"), 0.0]))
    assert loss.item() == 0.0
