"""The two multi-reward forms (summed advantages vs per-reward clipped losses) and the two
best-of-n advantage modes (full group vs re-normalised within the kept samples), hand-worked."""

import math

import pytest
import torch

from lightning_grpo.grpo import (
    clipped_surrogate_loss,
    combine_advantages,
    effective_advantages,
    grpo_advantages,
    reward_advantages,
)

S1 = math.sqrt(14 / 3)  # unbiased std of (1, 2, 3, 6): deviations (-2, -1, 0, 3) from mean 3
H = math.sqrt(3) / 2  # (0, 0, 2, 2) and (2, 2, 0, 0): deviations ±1, std 2/√3 → A = ±√3/2


def test_per_reward_loss_hand_worked_and_differs_from_the_sum():
    # ρ = (1.5, 0.5), ε = 0.2, A = [[1, -2], [-2, 1]], w = (0.5, 2)
    # reward 0: max(-1.5, -1.2) = -1.2 and max(1.0, 1.6) = 1.6 → 0.2
    # reward 1: max(3.0, 2.4) = 3.0 and max(-0.5, -0.8) = -0.5 → 1.25;  loss = 0.5·0.2 + 2·1.25 = 2.6
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5]))
    advantages = torch.tensor([[1.0, -2.0], [-2.0, 1.0]])
    weights = torch.tensor([0.5, 2.0])
    loss, stats = clipped_surrogate_loss(new, old, advantages, clip_range=0.2, reward_weights=weights)
    assert loss.item() == pytest.approx(2.6)
    assert stats.clip_fraction.item() == 1.0
    # summed form: A = (0.5 - 4, -1 + 2) = (-3.5, 1): max(5.25, 4.2) = 5.25, max(-0.5, -0.8) = -0.5 → 2.375
    summed, _ = clipped_surrogate_loss(new, old, advantages @ weights, clip_range=0.2)
    assert summed.item() == pytest.approx(2.375)


def test_per_reward_clamp_binds_per_reward():
    # ρ = 1: loss = -mean of the clamped advantages. A = [[6, -1], [-1, 6]], w = (1, 1), clip 5:
    # per reward: clamp → [[5, -1], [-1, 5]], each column's mean -A = -2 → -4;
    # summed: Σ = (5, 5), clamp 5 → -5
    logp = torch.zeros(2)
    advantages = torch.tensor([[6.0, -1.0], [-1.0, 6.0]])
    weights = torch.ones(2)
    per, _ = clipped_surrogate_loss(logp, logp, advantages, clip_range=0.2, adv_clip_max=5.0, reward_weights=weights)
    assert per.item() == pytest.approx(-4.0)
    summed, _ = clipped_surrogate_loss(logp, logp, advantages @ weights, clip_range=0.2, adv_clip_max=5.0)
    assert summed.item() == pytest.approx(-5.0)


def test_forms_agree_inside_the_clip_range_without_clamp():
    # every ratio inside [1-ε, 1+ε]: both losses are -mean(Σ_k w_k A_k ρ), same gradient
    old = torch.zeros(3)
    advantages = torch.tensor([[1.0, -2.0], [0.5, 0.25], [-1.5, 3.0]])
    weights = torch.tensor([0.7, 1.4])
    grads = []
    for adv, w in ((advantages, weights), (advantages @ weights, None)):
        new = torch.log(torch.tensor([1.05, 0.97, 1.0])).requires_grad_()
        loss, _ = clipped_surrogate_loss(new, old, adv, clip_range=0.2, reward_weights=w)
        loss.backward()
        grads.append((loss.detach(), new.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    # dL/dlogρ_b = -ρ_b·Σ_k w_k A_bk / B
    expected = -torch.tensor([1.05, 0.97, 1.0]) * (advantages @ weights) / 3
    torch.testing.assert_close(grads[0][1], expected)


def test_loss_refuses_mismatched_weights():
    logp = torch.zeros(2)
    with pytest.raises(ValueError, match="reward_weights"):
        clipped_surrogate_loss(logp, logp, torch.zeros(2, 2), clip_range=0.2)
    with pytest.raises(ValueError, match="reward_weights"):
        clipped_surrogate_loss(logp, logp, torch.zeros(2), clip_range=0.2, reward_weights=torch.ones(1))
    with pytest.raises(ValueError, match="3 reward weights for 2"):
        clipped_surrogate_loss(logp, logp, torch.zeros(2, 2), clip_range=0.2, reward_weights=torch.ones(3))


def test_combine_forms_hand_worked():
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, 6.0]), "b": torch.tensor([0.0, 0.0, 2.0, 2.0])}
    weights = {"a": 2.0, "b": 1.0}
    per = reward_advantages(rewards, weights, 4)
    a = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / S1
    b = torch.tensor([-H, -H, H, H])
    torch.testing.assert_close(per["a"], a)
    summed = combine_advantages(per, weights, "sum", clip_max=2.5)
    torch.testing.assert_close(summed, (2 * a + b).clamp(-2.5, 2.5))  # 2·3/S1 + H = 3.64 → 2.5
    assert summed[-1].item() == 2.5
    columns = combine_advantages(per, weights, "per_reward", clip_max=1.0)
    torch.testing.assert_close(columns, torch.stack([a, b], 1).clamp(-1, 1))  # 3/S1 = 1.39 → 1
    torch.testing.assert_close(effective_advantages(columns, torch.tensor([2.0, 1.0])), 2 * a.clamp(-1, 1) + b)
    with pytest.raises(ValueError, match="multi_reward"):
        combine_advantages(per, weights, "mean", clip_max=None)


