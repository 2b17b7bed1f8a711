"""The single-process logic of lightning_grpo/distributed.py, with hand-worked values."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_grpo.distributed import gather_by_key, local_selection, members_of_rank, update_schedule
from lightning_grpo.noise import sample_keys
from tests.training.fixtures import PROMPTS, ListPrompts, make_module


def test_update_schedule_equal_counts_needs_no_agreement():
    schedule = update_schedule(8, 4, agree=False)
    assert schedule.local == [range(0, 4), range(4, 8)]
    assert schedule.global_counts == [4, 4]
    assert schedule.weight(0) == 1 / 4  # world size 1: the mean over the step's 4 samples


def test_update_schedule_splits_a_short_last_step_and_one_step_when_unset():
    assert update_schedule(6, 4, agree=True).local == [range(0, 4), range(4, 6)]
    assert update_schedule(6, 4, agree=True).global_counts == [4, 2]
    assert update_schedule(6, None, agree=True).local == [range(0, 6)]
    assert update_schedule(0, None, agree=True).local == []  # nothing anywhere: no step


def test_local_selection_keeps_the_selection_order():
    # this rank holds full samples 5, 1, 6, 2 (position of its samples 0..3)
    position = torch.tensor([5, 1, 6, 2])
    chosen = torch.tensor([2, 5, 7, 1])  # full indices chosen, in selection order
    local, rows = local_selection(position, chosen, num_full=8)
    assert local.tolist() == [3, 0, 1]  # samples holding 2, 5, 1
    assert rows.tolist() == [0, 1, 3]  # their places in `chosen`


def test_gather_by_key_places_scores_by_group_and_member():
    keys = sample_keys(first_group=0, num_groups=2, members=[0, 1])[torch.tensor([3, 0, 2, 1])]
    scores = {"r": torch.tensor([13.0, 10.0, 12.0, 11.0])}  # sample (g, j) scored 10 + 2g + j
    gathered = gather_by_key(scores, keys, group_size=2)
    assert gathered.scores["r"].tolist() == [10.0, 11.0, 12.0, 13.0]
    assert gathered.position.tolist() == [3, 0, 2, 1] and gathered.num_groups == 2
    with pytest.raises(ValueError, match="exactly once"):
        gather_by_key(scores, keys, group_size=3)


def test_members_of_rank():
    assert list(members_of_rank(24, 2, 8)) == [6, 7, 8]
    with pytest.raises(ValueError, match="divisible"):
        members_of_rank(12, 0, 8)


def test_rollout_batch_size_does_not_change_training():
    """The module with rollout_batch_size=3 trains to the weights of the one-batch rollout."""
    weights = []
    for chunk in (None, 3):
        module = make_module(rollout_batch_size=chunk, decode_batch_size=5)
        trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=ListPrompts(PROMPTS, batch_size=2))
        weights.append(torch.cat([p.detach().flatten() for p in module.policy.trainable_parameters()]))
    assert not torch.equal(weights[0], torch.cat([p.detach().flatten() for p in make_module().policy.trainable_parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-5)


def test_rollout_batch_size_is_validated():
    with pytest.raises(ValueError, match="rollout_batch_size"):
        make_module(rollout_batch_size=0)
