"""The reward contract, and the wrappers that combine rewards (binary threshold, multi-reward).

A reward maps a batch of generated pixels (and their prompts, and first frames for I2V) to one
finite score per sample. It is never differentiated: GRPO only needs the scores.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from lightning_grpo.grpo.advantages import binarize


class RewardError(RuntimeError):
    """A reward failed or returned an invalid value; the message names the reward."""


class Reward(nn.Module, ABC):
    """Base class of every reward.

    Args:
        name: the name the reward is logged under (defaults to the class's `default_name`).
        weight: its weight w_k in the multi-reward advantage A = Σ_k w_k·A_k.
    """

    default_name: str = "reward"

    def __init__(self, name: str | None = None, weight: float = 1.0) -> None:
        super().__init__()
        self.name = name or self.default_name
        self.weight = float(weight)

    @abstractmethod
    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        """Scores Tensor[B] for pixels in [0, 1] ([B, C, H, W] or [B, F, C, H, W])."""

    @torch.no_grad()
    def forward(
        self, pixels: Tensor, prompts: list[str], images: Tensor | None = None, allow_nonfinite: bool = False
    ) -> Tensor:
        """Validated, gradient-free scores: Tensor[B] fp32 on pixels' device.

        Any exception, a wrong shape, and (unless `allow_nonfinite`) a NaN/inf score raise
        `RewardError` naming the reward. `allow_nonfinite=True` returns non-finite scores as they
        are, for a caller that drops the affected groups (`GRPOModule(reward_failure="drop_group")`);
        an exception is never per-sample, so it still raises.
        """
        batch = pixels.shape[0]
        if pixels.ndim not in (4, 5):
            raise RewardError(f"reward {self.name!r}: pixels must be [B,C,H,W] or [B,F,C,H,W], got {tuple(pixels.shape)}")
        if len(prompts) != batch:
            raise RewardError(f"reward {self.name!r}: {len(prompts)} prompts for {batch} samples")
        try:
            scores = self.score(pixels, prompts, images)
        except RewardError:
            raise
        except Exception as err:  # name the reward: a bare traceback from deep inside a model is useless
            raise RewardError(f"reward {self.name!r} failed: {type(err).__name__}: {err}") from err
        scores = torch.as_tensor(scores, device=pixels.device).float()
        if scores.shape != (batch,):
            raise RewardError(f"reward {self.name!r} returned shape {tuple(scores.shape)}, expected ({batch},)")
        if not allow_nonfinite and not torch.isfinite(scores).all():
            bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
            raise RewardError(f"reward {self.name!r} returned non-finite scores at samples {bad}: {scores.tolist()}")
        return scores


class Binary(Reward):
    """1 where the wrapped reward exceeds `threshold`, else 0 (the paper's binary reward).

    Args:
        reward: the reward to threshold (e.g. HPS-v2.1).
        threshold: strict lower bound for a 1 (paper example: HPS > 0.28).
    """

    def __init__(self, reward: Reward, threshold: float, name: str | None = None, weight: float = 1.0) -> None:
        super().__init__(name or f"{reward.name}_binary", weight)
        self.reward = reward
        self.threshold = float(threshold)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        # a non-finite inner score stays non-finite (never silently 0): the outer forward then
        # raises, or lets the caller drop the sample's group
        scores = self.reward(pixels, prompts, images, allow_nonfinite=True)
        return torch.where(torch.isfinite(scores), binarize(scores, self.threshold), scores)


class MultiReward(nn.Module):
    """Several named, weighted rewards scored on the same batch.

    Returns a dict name -> Tensor[B]; advantages are normalised per reward and summed with the
    rewards' weights (see `lightning_grpo.grpo.advantages.multi_reward_advantages`).
    """

    def __init__(self, rewards: list[Reward]) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("at least one reward is required")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}; set `name:` on each")
        self.rewards = nn.ModuleList(rewards)

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    def forward(
        self, pixels: Tensor, prompts: list[str], images: Tensor | None = None, allow_nonfinite: bool = False
    ) -> dict[str, Tensor]:
        """{name: Tensor[B]}; `allow_nonfinite` is passed to every reward (see `Reward.forward`)."""
        return {r.name: r(pixels, prompts, images, allow_nonfinite=allow_nonfinite) for r in self.rewards}


class ServiceClientState:
    """Mixin for rewards that call a service through a lazily made `self._client` (httpx) guarded
    by `self._lock`: neither crosses a process boundary (DataLoader workers, spawned ranks, a
    deep copy), so they are pickled as None and the copy makes its own client on first use."""

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()