def test_best_of_n_ranks_by_weighted_sum_and_keeps_full_group_advantages():
    # a = (1, 2, 3, 6) → (-2, -1, 0, 3)/S1; b = (2, 2, 0, 0) → (H, H, -H, -H); w = (1, 3)
    # Σ w·A = (-0.93 + 2.60, -0.46 + 2.60, -2.60, 1.39 - 2.60) = (1.67, 2.13, -2.60, -1.21):
    # best = sample 1, worst = sample 2 (a alone would pick 3 and 0)
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, 6.0]), "b": torch.tensor([2.0, 2.0, 0.0, 0.0])}
    weights = {"a": 1.0, "b": 3.0}
    full = grpo_advantages(rewards, weights, 4, form="per_reward", best_of_n=(1, 1), best_of_n_advantages="group")
    assert full.chosen.tolist() == [1, 2]
    torch.testing.assert_close(full.advantages, torch.tensor([[-1 / S1, H], [0.0, -H]]))
    summed = grpo_advantages(rewards, weights, 4, form="sum", best_of_n=(1, 1))  # "group" is the default
    torch.testing.assert_close(summed.advantages, torch.tensor([-1 / S1 + 3 * H, -3 * H]))


def test_best_of_n_kept_mode_renormalises_within_the_kept_samples():
    # kept samples 1 and 2: a = (2, 3) → (-1, 1)/√2; b = (2, 0) → (1, -1)/√2
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, 6.0]), "b": torch.tensor([2.0, 2.0, 0.0, 0.0])}
    weights = {"a": 1.0, "b": 3.0}
    r = 1 / math.sqrt(2)
    kept = grpo_advantages(rewards, weights, 4, form="per_reward", best_of_n=(1, 1), best_of_n_advantages="kept")
    assert kept.chosen.tolist() == [1, 2]
    torch.testing.assert_close(kept.advantages, torch.tensor([[-r, r], [r, -r]]))
    summed = grpo_advantages(rewards, weights, 4, form="sum", best_of_n=(1, 1), best_of_n_advantages="kept")
    torch.testing.assert_close(summed.advantages, torch.tensor([-r + 3 * r, r - 3 * r]))


def test_best_of_n_single_reward_two_groups():
    # group 0: (1, 2, 3, 6), keep best 6 and worst 1 → full group (3, -2)/S1, kept (1, -1)/√2;
    # group 1: (4, 0, 0, 0): mean 1, std 2 → (1.5, -0.5, -0.5, -0.5); the stable sort puts the tie last at index 7
    rewards = {"hps": torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 0.0, 0.0, 0.0])}
    full = grpo_advantages(rewards, {"hps": 1.0}, 4, best_of_n=(1, 1))
    assert full.chosen.tolist() == [3, 0, 4, 7]
    torch.testing.assert_close(full.advantages, torch.tensor([3 / S1, -2 / S1, 1.5, -0.5]))
    kept = grpo_advantages(rewards, {"hps": 1.0}, 4, best_of_n=(1, 1), best_of_n_advantages="kept")
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(kept.advantages, torch.tensor([r, -r, r, -r]))
    with pytest.raises(ValueError, match="best_of_n_advantages"):
        grpo_advantages(rewards, {"hps": 1.0}, 4, best_of_n=(1, 1), best_of_n_advantages="renormalise")


def test_without_best_of_n_every_sample_is_trained():
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, 6.0])}
    result = grpo_advantages(rewards, {"a": 0.5}, 4, clip_max=0.5)
    assert result.chosen is None
    torch.testing.assert_close(result.advantages, (0.5 * torch.tensor([-2.0, -1.0, 0.0, 3.0]) / S1).clamp(-0.5, 0.5))
