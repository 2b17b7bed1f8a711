"""FluxPolicy on a tiny random FLUX pipeline: equivalence with diffusers, schedule, contract."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import IMAGE_SIZE, TEXT_MAX_LENGTH, ode_sample

from lightning_grpo.policies import FluxPolicy, flux_pipeline_sigmas
from lightning_grpo.samplers import FlowSDESampler

PROMPTS = ["a photo of a cat", "a red dog on a sofa"]
STEPS = 4
ATOL = 1e-5  # fp32; the loop is observed to be bit-identical to the pipeline (error 0.0)
SEQ = (IMAGE_SIZE // 2 // 2) ** 2  # packed tokens: VAE ×2, then 2×2 patches
CHANNELS = 16  # 4 latent channels × 2×2 patch


def make_policy(path: Path, **kwargs) -> FluxPolicy:
    kwargs.setdefault("max_sequence_length", TEXT_MAX_LENGTH)
    return FluxPolicy(str(path), height=IMAGE_SIZE, width=IMAGE_SIZE, **kwargs)


def load_pipeline(path: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline(tiny_flux_path: Path):
    """The reference: diffusers' FluxPipeline with its FlowMatchEulerDiscreteScheduler."""
    return load_pipeline(tiny_flux_path)


def run_pipeline(pipe, latents: torch.Tensor, guidance: float, output_type: str) -> torch.Tensor:
    return pipe(
        PROMPTS,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        max_sequence_length=TEXT_MAX_LENGTH,
        latents=latents.clone(),
        output_type=output_type,
    ).images


def check_reproduces(policy: FluxPolicy, pipe, guidance: float) -> None:
    sampler = FlowSDESampler(num_steps=STEPS, eta=0.0, sigmas=policy.pipeline_sigmas(STEPS))
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))  # [B, seq, 4C]

    latents = ode_sample(policy, sampler, PROMPTS, noise)
    pixels = policy.decode(latents)

    ref_latents = run_pipeline(pipe, noise, guidance, "latent")
    ref_pixels = run_pipeline(pipe, noise, guidance, "pt")
    assert (latents - noise).abs().max() > 0.1  # the loop moved
    torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(latents, ref_latents, atol=ATOL, rtol=0)
    torch.testing.assert_close(pixels, ref_pixels, atol=ATOL, rtol=0)
    inside = ((ref_pixels > 0) & (ref_pixels < 1)).float().mean()
    assert inside > 0.2, "reference pixels are mostly clamped: the comparison would be weak"


def test_euler_loop_reproduces_flux_dev_pipeline(tiny_flux_path, pipeline):
    """Acceptance: prepare_latents → predict/ode_step loop → decode equals FluxPipeline (guidance 3.5)."""
    check_reproduces(make_policy(tiny_flux_path, guidance=3.5), pipeline, guidance=3.5)


def test_euler_loop_reproduces_flux_schnell_pipeline(tiny_flux_schnell_path):
    """Without a guidance embedding (schnell), the guidance value is not passed at all."""
    policy = make_policy(tiny_flux_schnell_path)
    assert not policy.transformer.config.guidance_embeds
    check_reproduces(policy, load_pipeline(tiny_flux_schnell_path), guidance=3.5)


def test_comparison_can_fail(tiny_flux_path, pipeline):
    """The tiny model is sensitive enough: another guidance value gives other latents."""
    policy = make_policy(tiny_flux_path, guidance=3.5)
    sampler = FlowSDESampler(num_steps=STEPS, eta=0.0, sigmas=policy.pipeline_sigmas(STEPS))
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))
    latents = ode_sample(policy, sampler, PROMPTS, noise)
    assert (latents - run_pipeline(pipeline, noise, 1.0, "latent")).abs().max() > 1e-3


