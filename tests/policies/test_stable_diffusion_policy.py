"""StableDiffusionPolicy on a tiny random SD pipeline: equivalence with diffusers, contract."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny import IMAGE_SIZE, ode_sample

from lightning_grpo.policies import StableDiffusionPolicy
from lightning_grpo.samplers import DDIMSDESampler

PROMPTS = ["a photo of a cat", "a red dog on a sofa"]
STEPS = 4
ATOL = 1e-5  # fp32; the loop is observed to be bit-identical to the pipeline (error 0.0)


def make_policy(path: Path, **kwargs) -> StableDiffusionPolicy:
    return StableDiffusionPolicy(str(path), height=IMAGE_SIZE, width=IMAGE_SIZE, **kwargs)


def make_sampler(policy: StableDiffusionPolicy, eta: float = 0.0) -> DDIMSDESampler:
    from diffusers import DDIMScheduler

    return DDIMSDESampler(num_steps=STEPS, eta=eta, scheduler=DDIMScheduler.from_config(policy.scheduler_config))


@pytest.fixture(scope="module")
def pipeline(tiny_sd_path: Path):
    """The reference: diffusers' StableDiffusionPipeline with a DDIMScheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, latents: torch.Tensor, guidance_scale: float, output_type: str, **kwargs) -> torch.Tensor:
    return pipe(
        PROMPTS,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        eta=0.0,
        latents=latents.clone(),
        output_type=output_type,
        **kwargs,
    ).images


@pytest.mark.parametrize(
    ("guidance_scale", "negative_prompt"),
    [(1.0, ""), (5.0, ""), (5.0, "a blue square")],
    ids=["no-cfg", "cfg", "cfg-negative-prompt"],
)
def test_ddim_loop_reproduces_pipeline(tiny_sd_path, pipeline, guidance_scale, negative_prompt):
    """Acceptance: prepare_latents → predict/ode_step loop → decode equals the DDIM pipeline."""
    policy = make_policy(tiny_sd_path, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    assert policy.uses_cfg == (guidance_scale > 1)
    sampler = make_sampler(policy)
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))  # [B, 4, 8, 8]

    latents = ode_sample(policy, sampler, PROMPTS, noise)
    pixels = policy.decode(latents)

    extra = {"negative_prompt": [negative_prompt] * len(PROMPTS)} if negative_prompt else {}
    ref_latents = run_pipeline(pipeline, noise, guidance_scale, "latent", **extra)
    ref_pixels = run_pipeline(pipeline, noise, guidance_scale, "pt", **extra)
    assert (latents - noise).abs().max() > 0.1  # the loop moved
    torch.testing.assert_close(latents, ref_latents, atol=ATOL, rtol=0)
    torch.testing.assert_close(pixels, ref_pixels, atol=ATOL, rtol=0)
    inside = ((ref_pixels > 0) & (ref_pixels < 1)).float().mean()
    assert inside > 0.2, "reference pixels are mostly clamped: the comparison would be weak"


def test_comparison_can_fail(tiny_sd_path, pipeline):
    """The tiny model is sensitive enough: another guidance scale gives other latents."""
    policy = make_policy(tiny_sd_path, guidance_scale=5.0)
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))
    latents = ode_sample(policy, make_sampler(policy), PROMPTS, noise)
    other = run_pipeline(pipeline, noise, 2.0, "latent")
    assert (latents - other).abs().max() > 1e-3


