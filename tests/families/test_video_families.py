"""What the family contract does not cover for the video families (HunyuanVideo, SkyReels-V1 I2V):
the first frame enters the transformer exactly as the pipeline feeds it, CFG steps the optimizer once
per rollout, true CFG matches the pipeline, video decode layout, tiled/sliced decoding, the prompt
template's crop, and bad input refused by name."""

from __future__ import annotations

import pytest
import torch

from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.family import resolve_class
from lightning_grpo.policies.hunyuan_video import template_crop_start
from lightning_grpo.policies.registry import FAMILIES
from lightning_grpo.testing.stand_ins import VIDEO_TEMPLATE
from lightning_grpo.rollout import ode_from

from tests.families.fitting import PROMPTS, first_frames, fit
from tests.training.fixtures import Redness

STEPS = 3


def make(name, paths, **kwargs):
    return FAMILIES[name].stand_in_policy(paths[name], num_sampling_steps=STEPS, **kwargs)


def plain_pipeline(policy, path):
    pipe = resolve_class(f"diffusers.{policy.pipeline_class}").from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_inputs(transformer) -> tuple[list[torch.Tensor], object]:
    """Records the `hidden_states` of every call of `transformer` (a forward pre-hook)."""
    seen: list[torch.Tensor] = []
    handle = transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["hidden_states"].detach().clone()), with_kwargs=True)
    return seen, handle


def run_pipeline(pipe, policy, noise, images=None, output_type="latent"):
    extra = {} if images is None else {"image": images}
    out = pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=STEPS, output_type=output_type,
               return_dict=False, **policy.pipeline_call_kwargs(len(PROMPTS)), **extra)
    return out[0]


# -- image-to-video: the first frame ---------------------------------------------------------

def test_first_frame_enters_the_transformer_exactly_as_the_pipeline_feeds_it(stand_in_paths):
    policy = make("skyreels_i2v", stand_in_paths)
    images = first_frames(policy)
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))  # [B, C, f, h, w]
    pipe = plain_pipeline(policy, stand_in_paths["skyreels_i2v"])
    theirs, handle = transformer_inputs(pipe.transformer)
    run_pipeline(pipe, policy, noise, images)
    handle.remove()
    ours, handle = transformer_inputs(policy.transformer)
    ode_from(policy, policy.build_sampler(eta=0.0), noise.clone(), PROMPTS, images)
    handle.remove()
    assert len(ours) == len(theirs) == STEPS
    channels = policy.latent_channels
    for mine, pipeline_input in zip(ours, theirs):  # [B, 2C, f, h, w] at every step
        assert mine.shape == pipeline_input.shape == (len(PROMPTS), 2 * channels, *noise.shape[2:])
        torch.testing.assert_close(mine[:, channels:], pipeline_input[:, channels:], atol=0, rtol=0)  # the first frame, bit for bit
        torch.testing.assert_close(mine[:, :channels], pipeline_input[:, :channels], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[0][:, :channels], noise, atol=0, rtol=0)  # noise first, frame second


def test_first_frame_latent_is_the_vae_posterior_sample_then_zeros(stand_in_paths):
    """I = cat([s·z_1, 0, …], dim=2), z_1 = μ + σ·ε, ε from a generator seeded `first_frame_seed`."""
    policy = make("skyreels_i2v", stand_in_paths, first_frame_seed=3)
    images = first_frames(policy)
    latents = policy.encode_prompts(PROMPTS, images)["image_latents"]  # [P, C, f, h, w]
    posterior = policy.vae.encode((images * 2 - 1).unsqueeze(2)).latent_dist  # [P, C, 1, h, w]
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(3)) for _ in PROMPTS])
    expected = (posterior.mean + posterior.std * eps) * policy.vae.config.scaling_factor
    assert policy.latent_frames > 1 and latents.shape[2] == policy.latent_frames
    torch.testing.assert_close(latents[:, :, :1], expected, atol=1e-6, rtol=0)
    assert latents[:, :, 1:].abs().max() == 0
    # the latent belongs to the frame, not to its batch position
    swapped = policy.encode_prompts(PROMPTS[::-1], images.flip(0))["image_latents"]
    torch.testing.assert_close(swapped.flip(0), latents, atol=0, rtol=0)
    assert (latents[0] - latents[1]).abs().max() > 1e-3  # different frames, different latents


