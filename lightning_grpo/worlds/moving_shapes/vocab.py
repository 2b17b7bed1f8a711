"""The moving-shapes world's vocabulary: directions, the clip geometry, and the `MotionScene` record.

A clip shows ONE object of the image world's palette and shapes (`lightning_grpo.worlds.shapes.vocab`:
the same colour and shape names, the same indices) gliding at constant speed in one of four
directions. Positions are not part of a motion scene: where the object starts is drawn at
random from a box that is the same for every direction, so a first frame (the image-to-video
condition) shows the shape and colour but says nothing about where it will go.

Clip geometry (fractions of the image side, y grows downwards):
- the object's radius is `MOTION_RADIUS` × U(1 − `MOTION_RADIUS_JITTER`, 1 + …);
- it starts with its centre at (0.5, 0.5) + U(−`START_JITTER`, `START_JITTER`)² and moves
  `TRAVEL` along its direction over the clip, linearly in time (frame f of F at t = f / (F − 1));
- with these values the whole object stays inside the image in every frame:
  0.5 − 0.08 − 0.2 − 0.17 × 1.15 = 0.0245 > 0 (the image world's object size).
"""

from __future__ import annotations


import torch
from torch import Tensor

from lightning_grpo.worlds.base import scene_indices, scene_record
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, SHAPES

#: Direction names; order fixes the direction index.
DIRECTIONS: tuple[str, ...] = ("right", "left", "up", "down")

#: Unit displacement (x, y) of each direction in image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}

#: Object radius (half its bounding-box side) as a fraction of the image side, before jitter.
MOTION_RADIUS = 0.17
#: The radius is scaled by U(1 − MOTION_RADIUS_JITTER, 1 + MOTION_RADIUS_JITTER) per clip.
MOTION_RADIUS_JITTER = 0.15
#: Distance the centre travels from the first to the last frame, as a fraction of the side.
TRAVEL = 0.2
#: The start centre is (0.5, 0.5) + U(−START_JITTER, START_JITTER) in x and y, for every direction.
START_JITTER = 0.08
#: Default frames per clip: 4k + 1, the frame counts HunyuanVideo's causal VAE encodes exactly
#: (one latent frame for the first frame, then one per 4).
DEFAULT_FRAMES = 9


def direction_vectors(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit displacements as Tensor[D, 2] (x, y), rows in `DIRECTIONS` order."""
    return torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS], device=device, dtype=dtype)


#: One object of a clip: a colour, a shape and a direction of motion, by name (a `SceneRecord`:
#: frozen and ordered, `.indices` into `COLOUR_NAMES`, `SHAPES`, `DIRECTIONS`).
MotionScene = scene_record("MotionScene", __name__, "One object of a clip: a colour, a shape and a direction of motion.",
                           colour=COLOUR_NAMES, shape=SHAPES, direction=DIRECTIONS)
#: Every (colour, shape, direction) combination, in index order (4 × 3 × 4 = 48).
all_motion_scenes = MotionScene.every
#: Attribute indices of motion scenes as LongTensor[N, 3] (columns: colour, shape, direction).
motion_scenes_to_indices = scene_indices
