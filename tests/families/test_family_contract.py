"""The family contract, checked for every family in the registry (no per-family test code).

For each registered family, on its tiny stand-in pipeline:
  - the deterministic sample of the policy's own sampler equals the diffusers pipeline's (compared
    as the pipeline returns latents: `pipeline_latents`), and so do its decoded pixels (the
    family's VAE normalisation);
  - the first inner GRPO update has ratio 1;
  - checkpoints hold only the trainable weights and load strictly;
  - LoRA trains only adapter weights; its KL reference costs no second copy of the denoiser;
  - gradient checkpointing recomputes (the blocks run again) and gives the same gradients;
  - a sampler of the other paradigm is refused, naming both classes;
  - export (full fine-tuning and LoRA, through `lightning-grpo export`) round-trips through
    plain diffusers and reproduces the policy's deterministic sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_grpo.cli import main as cli_main
from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.family import resolve_class
from lightning_grpo.policies.registry import FAMILIES
from lightning_grpo.rollout import ode_from
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler

from tests.families.fitting import PROMPTS, condition_for, first_frames, fit
from tests.training.fixtures import Redness

NAMES = sorted(FAMILIES)
STEPS = 4
ATOL = 1e-5


def make_policy(name: str, paths, **kwargs):
    return FAMILIES[name].stand_in_policy(paths[name], num_sampling_steps=STEPS, **kwargs)


def plain_pipeline(policy, path: Path):
    """The family's diffusers pipeline loaded from `path` by diffusers alone."""
    pipe = resolve_class(f"diffusers.{policy.pipeline_class}").from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_sample(pipe, policy, noise: torch.Tensor, output_type: str = "latent") -> torch.Tensor:
    """The pipeline's sample of PROMPTS (with their first frames) from `noise`. A pipeline that
    conditions a call on one image (`pipeline_one_image_per_call`: diffusers' Wan I2V repeats a
    batch of images per prompt) is called once per prompt, the samples stacked."""
    frames = first_frames(policy)
    if frames is not None and policy.pipeline_one_image_per_call:
        return torch.cat([
            pipe(prompt=[prompt], image=frames[i : i + 1], latents=noise[i : i + 1].clone(), num_inference_steps=STEPS,
                 output_type=output_type, return_dict=False, **policy.pipeline_call_kwargs(1))[0]
            for i, prompt in enumerate(PROMPTS)
        ])
    extra = {} if frames is None else {"image": frames}
    kwargs = {**policy.pipeline_call_kwargs(len(PROMPTS)), **extra}
    return pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=STEPS, output_type=output_type, return_dict=False, **kwargs)[0]


def policy_sample(policy, noise: torch.Tensor) -> torch.Tensor:
    return ode_from(policy, policy.build_sampler(eta=0.0), noise.clone(), PROMPTS, first_frames(policy))


def noise_for(policy) -> torch.Tensor:
    return policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))


def grpo(policy, **kwargs) -> GRPOModule:
    """GRPOModule without a sampler: the policy builds its own (eta from the family default)."""
    options = dict(group_size=2, timestep_fraction=0.5, micro_batch_size=2, samples_per_update=None, learning_rate=1e-3, show_progress=False)
    return GRPOModule(policy=policy, rewards=[Redness()], **{**options, **kwargs})


