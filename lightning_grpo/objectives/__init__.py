"""RL objectives for `GRPOModule(objective=...)` (`model.objective` in a config): GRPO (default)
and DiffusionNFT. The contract is `lightning_grpo.objectives.base.Objective`."""

from lightning_grpo.objectives.base import Objective, Prepared, RolloutNeeds, Targets
from lightning_grpo.objectives.grpo import GRPO

__all__ = ["GRPO", "Objective", "Prepared", "RolloutNeeds", "Targets"]
