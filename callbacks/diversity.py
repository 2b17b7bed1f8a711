"""Sample diversity during GRPO: do samples of one prompt collapse onto one image (mode collapse),
and do different prompts still give different images?

Two torchmetrics `Metric`s, distributed-safe (their states are sums, `dist_reduce_fx="sum"`):

- `WithinGroupDiversity`: mean distance over all unordered pairs of samples of the same prompt
  (the same group);
- `AcrossPromptDiversity`: mean distance over all unordered pairs of samples of *different*
  prompts. Pairs of individual samples were chosen over distances between group means because
  the group mean of images is a blur that no generator produces; the pair mean is comparable
  with the within-group value (same kind of pair, only the prompt differs).

Both average over pairs (not over groups), and count only pairs inside one `update` call: one
rollout on one rank. Under DDP every rank adds its own pairs and `compute()` sums the totals, so
the result equals one process updating with every rank's batch in turn (tested with gloo).

`DiversityMonitor` computes them on each rollout in pixel space and latent space, and in CLIP
image-embedding space when an open_clip model is configured, and logs
`train/diversity/{space}_within_group` and `train/diversity/{space}_across_prompts`.

Videos [B, F, C, H, W] add, in pixel space, per frame and over time:
- `pixel_per_frame_{within_group,across_prompts}`: the pair distance of frame f of two samples,
  averaged over frames and pairs (do the clips differ frame by frame, not only on average);
- `pixel_motion_{within_group,across_prompts}`: the same on the frame differences x_{f+1} − x_f
  (do the samples of a prompt move differently, or all the same way);
- `pixel_temporal_change`: the mean RMS change between consecutive frames of a clip
  (`temporal_change`); 0 means the policy has collapsed to still images.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from lightning_grpo.callbacks._logging import last_step
from lightning_grpo.rewards._common import flatten_frames

Distance = Literal["rms", "l2", "cosine"]
Space = Literal["pixel", "latent", "clip"]


def pairwise_distances(features: Tensor, distance: Distance = "rms") -> Tensor:
    """[B, B] distances between the rows of features [B, ...] (flattened to [B, D]).

    - "l2": Euclidean distance;
    - "rms": Euclidean distance / √D, the root-mean-square per-element difference, comparable
      across resolutions and frame counts (pixel and latent spaces);
    - "cosine": 1 − cosine similarity (embedding spaces such as CLIP).
    Euclidean distances are computed from differences (not via ‖a‖² + ‖b‖² − 2ab), so identical
    samples are exactly 0 apart.
    """
    flat = features.detach().flatten(1).float()  # [B, D]
    if distance == "cosine":
        unit = F.normalize(flat, dim=1)
        return (1 - unit @ unit.T).clamp_min(0)
    l2 = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")  # [B, B]
    if distance == "l2":
        return l2
    if distance == "rms":
        return l2 / math.sqrt(flat.shape[1])
    raise ValueError(f"distance must be 'rms', 'l2' or 'cosine', got {distance!r}")


class _PairwiseDiversity(Metric):
    """Mean pairwise distance over the unordered sample pairs that `_pair_mask` selects."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    total: Tensor
    pairs: Tensor

    def __init__(self, distance: Distance = "rms", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if distance not in ("rms", "l2", "cosine"):
            raise ValueError(f"distance must be 'rms', 'l2' or 'cosine', got {distance!r}")
        self.distance = distance
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _pair_mask(self, same_group: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, features: Tensor, groups: Tensor) -> None:
        """Add the pairs of one batch.

        Args:
            features: [B, ...] one row per sample (pixels, latents or embeddings).
            groups: [B] prompt (group) id of each sample; only equality matters.
        """
        if features.shape[0] != groups.shape[0]:
            raise ValueError(f"{features.shape[0]} samples but {groups.shape[0]} group ids")
        distances = pairwise_distances(features, self.distance)  # [B, B]
        groups = groups.to(distances.device)
        upper = torch.ones_like(distances, dtype=torch.bool).triu(diagonal=1)  # each unordered pair once
        mask = upper & self._pair_mask(groups[:, None] == groups[None, :])
        self.total += distances[mask].double().sum()
        self.pairs += mask.sum()

    def compute(self) -> Tensor:
        """Mean distance over all pairs added (on every rank); NaN when there were none."""
        if self.pairs == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.pairs).float()


