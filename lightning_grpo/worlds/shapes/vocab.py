"""The shapes world's vocabulary: colours, shapes, positions, background, and the `Scene` record.

One place defines every attribute value, so the renderer, the prompt templates and the verifier
can never disagree on a name or on an index. Attributes are handled by index in tensors (fast,
vectorised) and by name in prompts; `Scene` converts between the two.

The palette is chosen for separability rather than beauty: against the black background every
colour lies at distance > 0.8 (so the foreground is easy to segment) and every pair of colours
differs by > 0.65 in at least one channel (so a blurred or dimmed blob still reads as its own hue).
"""

from __future__ import annotations


import torch
from torch import Tensor

from lightning_grpo.worlds.base import scene_indices, scene_record

#: Colour names and their RGB values in [0, 1]. Order fixes the colour index.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}

#: Shape names; order fixes the shape index.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Position names (image quadrants); order fixes the position index.
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

#: Quadrant centre of each position, as (x, y) fractions of the image side (y grows downwards).
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}

#: Plain background colour (black: an all-black image is an empty scene).
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def palette(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Colour RGB values as Tensor[K, 3], rows in `COLOUR_NAMES` order."""
    return torch.tensor([COLOURS[name] for name in COLOUR_NAMES], device=device, dtype=dtype)


def background(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Background RGB as Tensor[3]."""
    return torch.tensor(BACKGROUND, device=device, dtype=dtype)


#: One object in a scene: a colour, a shape and a position, by name (a `SceneRecord`: frozen and
#: ordered, `.indices` into `COLOUR_NAMES`, `SHAPES`, `POSITIONS`, `Scene.from_indices(c, s, p)`).
Scene = scene_record("Scene", __name__, "One object in a scene: a colour, a shape and a position, by name.",
                     colour=COLOUR_NAMES, shape=SHAPES, position=POSITIONS)
#: Every (colour, shape, position) combination, in index order (4 × 3 × 4 = 48).
all_scenes = Scene.every
#: Attribute indices of scenes as LongTensor[N, 3] (columns: colour, shape, position).
scenes_to_indices = scene_indices
