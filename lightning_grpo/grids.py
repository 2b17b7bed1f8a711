"""Readable image grids: nearest-neighbour upscaled cells, column titles, a caption under each row
(and optionally under each cell), for TensorBoard and for PNG files alike.

Used by `callbacks.ODEVisualizer` (rows = prompts, columns = seeds at step 0 | seeds now) and by
`EvaluationResult.write` (rows = prompts, columns = samples). The input is a cell array
[R, K, C, H, W]; cells may be wider than tall (W a multiple of about H), so a video can be shown as
a film strip per cell (`filmstrip`), and `save_gif` writes the per-frame grids of a video as
an animation (the same clips as TensorBoard's `add_video`, as a file). torchvision's `make_grid` has no
text; the captions are drawn with Pillow (already a torchvision dependency), with its built-in
scalable font, so nothing has to be installed or downloaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["GridLayout", "captioned_grid", "filmstrip", "save_gif", "save_png", "with_condition"]

#: Caption text size in pixels, line height, and the white space around blocks.
FONT_SIZE = 12
LINE_HEIGHT = 15
MARGIN = 6


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid (what `captioned_grid` draws; tests check it).

    cell: upscaled cell side (its height); cell_width: its width when cells are wider than
    tall (film strips; None: square); caption_lines: text lines under each row; title_height:
    height of the column-title band at the top of each block; block_width / row_height: one
    column block (rows stacked) and one row with its caption; blocks: column blocks side by side.
    """

    cell: int
    columns: int
    rows_per_block: int
    blocks: int
    caption_lines: int
    cell_caption_lines: int
    title_lines: int
    gap_after: int | None  # a wider gap after this many columns (e.g. step 0 | now)
    cell_width: int | None = None

    @property
    def width(self) -> int:
        """Width of one cell box in pixels."""
        return self.cell_width or self.cell

    @property
    def title_height(self) -> int:
        return self.title_lines * LINE_HEIGHT + (MARGIN if self.title_lines else 0)

    @property
    def row_height(self) -> int:
        return self.cell + (self.cell_caption_lines + self.caption_lines) * LINE_HEIGHT + MARGIN

    @property
    def block_width(self) -> int:
        return self.columns * (self.width + 2) + (3 * MARGIN if self.gap_after else 0)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole grid."""
        height = MARGIN + self.title_height + self.rows_per_block * self.row_height
        return height, MARGIN + self.blocks * (self.block_width + 2 * MARGIN)

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of cell (row, column)."""
        block, r = divmod(row, self.rows_per_block)
        x = MARGIN + block * (self.block_width + 2 * MARGIN) + column * (self.width + 2)
        if self.gap_after and column >= self.gap_after:
            x += 3 * MARGIN
        return MARGIN + self.title_height + r * self.row_height, x


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width_px: int) -> list[str]:
    """Lines of `text` that fit `width_px` (about 6.5 px per character at the caption size),
    broken at word boundaries only: spaces, and after the underscores and dots of an identifier
    such as a reward name (`moving_shapes_product` → `moving_shapes_` / `product`), never inside a
    word; a single word wider than the line stays whole (it runs past the cell, still readable)."""
    width = max(4, int(width_px / (0.55 * FONT_SIZE)))
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) <= width:
            line += " " + word
            continue
        if line:
            lines.append(line)
        if len(word) <= width:
            line = word
            continue
        # a word wider than the line: break after its underscores / dots, whole pieces per line
        line = ""
        for piece in re.findall(r"[^_.]*[_.]+|[^_.]+$", word):
            if line and len(line) + len(piece) > width:
                lines.append(line)
                line = ""
            line += piece
    if line:
        lines.append(line)
    return lines or [""]


