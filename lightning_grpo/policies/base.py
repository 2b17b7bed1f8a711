"""The policy-adapter contract: one base-model family per adapter, nothing of GRPO inside.

An adapter owns its diffusers components (text encoders, denoiser, VAE) and exposes the five
operations the rollout and the update need, plus its matching sampler (`build_sampler`) and its
KL reference (`kl_reference` / `reference_predict`). GRPOModule never looks inside.
Diffusers-backed families share `lightning_grpo.policies.family.DiffusersPolicy`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn

from lightning_grpo.types import Condition

if TYPE_CHECKING:
    from lightning_grpo.samplers.base import Sampler

Paradigm = Literal["flow", "diffusion"]


class PolicyAdapter(nn.Module, ABC):
    """A generator seen as a policy over denoising steps.

    Class attributes:
        paradigm: "flow" (velocity prediction, use FlowSDESampler) or "diffusion" (use DDIMSDESampler).
        conditions_on_images: True for image-to-video policies, whose `encode_prompts` needs the
            first frames (the batch's "images").
    """

    paradigm: ClassVar[Paradigm]
    conditions_on_images: ClassVar[bool] = False
    pipeline_one_image_per_call: ClassVar[bool] = False
    """True when the family's diffusers pipeline conditions one call on one image (diffusers' Wan
    I2V: a batch of P images is repeated per prompt and fails); the policy itself takes a batch of
    first frames, which equals one pipeline call per prompt (the family contract test calls it so)."""
    geometry_arguments: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that fix the latents' shape (height, width, frames, ...): a checkpoint
    records their values and refuses to load into a policy built with others
    (`lightning_grpo.checkpointing.model_signature`)."""
    denoiser_name: ClassVar[str] = ""
    """Attribute holding the trainable denoiser ("" when the adapter is its own denoiser)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """Conditioning for a batch of prompts (and first frames [B, C, H, W] in [0, 1] for I2V).

        Every tensor is batch-first with B = len(prompts); it includes the unconditional branch
        when classifier-free guidance is on. Runs under no_grad (text encoders are frozen).
        """

    @abstractmethod
    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial noise x_0: Tensor[batch_size, *L] on the adapter's device, fp32."""

    @abstractmethod
    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Model output (velocity, ε, v or x0 as the sampler expects) for latents [B, *L].

        `timesteps` is Tensor[B] of the sampler's model-facing timesteps. Guidance (CFG) is
        applied inside when the adapter's guidance scale is > 1; the result is [B, *L].
        """

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [0, 1]: [B, C, H, W] for images, [B, F, C, H, W] for video. No gradient."""

    @property
    def uses_cfg(self) -> bool:
        """True when predict() runs classifier-free guidance (GRPO then steps once per rollout)."""
        return False

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool | None:
        """Whether a policy built with `init_args` (a config's `init_args`; the constructor's
        defaults fill the rest) runs classifier-free guidance, known before anything loads (the
        start-up checks and the memory estimate ask); None when only the built policy knows.
        Must agree with `uses_cfg` (tests/families/test_family_knowledge.py checks every family)."""
        return None

    # -- what the strategies need ---------------------------------------------------------

    @property
    def block_classes(self) -> set[type[nn.Module]]:
        """The module classes FSDP wraps as its units (each instance one unit). Here the adapter
        itself: a weight-free adapter is one unit; families name their denoiser's blocks."""
        return {type(self)}

    def fsdp_roots(self, reference: nn.Module | None) -> list[nn.Module]:
        """The modules FSDP shards, each with the `block_classes` inside it as units: the adapter
        (its KL reference, a copy of the whole adapter, stays replicated). Families return their
        trainable denoiser(s), and the frozen denoiser copy of full fine-tuning's KL reference."""
        return [self]

    def trained_at(self, timesteps: Tensor) -> Tensor:
        """Which of the sampler's model-facing timesteps [T] the trainable weights act at:
        BoolTensor[T]. Every step here; a family whose trained part runs at some noise levels only
        (Wan 2.2 A14B with one of its two experts trained) says which, and the objectives draw the
        trained steps among those (`trainable_policy_steps`)."""
        return torch.ones(timesteps.shape, dtype=torch.bool, device=timesteps.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (the denoiser, or its LoRA weights)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- the family's sampler -----------------------------------------------------------------

    def sampler_defaults(self, num_steps: int | None, eta: float | None) -> tuple[int, float]:
        """(steps, eta) of `build_sampler` when not given (16 and 0.3, the flow recipe's, here)."""
        return (16 if num_steps is None else int(num_steps), 0.3 if eta is None else float(eta))

    def build_sampler(self, num_steps: int | None = None, eta: float | None = None) -> Sampler:
        """The sampler of this policy's paradigm, with the family's default schedule.

        GRPOModule calls it when no sampler is configured. Families override it to use their
        checkpoint's own schedule (FLUX: the pipeline's sigmas; SD: its DDIM scheduler config).
        """
        from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler

        steps, eta = self.sampler_defaults(num_steps, eta)
        if self.paradigm == "flow":
            return FlowSDESampler(num_steps=steps, eta=eta)
        return DDIMSDESampler(num_steps=steps, eta=eta)

    # -- KL reference -------------------------------------------------------------------------

    def kl_reference(self) -> nn.Module | None:
        """The weights the KL reference (the initial policy) needs beyond this adapter's own.

        Default: a frozen deep copy of the whole adapter. `DiffusersPolicy` keeps far less:
        nothing with LoRA (adapters disabled), the denoiser alone with full fine-tuning.
        """
        reference = copy.deepcopy(self)
        reference.requires_grad_(False)
        return reference.eval()

    def reference_predict(self, reference: nn.Module | None, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """`predict` of the initial policy, given what `kl_reference()` returned."""
        return reference.predict(latents, timesteps, condition)


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of `cls.__init__` and of every `__init__` up its MRO (what a family
    forwards through **kwargs), the most derived winning."""
    import inspect

    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults[name] = parameter.default
    return defaults


def configured(cls: type, init_args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments a policy of class `cls` is built with from a config's `init_args`: the
    constructor's defaults, overridden by every value the config gives (None: the default)."""
    return {**constructor_defaults(cls), **{k: v for k, v in init_args.items() if v is not None}}


def check_sampler_matches(policy: PolicyAdapter, sampler: Sampler) -> None:
    """Refuse a sampler of the other paradigm (a FLUX velocity fed to DDIM would train silently)."""
    expected = getattr(sampler, "paradigm", None)
    if expected is not None and expected != policy.paradigm:
        raise ValueError(
            f"{type(sampler).__name__} is a {expected!r} sampler but {type(policy).__name__} is a "
            f"{policy.paradigm!r} policy: use {type(policy).__name__}.build_sampler() (omit `sampler`) "
            f"or a sampler of the {policy.paradigm!r} paradigm"
        )
