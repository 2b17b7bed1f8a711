"""Image-to-video prompts: a prompt and a first-frame image per record, streamed like prompts.

Everything but the image comes from :class:`~lightning_grpo.datamodules.prompts.PromptDataModule`: formats,
hold-out, shuffle, sharding, resume. Images are loaded lazily, only by the worker whose slice
holds the record, resized and center-cropped to ``image_size``.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from lightning_grpo.datamodules.prompts import NoTrainingBatchError, PromptDataModule
from lightning_grpo.datamodules.sources import BadRecordReporter, Record, RecordSpec
from lightning_grpo.datamodules.streaming import PromptStream, StreamConfig


#: Modes whose pixels have no defined range (32-bit integer, float): refused rather than guessed.
UNSCALED_MODES = frozenset({"I", "F", "I;32", "I;32B", "I;32L"})


def load_image(source: str | io.BytesIO, size: tuple[int, int]) -> torch.Tensor:
    """Decode an image as RGB, scale it to cover ``size`` = (height, width), center-crop it.

    Any 8-bit mode (L, P, RGB, CMYK, YCbCr, 1) is converted by Pillow; 16-bit grey is scaled to
    8 bits (Pillow's own conversion would clip it at 255); transparency is composited over black
    (the shapes world's background) instead of dropping the alpha channel, which would show
    whatever colour hides under transparent pixels. An animated file gives its first frame.

    Returns:
        Float tensor ``[3, H, W]`` with values in [0, 1].

    Raises:
        ValueError: for a 32-bit integer or float image (no defined pixel range).
        OSError: for a missing, truncated or undecodable file (Pillow's errors).
    """
    with Image.open(source) as image:
        rgb = to_rgb(ImageOps.exif_transpose(image))
    return fit_image(rgb, size)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opaque 8-bit RGB copy of ``image`` (see :func:`load_image` for the rules per mode)."""
    if image.mode in UNSCALED_MODES:
        raise ValueError(f"image mode {image.mode!r} has no defined pixel range; save it as 8-bit (RGB, L, P) or 16-bit grey")
    if image.mode.startswith("I;16"):
        grey = (np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Scale an RGB image to cover ``size`` = (height, width) and center-crop it: ``[3, H, W]`` in [0, 1]."""
    height, width = size
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
    ``"metadata"``). A record whose image is missing, undecodable or of an unusable mode is
    reported with its ``path:line`` (raising under ``on_bad_line="error"``). Under ``"skip"`` the
    batch keeps its size: the failed records are replaced by repeats of the slice's readable ones
    (as ``remainder="pad"`` repeats records), or, when none of the slice is readable, by the first
    readable record of the rest of its block. A shrunken batch would break the update's
    divisibility (``samples_per_update``) and, under DDP, the ranks' lockstep. Only when a whole
    block (``world_size × workers × batch_size`` records) holds no readable image is the batch
    empty, on every rank at once since every shard sees the block; ``GRPOModule`` skips such a step.
    """

    def __init__(self, config: StreamConfig, image_key: str, image_root: str | None, image_size: tuple[int, int]):
        super().__init__(config)
        self.image_key = image_key
        self.image_root = image_root
        self.image_size = image_size

    def block_batch(self, block: list[Record], start: int, stop: int, reporter: BadRecordReporter) -> dict[str, Any]:
        """This shard's slice with its images, unreadable records replaced (class doc)."""
        own = block[start:stop]
        loaded = [(record, self._load(record, reporter)) for record in own]
        good = [(record, image) for record, image in loaded if image is not None]
        if not good:  # none of ours is readable: borrow one from the others' slices (quietly: they report theirs)
            quiet = BadRecordReporter("skip", verbose=False)
            others = block[stop:] + block[:start]
            good = next(([(r, im)] for r in others if (im := self._load(r, quiet)) is not None), [])
        filled = [good[i % len(good)] for i in range(len(own))] if good else []
        return self._batch([record for record, _ in filled], [image for _, image in filled], reporter)

    def _batch(self, records: list[Record], images: list[torch.Tensor], reporter: BadRecordReporter) -> dict[str, Any]:
        """The base batch of ``records`` plus their already decoded ``images``."""
        batch = super().make_batch(records, reporter)
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
    datasets with a prompt and an image column; plain text has no image column. A missing,
    undecodable or unusable (32-bit) image is reported with the data file and line and raised
    (``on_bad_line="error"``) or skipped, its place in the batch taken by a readable record of
    the same batch or block, so batches keep their size (see :class:`ImagePromptStream`).

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

    def check_training_prompts(self, world_size: int | None = None) -> None:
        """The prompts fill one step (see the base class) and the first step's block holds at least
        one readable image: with none, every batch would be empty and every step skipped."""
        super().check_training_prompts(world_size)
        world_size = world_size if world_size is not None else self._rank_and_world_size()[1]
        config = replace(self._stream_config("train", self.batch_size, 0, world_size), shuffle=False)
        stream = self.make_stream(config)
        reporter = BadRecordReporter("skip", verbose=False)
        block = list(itertools.islice(stream.records(BadRecordReporter("skip", verbose=False)), self.batch_size * world_size * max(self.num_workers, 1)))
        if any(stream._load(record, reporter) is not None for record in block):
            return
        raise NoTrainingBatchError(
            f"no training batch: not one image of the first {len(block)} training records can be read "
            f"(image_key={self.image_key!r}, image_root={self.image_root!r}): {reporter.why_none().replace('every record is malformed: ', '')}"
        )