def _upscale(cells: Tensor, cell: int, width: int | None = None) -> Tensor:
    """[N, 3, h, w] in [0, 1] → [N, 3, cell, width (default cell)] by nearest neighbour (integer
    factor, then centred pad)."""
    h, w = cells.shape[-2:]
    width = width or cell
    factor = max(1, min(cell // h, width // w))
    big = F.interpolate(cells, scale_factor=factor, mode="nearest")
    pad_h, pad_w = cell - big.shape[-2], width - big.shape[-1]
    return F.pad(big, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=1.0)


def captioned_grid(
    cells: Tensor,
    row_captions: list[str] | None = None,
    column_titles: list[str] | None = None,
    cell_captions: list[list[str]] | None = None,
    cell_size: int = 128,
    rows_per_block: int | None = None,
    gap_after: int | None = None,
) -> Tensor:
    """A readable grid as Tensor[3, H', W'] float in [0, 1] (TensorBoard's CHW image).

    Args:
        cells: [R, K, C, H, W] images in [0, 1] (C = 1 or 3): R rows of K columns. Wide cells
            (W > H, e.g. `filmstrip`s) get boxes `cell_size` high and ⌈cell_size·W/H⌉ wide.
        row_captions: R texts, each drawn (wrapped) under its row, e.g. the prompt.
        column_titles: K texts drawn above the columns of every block, e.g. "step 0 · seed 1".
        cell_captions: R × K short texts under each cell, e.g. a score.
        cell_size: side each cell is upscaled to (nearest neighbour, integer factor).
        rows_per_block: rows stacked per column block; more rows start a new block to the right
            (keeps 80 prompts from making a 10,000-pixel-tall strip). Default: all in one block.
        gap_after: draw a wider gap after this many columns (separates step 0 from now).
    """
    if cells.ndim != 5 or cells.shape[2] not in (1, 3):
        raise ValueError(f"cells must be [rows, columns, 1 or 3, H, W], got {tuple(cells.shape)}")
    rows, columns = cells.shape[:2]
    for name, texts, n in (("row_captions", row_captions, rows), ("column_titles", column_titles, columns)):
        if texts is not None and len(texts) != n:
            raise ValueError(f"{name}: {len(texts)} texts for {n} {'rows' if name == 'row_captions' else 'columns'}")
    if cell_captions is not None and (len(cell_captions) != rows or any(len(c) != columns for c in cell_captions)):
        raise ValueError(f"cell_captions must be {rows} rows of {columns} texts")
    per_block = min(rows, rows_per_block or rows)
    height_px, width_px = cells.shape[-2:]
    cell_width = math.ceil(cell_size * width_px / height_px) if width_px > height_px else None
    layout = GridLayout(cell=cell_size, columns=columns, rows_per_block=per_block, blocks=math.ceil(rows / per_block),
                        caption_lines=0, cell_caption_lines=1 if cell_captions else 0, title_lines=0, gap_after=gap_after,
                        cell_width=cell_width)
    wrapped_rows = [_wrap(t, layout.block_width) for t in row_captions] if row_captions else []
    wrapped_titles = [_wrap(t, layout.width) for t in column_titles] if column_titles else []
    layout = GridLayout(
        cell=cell_size, columns=columns, rows_per_block=per_block, blocks=layout.blocks,
        caption_lines=max((len(w) for w in wrapped_rows), default=0), cell_caption_lines=layout.cell_caption_lines,
        title_lines=max((len(w) for w in wrapped_titles), default=0), gap_after=gap_after, cell_width=cell_width,
    )
    images = cells.float().clamp(0, 1).flatten(0, 1)  # [R·K, C, H, W]
    images = _upscale(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images, cell_size, layout.width)
    height, width = layout.size
    canvas = Image.new("RGB", (width, height), "white")
    tiles = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [R·K, cell, width, 3]
    draw, font = ImageDraw.Draw(canvas), _font()
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        y, x = layout.cell_origin(row, column)
        canvas.paste(Image.fromarray(tile), (x, y))
        if cell_captions:
            draw.text((x, y + cell_size + 1), cell_captions[row][column], fill="black", font=font)
    for row, lines in enumerate(wrapped_rows):
        y, x = layout.cell_origin(row, 0)
        y += cell_size + layout.cell_caption_lines * LINE_HEIGHT + 1
        for i, line in enumerate(lines):
            draw.text((x, y + i * LINE_HEIGHT), line, fill="black", font=font)
    for block in range(layout.blocks):
        for column, lines in enumerate(wrapped_titles):
            _, x = layout.cell_origin(block * per_block, column)
            for i, line in enumerate(lines):
                draw.text((x, MARGIN + i * LINE_HEIGHT), line, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a [3, H, W] grid in [0, 1] as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def filmstrip(clips: Tensor, max_frames: int = 5, gap: int = 1) -> Tensor:
    """Videos as film strips: [N, F, C, H, W] → [N, C, H, k·W + (k − 1)·gap], the k = min(F,
    max_frames) frames evenly spaced from the first to the last, side by side, white gaps between.

    A still grid of videos readable at a glance (motion = the object's place changing along the
    strip); `save_gif` animates the full clips."""
    if clips.ndim != 5:
        raise ValueError(f"clips must be [N, F, C, H, W], got {tuple(clips.shape)}")
    if max_frames < 1 or gap < 0:
        raise ValueError(f"max_frames must be >= 1 and gap >= 0, got {max_frames}, {gap}")
    frames = clips.shape[1]
    chosen = torch.linspace(0, frames - 1, min(frames, max_frames)).round().long()  # [k]
    pieces = []
    for i, f in enumerate(chosen.tolist()):
        if i and gap:
            pieces.append(torch.ones(*clips.shape[:1], clips.shape[2], clips.shape[3], gap, dtype=clips.dtype))
        pieces.append(clips[:, f])
    return torch.cat(pieces, dim=-1)


def with_condition(cells: Tensor, conditioning: Tensor) -> Tensor:
    """Image-to-video grids: the conditioning frame as a first column beside each row's clips.

    cells [R, K, C, H, W'] (W' ≥ W: film strips, or frames with W' = W), conditioning
    [R, C, H, W] in [0, 1] -> [R, K + 1, C, H, W'], the frame padded with white on the right to
    the cells' width (grids need cells of one size)."""
    if conditioning.ndim != 4 or len(conditioning) != len(cells) or conditioning.shape[-2] != cells.shape[-2]:
        raise ValueError(f"conditioning must be [{len(cells)}, C, {cells.shape[-2]}, W], got {tuple(conditioning.shape)}")
    pad = cells.shape[-1] - conditioning.shape[-1]
    if pad < 0:
        raise ValueError(f"conditioning frames ({conditioning.shape[-1]} px wide) are wider than the cells ({cells.shape[-1]} px)")
    frame = conditioning.to(cells.dtype)
    if frame.shape[1] != cells.shape[2]:
        frame = frame.expand(-1, cells.shape[2], -1, -1) if frame.shape[1] == 1 else frame
    frame = F.pad(frame, (0, pad), value=1.0)
    return torch.cat([frame[:, None], cells], dim=1)


def save_gif(frames: Tensor, path: str | Path, fps: int = 4) -> Path:
    """Write frames [F, 3, H, W] in [0, 1] as a looping animated GIF (parent folders created).

    Pillow writes it (already a dependency; moviepy, which TensorBoard's `add_video` needs, is not
    required for files); returns the path."""
    if frames.ndim != 4 or frames.shape[1] != 3 or not len(frames):
        raise ValueError(f"frames must be [F >= 1, 3, H, W], got {tuple(frames.shape)}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = (frames.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    images = [Image.fromarray(a) for a in arrays]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path
