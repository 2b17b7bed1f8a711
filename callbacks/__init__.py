"""Lightning callbacks for GRPO runs: reward logging, ODE-solver visualisation, diversity, EMA,
held-out evaluation, reward-hacking monitor, test report. `lightning-grpo` turns on RewardLogger, DiversityMonitor (pixel, latent),
ODEVisualizer and TestReport by default (see `lightning_grpo.cli.default_callbacks`)."""

from lightning_grpo.callbacks.diversity import AcrossPromptDiversity, DiversityMonitor, WithinGroupDiversity
from lightning_grpo.callbacks.ema import EMA
from lightning_grpo.callbacks.evaluation import HeldOutEvaluation
from lightning_grpo.callbacks.ode_visualizer import ODEVisualizer
from lightning_grpo.callbacks.reward_hacking import RewardHackingMonitor
from lightning_grpo.callbacks.reward_logger import RewardLogger
from lightning_grpo.callbacks.test_report import TestReport

__all__ = ["AcrossPromptDiversity", "DiversityMonitor", "EMA", "HeldOutEvaluation", "ODEVisualizer", "RewardHackingMonitor", "RewardLogger", "TestReport", "WithinGroupDiversity"]