def randomise_lora(policy, seed: int = 0) -> None:
    """Non-zero LoRA B matrices (they start at zero), so adapted and base models differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_sample_equals_the_pipeline(name, stand_in_paths):
    policy = make_policy(name, stand_in_paths)
    noise = noise_for(policy)
    latents = policy_sample(policy, noise)
    reference = pipeline_sample(plain_pipeline(policy, stand_in_paths[name]), policy, noise)
    assert (latents - noise).abs().max() > 0.1  # the loop moved
    torch.testing.assert_close(policy.pipeline_latents(latents), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_decoded_sample_equals_the_pipelines_pixels(name, stand_in_paths):
    """The family's VAE normalisation (`latent_normalization`: scale/shift, per-channel mean/std)
    and layout: `decode` of the deterministic sample = the pipeline's own decoded output."""
    policy = make_policy(name, stand_in_paths)
    noise = noise_for(policy)
    pixels = policy.decode(policy_sample(policy, noise))  # [B, 3, H, W] or [B, F, 3, H, W], in [0, 1]
    reference = pipeline_sample(plain_pipeline(policy, stand_in_paths[name]), policy, noise, output_type="pt")
    assert pixels.shape == reference.shape
    assert pixels.std() > 0.01  # not a constant image
    torch.testing.assert_close(pixels, reference.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_sampler_is_refused_naming_both(name, stand_in_paths):
    policy = make_policy(name, stand_in_paths)
    assert type(policy.build_sampler()).paradigm == policy.paradigm
    other = DDIMSDESampler(num_steps=STEPS) if policy.paradigm == "flow" else FlowSDESampler(num_steps=STEPS)
    with pytest.raises(ValueError) as error:
        grpo(policy, sampler=other)
    assert type(policy).__name__ in str(error.value) and type(other).__name__ in str(error.value)


@pytest.mark.parametrize("name", NAMES)
def test_first_inner_update_ratio_is_one(name, stand_in_paths):
    _, record = fit(grpo(make_policy(name, stand_in_paths)))
    assert record.metrics[0]["train/ratio/first_update_max_dev"] <= 1e-6


@pytest.fixture(scope="module")
def lora_runs(stand_in_paths, tmp_path_factory):
    """Per family: a LoRA policy (random B, alpha ≠ rank) trained for one GRPO step with a KL term,
    its state before training, its checkpoint and the config that built it."""
    runs = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(f"lora_{name}")
        init_args = {**FAMILIES[name].stand_in_kwargs, "pretrained_model_name_or_path": str(stand_in_paths[name]),
                     "num_sampling_steps": STEPS, "lora_rank": 2, "lora_alpha": 4.0}
        config = {"model": {"policy": {"class_path": FAMILIES[name].policy_class, "init_args": init_args}}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        policy = FAMILIES[name].policy_type()(**init_args)
        randomise_lora(policy)
        before = {k: v.detach().clone() for k, v in policy.named_parameters()}
        module = grpo(policy, kl_beta=0.1)
        trainer, record = fit(module, default_root_dir=folder)
        trainer.save_checkpoint(folder / "grpo.ckpt")
        runs[name] = dict(module=module, before=before, folder=folder, config=config, record=record)
    return runs


@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_only_adapter_weights(name, lora_runs):
    run = lora_runs[name]
    policy = run["module"].policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, run["before"][n])}
    assert moved and moved <= set(trainable)


@pytest.mark.parametrize("name", NAMES)
def test_lora_kl_reference_holds_no_second_copy(name, lora_runs, stand_in_paths):
    module = lora_runs[name]["module"]
    storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    policy_storages = {p.untyped_storage().data_ptr() for p in module.policy.parameters()}
    assert storages == policy_storages  # the reference adds no weights at all
    # ... and it is the base model: adapters disabled equals the same family without LoRA
    base = make_policy(name, stand_in_paths)
    noise, t = noise_for(base), module.sampler.timesteps[:1].expand(len(PROMPTS))
    condition = condition_for(base)
    with torch.no_grad():
        reference = module.policy.reference_predict(module.reference_policy, noise, t, condition)
        adapted = module.policy.predict(noise, t, condition)
        torch.testing.assert_close(reference, base.predict(noise, t, condition), atol=1e-6, rtol=0)
    assert (adapted - reference).abs().max() > 1e-3  # adapters re-enabled afterwards
    assert lora_runs[name]["record"].metrics[0]["train/kl"] > 0  # random B: adapted ≠ reference


