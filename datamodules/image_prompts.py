"""Image-to-video prompts: a prompt and a first-frame image per record, streamed like prompts.

Everything but the image comes from :class:`~lightning_grpo.datamodules.prompts.PromptDataModule`: formats,
hold-out, shuffle, sharding, resume. Images are loaded lazily, only by the worker whose slice
holds the record, resized and center-cropped to ``image_size``.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from lightning_grpo.datamodules.prompts import PromptDataModule
from lightning_grpo.datamodules.sources import BadRecordReporter, Record, RecordSpec
from lightning_grpo.datamodules.streaming import PromptStream, StreamConfig


def load_image(source: str | io.BytesIO, size: tuple[int, int]) -> torch.Tensor:
    """Decode an image as RGB, scale it to cover ``size`` = (height, width), center-crop it.

    Returns:
        Float tensor ``[3, H, W]`` with values in [0, 1].
    """
    height, width = size
    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3]
    return pixels.permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def image_source(value: Any, data_path: str, image_root: str | None) -> str | io.BytesIO:
    """Where to read an image from a record's image field.

    A string is a path, relative to ``image_root`` or else to the folder holding the data file.
    A dict like the HF ``Image`` feature's ``{"bytes": ..., "path": ...}`` is read from its bytes
    when present, else from its path.
    """
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected an image path or {{'bytes', 'path'}}, got {type(value).__name__}")
    if os.path.isabs(value):
        return value
    return os.path.join(image_root if image_root is not None else os.path.dirname(os.path.abspath(data_path)), value)


class ImagePromptStream(PromptStream):
    """A :class:`PromptStream` whose batches also hold the decoded images.

    A batch is ``{"prompts": list[str], "images": Tensor[B, 3, H, W] in [0, 1]}`` (plus
    ``"metadata"``). A record whose image is missing or cannot be decoded is reported with its
    ``path:line`` and left out of its batch under ``on_bad_line="skip"`` (the batch is then
    smaller; only the worker owning the record opens the image, so the others cannot know), or
    raises under ``"error"``.
    """

    def __init__(self, config: StreamConfig, image_key: str, image_root: str | None, image_size: tuple[int, int]):
        super().__init__(config)
        self.image_key = image_key
        self.image_root = image_root
        self.image_size = image_size

    def make_batch(self, records: list[Record], reporter: BadRecordReporter) -> dict[str, Any]:
        kept: list[Record] = []
        images: list[torch.Tensor] = []
        for record in records:
            image = self._load(record, reporter)
            if image is not None:
                kept.append(record)
                images.append(image)
        batch = super().make_batch(kept, reporter)
        batch["images"] = torch.stack(images) if images else torch.empty(0, 3, *self.image_size)  # [B, 3, H, W]
        return batch

    def _load(self, record: Record, reporter: BadRecordReporter) -> torch.Tensor | None:
        """The record's image, or None after reporting why it could not be read."""
        value = record.fields.get(self.image_key)
        try:
            return load_image(image_source(value, record.path, self.image_root), self.image_size)
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
            shown = value if isinstance(value, str) else type(value).__name__
            reporter.bad(record.path, record.line, f"cannot read image {shown!r}: {error}")
            return None


class ImagePromptDataModule(PromptDataModule):
    """Prompts with first-frame images for image-to-video GRPO, streamed like :class:`PromptDataModule`.

    A batch is ``{"prompts": list[str], "images": Tensor[B, 3, H, W]}`` with float pixels in
    [0, 1] (plus ``"metadata"`` when asked). Sources are JSONL, Parquet or ``save_to_disk``
    datasets with a prompt and an image column; plain text has no image column. A missing or
    undecodable image is reported with the data file and line and skipped (the batch shrinks,
    possibly to empty) or raised, per ``on_bad_line``.

    Args:
        train_files: Paths or globs of JSONL/Parquet files or ``save_to_disk`` folders.
        image_key: JSONL key or column holding the image: a path (relative ones are resolved
            against ``image_root``, else the folder holding the data file) or a HF ``Image``
            value ``{"bytes", "path"}``.
        image_root: Folder that relative image paths are relative to.
        image_size: Output size ``(height, width)``, or one int for a square. Images are scaled
            to cover it and center-cropped, keeping their aspect ratio.
        **kwargs: Every other argument of :class:`PromptDataModule` (batch size, validation
            split, shuffle, workers, ``on_bad_line``, ...).
    """

    def __init__(
        self,
        train_files: str | list[str],
        image_key: str = "image",
        image_root: str | None = None,
        image_size: int | tuple[int, int] = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_files, **kwargs)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
        self.image_key = image_key
        self.image_root = image_root
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))

    def record_spec(self) -> RecordSpec:
        """Prompt records that must also carry an image field."""
        spec = super().record_spec()
        return RecordSpec(spec.prompt_keys, required_keys=(self.image_key,), metadata_keys=spec.metadata_keys)

    def make_stream(self, config: StreamConfig) -> ImagePromptStream:
        return ImagePromptStream(config, self.image_key, self.image_root, self.image_size)
