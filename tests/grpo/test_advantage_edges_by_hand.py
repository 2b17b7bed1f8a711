"""Edges of the advantage formulas, by hand: a constant group next to a varied one, the dtype of
groups of one, the lower clamp of the per-reward form, weights of another dtype, the global std
through `grpo_advantages`."""

from __future__ import annotations

import math

import torch

from lightning_grpo.grpo.advantages import combine_advantages, effective_advantages, group_advantages, grpo_advantages


def test_a_constant_group_gets_exactly_zero_next_to_a_varied_group():
    # six rewards of 0.3: their float32 mean is not exactly 0.3, so (r − mean) / (0 + eps) would be ≈ 3
    rewards = torch.tensor([0.3] * 6 + [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    advantages = group_advantages(rewards, 6)
    assert torch.equal(advantages[:6], torch.zeros(6))
    std = math.sqrt(17.5 / 5)  # unbiased std of 0..5 (mean 2.5, Σ(k − 2.5)² = 17.5)
    torch.testing.assert_close(advantages[6:], (torch.arange(6.0) - 2.5) / std)


def test_groups_of_one_give_float32_zeros_whatever_the_reward_dtype():
    for rewards in (torch.tensor([1, 0, 1]), torch.tensor([0.5, 0.25], dtype=torch.float64)):
        advantages = group_advantages(rewards, 1)
        assert advantages.dtype == torch.float32 and torch.equal(advantages, torch.zeros(len(rewards)))
        assert advantages.dtype == group_advantages(rewards[:2], 2).dtype  # as any other group size


def test_per_reward_form_clamps_both_signs_of_each_column():
    per_reward = {"a": torch.tensor([-7.0, 2.0, 6.0]), "b": torch.tensor([0.5, -5.5, 9.0])}
    columns = combine_advantages(per_reward, {"a": 1.0, "b": 2.0}, "per_reward", clip_max=5.0)
    torch.testing.assert_close(columns, torch.tensor([[-5.0, 0.5], [2.0, -5.0], [5.0, 5.0]]))


def test_effective_advantages_take_weights_of_another_dtype():
    advantages = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # [B, K] float32
    combined = effective_advantages(advantages, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert combined.dtype == torch.float32
    torch.testing.assert_close(combined, torch.tensor([0.5 - 4.0, 0.25 + 6.0]))


def test_grpo_advantages_normalise_with_the_global_std():
    rewards = {"r": torch.tensor([0.0, 1.0, 0.0, 3.0])}  # batch std √2; groups' own stds 0.71, 2.12
    out = grpo_advantages(rewards, {"r": 1.0}, 2, std_mode="global")
    assert out.chosen is None
    torch.testing.assert_close(out.advantages, torch.tensor([-0.5, 0.5, -1.5, 1.5]) / math.sqrt(2))


def test_best_of_n_kept_advantages_use_the_global_std_of_the_kept_samples():
    rewards = {"r": torch.tensor([0.0, 1.0, 2.0, 10.0, 0.0, 1.0, 2.0, 4.0])}
    out = grpo_advantages(rewards, {"r": 1.0}, 4, best_of_n=(1, 1), best_of_n_advantages="kept", std_mode="global")
    assert out.chosen.tolist() == [3, 0, 7, 4]  # per group: the best, then the worst
    # kept rewards [10, 0, 4, 0]: centred ±5, ±2; their batch std is sqrt(67 / 3) (mean 3.5)
    torch.testing.assert_close(out.advantages, torch.tensor([5.0, -5.0, 2.0, -2.0]) / math.sqrt(67 / 3))


def test_best_of_n_advantages_are_clamped():
    # group [0, 0, 0, 10]: mean 2.5, std 5, so A = −0.5, −0.5, −0.5, 1.5; the best is clamped to 1
    out = grpo_advantages({"r": torch.tensor([0.0, 0.0, 0.0, 10.0])}, {"r": 1.0}, 4, best_of_n=(1, 1), clip_max=1.0)
    assert out.chosen.tolist() == [3, 2]  # the best, and the last of the tied worst (stable sort)
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, -0.5]))
