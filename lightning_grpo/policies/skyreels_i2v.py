"""SkyReels-V1 image-to-video as a GRPO policy: HunyuanVideo conditioned on a first frame.

Mirrors `diffusers.HunyuanSkyreelsImageToVideoPipeline`, which is `HunyuanVideoPipeline` (see
hunyuan_video.py, whose policy this one extends) plus one thing: the first frame's VAE latent is
concatenated with the noisy latent on the channel axis before every transformer call,

    hidden_states = cat([x, I], dim=1)   [B, 2C, f, h, w]
    I = cat([s·z_1, 0, …, 0], dim=2)     [B, C, f, h, w]: the first latent frame is the frame's
                                         latent, the f − 1 later ones are zeros
    z_1 ~ VAE.encode(frame).latent_dist  (a posterior sample, as the pipeline and DanceGRPO draw
                                         it), s = the VAE's scaling_factor,

and the transformer predicts the velocity of x alone, [B, C, f, h, w]. The frame goes through the
pipeline's own `video_processor.preprocess` and `prepare_latents`, so I is built by the pipeline's
code, not restated. True classifier-free guidance (`true_cfg_scale` > 1, DanceGRPO: 5 on the
empty prompt) is the HunyuanVideo family's; with it GRPO steps the optimizer once per rollout.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from lightning_grpo.policies.family import ConfigGeometry
from lightning_grpo.policies.hunyuan_video import HunyuanVideoPolicy
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition


class SkyReelsI2VPolicy(HunyuanVideoPolicy):
    """SkyReels-V1-Hunyuan-I2V (HunyuanVideoTransformer3DModel with 2C input channels).

    The condition is HunyuanVideoPolicy's plus {"image_latents": [B, C, f, h, w]} (I above),
    computed once per prompt in `encode_prompts(prompts, images)` from first frames
    [P, 3, H, W] in [0, 1]. Everything else (text, guidance, CFG, decode, LoRA, export) is
    HunyuanVideoPolicy's / DiffusersPolicy's, and so are the other arguments.

    Args:
        pretrained_model_name_or_path: a SkyReels-V1 I2V pipeline folder in the diffusers layout
            (e.g. HunyuanVideo's folder with Skywork/SkyReels-V1-Hunyuan-I2V as transformer/).
        height, width: frame size (multiples of 16; DanceGRPO: 400×640).
        num_frames: 4k + 1 frames (DanceGRPO: 53).
        guidance: distilled guidance embedding value (DanceGRPO feeds 1000, i.e. 1.0).
        true_cfg_scale: true CFG scale (on when > 1; DanceGRPO: 5, on `negative_prompt` "").
        first_frame_seed: seed of the posterior sample z_1: each first frame draws from its own
            generator with this seed, so a frame's latent does not depend on its batch position
            (`pipeline_call_kwargs` hands the pipeline the same generators).
        **kwargs: HunyuanVideoPolicy's and DiffusersPolicy's arguments.
    """

    pipeline_class = "HunyuanSkyreelsImageToVideoPipeline"
    conditions_on_images = True
    default_eta = 0.3  # DanceGRPO SkyReels recipe: 16 steps, eta 0.3
    published_config = "SkyReels-V1-Hunyuan-I2V"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 400,
        width: int = 640,
        num_frames: int = 53,
        guidance: float = 1.0,
        true_cfg_scale: float = 1.0,
        first_frame_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained_model_name_or_path, height, width, num_frames, guidance=guidance, true_cfg_scale=true_cfg_scale, **kwargs)
        self.first_frame_seed = int(first_frame_seed)

    def check_components(self) -> None:
        channels = self.transformer.config.in_channels
        if channels != 2 * self.transformer.config.out_channels:
            raise ValueError(
                f"{self.pretrained_model_name_or_path!r}: a SkyReels I2V transformer takes 2C input channels (noise ⊕ first "
                f"frame), this one takes {channels} for {self.transformer.config.out_channels} out: a text-to-video checkpoint?"
            )

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """HunyuanVideo's, plus the first frame's latent I [C, f, h, w] (once, whatever CFG)."""
        geometry = super().config_geometry(init_args, configs, cfg)
        geometry.condition["image_latents"] = (geometry.latent, "latent")
        return geometry

    @property
    def latent_channels(self) -> int:
        """Channels C of the noisy latent: half the transformer's input (the other half is I)."""
        return int(self.transformer.config.in_channels) // 2

    def _first_frame_generators(self, count: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(self.first_frame_seed) for _ in range(count)]

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        """HunyuanVideoPolicy's, plus the first-frame generators (the caller adds `image=`)."""
        return {**super().pipeline_call_kwargs(num_prompts), "generator": self._first_frame_generators(num_prompts)}

    @torch.no_grad()
    def first_frame_latents(self, images: Tensor) -> Tensor:
        """I [P, C, f, h, w] for first frames [P, 3, H, W] in [0, 1], built by the pipeline's own
        `video_processor.preprocess` (resize to H×W, map to [−1, 1]) and `prepare_latents`."""
        pipe, vae = self.pipeline, self.vae
        frames = pipe.video_processor.preprocess(images, height=self.height, width=self.width).to(vae.device, vae.dtype)
        count = frames.shape[0]
        device = placement(self.transformer)[0]
        unused_noise = torch.zeros((count, *self.latent_shape), device=device)  # given, so none is drawn
        _, image_latents = pipe.prepare_latents(
            frames, count, self.latent_channels, self.height, self.width, self.num_frames,
            torch.float32, device, self._first_frame_generators(count), unused_noise,
        )
        return image_latents  # [P, C, f, h, w]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """HunyuanVideoPolicy's text condition plus "image_latents" (I) of the first frames."""
        prompts = list(prompts)
        self.check_first_frames(prompts, images)
        condition = self._text_condition(prompts)
        condition["image_latents"] = self.first_frame_latents(images)
        return condition

    def model_input(self, latents: Tensor, condition: Condition) -> Tensor:
        """cat([x, I], dim=1): [B, 2C, f, h, w], as the pipeline feeds its transformer."""
        return torch.cat([latents, condition["image_latents"].to(latents)], dim=1)


__all__ = ["SkyReelsI2VPolicy"]