@pytest.mark.parametrize("image_seq_len", [SEQ, 1024, 4096, 8100])
@pytest.mark.parametrize("num_steps", [1, 16, 28])
def test_flux_pipeline_sigmas_match_the_scheduler(pipeline, image_seq_len, num_steps):
    """Against the scheduler driven as FluxPipeline does, and against the formula written out."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(pipeline.scheduler.config)
    sigmas = flux_pipeline_sigmas(config, num_steps, image_seq_len)
    assert len(sigmas) == num_steps + 1 and sigmas[-1] == 0.0

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = config["base_shift"] + m * (image_seq_len - config["base_image_seq_len"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    assert sigmas == scheduler.sigmas.tolist()

    t = np.linspace(1.0, 1 / num_steps, num_steps)
    by_hand = np.exp(mu) / (np.exp(mu) + (1 / t - 1))  # time shift, exponential form
    np.testing.assert_allclose(sigmas[:-1], by_hand, rtol=1e-6, atol=1e-7)
    sampler = FlowSDESampler(num_steps=num_steps, eta=0.3, sigmas=sigmas)
    torch.testing.assert_close(sampler.timesteps, scheduler.timesteps, atol=0, rtol=0)


def test_flux_pipeline_sigmas_static_shift(pipeline):
    """use_dynamic_shifting=False: the static SD3 shift of the config applies instead."""
    config = dict(pipeline.scheduler.config, use_dynamic_shifting=False, shift=3.0)
    sigmas = np.array(flux_pipeline_sigmas(config, 8, 4096)[:-1])
    t = np.linspace(1.0, 1 / 8, 8)
    np.testing.assert_allclose(sigmas, 3 * t / (1 + 2 * t), rtol=1e-6)


def test_latents_are_packed_and_are_the_pipeline_noise(tiny_flux_path, pipeline):
    policy = make_policy(tiny_flux_path)
    assert policy.image_seq_len == SEQ
    ours = policy.prepare_latents(3, torch.Generator().manual_seed(7))
    theirs, _ = pipeline.prepare_latents(3, 4, IMAGE_SIZE, IMAGE_SIZE, torch.float32, "cpu", torch.Generator().manual_seed(7))
    assert ours.shape == (3, SEQ, CHANNELS) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    unpacked = policy.unpack(ours)
    assert unpacked.shape == (3, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    # Packing is a pure permutation: the top-left 2×2 patch of channel c is token 0, features 4c..4c+3.
    torch.testing.assert_close(ours[:, 0, :4], unpacked[:, 0, :2, :2].reshape(3, 4), atol=0, rtol=0)


def test_condition_is_batch_first_and_deterministic_in_train_mode(tiny_flux_path):
    policy = make_policy(tiny_flux_path).train()  # the tiny T5 has dropout 0.1
    condition = policy.encode_prompts(PROMPTS)
    assert set(condition) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert condition["prompt_embeds"].shape == (len(PROMPTS), TEXT_MAX_LENGTH, 32)
    assert condition["pooled_prompt_embeds"].shape == (len(PROMPTS), 32)
    again = policy.encode_prompts(PROMPTS)
    for key in condition:
        torch.testing.assert_close(condition[key], again[key], atol=0, rtol=0)
        # Different prompts give different embeddings (the tokenizers did not load empty).
        assert (condition[key][0] - condition[key][1]).abs().max() > 1e-3


def test_predict_shape_and_gradient_reaches_transformer(tiny_flux_path):
    policy = make_policy(tiny_flux_path).train()
    sampler = FlowSDESampler(num_steps=STEPS, eta=0.3)
    condition = policy.encode_prompts(PROMPTS)
    x = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(1))
    out = policy.predict(x, sampler.timesteps[torch.tensor([0, 2])], condition)  # a step per sample
    assert out.shape == x.shape == (len(PROMPTS), SEQ, CHANNELS) and out.dtype == torch.float32
    out.square().mean().backward()
    trainable = policy.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in policy.transformer.parameters()}
    assert all(p.grad is not None for p in trainable if p.requires_grad)
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0
    for frozen in (policy.vae, policy.text_encoder, policy.text_encoder_2):
        assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())
        assert not frozen.training


def test_lora_trains_only_adapter_weights_and_starts_at_base(tiny_flux_path):
    base = make_policy(tiny_flux_path)
    lora = make_policy(tiny_flux_path, lora_rank=2, gradient_checkpointing=True)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    condition = base.encode_prompts(PROMPTS)
    x = base.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(2))
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        torch.testing.assert_close(lora.predict(x, t, condition), base.predict(x, t, condition), atol=1e-6, rtol=0)
    lora.train()
    lora.predict(x, t, condition).square().mean().backward()
    assert all(p.grad is not None for p in lora.trainable_parameters())


def test_lora_adapters_train_in_float32_under_a_bfloat16_denoiser(tiny_flux_path):
    """peft creates adapters in the base's dtype; in bf16 a small AdamW step of a LoRA weight is
    below half an ulp and lost. The adapters are float32, the base stays bf16, the forward runs
    and one step of lr 1e-5 moves every adapter matrix it reaches."""
    lora = make_policy(tiny_flux_path, lora_rank=2, denoiser_dtype="bfloat16")
    dtypes = {("lora_" in n, p.dtype) for n, p in lora.transformer.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.fill_(0.5)  # a trained adapter's size: bf16's ulp at 0.5 is 2^-8, far above lr 1e-5
    condition = lora.encode_prompts(PROMPTS)
    x = lora.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(2))
    lora.train()
    lora.predict(x, torch.tensor([900.0, 250.0]), condition).float().square().mean().backward()
    trainable = [p for p in lora.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    before = [p.detach().clone() for p in trainable]
    torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0).step()
    assert trainable and all(not torch.equal(b, p) for b, p in zip(before, trainable))


def test_decode_is_pixels_in_unit_range(tiny_flux_path):
    policy = make_policy(tiny_flux_path)
    latents = 3 * torch.randn(2, SEQ, CHANNELS, generator=torch.Generator().manual_seed(3))
    pixels = policy.decode(latents)
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == torch.float32 and not pixels.requires_grad
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("transformer", "transformer"),
        ("text_encoder_2/model.safetensors", "text_encoder_2"),
        ("tokenizer_2", "tokenizer_2"),
        ("vae/config.json", "vae"),
    ],
)
def test_missing_component_is_named(tiny_flux_path, tmp_path, remove, named):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux_path, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=named):
        make_policy(broken)


def test_missing_pretrained_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-flux"):
        make_policy(tmp_path / "no-such-flux")


def test_resolution_must_fit_vae_and_packing(tiny_flux_path):
    with pytest.raises(ValueError, match="multiples of 4"):
        FluxPolicy(str(tiny_flux_path), height=18, width=16)
