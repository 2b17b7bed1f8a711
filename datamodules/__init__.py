"""Prompt datamodules: streamed, sharded, resumable prompt (and first-frame image) datasets.

``PromptDataModule`` serves text-to-image/video prompts; ``ImagePromptDataModule`` adds the
first-frame image of image-to-video. See ``lightning_grpo.datamodules.streaming`` for how sharding and resume work.
"""

# This folder is installed as lightning_grpo.datamodules (pyproject.toml's package-dir). Imported as a
# top-level `datamodules` (the repository root on sys.path), its modules would exist twice, under two
# names, with two copies of every class (isinstance and the CLI's class_path checks then disagree).
if __name__ != "lightning_grpo.datamodules":
    raise ImportError(f"import this package as lightning_grpo.datamodules, not as {__name__!r} (one name per module)")

from lightning_grpo.datamodules.image_prompts import ImagePromptDataModule
from lightning_grpo.datamodules.prompts import NoTrainingBatchError, PromptDataModule
from lightning_grpo.datamodules.sources import MalformedRecordError, MalformedRecordWarning

__all__ = ["ImagePromptDataModule", "MalformedRecordError", "MalformedRecordWarning", "NoTrainingBatchError", "PromptDataModule"]
