"""Lightning callbacks for GRPO runs: reward logging, ODE-solver visualisation, diversity, EMA,
held-out evaluation. `lightning-grpo` turns on RewardLogger, DiversityMonitor (pixel, latent) and
ODEVisualizer by default (see `lightning_grpo.cli.default_callbacks`)."""

from callbacks.diversity import AcrossPromptDiversity, DiversityMonitor, WithinGroupDiversity
from callbacks.ema import EMA
from callbacks.evaluation import HeldOutEvaluation
from callbacks.ode_visualizer import ODEVisualizer
from callbacks.reward_logger import RewardLogger

__all__ = ["AcrossPromptDiversity", "DiversityMonitor", "EMA", "HeldOutEvaluation", "ODEVisualizer", "RewardLogger", "WithinGroupDiversity"]
