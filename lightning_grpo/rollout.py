"""Rollout: sample G trajectories per prompt with the SDE sampler, keeping what the update needs.

A pure function of (policy, sampler, prompts, generator): no state on any module, so the same
code serves training, evaluation and benchmarks.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.samplers.ode_tail import MultistepODETail
from lightning_grpo.types import Rollout, index_condition


def initial_noise(
    policy: PolicyAdapter, num_prompts: int, group_size: int, shared_noise: bool, generator: torch.Generator | None
) -> Tensor:
    """x_0 for every sample: [P·G, *L]; with shared_noise the G samples of a prompt start alike.

    DanceGRPO found shared initial noise within a group important for stable training: the
    group's reward differences then come from the SDE noise, not from the starting point.
    """
    if shared_noise:
        return policy.prepare_latents(num_prompts, generator).repeat_interleave(group_size, dim=0)
    return policy.prepare_latents(num_prompts * group_size, generator)


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
    sde_steps: Tensor | None = None,
    ode_tail: MultistepODETail | None = None,
) -> Rollout:
    """Sample `group_size` trajectories for each prompt, batched over all of them.

    Args:
        policy: the adapter of the model being trained.
        sampler: the SDE sampler (its eta > 0 for GRPO).
        prompts: P prompts; sample b belongs to prompt b // group_size.
        group_size: G.
        generator: generator on the policy's device, for the initial noise and every step's noise.
        shared_noise: same initial noise for the G samples of a prompt.
        images: first frames [P, C, H, W] for image-to-video, or None.
        progress: wraps the step range (e.g. a progress bar).
        sde_steps: BoolTensor[T] from a `StepSchedule` (MixGRPO window, Flow-GRPO-Fast branch):
            SDE steps where True; deterministic `sampler.ode_step` (no noise drawn, log-prob 0)
            where False. None: every step is an SDE step.
        ode_tail: MixGRPO-Flash: after the last SDE step, integrate to σ = 0 with this fewer-step
            higher-order solver instead of the sampler's grid; the latents it skips are NaN
            (never trained, never read), the last one is its result.
    """
    num_prompts = len(prompts)
    group_index = torch.arange(num_prompts, device=policy.device).repeat_interleave(group_size)  # [B]
    # encode each prompt once, then repeat its condition G times
    condition = index_condition(policy.encode_prompts(prompts, images), group_index)
    expanded_images = None if images is None else images[group_index]  # [B, C, H, W]
    x = initial_noise(policy, num_prompts, group_size, shared_noise, generator)  # [B, *L]
    latents, log_probs = [x], []
    tail = None if ode_tail is None else ode_tail.start(sde_steps, sampler.num_steps)
    for i in progress(range(sampler.num_steps)):
        if i == tail:
            x, _ = ode_tail.integrate(lambda z, t: policy.predict(z, t, condition), sampler, x, i)
            skipped = sampler.num_steps - i - 1
            latents += [torch.full_like(x, float("nan"))] * skipped + [x]
            log_probs += [torch.zeros(x.shape[0], device=x.device)] * (skipped + 1)
            break
        t = sampler.timesteps[i].to(x.device).expand(x.shape[0])  # [B]
        model_output = policy.predict(x, t, condition)
        if sde_steps is None or sde_steps[i]:
            step = sampler.step(model_output, x, i, generator=generator)
            x, log_prob = step.prev_sample, step.log_prob
        else:  # ODE step outside the schedule's SDE steps: a Dirac, never trained
            x, log_prob = sampler.ode_step(model_output, x, i), torch.zeros(x.shape[0], device=x.device)
        latents.append(x)
        log_probs.append(log_prob)
    return Rollout(
        latents=torch.stack(latents, dim=1),  # [B, T+1, *L]
        log_probs=torch.stack(log_probs, dim=1),  # [B, T]
        condition=condition,
        prompts=[p for p in prompts for _ in range(group_size)],
        group_index=group_index,
        images=expanded_images,
        sde_steps=None if sde_steps is None else sde_steps.cpu().bool(),
    )


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
        t = sampler.timesteps[i].to(x.device).expand(x.shape[0])  # [B]
        x = sampler.ode_step(policy.predict(x, t, condition), x, i)
    return x
