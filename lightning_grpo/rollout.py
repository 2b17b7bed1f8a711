"""Rollout: sample G trajectories per prompt with the SDE sampler, keeping what the update needs.

A pure function of (policy, sampler, prompts, generator): no state on any module, so the same
code serves training, evaluation and benchmarks. Rolled out in chunks of samples, with noise
keyed by sample identity, so chunk size and rank layout never change a trajectory.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.noise import SampleNoise, base_seed, sample_keys
from lightning_grpo.samplers.ode_tail import MultistepODETail
from lightning_grpo.types import Condition, Rollout, index_condition
from lightning_grpo.stopping import check_stop


@torch.no_grad()
def rollout(
    policy: PolicyAdapter,
    sampler: Sampler,
    prompts: list[str],
    group_size: int,
    generator: torch.Generator | None = None,
    shared_noise: bool = True,
    images: Tensor | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
    chunk_size: int | None = None,
    first_group: int = 0,
    members: Sequence[int] | None = None,
    sde_steps: Tensor | None = None,
    ode_tail: MultistepODETail | None = None,
) -> Rollout:
    """Sample `group_size` trajectories for each prompt, `chunk_size` samples at a time.

    Noise is keyed by sample identity (`lightning_grpo.noise`): sample (group g, member j) draws
    from a generator seeded by (base seed, g, j), the base seed being one draw from `generator`.
    So the result does not depend on `chunk_size` (memory knob: peak activation memory scales
    with it, not with P·G), and a rank rolling out groups first_group.. draws exactly what one
    process rolling out all ranks' prompts would draw for them.

    Args:
        policy: the adapter of the model being trained.
        sampler: the SDE sampler (its eta > 0 for GRPO).
        prompts: P prompts; sample b belongs to prompt b // M (M = len(members)).
        group_size: G.
        generator: source of the base seed (None: the global CPU generator).
        shared_noise: same initial noise for the G samples of a prompt.
        images: first frames [P, C, H, W] for image-to-video, or None.
        progress: wraps the step range of each chunk (e.g. a progress bar).
        chunk_size: samples per denoiser batch; None = all P·M at once.
        first_group: global index g of the first prompt (its rank's offset in the union of ranks).
        members: the member indices j this process rolls out of every group (groups spanning
            ranks); None = all of 0..G-1.
        sde_steps: BoolTensor[T] from a `StepSchedule` (MixGRPO window, Flow-GRPO-Fast branch):
            SDE steps where True; deterministic `sampler.ode_step` (no noise drawn, log-prob 0)
            where False. None: every step is an SDE step.
        ode_tail: MixGRPO-Flash: after the last SDE step, integrate to σ = 0 with this fewer-step
            higher-order solver instead of the sampler's grid; the latents it skips are NaN
            (never trained, never read), the last one is its result.
    """
    members = list(range(group_size)) if members is None else list(members)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    num_prompts, device = len(prompts), policy.device
    group_index = torch.arange(num_prompts, device=device).repeat_interleave(len(members))  # [B]
    keys = sample_keys(first_group, num_prompts, members)  # [B, 2]
    seed = base_seed(generator)
    # encode each prompt once; each chunk indexes its rows
    prompt_condition = policy.encode_prompts(prompts, images)
    latents, log_probs = [], []
    for chunk in torch.arange(len(keys), device=device).split(chunk_size or len(keys)):
        condition = index_condition(prompt_condition, group_index[chunk])
        noise = SampleNoise(seed, keys[chunk.cpu()], shared_noise, device)
        chunk_latents, chunk_log_probs = _trajectories(
            policy, sampler, noise.initial(policy), condition, noise, progress, sde_steps, ode_tail
        )
        latents.append(chunk_latents)
        log_probs.append(chunk_log_probs)
    return Rollout(
        latents=torch.cat(latents),  # [B, T+1, *L]
        log_probs=torch.cat(log_probs),  # [B, T]
        condition=index_condition(prompt_condition, group_index),
        prompts=[p for p in prompts for _ in members],
        group_index=group_index,
        images=None if images is None else images[group_index],  # [B, C, H, W]
        sample_keys=keys,
        sde_steps=None if sde_steps is None else sde_steps.cpu().bool(),
    )


def _trajectories(
    policy: PolicyAdapter, sampler: Sampler, x: Tensor, condition: Condition, noise: SampleNoise, progress: Callable,
    sde_steps: Tensor | None = None, ode_tail: MultistepODETail | None = None,
) -> tuple[Tensor, Tensor]:
    """The step loop from x_0 [b, *L]: latents [b, T+1, *L] and log-probs [b, T]; SDE steps where
    `sde_steps` is True (all when None), ODE steps elsewhere, `ode_tail` after the last SDE step."""
    latents, log_probs = [x], []
    tail = None if ode_tail is None else ode_tail.start(sde_steps, sampler.num_steps)
    for i in progress(range(sampler.num_steps)):
        if i == tail:
            x, _ = ode_tail.integrate(lambda z, t: policy.predict(z, t, condition), sampler, x, i)
            skipped = sampler.num_steps - i - 1
            latents += [torch.full_like(x, float("nan"))] * skipped + [x]
            log_probs += [torch.zeros(x.shape[0], device=x.device)] * (skipped + 1)
            break
        t = sampler.timesteps[i].to(x.device).expand(x.shape[0])  # [b]
        model_output = policy.predict(x, t, condition)
        if sde_steps is None or sde_steps[i]:
            step = sampler.step(model_output, x, i, noise=noise.standard_normal(x))
            x, log_prob = step.prev_sample, step.log_prob
        else:  # ODE step outside the schedule's SDE steps: a Dirac, never trained, no noise drawn
            x, log_prob = sampler.ode_step(model_output, x, i), torch.zeros(x.shape[0], device=x.device)
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def ode_sample(
    policy: PolicyAdapter,
    sampler: Sampler,
    prompts: list[str],
    generator: torch.Generator | None = None,
    images: Tensor | None = None,
) -> Tensor:
    """Deterministic (eta = 0) sampling from seeded noise, for evaluation and visualisation: [B, *L]."""
    return ode_from(policy, sampler, policy.prepare_latents(len(prompts), generator), prompts, images)


@torch.no_grad()
def ode_from(policy: PolicyAdapter, sampler: Sampler, x: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
    """Integrate the ODE (sampler.ode_step, eta = 0) from given initial latents x_0 [B, *L]: [B, *L]."""
    condition = policy.encode_prompts(prompts, images)
    for i in range(sampler.num_steps):
        check_stop()  # a stop signal ends an evaluation here, never a training step (see lightning_grpo.stopping)
        t = sampler.timesteps[i].to(x.device).expand(x.shape[0])  # [B]
        x = sampler.ode_step(policy.predict(x, t, condition), x, i)
    return x
