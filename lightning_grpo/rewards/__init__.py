"""Rewards: the contract and the combinators; model-backed rewards import their heavy deps lazily."""

from lightning_grpo.rewards.base import Binary, MultiReward, Reward, RewardError

__all__ = ["Binary", "MultiReward", "Reward", "RewardError"]
