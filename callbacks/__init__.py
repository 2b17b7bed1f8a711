"""Lightning callbacks for GRPO runs: reward logging, ODE-solver visualisation, diversity, EMA,
held-out evaluation, reward-hacking monitor, test report. `lightning-grpo` turns on RewardLogger, DiversityMonitor (pixel, latent),
ODEVisualizer and TestReport by default (see `lightning_grpo.cli.default_callbacks`)."""

# This folder is installed as lightning_grpo.callbacks (pyproject.toml's package-dir). Imported as a
# top-level `callbacks` (the repository root on sys.path), its modules would exist twice, under two
# names, with two copies of every class (isinstance and the CLI's class_path checks then disagree).
if __name__ != "lightning_grpo.callbacks":
    raise ImportError(f"import this package as lightning_grpo.callbacks, not as {__name__!r} (one name per module)")

from lightning_grpo.callbacks.diversity import AcrossPromptDiversity, DiversityMonitor, WithinGroupDiversity
from lightning_grpo.callbacks.ema import EMA
from lightning_grpo.callbacks.evaluation import HeldOutEvaluation
from lightning_grpo.callbacks.ode_visualizer import ODEVisualizer
from lightning_grpo.callbacks.reward_hacking import RewardHackingMonitor
from lightning_grpo.callbacks.reward_logger import RewardLogger
from lightning_grpo.callbacks.test_report import TestReport

__all__ = ["AcrossPromptDiversity", "DiversityMonitor", "EMA", "HeldOutEvaluation", "ODEVisualizer", "RewardHackingMonitor", "RewardLogger", "TestReport", "WithinGroupDiversity"]