def test_image_to_video_needs_first_frames_of_the_right_shape(stand_in_paths):
    policy = make("skyreels_i2v", stand_in_paths)
    with pytest.raises(ValueError, match="image-to-video.*first frames"):
        policy.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match=r"\[P=2, 3, H, W\].*\(1, 3, 16, 16\)"):
        policy.encode_prompts(PROMPTS, torch.rand(1, 3, 16, 16))
    text_to_video = make("hunyuan_video", stand_in_paths)
    with pytest.raises(ValueError, match="text-to-video"):
        text_to_video.encode_prompts(PROMPTS, torch.rand(2, 3, 16, 16))


def test_a_text_to_video_checkpoint_is_refused_as_image_to_video(stand_in_paths):
    with pytest.raises(ValueError, match="2C input channels.*takes 4"):
        FAMILIES["skyreels_i2v"].stand_in_policy(stand_in_paths["hunyuan_video"])


# -- classifier-free guidance ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hunyuan_video", "skyreels_i2v"])
def test_true_cfg_sample_equals_the_pipeline(name, stand_in_paths):
    policy = make(name, stand_in_paths, true_cfg_scale=4.0, negative_prompt="a blue square")
    assert policy.uses_cfg
    images = first_frames(policy)
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(1))
    ours = ode_from(policy, policy.build_sampler(eta=0.0), noise.clone(), PROMPTS, images)
    theirs = run_pipeline(plain_pipeline(policy, stand_in_paths[name]), policy, noise, images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    unguided = ode_from(make(name, stand_in_paths), policy.build_sampler(eta=0.0), noise.clone(), PROMPTS, images)
    assert (ours - unguided).abs().max() > 1e-3  # guidance changes the sample: the comparison can fail


@pytest.mark.parametrize("cfg, rollouts, expected_steps", [(1.0, 1, 2), (5.0, 1, 1), (5.0, 2, 2)])
def test_cfg_steps_the_optimizer_exactly_once_per_rollout(cfg, rollouts, expected_steps, stand_in_paths):
    """4 samples per rollout (2 // rollouts prompts × 2·rollouts), samples_per_update = 2: two optimizer
    steps per rollout without CFG, one with it."""
    policy = make("skyreels_i2v", stand_in_paths, true_cfg_scale=cfg)
    steps = []
    module = GRPOModule(policy=policy, rewards=[Redness()], group_size=2 * rollouts, timestep_fraction=0.5, micro_batch_size=1,
                        samples_per_update=2, learning_rate=1e-3, show_progress=False)
    original = module._optimizer_step
    module._optimizer_step = lambda *args: steps.append(module.trainer.global_step) or original(*args)
    trainer, _ = fit(module, batches=rollouts, batch_size=len(PROMPTS) // rollouts)
    assert len(steps) == trainer.global_step == expected_steps


# -- video decode ------------------------------------------------------------------------------

def test_decode_is_the_pipelines_video_in_frames_first_layout(stand_in_paths):
    policy = make("hunyuan_video", stand_in_paths)
    noise = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(2))
    pipe = plain_pipeline(policy, stand_in_paths["hunyuan_video"])
    theirs = run_pipeline(pipe, policy, noise, output_type="pt")  # [B, F, 3, H, W] in [0, 1]
    ours = policy.decode(ode_from(policy, policy.build_sampler(eta=0.0), noise.clone(), PROMPTS))
    assert ours.shape == (len(PROMPTS), policy.num_frames, 3, policy.height, policy.width)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.min() >= 0 and ours.max() <= 1 and ours.std() > 1e-3


def test_encode_pixels_takes_clips_frames_first(stand_in_paths):
    policy = make("hunyuan_video", stand_in_paths)
    clips = torch.rand(2, policy.num_frames, 3, policy.height, policy.width, generator=torch.Generator().manual_seed(0))
    latents = policy.encode_pixels(clips)
    assert latents.shape == (2, *policy.latent_shape)
    # the posterior mode of the frames-first clip, via the VAE's own [B, 3, F, H, W] layout
    expected = policy.vae.encode(clips.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode() * policy.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_sliced_decoding_decodes_one_clip_at_a_time_with_the_same_pixels(stand_in_paths):
    whole, sliced = make("hunyuan_video", stand_in_paths), make("hunyuan_video", stand_in_paths, vae_slicing=True)
    latents = whole.prepare_latents(3, torch.Generator().manual_seed(4))
    calls = count_calls(sliced.vae.decoder)
    torch.testing.assert_close(sliced.decode(latents), whole.decode(latents), atol=1e-5, rtol=0)
    assert calls[0] == 3


def test_tiled_decoding_decodes_in_tiles(stand_in_paths):
    tiles = {"tile_sample_min_height": 8, "tile_sample_min_width": 8, "tile_sample_stride_height": 4, "tile_sample_stride_width": 4}
    tiled = make("hunyuan_video", stand_in_paths, vae_tiling=tiles)
    assert tiled.vae.use_tiling and tiled.vae.tile_sample_min_height == 8
    latents = tiled.prepare_latents(1, torch.Generator().manual_seed(4))
    calls = count_calls(tiled.vae.decoder)
    pixels = tiled.decode(latents)
    assert calls[0] > 1  # several spatial tiles of the 16×16 frames
    assert pixels.shape == (1, tiled.num_frames, 3, tiled.height, tiled.width) and torch.isfinite(pixels).all()


# -- text and geometry -------------------------------------------------------------------------

def test_the_template_crop_leaves_exactly_the_prompts_tokens(stand_in_paths):
    policy = make("hunyuan_video", stand_in_paths)
    tokenizer = policy.tokenizer
    crop = policy.prompt_template["crop_start"]
    assert crop == template_crop_start(tokenizer, VIDEO_TEMPLATE["template"]) > 0
    condition = policy.encode_prompts(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(VIDEO_TEMPLATE["template"].format(prompt))["input_ids"][crop:]
        assert tokenizer.decode(ids) == prompt + "<|eot_id|>"  # the prompt and the template's closing token
        assert int(condition["prompt_attention_mask"][row].sum()) == len(ids)
    with pytest.raises(ValueError, match="placeholder"):
        template_crop_start(tokenizer, "no placeholder")


def test_the_default_template_is_the_pipelines(stand_in_paths):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    policy = FAMILIES["hunyuan_video"].stand_in_policy(stand_in_paths["hunyuan_video"], prompt_template=None)
    assert policy.prompt_template == DEFAULT_PROMPT_TEMPLATE and policy.prompt_template["crop_start"] == 95


def test_prepare_latents_is_the_pipelines_noise(stand_in_paths):
    policy = make("hunyuan_video", stand_in_paths)
    pipe = plain_pipeline(policy, stand_in_paths["hunyuan_video"])
    theirs = pipe.prepare_latents(3, policy.latent_channels, policy.height, policy.width, policy.num_frames, torch.float32,
                                  torch.device("cpu"), torch.Generator().manual_seed(7))
    torch.testing.assert_close(policy.prepare_latents(3, torch.Generator().manual_seed(7)), theirs, atol=0, rtol=0)
    assert theirs.shape == (3, 4, 2, 4, 4)  # 5 frames → 2 latent frames; 16×16 → 4×4


def test_frames_must_be_4k_plus_1(stand_in_paths):
    with pytest.raises(ValueError, match=r"num_frames must be 4k \+ 1.*got 6"):
        make("hunyuan_video", stand_in_paths, num_frames=6)


def test_pipeline_sigmas_are_the_schedulers_static_shift(stand_in_paths):
    policy = make("hunyuan_video", stand_in_paths)
    shift = policy.scheduler_config["shift"]
    base = torch.linspace(1, 0, 9, dtype=torch.float64)[:-1]
    expected = (shift * base / (1 + (shift - 1) * base)).tolist() + [0.0]  # σ' = sσ / (1 + (s − 1)σ)
    assert shift == 7.0
    torch.testing.assert_close(torch.tensor(policy.pipeline_sigmas(8)), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    shifted = make("hunyuan_video", stand_in_paths, sampling_shift=5.0).build_sampler()
    assert shifted.shift == 5.0 and shifted.num_steps == STEPS and shifted.eta == 0.25