@pytest.mark.parametrize("name", NAMES)
def test_full_fine_tuning_kl_reference_copies_the_denoiser_only(name, stand_in_paths):
    module = grpo(make_policy(name, stand_in_paths), kl_beta=0.1)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    extra = count(module.parameters()) - count(module.policy.parameters())
    assert extra == count(module.policy.denoiser.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_leave_out_frozen_weights_and_load_strictly(name, lora_runs, stand_in_paths):
    run = lora_runs[name]
    checkpoint = torch.load(run["folder"] / "grpo.ckpt", map_location="cpu", weights_only=True)
    saved = set(checkpoint["state_dict"])
    trainable = {f"policy.{n}" for n, p in run["module"].policy.named_parameters() if p.requires_grad}
    assert saved == trainable  # no text encoder, VAE or LoRA base weight, no reference
    fresh = grpo(FAMILIES[name].policy_type()(**run["config"]["model"]["policy"]["init_args"]), kl_beta=0.1)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for key in trainable:
        torch.testing.assert_close(fresh.state_dict()[key], run["module"].state_dict()[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(name, stand_in_paths):
    grads, calls = [], []
    for checkpointing in (False, True):
        policy = make_policy(name, stand_in_paths, gradient_checkpointing=checkpointing).eval()  # GRPO's mode
        assert policy.block_classes, "the family names its denoiser blocks (diffusers _no_split_modules)"
        count = [0]
        for m in policy.denoiser.modules():
            if type(m) in policy.block_classes:
                # a pre-hook: the recomputation stops early, before post-hooks would run
                m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        noise = noise_for(policy)
        t = policy.build_sampler().timesteps[1:2].expand(len(PROMPTS))
        policy.predict(noise, t, condition_for(policy)).square().mean().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
        calls.append(count[0])
    assert calls[1] > calls[0]  # the blocks ran again in backward: checkpointing is really on
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_full_fine_tuning_export_round_trips_through_diffusers(name, stand_in_paths, tmp_path):
    policy = make_policy(name, stand_in_paths)
    with torch.no_grad():  # a "trained" denoiser: away from the base weights
        generator = torch.Generator().manual_seed(1)
        for p in policy.denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    exported = plain_pipeline(policy, policy.export(tmp_path / "pipeline"))
    noise = noise_for(policy)
    expected = policy.pipeline_latents(policy_sample(policy, noise))
    torch.testing.assert_close(pipeline_sample(exported, policy, noise), expected, atol=ATOL, rtol=0)
    base = pipeline_sample(plain_pipeline(policy, stand_in_paths[name]), policy, noise)
    assert (base - expected).abs().max() > 1e-3  # the comparison can fail


@pytest.mark.parametrize("name", NAMES)
def test_lora_export_cli_round_trips_through_load_lora_weights(name, lora_runs, stand_in_paths, tmp_path):
    run = lora_runs[name]
    out = tmp_path / "lora"
    cli_main(["export", "--config", str(run["folder"] / "config.yaml"), "--ckpt_path", str(run["folder"] / "grpo.ckpt"), "--out", str(out)])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    policy = run["module"].policy
    settings = json.loads((out / "generation_settings.json").read_text())  # how the run generated, for plain diffusers
    assert settings["pipeline"] == policy.pipeline_class and settings["weights"].startswith("LoRA")
    assert settings["call"]["num_inference_steps"] == run["module"].sampler.num_steps
    assert {k: settings["call"][k] for k in ("height", "width")} == {"height": policy.height, "width": policy.width}
    pipe = plain_pipeline(policy, stand_in_paths[name])
    noise = noise_for(policy)
    base = pipeline_sample(pipe, policy, noise)
    pipe.load_lora_weights(str(out))
    expected = policy.pipeline_latents(policy_sample(policy, noise))
    torch.testing.assert_close(pipeline_sample(pipe, policy, noise), expected, atol=ATOL, rtol=0)
    assert (base - expected).abs().max() > 1e-3  # the LoRA matters: the comparison can fail
