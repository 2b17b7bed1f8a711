"""The single-process logic of lightning_grpo/distributed.py, with hand-worked values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_grpo.callbacks._logging import RunFolder
from lightning_grpo.distributed import gather_by_key, local_selection, members_of_rank, replicated_state_names, update_schedule
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


def test_replicated_state_names_lists_frozen_parameters_and_every_buffer():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    frozen.register_buffer("position_ids", torch.arange(2), persistent=False)  # as CLIP's text embeddings
    trainable = nn.Linear(2, 1)
    trainable.register_buffer("scale", torch.ones(1))
    module = nn.ModuleDict({"encoder": frozen, "denoiser": trainable})
    assert replicated_state_names(module) == ["encoder.weight", "encoder.bias", "encoder.position_ids", "denoiser.scale"]


def test_grpo_module_tells_ddp_to_leave_frozen_parts_and_buffers_alone():
    """GRPOModule's `_ddp_params_and_buffers_to_ignore` (read by DistributedDataParallel and by
    Lightning before validate/test): frozen parameters and buffers, never a trainable parameter;
    made when asked, so it follows what is trainable then."""
    module = make_module()
    module.policy.text_encoder = nn.Linear(3, 3).requires_grad_(False)
    module.policy.register_buffer("position_ids", torch.arange(3))
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert {"policy.text_encoder.weight", "policy.text_encoder.bias", "policy.position_ids"} <= ignored
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and not trainable & ignored
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    assert ignored == frozen | {name for name, _ in module.named_buffers()}
    first = next(name for name in sorted(trainable))
    module.get_parameter(first).requires_grad_(False)
    assert first in module._ddp_params_and_buffers_to_ignore


def test_run_folder_is_resolved_on_every_rank_before_a_rank_zero_write(tmp_path):
    """`RunFolder.get` returns what `resolve` read on every rank; on several ranks it refuses to
    read `Trainer.log_dir` (a collective) from a rank-zero-only branch."""
    one = SimpleNamespace(log_dir=str(tmp_path / "version_0"), default_root_dir=str(tmp_path), world_size=1)
    assert RunFolder().get(one) == tmp_path / "version_0"
    assert RunFolder().get(SimpleNamespace(log_dir=None, default_root_dir=str(tmp_path), world_size=1)) == tmp_path
    two = SimpleNamespace(log_dir=str(tmp_path / "version_0"), default_root_dir=str(tmp_path), world_size=2)
    with pytest.raises(RuntimeError, match="every rank"):
        RunFolder().get(two)
    folder = RunFolder()
    folder.resolve(two)
    two.log_dir = "elsewhere"  # read once, at resolve
    assert folder.get(two) == tmp_path / "version_0"
