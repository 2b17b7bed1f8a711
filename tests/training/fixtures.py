"""Fixtures for the training-system tests: a list-backed prompt datamodule and a tiny module."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.base import Reward
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler


class ListPrompts(LightningDataModule):
    """Prompts from a Python list, batched as {"prompts": [...]}."""

    def __init__(self, prompts: list[str], batch_size: int = 2) -> None:
        super().__init__()
        self.prompts, self.batch_size = prompts, batch_size

    def train_dataloader(self):
        return DataLoader(self.prompts, batch_size=self.batch_size, collate_fn=lambda p: {"prompts": list(p)})

    val_dataloader = test_dataloader = train_dataloader


class Redness(Reward):
    """Mean red-minus-green of the image: dense, smooth, cheap."""

    default_name = "redness"

    def score(self, pixels, prompts, images=None):
        return (pixels[:, 0] - pixels[:, 1]).flatten(1).mean(1)


PROMPTS =  [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")] * 4


def make_module(paradigm: str = "flow", guidance_scale: float = 1.0, **kwargs) -> GRPOModule:
    sampler = FlowSDESampler(num_steps=4, eta=0.7) if paradigm == "flow" else DDIMSDESampler(num_steps=4, eta=1.0)
    options = dict(group_size=4, timestep_fraction=0.5, micro_batch_size=2, samples_per_update=4, clip_range=0.2, learning_rate=1e-3, show_progress=False)
    options.update(kwargs)
    policy = TinyPolicy(paradigm=paradigm, resolution=8, guidance_scale=guidance_scale)
    return GRPOModule(policy=policy, sampler=sampler, rewards=[Redness()], **options)
