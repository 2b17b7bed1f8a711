"""Dropping the groups with a non-finite reward: hand-worked cases of `filter_nonfinite_groups`."""

import pytest
import torch

from lightning_grpo.grpo.filtering import filter_nonfinite_groups

nan, inf = float("nan"), float("inf")


def test_hand_worked_one_group_dropped():
    # G = 2, groups (0,1) (2,3) (4,5); reward "a" is NaN on sample 1 → group 0 dropped
    scores = {"a": torch.tensor([1.0, nan, 2.0, 3.0, 4.0, 5.0]), "b": torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])}
    result = filter_nonfinite_groups(scores, group_size=2)
    assert result.keep.tolist() == [2, 3, 4, 5]
    assert result.kept_groups.tolist() == [False, True, True]
    assert result.dropped_groups == 1 and result.num_groups == 3
    assert result.nonfinite_samples == {"a": 1}


def test_failures_of_different_rewards_combine():
    # "a" fails in group 0, "b" (inf) in group 1: both dropped; counts per reward
    scores = {"a": torch.tensor([1.0, nan, 2.0, 3.0]), "b": torch.tensor([0.0, 0.0, inf, -inf])}
    result = filter_nonfinite_groups(scores, group_size=2)
    assert result.keep.tolist() == []
    assert result.dropped_groups == 2
    assert result.nonfinite_samples == {"a": 1, "b": 2}


def test_all_finite_keeps_everything_in_order():
    scores = {"a": torch.arange(6.0)}
    result = filter_nonfinite_groups(scores, group_size=3)
    assert result.keep.tolist() == [0, 1, 2, 3, 4, 5]
    assert result.dropped_groups == 0 and result.nonfinite_samples == {}


def test_whole_group_goes_even_when_one_sample_fails():
    # G = 4: one NaN in the middle group removes its four samples, never just the one sample
    values = torch.arange(12.0)
    values[6] = nan
    result = filter_nonfinite_groups({"r": values}, group_size=4)
    assert result.keep.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="groups of 4"):
        filter_nonfinite_groups({"r": torch.zeros(6)}, group_size=4)
    with pytest.raises(ValueError, match="different numbers"):
        filter_nonfinite_groups({"a": torch.zeros(4), "b": torch.zeros(6)}, group_size=2)
    with pytest.raises(ValueError, match="no reward"):
        filter_nonfinite_groups({}, group_size=2)
