"""`Delayed`: a reward that takes as long as a real reward model, for benchmarks and tests.

Serving `Delayed(JpegIncompressibility(), seconds=0.8)` stands in for a reward model whose forward
takes 0.8 s per request (HPS-v2.1 ViT-H/14 on a batch of FLUX images, a 7B VLM judge) without any
weights: `bench/async_scoring.py` measures how much of it asynchronous scoring hides, and the
reward-server tests use it to kill a server while a request is in flight.
"""

from __future__ import annotations

import time

from torch import Tensor

from lightning_grpo.rewards.base import Reward


class Delayed(Reward):
    """The scores of `reward`, returned after sleeping `seconds` (per call, on top of its own time).

    Args:
        reward: the reward whose scores are returned.
        seconds: extra wall time per call (>= 0).
        name: defaults to the wrapped reward's name, so a delayed reward logs as the original.
        weight: defaults to the wrapped reward's weight.
    """

    def __init__(self, reward: Reward, seconds: float, name: str | None = None, weight: float | None = None) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        super().__init__(name or reward.name, reward.weight if weight is None else weight)
        self.reward = reward
        self.seconds = float(seconds)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        time.sleep(self.seconds)
        return self.reward(pixels, prompts, images, allow_nonfinite=True)
