"""Best-of-n selection (never crosses groups) and the random timestep subset."""

import pytest
import torch

from lightning_grpo.grpo import best_of_n_indices, sample_timestep_indices


def test_best_of_n_hand_worked():
    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.0, 9.0, 4.0, 7.0])
    assert best_of_n_indices(scores, 4, keep_top=1, keep_bottom=1).tolist() == [0, 1, 5, 4]
    assert best_of_n_indices(scores, 4, keep_top=2, keep_bottom=1).tolist() == [0, 2, 1, 5, 7, 4]


def test_best_of_n_ties_are_deterministic():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert best_of_n_indices(scores, 4, 1, 1).tolist() == [0, 3]


@pytest.mark.parametrize("seed", range(5))
def test_best_of_n_never_crosses_groups(seed):
    gen = torch.Generator().manual_seed(seed)
    group_size, groups, top, bottom = 8, 6, 3, 2
    # make one group's scores dominate all others: a global top-k would take only that group
    scores = torch.rand(groups * group_size, generator=gen)
    scores[:group_size] += 100
    chosen = best_of_n_indices(scores, group_size, top, bottom)
    k = top + bottom
    block_of = torch.arange(groups).repeat_interleave(k)
    assert torch.equal(chosen // group_size, block_of)
    for g in range(groups):
        block = chosen[g * k : (g + 1) * k]
        group_scores = scores[g * group_size : (g + 1) * group_size]
        assert set(block[:top].tolist()) == set((group_scores.topk(top).indices + g * group_size).tolist())
        assert set(block[top:].tolist()) == set((group_scores.topk(bottom, largest=False).indices + g * group_size).tolist())


@pytest.mark.parametrize("top, bottom", [(3, 2), (0, 0), (-1, 2)])
def test_best_of_n_refuses_impossible_counts(top, bottom):
    with pytest.raises(ValueError, match="keep_top"):
        best_of_n_indices(torch.zeros(8), 4, top, bottom)


def test_timestep_subset_shape_range_and_uniqueness():
    gen = torch.Generator().manual_seed(0)
    candidates = torch.arange(16)
    idx = sample_timestep_indices(32, candidates, 0.6, gen)
    assert idx.shape == (32, 9)  # int(16 · 0.6) = 9, DanceGRPO's rule
    assert all(len(set(row.tolist())) == 9 for row in idx)
    assert idx.min() >= 0 and idx.max() <= 15
    assert len({tuple(row.tolist()) for row in idx}) > 1  # a permutation per sample


def test_timestep_subset_respects_candidates_and_seed():
    candidates = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # e.g. the last of 8 steps dropped
    a = sample_timestep_indices(10, candidates, 1.0, torch.Generator().manual_seed(3))
    b = sample_timestep_indices(10, candidates, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert 7 not in a.tolist() and sorted(a[0].tolist()) == list(range(7))


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_timestep_subset_refuses_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        sample_timestep_indices(2, torch.arange(4), fraction)


def test_timestep_subset_needs_a_stochastic_step():
    with pytest.raises(ValueError, match="eta"):
        sample_timestep_indices(2, torch.zeros(0, dtype=torch.long), 0.5)


def test_timestep_subset_keeps_at_least_one_step_when_the_fraction_rounds_to_none():
    """int(4 · 0.1) = 0 steps: one is kept per sample (and not two)."""
    idx = sample_timestep_indices(5, torch.tensor([3, 5, 7, 9]), 0.1, torch.Generator().manual_seed(0))
    assert idx.shape == (5, 1) and set(idx.flatten().tolist()) <= {3, 5, 7, 9}
