"""Prompt datamodules: streamed, sharded, resumable prompt (and first-frame image) datasets.

``PromptDataModule`` serves text-to-image/video prompts; ``ImagePromptDataModule`` adds the
first-frame image of image-to-video. See ``datamodules.streaming`` for how sharding and resume work.
"""

from datamodules.image_prompts import ImagePromptDataModule
from datamodules.prompts import PromptDataModule
from datamodules.sources import MalformedRecordError, MalformedRecordWarning

__all__ = ["ImagePromptDataModule", "MalformedRecordError", "MalformedRecordWarning", "PromptDataModule"]
