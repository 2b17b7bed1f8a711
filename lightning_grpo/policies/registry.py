"""The family registry: every diffusers-backed family, with a tiny stand-in to test it on.

One entry per family. The family contract test (tests/families/test_family_contract.py), the
family-knowledge test (tests/families/test_family_knowledge.py) and the config tests
(tests/configs: each family's recipe instantiated and fitted for two steps on its stand-in) are
parametrized over `FAMILIES`, so a new family is one family file, one entry here (with its
stand-in builder) and one YAML in configs/; no new test code (docs/architecture.md, "Adding a
family").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lightning_grpo.policies.family import DiffusersPolicy, resolve_class

#: Frames of the video stand-in clips (4k + 1 with k = 1: 2 latent frames); the stand-ins'
#: geometry lives here, beside the arguments the registry runs them with, so the registry needs
#: nothing from `lightning_grpo.testing` until a stand-in is built.
VIDEO_FRAMES = 5
#: A short prompt template in the form of the HunyuanVideo pipelines' DEFAULT_PROMPT_TEMPLATE for the
#: tiny Llama tokenizer of the stand-ins; its `crop_start` is counted by the policy (`template_crop_start`).
VIDEO_TEMPLATE = {
    "template": "<|start_header_id|>system<|end_header_id|>describe the video<|eot_id|><|start_header_id|>user<|end_header_id|>{}<|eot_id|>",
}
#: The FLUX.2 [dev] stand-in's max_sequence_length: the pipeline's system message with the template
#: (39 tokens with the stand-in's tokenizer: its words are whole tokens) and the test prompts (up to 9
#: tokens) fit, so no prompt is cut.
FLUX2_DEV_TEXT_LENGTH = 64


@dataclass(frozen=True)
class StandInBuilder:
    """A stand-in builder named by its dotted path ("lightning_grpo.testing.stand_ins.build_tiny_flux"),
    imported when called: `builder(path, seed=0) -> path`. The registry names every builder of
    `lightning_grpo.testing` this way, so importing the library core never imports the test support
    (tests/packaging/test_core_imports.py)."""

    dotted: str

    def __call__(self, path: str | Path, seed: int = 0) -> Path:
        return resolve_class(self.dotted)(path, seed)


@dataclass(frozen=True)
class Family:
    """A registered family.

    Attributes:
        name: short name ("flux", "sd").
        policy_class: dotted path of the `DiffusersPolicy` subclass.
        build_stand_in: `build(path, seed=0) -> path` writes a tiny random pipeline of the
            family's real classes in the diffusers layout (offline, seconds on a CPU); given as
            the dotted path of a function (a `StandInBuilder`, imported when called: the
            builders live in `lightning_grpo.testing.stand_ins`) or as the function itself.
        stand_in_kwargs: policy arguments the family contract test builds the stand-in policy
            with: what fits the stand-in (resolution, frames, sequence length, prompt template)
            and the contract's own choices named in `contract_only`.
        contract_only: keys of `stand_in_kwargs` that are the contract test's choices (e.g. a
            guidance scale that exercises CFG), not needed to run on the stand-in: a recipe run
            on the stand-in keeps its own values for them (`recipe_arguments`).
        config: the family's recipe under configs/ (the config tests fit it on the stand-in).
    """

    name: str
    policy_class: str
    build_stand_in: Callable[..., Path] | str
    stand_in_kwargs: dict[str, Any] = field(default_factory=dict)
    config: str = ""
    contract_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.build_stand_in, str):
            object.__setattr__(self, "build_stand_in", StandInBuilder(self.build_stand_in))

    def policy_type(self) -> type[DiffusersPolicy]:
        return resolve_class(self.policy_class)

    def stand_in_policy(self, path: str | Path, **kwargs: Any) -> DiffusersPolicy:
        """The family's policy on a stand-in folder written by `build_stand_in`."""
        return self.policy_type()(str(path), **{**self.stand_in_kwargs, **kwargs})

    def recipe_arguments(self, path: str | Path) -> dict[str, Any]:
        """What a recipe's `model.policy.init_args` take to run on the stand-in at `path` on a
        CPU: the folder, the stand-in's geometry (`stand_in_kwargs` but `contract_only`) and
        float32 components; every other recipe value stays."""
        geometry = {k: v for k, v in self.stand_in_kwargs.items() if k not in self.contract_only}
        return {"pretrained_model_name_or_path": str(path), **geometry, "dtype": "float32", "denoiser_dtype": "float32"}

    def serves(self, class_path: str) -> bool:
        """Whether a config's `class_path` names this family's policy class (by any import path:
        "lightning_grpo.policies.X" or the module's own)."""
        module, _, name = str(class_path).rpartition(".")
        if not module or name != self.policy_class.rpartition(".")[2]:
            return False
        try:
            return resolve_class(class_path) is self.policy_type()
        except (ImportError, AttributeError):
            return False


def family_of(class_path: str) -> Family | None:
    """The registered family whose policy class `class_path` names (the first registered, when
    several families share a class), or None."""
    return next((family for family in FAMILIES.values() if family.serves(class_path)), None)


