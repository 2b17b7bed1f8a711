"""RL objectives for `GRPOModule(objective=...)` (`model.objective` in a config): GRPO (default)
and DiffusionNFT. The contract is `lightning_grpo.objectives.base.Objective`."""

from lightning_grpo.objectives.base import Objective, Prepared, RolloutNeeds, Targets
from lightning_grpo.objectives.grpo import GRPO
from lightning_grpo.objectives.nft import DiffusionNFT

__all__ = ["DiffusionNFT", "GRPO", "Objective", "Prepared", "RolloutNeeds", "Targets"]
