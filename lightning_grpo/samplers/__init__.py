"""SDE samplers with exact Gaussian log-probabilities: one algorithm per file."""

from lightning_grpo.samplers.base import Sampler, gaussian_log_prob
from lightning_grpo.samplers.ddim_sde import DDIMSDESampler
from lightning_grpo.samplers.flow_sde import FlowSDESampler
from lightning_grpo.samplers.ode_tail import MultistepODETail
from lightning_grpo.samplers.step_schedule import AllSteps, RandomBranch, SlidingWindow, StepSchedule

__all__ = [
    "AllSteps", "DDIMSDESampler", "FlowSDESampler", "MultistepODETail", "RandomBranch", "Sampler", "SlidingWindow", "StepSchedule", "gaussian_log_prob",
]
