"""Group advantages: hand-worked values, zero-variance groups, multi-reward sums."""

import math

import pytest
import torch

from lightning_grpo.grpo import binarize, group_advantages, multi_reward_advantages, zero_variance_fraction


def test_hand_worked_group_std():
    # group 1: mean 2, unbiased std 1 → (-1, 0, 1); group 2: mean 4, std sqrt(3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 6.0])
    expected = torch.tensor([-1.0, 0.0, 1.0, -1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)])
    torch.testing.assert_close(group_advantages(rewards, 3), expected)


def test_population_std_option():
    # population std of (1, 2, 3) is sqrt(2/3)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, unbiased=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3))


def test_global_std_divides_by_batch_std():
    # batch: mean 6, deviations (-5,-4,-3,4,4,4), unbiased var 98/5; group means subtracted
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    adv = group_advantages(rewards, 3, std_mode="global")
    std = math.sqrt(98 / 5)
    torch.testing.assert_close(adv, torch.tensor([-1 / std, 0.0, 1 / std, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("value", [0.1, 1e6, -3.7, 0.0])
@pytest.mark.parametrize("std_mode", ["group", "global"])
def test_zero_variance_group_gives_exact_zero(value, std_mode):
    rewards = torch.tensor([value] * 5 + [0.0, 1.0, 2.0, 3.0, 4.0])
    adv = group_advantages(rewards, 5, std_mode=std_mode)
    assert torch.isfinite(adv).all()
    assert adv[:5].tolist() == [0.0] * 5
    assert adv[5:].abs().sum() > 0


def test_all_groups_constant_and_group_of_one():
    assert group_advantages(torch.full((6,), 0.3), 3).tolist() == [0.0] * 6
    assert group_advantages(torch.tensor([1.0, 5.0]), 1).tolist() == [0.0, 0.0]


def test_clip_max_clamps():
    # nine zeros and one 10: mean 1, unbiased std sqrt(10), top advantage 9/sqrt(10) ≈ 2.85
    rewards = torch.tensor([0.0] * 9 + [10.0])
    unclipped = group_advantages(rewards, 10)
    assert unclipped[-1].item() == pytest.approx(9 / math.sqrt(10), rel=1e-6)
    clipped = group_advantages(rewards, 10, clip_max=2.0)
    assert clipped[-1].item() == 2.0
    torch.testing.assert_close(clipped[:-1], unclipped[:-1])


def test_groups_are_independent():
    a = torch.tensor([1.0, 4.0, 2.0])
    b = torch.tensor([100.0, -50.0, 7.0])
    together = group_advantages(torch.cat([a, b]), 3)
    torch.testing.assert_close(together[:3], group_advantages(a, 3))
    torch.testing.assert_close(together[3:], group_advantages(b, 3))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(torch.arange(4.0), 2, std_mode="batch")


def test_multi_reward_normalises_each_then_weights():
    # r1 = (1,2,3) → (-1,0,1); r2 = (3,3,6) → (-1,-1,2)/sqrt(3); A = 0.7·A1 + 1.4·A2
    rewards = {"hps": torch.tensor([1.0, 2.0, 3.0]), "clip": torch.tensor([3.0, 3.0, 6.0])}
    total, per = multi_reward_advantages(rewards, {"hps": 0.7, "clip": 1.4}, 3)
    s3 = math.sqrt(3)
    expected = torch.tensor([-0.7 - 1.4 / s3, -1.4 / s3, 0.7 + 2.8 / s3])
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(per["hps"], torch.tensor([-1.0, 0.0, 1.0]))


def test_multi_reward_is_scale_free_and_clamps_the_sum():
    base = torch.tensor([0.0, 1.0, 0.0, 0.0])
    small, _ = multi_reward_advantages({"a": base, "b": base * 1e-3}, {"a": 1.0, "b": 1.0}, 4)
    torch.testing.assert_close(small, 2 * group_advantages(base, 4), rtol=1e-4, atol=0)  # eps/std ≈ 2e-5
    clamped, _ = multi_reward_advantages({"a": base, "b": base}, {"a": 1.0, "b": 1.0}, 4, clip_max=1.0)
    assert clamped.max().item() == 1.0


def test_multi_reward_refuses_mismatched_names():
    with pytest.raises(ValueError, match="clip"):
        multi_reward_advantages({"hps": torch.zeros(2)}, {"hps": 1.0, "clip": 1.0}, 2)


def test_binarize_and_zero_variance_fraction():
    hps = torch.tensor([0.27, 0.28, 0.29, 0.35])
    assert binarize(hps, 0.28).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert zero_variance_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2).item() == pytest.approx(2 / 3)
