"""The sampler contract shared by the rectified-flow and diffusion SDE samplers.

A sampler owns the discretisation (timesteps/sigmas) of one sampling run and the Gaussian
transition p(x_{i+1} | x_i) that GRPO needs a log-density for. It is pure: no state changes
after construction, all math in fp32, and `index` may be an int or a LongTensor[B] so a batch
can mix timesteps (the random timestep subset of each sample).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_grpo.types import StepOutput

LogProbReduction = Literal["mean", "sum"]


def gather_per_sample(values: Tensor, index: int | Tensor, like: Tensor) -> Tensor:
    """values[index] shaped [B, 1, 1, ...] so it broadcasts against `like` ([B, *L])."""
    if isinstance(index, int):
        index = torch.full((like.shape[0],), index, dtype=torch.long)
    index = index.to(values.device).long()
    if index.ndim == 0:
        index = index.expand(like.shape[0])
    out = values[index].to(device=like.device, dtype=torch.float32)
    return out.view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: LogProbReduction = "mean") -> Tensor:
    """log N(x; mean, std²) per element, reduced over all non-batch dims (fp32).

    Written out instead of `torch.distributions.Normal` to avoid building a distribution object
    per step; tests check equality with `Normal(mean, std).log_prob`.
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, log_prob.ndim))
    if reduction == "mean":
        return log_prob.mean(dim=dims)
    if reduction == "sum":
        return log_prob.sum(dim=dims)
    raise ValueError(f"log_prob reduction must be 'mean' or 'sum', got {reduction!r}")


class Sampler(ABC):
    """Stochastic sampler with exact Gaussian transitions.

    Attributes:
        num_steps: number of transitions T in one trajectory.
        timesteps: Tensor[T], the value the model is conditioned on at step i (flow: sigma·1000 as
            diffusers' FlowMatchEulerDiscreteScheduler; diffusion: the integer DDPM timestep).
        eta: noise level; 0 gives the deterministic ODE step.
        log_prob_reduction: "mean" (DanceGRPO, default) or "sum" over non-batch dimensions.

    Class attribute:
        paradigm: "flow" or "diffusion", the model output it expects (a policy of the other
            paradigm is refused by GRPOModule, see `policies.base.check_sampler_matches`).
    """

    paradigm: ClassVar[str]
    num_steps: int
    timesteps: Tensor
    eta: float
    log_prob_reduction: LogProbReduction

    def stochastic_steps(self) -> Tensor:
        """Indices of the steps with std > 0: the only ones that carry a policy gradient."""
        return torch.arange(self.num_steps) if self.eta > 0 else torch.zeros(0, dtype=torch.long)

    @abstractmethod
    def mean_and_std(self, model_output: Tensor, sample: Tensor, index: int | Tensor, eta: float) -> tuple[Tensor, Tensor]:
        """Mean [B, *L] and std (broadcastable) of p(x_{i+1} | x_i) at noise level `eta`."""

    def step(
        self,
        model_output: Tensor,
        sample: Tensor,
        index: int | Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """Draw x_{i+1} ~ N(mean, std²) (or score the given `prev_sample`) and return its log-prob.

        `noise` [B, *L]: the standard-normal draw ε of x_{i+1} = mean + std·ε, when the caller
        keys its noise to sample identities (the rollout does, so chunking and ranks do not change
        it); otherwise ε is drawn from `generator`."""
        mean, std = self.mean_and_std(model_output, sample, index, self.eta)
        if prev_sample is None:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            prev_sample = mean + std * noise.to(device=mean.device, dtype=torch.float32)
        log_prob = gaussian_log_prob(prev_sample, mean, std, self.log_prob_reduction)
        # A step with std = 0 is a Dirac, with no density: report 0 (it is never trained on,
        # see `stochastic_steps`) instead of the NaN/inf the formula would give.
        deterministic = (torch.as_tensor(std).expand_as(mean).flatten(1) == 0).all(dim=1)  # [B]
        log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
        return StepOutput(prev_sample=prev_sample.to(sample.dtype), mean=mean, std=std, log_prob=log_prob)

    def log_prob(self, model_output: Tensor, sample: Tensor, prev_sample: Tensor, index: int | Tensor) -> Tensor:
        """log p(prev_sample | sample) under the current model output: Tensor[B], fp32."""
        return self.step(model_output, sample, index, prev_sample=prev_sample).log_prob

    def ode_step(self, model_output: Tensor, sample: Tensor, index: int | Tensor) -> Tensor:
        """Deterministic (eta = 0) step, used for visualisation and evaluation."""
        mean, _ = self.mean_and_std(model_output, sample, index, 0.0)
        return mean.to(sample.dtype)
