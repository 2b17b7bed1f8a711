"""The module's own advantage and batch-layout steps, by hand: the GRPO objective's `targets`
passes every advantage option on to `grpo_advantages`, and `check_divides` refuses a rollout that
does not split into optimizer steps of micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo.distributed import check_divides
from lightning_grpo.objectives import Prepared, Targets
from tests.training.fixtures import make_module


def _targets(module, scores):
    return module.objective.targets(scores, module.rewards.weights, module.hparams.group_size)


@pytest.mark.parametrize(
    "std_mode, expected",
    [
        # groups [0, 1], [0, 3]: each group's own std (0.7071, 2.1213) makes every advantage ±1/√2
        ("group", [-1 / math.sqrt(2), 1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2)]),
        # the batch std of [0, 1, 0, 3] is √2: centred values ±0.5, ±1.5 divided by it
        ("global", [-0.5 / math.sqrt(2), 0.5 / math.sqrt(2), -1.5 / math.sqrt(2), 1.5 / math.sqrt(2)]),
    ],
)
def test_targets_normalise_with_the_configured_std(std_mode, expected):
    module = make_module(group_size=2, micro_batch_size=1, samples_per_update=2, advantage_std=std_mode)
    targets = _targets(module, {"redness": torch.tensor([0.0, 1.0, 0.0, 3.0])})
    assert targets.chosen is None
    torch.testing.assert_close(targets.values, torch.tensor(expected))


def test_targets_clamp_the_advantages_at_adv_clip_max():
    """The same groups with adv_clip_max = 0.5: every ±1/√2 ≈ ±0.7071 is cut to ±0.5."""
    module = make_module(group_size=2, micro_batch_size=1, samples_per_update=2, adv_clip_max=0.5)
    targets = _targets(module, {"redness": torch.tensor([0.0, 1.0, 0.0, 3.0])})
    torch.testing.assert_close(targets.values, torch.tensor([-0.5, 0.5, -0.5, 0.5]))


@pytest.mark.parametrize(
    "num_samples, per_update, micro_batch_size, fits",
    [
        (8, 4, 2, True),
        (8, 8, 1, True),
        (8, 3, 1, False),  # 8 samples do not make whole optimizer steps of 3 (the micro-batches do)
        (8, 4, 3, False),  # a step of 4 does not make whole micro-batches of 3 (the steps do)
        (9, 3, 2, False),  # neither
    ],
)
def test_check_divides_refuses_each_kind_of_misfit(num_samples, per_update, micro_batch_size, fits):
    if fits:
        check_divides(num_samples, per_update, micro_batch_size)
    else:
        with pytest.raises(ValueError, match=f"{num_samples} trained samples"):
            check_divides(num_samples, per_update, micro_batch_size)


def test_an_update_is_a_function_of_the_seed_not_of_the_global_rng():
    """8 samples in 2 optimizer steps of 4: which samples share a step is drawn from the module's
    seeded generator, so the global RNG state before the fit does not change the result."""
    from tests.training.fixtures import PROMPTS
    from tests.training.test_module import fit

    trained = []
    for global_seed in (0, 1):
        module = make_module(samples_per_update=4, seed=5)  # 2 prompts × G = 4 → 8 samples
        with torch.random.fork_rng():  # the global RNG is restored afterwards
            torch.manual_seed(global_seed)
            fit(module, PROMPTS, batches=1)
        trained.append(torch.cat([p.detach().flatten() for p in module.policy.trainable_parameters()]))
    torch.testing.assert_close(trained[0], trained[1], rtol=0, atol=0)


def test_one_optimizer_step_follows_the_gradient_of_the_mean_loss_over_samples_and_steps():
    """`_update` weights each micro-batch loss so that the step's gradient is that of the mean
    clipped loss over its samples × trained timesteps (one step per rollout here, 8 samples × 4
    steps); recomputed one (sample, step) at a time on a copy of the module taken before the fit."""
    import copy

    from lightning_grpo.samplers.step_schedule import trainable_steps
    from tests.training.fixtures import PROMPTS
    from tests.training.test_module import fit

    module = make_module(timestep_fraction=1.0, samples_per_update=None, max_grad_norm=None)
    reference = copy.deepcopy(module)
    seen = {}
    update = module._update

    def recording_update(selection):
        seen.update(trajectories=selection.trained, targets=selection.targets)
        return update(selection)

    module._update = recording_update
    _, record = fit(module, PROMPTS, batches=1)
    trajectories, targets = seen["trajectories"], seen["targets"]
    steps = trainable_steps(reference.sampler)  # all 4 steps (fraction 1)
    every_step = Prepared(trajectories, targets, steps.repeat(trajectories.batch_size, 1), {})  # [B, 4]
    losses = [reference.objective.loss(reference, every_step, torch.tensor([b]), k)[0]
              for b in range(trajectories.batch_size) for k in range(len(steps))]
    (torch.stack(losses).sum() / len(losses)).backward()
    grads = [p.grad.flatten() for p in reference.policy.trainable_parameters() if p.grad is not None]
    assert record.metrics[0]["train/grad_norm"] == pytest.approx(float(torch.cat(grads).norm()), rel=1e-4)


def _trained_subsets(seed: int) -> list[dict[tuple[int, int], set[int]]]:
    """Fit two rollouts; per rollout, {sample key (group, member): the timestep indices trained}."""
    from tests.training.fixtures import PROMPTS
    from tests.training.test_module import fit

    module = make_module(seed=seed)  # timestep_fraction 0.5: 2 of the 4 steps per sample
    per_rollout: list[dict] = []
    update, loss = module._update, module.objective.loss

    def recording_update(*args, **kwargs):
        per_rollout.append({})
        return update(*args, **kwargs)

    def recording_loss(module_, prepared, samples, column):
        index = prepared.columns[samples, column]
        for key, i in zip(prepared.rollout.sample_keys[samples.cpu()].tolist(), index.tolist()):
            per_rollout[-1].setdefault(tuple(key), set()).add(i)
        return loss(module_, prepared, samples, column)

    module._update, module.objective.loss = recording_update, recording_loss
    fit(module, PROMPTS, batches=2)
    return per_rollout


def test_the_trained_timestep_subsets_are_redrawn_every_step_and_follow_the_seed():
    first, other_seed = _trained_subsets(0), _trained_subsets(1)
    assert first[0].keys() == first[1].keys() == other_seed[0].keys()  # the same 8 sample keys each time
    assert all(len(steps) == 2 for steps in first[0].values())
    assert first[0] != first[1]  # a fresh subset at the next step
    assert first[0] != other_seed[0]  # and another one under another seed


def test_the_trained_timestep_subsets_do_not_depend_on_the_rank():
    """A sample's subset is keyed by (seed, step, sample key) only: rank 1 of a faked trainer at the
    same global step trains the same timesteps of each sample as rank 0 (samples can move between
    ranks, e.g. groups spanning ranks), while another step draws other subsets."""
    from types import SimpleNamespace

    from lightning_grpo.rollout import rollout
    from tests.training.fixtures import PROMPTS

    module = make_module(seed=4)  # timestep_fraction 0.5: 2 of the 4 steps
    trajectories = rollout(module.policy, module.sampler, PROMPTS[:2], 4, torch.Generator().manual_seed(0))

    def subsets(rank: int, step: int) -> torch.Tensor:
        module._trainer = SimpleNamespace(global_rank=rank, global_step=step)
        try:
            return module.objective.prepare(module, trajectories, Targets.empty(), module._column_seed()).columns
        finally:
            module._trainer = None

    assert torch.equal(subsets(0, 3), subsets(1, 3)) and torch.equal(subsets(0, 3), subsets(2, 3))
    assert not torch.equal(subsets(0, 3), subsets(0, 4))
