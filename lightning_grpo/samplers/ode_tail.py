"""MixGRPO-Flash: a higher-order ODE solver on fewer steps after the last SDE step of a rollout.

Steps after the SDE window are never trained, so they need not follow the sampler's grid: MixGRPO
-Flash (Li et al., arXiv 2507.21802) integrates them with 2nd-order DPM-Solver++ on a schedule
compressed to `compression` × the remaining steps (official `dpm_post_compress_ratio` 0.4;
Flash*: 0.2), at least one step. This cuts denoiser calls of the rollout, not only of the update.

The solver is diffusers' `UniPCMultistepScheduler` on the flow schedule (`use_flow_sigmas`,
`prediction_type="flow_prediction"`): a multistep 2nd-order solver (predictor-corrector, bh2),
in the same exponential-integrator family as DPM-Solver++, and the one diffusers scheduler
that takes an explicit sigma list for a flow model; `DPMSolverMultistepScheduler` takes only
integer timesteps, which cannot express the tail of an arbitrary flow schedule. Flow samplers
only (the tail needs σ, and diffusers' flow-prediction conversion x̂0 = x − σ·v is ours, eq. F1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lightning_grpo.samplers.base import Sampler

__all__ = ["MultistepODETail"]

Velocity = Callable[[Tensor, Tensor], Tensor]
"""(x [B, *L], timesteps σ·1000 [B]) -> model output v [B, *L]."""


@dataclass(frozen=True)
class MultistepODETail:
    """Integrate the flow ODE from step `start` of the sampler's grid to σ = 0 in fewer steps.

    Args:
        compression: the tail's steps = max(1, round(compression · (T − start))) (MixGRPO-Flash 0.4).
        order: solver order (2 = MixGRPO-Flash; 1 = first order, 3 = third).
    """

    compression: float = 0.4
    order: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.compression <= 1:
            raise ValueError(f"MultistepODETail compression must be in (0, 1], got {self.compression}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"MultistepODETail order must be 1, 2 or 3, got {self.order}")

    def sigmas(self, sampler: Sampler, start: int) -> Tensor:
        """Tensor[m + 1]: σ_start … 0 at m evenly spaced fractional indices of the sampler's grid
        (σ linearly interpolated between its points, so the tail keeps the schedule's shape)."""
        grid = getattr(sampler, "sigmas", None)
        if grid is None:
            raise ValueError(f"MultistepODETail needs a flow sampler with sigmas, got {type(sampler).__name__}")
        if not 0 <= start < sampler.num_steps:
            raise ValueError(f"tail start {start} outside the {sampler.num_steps} sampling steps")
        steps = max(1, round(self.compression * (sampler.num_steps - start)))  # m
        position = torch.linspace(float(start), float(sampler.num_steps), steps + 1, dtype=torch.float64)
        low = position.floor().long().clamp(max=sampler.num_steps - 1)
        frac = position - low
        grid = grid.double()
        return ((1 - frac) * grid[low] + frac * grid[low + 1]).float()

    @staticmethod
    def start(sde_steps: Tensor | None, num_steps: int) -> int | None:
        """The step the tail takes over at: the one after the last SDE step; None when there is no
        tail (every step stochastic, or the last SDE step is the last step)."""
        if sde_steps is None or not bool(sde_steps.any()):
            return None
        start = int(sde_steps.nonzero().max()) + 1
        return start if start < num_steps else None

    def integrate(self, velocity: Velocity, sampler: Sampler, x: Tensor, start: int) -> tuple[Tensor, int]:
        """x at σ = 0 from x at the sampler's step `start` [B, *L], and the number of model calls."""
        from diffusers import UniPCMultistepScheduler

        sigmas = self.sigmas(sampler, start)
        scheduler = UniPCMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=self.order,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(sigmas=sigmas[:-1].double().numpy(), device=x.device)
        # diffusers rounds timesteps to integers for its index lookup; the model sees σ·1000 exactly, as in the rollout
        sample = x.float()
        for k, timestep in enumerate(scheduler.timesteps):
            t = (sigmas[k] * 1000.0).to(x.device).expand(x.shape[0])  # [B]
            sample = scheduler.step(velocity(sample.to(x.dtype), t).float(), timestep, sample, return_dict=False)[0]
        return sample.to(x.dtype), len(scheduler.timesteps)
