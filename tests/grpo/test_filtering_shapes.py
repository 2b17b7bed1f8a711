"""`filter_nonfinite_groups` at the edges of its input check: 2-D scores, groups of one sample."""

import pytest
import torch

from lightning_grpo.grpo.filtering import filter_nonfinite_groups


def test_two_dimensional_scores_are_refused_even_when_they_split():
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        filter_nonfinite_groups({"r": torch.zeros(2, 2)}, group_size=2)


def test_groups_of_one_sample_drop_only_that_sample():
    result = filter_nonfinite_groups({"r": torch.tensor([1.0, float("nan"), 3.0])}, group_size=1)
    assert result.keep.tolist() == [0, 2] and result.dropped_groups == 1 and result.num_groups == 3


def test_group_size_zero_is_refused():
    with pytest.raises(ValueError, match="groups of 0"):
        filter_nonfinite_groups({"r": torch.zeros(2)}, group_size=0)
