"""SDE samplers with exact Gaussian log-probabilities: one algorithm per file."""

from lightning_grpo.samplers.base import Sampler, gaussian_log_prob
from lightning_grpo.samplers.ddim_sde import DDIMSDESampler
from lightning_grpo.samplers.flow_sde import FlowSDESampler

__all__ = ["DDIMSDESampler", "FlowSDESampler", "Sampler", "gaussian_log_prob"]
