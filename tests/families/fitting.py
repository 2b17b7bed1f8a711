"""Fitting a family's policy in a real Lightning loop, with first frames for image-to-video families."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from tests.training.fixtures import ListPrompts
from tests.training.test_module import Record

PROMPTS = ["a photo of a cat", "a red dog on a sofa"]


def first_frames(policy) -> torch.Tensor | None:
    """Fixed first frames [P, 3, H, W] in [0, 1] for image-to-video families, else None."""
    if not policy.conditions_on_images:
        return None
    return torch.rand(len(PROMPTS), 3, policy.height, policy.width, generator=torch.Generator().manual_seed(5))


def condition_for(policy):
    return policy.encode_prompts(PROMPTS, first_frames(policy))


class PromptsAndFrames(ListPrompts):
    """ListPrompts, with the first frames in every batch when the policy is image-to-video."""

    def __init__(self, policy, batch_size: int = len(PROMPTS)) -> None:
        super().__init__(PROMPTS, batch_size=batch_size)
        self.frames = first_frames(policy)

    def train_dataloader(self):
        if self.frames is None:
            return super().train_dataloader()
        rows = list(zip(self.prompts, self.frames))
        collate = lambda batch: {"prompts": [p for p, _ in batch], "images": torch.stack([f for _, f in batch])}  # noqa: E731
        return DataLoader(rows, batch_size=self.batch_size, collate_fn=collate)

    val_dataloader = test_dataloader = train_dataloader


def fit(module, batches: int = 1, batch_size: int = len(PROMPTS), **trainer_kwargs):
    """GRPO on PROMPTS (and first frames), `batches` rollouts of `batch_size` prompts (at most
    len(PROMPTS) / batch_size): (trainer, the logged metrics of each batch)."""
    record = Record()
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=batches, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record], **trainer_kwargs,
    )
    trainer.fit(module, datamodule=PromptsAndFrames(module.policy, batch_size))
    return trainer, record