_STAND_IN = {"height": 16, "width": 16}  # stand_ins.IMAGE_SIZE
_VIDEO_STAND_IN = {**_STAND_IN, "num_frames": VIDEO_FRAMES, "max_sequence_length": 16, "prompt_template": VIDEO_TEMPLATE}

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to FAMILIES (its name must be new)."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered ({FAMILIES[family.name].policy_class})")
    FAMILIES[family.name] = family
    return family


register_family(Family(
    name="flux", policy_class="lightning_grpo.policies.flux.FluxPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_flux",
    stand_in_kwargs={**_STAND_IN, "max_sequence_length": 16, "guidance": 3.5}, config="configs/flux_hps.yaml",
    contract_only=("guidance",),
))
register_family(Family(
    name="sd", policy_class="lightning_grpo.policies.stable_diffusion.StableDiffusionPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_sd",
    stand_in_kwargs={**_STAND_IN, "guidance_scale": 3.0}, config="configs/sd14_hps.yaml", contract_only=("guidance_scale",),
))

register_family(Family(
    name="hunyuan_video", policy_class="lightning_grpo.policies.hunyuan_video.HunyuanVideoPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_hunyuan_video", config="configs/hunyuan_t2v_videoalign.yaml",
    stand_in_kwargs=_VIDEO_STAND_IN,
))
register_family(Family(
    name="skyreels_i2v", policy_class="lightning_grpo.policies.skyreels_i2v.SkyReelsI2VPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_skyreels_i2v", config="configs/skyreels_i2v_mq.yaml",
    stand_in_kwargs=_VIDEO_STAND_IN,
))

register_family(Family(
    name="wan_t2v", policy_class="lightning_grpo.policies.wan.WanT2VPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_wan",
    stand_in_kwargs={**_STAND_IN, "num_frames": VIDEO_FRAMES, "max_sequence_length": 16, "guidance_scale": 3.0},
    config="configs/wan_t2v_videoalign.yaml", contract_only=("guidance_scale",),
))

register_family(Family(
    name="sd3", policy_class="lightning_grpo.policies.sd3.StableDiffusion3Policy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_sd3",
    stand_in_kwargs={**_STAND_IN, "max_sequence_length": 16, "guidance_scale": 3.0},
    config="configs/sd35_pickscore.yaml", contract_only=("guidance_scale",),
))

register_family(Family(
    name="qwen_image", policy_class="lightning_grpo.policies.qwen_image.QwenImagePolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_qwen_image",
    stand_in_kwargs={**_STAND_IN, "max_sequence_length": 16, "true_cfg_scale": 3.0},
    config="configs/qwen_image_hps.yaml", contract_only=("true_cfg_scale",),
))

register_family(Family(
    name="flux2_klein", policy_class="lightning_grpo.policies.flux2.Flux2KleinPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_flux2_klein",
    stand_in_kwargs={**_STAND_IN, "max_sequence_length": 32, "guidance_scale": 3.0},
    config="configs/flux2_pickscore.yaml", contract_only=("guidance_scale",),
))

register_family(Family(
    name="flux2_dev", policy_class="lightning_grpo.policies.flux2.Flux2DevPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_flux2_dev",
    stand_in_kwargs={**_STAND_IN, "max_sequence_length": FLUX2_DEV_TEXT_LENGTH, "guidance_scale": 3.5},
    config="configs/flux2_dev_pickscore.yaml", contract_only=("guidance_scale",),
))

register_family(Family(
    name="wan_a14b", policy_class="lightning_grpo.policies.wan.WanA14BPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_wan_a14b",
    # the contract trains the high-noise expert: its LoRA export is the one plain `load_lora_weights(out)`
    # loads (diffusers puts one expert per file); tests/families/test_wan_a14b.py covers "low" and "both"
    stand_in_kwargs={**_STAND_IN, "num_frames": VIDEO_FRAMES, "max_sequence_length": 16, "guidance_scale": 3.0,
                     "guidance_scale_2": 2.0, "trained_experts": "high"},
    config="configs/wan22_a14b_t2v_videoalign.yaml", contract_only=("guidance_scale", "guidance_scale_2", "trained_experts"),
))

register_family(Family(
    name="wan_i2v", policy_class="lightning_grpo.policies.wan.WanI2VPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_wan_i2v",
    stand_in_kwargs={**_STAND_IN, "num_frames": VIDEO_FRAMES, "max_sequence_length": 16, "guidance_scale": 3.0},
    config="configs/wan_i2v_mq.yaml", contract_only=("guidance_scale",),
))


register_family(Family(
    name="wan22_i2v_a14b", policy_class="lightning_grpo.policies.wan.WanA14BI2VPolicy",
    build_stand_in="lightning_grpo.testing.stand_ins.build_tiny_wan22_i2v_a14b",
    stand_in_kwargs={**_STAND_IN, "num_frames": VIDEO_FRAMES, "max_sequence_length": 16, "guidance_scale": 3.0,
                     "guidance_scale_2": 2.0, "trained_experts": "high"},  # as wan_a14b's
    config="configs/wan22_a14b_i2v_mq.yaml", contract_only=("guidance_scale", "guidance_scale_2", "trained_experts"),
))

__all__ = ["FAMILIES", "FLUX2_DEV_TEXT_LENGTH", "VIDEO_FRAMES", "VIDEO_TEMPLATE", "Family", "StandInBuilder", "family_of",
           "register_family"]
