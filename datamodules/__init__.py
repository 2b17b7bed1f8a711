"""Prompt datamodules: streamed, sharded, resumable prompt (and first-frame image) datasets.

``PromptDataModule`` serves text-to-image/video prompts; ``ImagePromptDataModule`` adds the
first-frame image of image-to-video. See ``datamodules.streaming`` for how sharding and resume work.
"""

from lightning_grpo.datamodules.image_prompts import ImagePromptDataModule
from lightning_grpo.datamodules.prompts import NoTrainingBatchError, PromptDataModule
from lightning_grpo.datamodules.sources import MalformedRecordError, MalformedRecordWarning

__all__ = ["ImagePromptDataModule", "MalformedRecordError", "MalformedRecordWarning", "NoTrainingBatchError", "PromptDataModule"]