def test_prepare_latents_is_the_pipeline_noise(tiny_sd_path, pipeline):
    policy = make_policy(tiny_sd_path)
    ours = policy.prepare_latents(3, torch.Generator().manual_seed(7))
    theirs = pipeline.prepare_latents(3, 4, IMAGE_SIZE, IMAGE_SIZE, torch.float32, "cpu", torch.Generator().manual_seed(7))
    assert ours.shape == (3, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_condition_is_batch_first(tiny_sd_path):
    policy = make_policy(tiny_sd_path, guidance_scale=3.0)
    condition = policy.encode_prompts(PROMPTS)
    assert set(condition) == {"prompt_embeds", "negative_prompt_embeds"}
    for value in condition.values():
        assert value.shape == (len(PROMPTS), 16, 32)
        assert not value.requires_grad
    # Different prompts give different embeddings (the tokenizer did not load empty).
    assert (condition["prompt_embeds"][0] - condition["prompt_embeds"][1]).abs().max() > 1e-3
    assert set(make_policy(tiny_sd_path).encode_prompts(PROMPTS)) == {"prompt_embeds"}


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_predict_shape_and_gradient_reaches_unet(tiny_sd_path, guidance_scale):
    policy = make_policy(tiny_sd_path, guidance_scale=guidance_scale).train()
    sampler = make_sampler(policy, eta=1.0)
    condition = policy.encode_prompts(PROMPTS)
    x = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(1))
    t = sampler.timesteps[torch.tensor([0, 2])]  # [B], a different step per sample
    out = policy.predict(x, t, condition)
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().mean().backward()
    trainable = policy.trainable_parameters()
    assert all(p.grad is not None for p in trainable)
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0
    assert all(p.grad is None for p in policy.vae.parameters())
    assert all(p.grad is None for p in policy.text_encoder.parameters())


def test_trainable_parameters_are_the_unet(tiny_sd_path):
    policy = make_policy(tiny_sd_path)
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.unet.parameters()}
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    policy.train()
    assert policy.unet.training and not policy.vae.training and not policy.text_encoder.training


def test_lora_trains_only_adapter_weights_and_starts_at_base(tiny_sd_path):
    base = make_policy(tiny_sd_path)
    lora = make_policy(tiny_sd_path, lora_rank=4, lora_alpha=8, gradient_checkpointing=True)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {id(p) for p in lora.trainable_parameters()} == {id(p) for n, p in lora.named_parameters() if "lora_" in n}
    # LoRA B starts at zero: same prediction as the base UNet.
    condition = base.encode_prompts(PROMPTS)
    x = base.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(2))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        torch.testing.assert_close(lora.predict(x, t, condition), base.predict(x, t, condition), atol=1e-6, rtol=0)
    # Gradient reaches the LoRA weights through gradient checkpointing in train mode.
    lora.train()
    lora.predict(x, t, condition).square().mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_decode_is_pixels_in_unit_range(tiny_sd_path):
    policy = make_policy(tiny_sd_path)
    latents = 3 * torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=torch.Generator().manual_seed(3))
    pixels = policy.decode(latents)
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == torch.float32 and not pixels.requires_grad
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert pixels.std() > 0


def test_missing_pretrained_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        make_policy(missing)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("vae", "vae"),
        ("tokenizer", "tokenizer"),
        ("unet/diffusion_pytorch_model.safetensors", "unet"),
        ("text_encoder/config.json", "text_encoder"),
        ("scheduler/scheduler_config.json", "scheduler_config.json"),
    ],
)
def test_missing_component_is_named(tiny_sd_path, tmp_path, remove, named):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=named):
        make_policy(broken)


def test_resolution_must_fit_the_vae(tiny_sd_path):
    with pytest.raises(ValueError, match="multiples of 2"):
        StableDiffusionPolicy(str(tiny_sd_path), height=15, width=16)


def test_frozen_parts_in_bfloat16(tiny_sd_path):
    """dtype applies to VAE and text encoder only; predict and decode still return fp32."""
    policy = make_policy(tiny_sd_path, dtype="bfloat16", guidance_scale=2.0)
    assert policy.vae.dtype == policy.text_encoder.dtype == torch.bfloat16
    assert policy.unet.dtype == torch.float32
    condition = policy.encode_prompts(PROMPTS)
    assert condition["prompt_embeds"].dtype == torch.bfloat16
    x = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(4))
    out = policy.predict(x, torch.tensor([900, 100]), condition)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    pixels = policy.decode(x)
    assert pixels.dtype == torch.float32 and 0 <= pixels.min() and pixels.max() <= 1


def test_unreachable_hub_id_is_a_file_not_found_error():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (a hub call could hang)")
    with pytest.raises(FileNotFoundError, match="lightning-grpo-tests/no-such-sd"):
        StableDiffusionPolicy("lightning-grpo-tests/no-such-sd")