class WithinGroupDiversity(_PairwiseDiversity):
    """Mean distance between two samples of the same prompt; 0 when each group is one repeated sample.

    Args:
        distance: "rms" (pixels, latents), "l2" or "cosine" (embeddings); see `pairwise_distances`.
    """

    def _pair_mask(self, same_group: Tensor) -> Tensor:
        return same_group


class AcrossPromptDiversity(_PairwiseDiversity):
    """Mean distance between two samples of different prompts (pairs of samples, not of group means).

    Args:
        distance: "rms" (pixels, latents), "l2" or "cosine" (embeddings); see `pairwise_distances`.
    """

    def _pair_mask(self, same_group: Tensor) -> Tensor:
        return ~same_group


class DiversityMonitor(Callback):
    """Logs within-group and across-prompt diversity of every rollout (rank-synchronised means).

    Logged tags: `train/diversity/{space}_within_group`, `train/diversity/{space}_across_prompts`
    for each space. Pixel and latent spaces use the "rms" distance (per-element root-mean-square
    difference, in pixel units [0, 1] and latent units); CLIP uses the cosine distance of the
    image embeddings (videos: the mean embedding of their frames).

    Args:
        spaces: which of "pixel" and "latent" to track (CLIP is added when a CLIP model is set).
        every_n_steps: compute every this many training batches (rollouts).
        clip_reward: name of one of the module's rewards built on open_clip (e.g. "hps",
            "clip_score") whose image tower embeds the samples: no second model in memory.
        clip_checkpoint: or a separate open_clip weights file to load (with `clip_architecture`),
            loaded like `lightning_grpo.rewards._open_clip.OpenClipCosineReward`.
        clip_architecture: open_clip model name of `clip_checkpoint` (e.g. "ViT-H-14").
        clip_state_dict_key: key of the state dict inside `clip_checkpoint`, if wrapped.
    """

    def __init__(
        self,
        spaces: Sequence[Literal["pixel", "latent"]] = ("pixel", "latent"),
        every_n_steps: int = 1,
        clip_reward: str | None = None,
        clip_checkpoint: str | None = None,
        clip_architecture: str | None = None,
        clip_state_dict_key: str | None = "state_dict",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if clip_reward is not None and clip_checkpoint is not None:
            raise ValueError("set clip_reward or clip_checkpoint, not both")
        if (clip_checkpoint is None) != (clip_architecture is None):
            raise ValueError("clip_checkpoint and clip_architecture go together")
        unknown = set(spaces) - {"pixel", "latent"}
        if unknown:
            raise ValueError(f"unknown diversity spaces {sorted(unknown)}; use 'pixel' and/or 'latent'")
        self.spaces: list[Space] = list(dict.fromkeys(spaces))
        self.every_n_steps = every_n_steps
        self.clip_reward = clip_reward
        self.clip_options = (clip_checkpoint, clip_architecture, clip_state_dict_key)
        self.clip = None  # an OpenClipCosineReward, resolved at setup
        self.metrics: dict[str, tuple[WithinGroupDiversity, AcrossPromptDiversity]] = {}
        self.video_metrics: dict[str, tuple[WithinGroupDiversity, AcrossPromptDiversity]] = {}
        self.temporal_change = MeanMetric()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.clip = self._resolve_clip(pl_module)
        spaces = self.spaces + (["clip"] if self.clip is not None else [])
        for space in spaces:
            distance: Distance = "cosine" if space == "clip" else "rms"
            self.metrics[space] = (WithinGroupDiversity(distance), AcrossPromptDiversity(distance))
        if "pixel" in self.spaces:
            self.video_metrics = {kind: (WithinGroupDiversity("rms"), AcrossPromptDiversity("rms")) for kind in ("per_frame", "motion")}

    def _resolve_clip(self, pl_module: LightningModule):
        from lightning_grpo.rewards._open_clip import OpenClipCosineReward

        if self.clip_reward is not None:
            rewards = {r.name: r for r in getattr(pl_module, "rewards").rewards}
            reward = rewards.get(self.clip_reward)
            if not isinstance(reward, OpenClipCosineReward):
                raise ValueError(f"clip_reward={self.clip_reward!r} must name an open_clip reward of the module; rewards: {sorted(rewards)}")
            return reward
        checkpoint, architecture, key = self.clip_options
        if checkpoint is None:
            return None
        return OpenClipCosineReward(checkpoint, architecture, state_dict_key=key, name="diversity_clip").to(pl_module.device)

    def features(self, space: Space, latents: Tensor, pixels: Tensor) -> Tensor:
        """[B, ...] the representation of each sample in `space`."""
        if space == "latent":
            return latents
        if space == "pixel":
            return pixels
        return clip_image_embeddings(self.clip, pixels)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = last_step(pl_module)
        if record is None or batch_idx % self.every_n_steps:
            return
        groups = record.group_index  # [B]
        values: dict[str, Tensor] = {}
        for space, (within, across) in self.metrics.items():
            # a rank that trained nothing this step holds an empty record: it adds no pair but
            # still takes part in the metric's synchronisation, as every rank must
            features = self.features(space, record.latents, record.pixels) if record.num_samples else None  # [B, ...]
            for name, metric in (("within_group", within), ("across_prompts", across)):
                metric.to(record.latents.device if features is None else features.device).reset()
                if features is not None:
                    metric.update(features, groups)
                values[f"train/diversity/{space}_{name}"] = metric.compute()  # synchronised over ranks
        if record.pixels.ndim == 5 and self.video_metrics:
            values.update(self.video_values(record.pixels, groups))
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=max(record.num_samples, 1))

    def video_values(self, pixels: Tensor, groups: Tensor) -> dict[str, Tensor]:
        """The per-frame and over-time measures of videos [B, F, C, H, W] (module doc), rank-synchronised."""
        values: dict[str, Tensor] = {}
        motion = pixels[:, 1:] - pixels[:, :-1]  # [B, F-1, C, H, W]
        for kind, clips in (("per_frame", pixels), ("motion", motion)):
            for name, metric in zip(("within_group", "across_prompts"), self.video_metrics[kind]):
                metric.to(pixels.device).reset()
                for f in range(clips.shape[1]):  # every frame has the same pairs: the mean over (pair, frame)
                    metric.update(clips[:, f], groups)
                values[f"train/diversity/pixel_{kind}_{name}"] = metric.compute()
        self.temporal_change.to(pixels.device).reset()
        self.temporal_change.update(temporal_change(pixels))
        values["train/diversity/pixel_temporal_change"] = self.temporal_change.compute()
        return values


def temporal_change(pixels: Tensor) -> Tensor:
    """[B] RMS change between consecutive frames of videos [B, F, C, H, W]:
    sqrt(mean over f, c, h, w of (x_{f+1} − x_f)²); 0 for a still clip."""
    if pixels.ndim != 5 or pixels.shape[1] < 2:
        raise ValueError(f"temporal_change needs videos [B, F >= 2, C, H, W], got {tuple(pixels.shape)}")
    return (pixels[:, 1:] - pixels[:, :-1]).detach().float().square().flatten(1).mean(1).sqrt()


def clip_image_embeddings(clip, pixels: Tensor) -> Tensor:
    """Normalised image embeddings [B, D] of pixels ([B, C, H, W] or video [B, F, C, H, W]: the
    normalised mean of its frames' embeddings) with an `OpenClipCosineReward`'s model."""
    frames, per_sample = flatten_frames(pixels)  # [B*F, C, H, W]
    inputs = clip.preprocess(frames.to(clip.device)).to(clip.dtype)
    embeddings = F.normalize(clip.model.encode_image(inputs).float(), dim=-1)  # [B*F, D]
    return F.normalize(embeddings.view(-1, per_sample, embeddings.shape[-1]).mean(1), dim=-1)  # [B, D]
