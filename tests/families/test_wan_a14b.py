"""What only Wan 2.2 A14B does: two experts switched by the step's noise level, either or both trained.

The family contract covers the family on its stand-in with the high-noise expert trained (its
deterministic sample equals `WanPipeline`'s, so the switch is right on the whole trajectory). Here:
  - at every denoising step the policy calls the expert `WanPipeline` itself calls (each
    transformer's forward recorded in both), with the stand-in's boundary between two steps;
  - a micro-batch whose samples sit on both sides of the boundary sends each to its expert;
  - "low" and "both": the optimizer and the checkpoint hold exactly the trained experts' weights,
    full fine-tuning's KL reference copies only them, one GRPO step moves those and leaves the
    frozen expert as it was;
  - "both" with LoRA exports two files that plain diffusers loads into the two experts
    (`load_lora_weights(..., load_into_transformer_2=True)`) and samples what the policy samples.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from lightning_grpo.policies.registry import FAMILIES
from lightning_grpo.policies.wan import LOW_NOISE_LORA_FILE
from lightning_grpo.rollout import ode_from

from tests.families.fitting import PROMPTS, condition_for, fit
from tests.families.test_family_contract import grpo, noise_for, pipeline_sample, plain_pipeline, policy_sample, randomise_lora

NAME = "wan_a14b"
STEPS = 4
EXPERT = {"transformer": "high", "transformer_2": "low"}


def policy_for(stand_in_paths, **kwargs):
    return FAMILIES[NAME].stand_in_policy(stand_in_paths[NAME], num_sampling_steps=STEPS, **kwargs)


def record_calls(owner) -> list[tuple[str, float]]:
    """(expert, timestep) of every forward of `owner.transformer` / `owner.transformer_2`, in order."""
    calls: list[tuple[str, float]] = []
    for attribute, expert in EXPERT.items():
        def hook(module, args, kwargs, expert=expert):
            calls.append((expert, float(kwargs["timestep"].reshape(-1)[0])))
        getattr(owner, attribute).register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_the_policy_calls_the_expert_the_pipeline_calls_at_every_step(stand_in_paths):
    policy = policy_for(stand_in_paths)  # CFG on (scale 3; 2 on the low-noise expert): two calls per step
    pipe = WanPipeline.from_pretrained(str(stand_in_paths[NAME]))
    pipe.set_progress_bar_config(disable=True)
    pipeline_calls, policy_calls = record_calls(pipe), record_calls(policy)
    noise = noise_for(policy)
    pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=STEPS, output_type="latent", **policy.pipeline_call_kwargs(len(PROMPTS)))
    ode_from(policy, policy.build_sampler(eta=0.0), noise.clone(), PROMPTS, None)

    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert policy.boundary_timestep == boundary
    timesteps = [t for t in pipe.scheduler.timesteps.tolist()]
    # the boundary falls strictly between two steps, so both experts run
    assert any(t > boundary for t in timesteps) and any(t < boundary for t in timesteps)
    assert len(pipeline_calls) == 2 * STEPS  # conditional and unconditional pass per step
    assert [e for e, _ in policy_calls] == [e for e, _ in pipeline_calls]
    torch.testing.assert_close(torch.tensor([t for _, t in policy_calls]), torch.tensor([t for _, t in pipeline_calls]), atol=0, rtol=0)
    assert {e for e, _ in pipeline_calls} == {"high", "low"}
    for expert, t in pipeline_calls:  # and the pipeline's own rule, t ≥ boundary → high
        assert expert == ("high" if t >= boundary else "low")


def test_a_micro_batch_across_the_boundary_sends_each_sample_to_its_expert(stand_in_paths):
    policy = policy_for(stand_in_paths)
    noise, condition = noise_for(policy), condition_for(policy)
    timesteps = policy.build_sampler().timesteps  # [1000, 857.7, 602.2, 8.9]: boundary 700
    mixed = torch.stack([timesteps[0], timesteps[2]])  # sample 0 high noise, sample 1 low noise
    with torch.no_grad():
        out = policy.predict(noise, mixed, condition)
        high = policy.predict(noise, timesteps[0].expand(2), condition)  # all high: one call
        low = policy.predict(noise, timesteps[2].expand(2), condition)
    torch.testing.assert_close(out[0], high[0], atol=1e-5, rtol=0)  # batch of 1 vs 2: float noise
    torch.testing.assert_close(out[1], low[1], atol=1e-5, rtol=0)
    assert (high[1] - low[1]).abs().max() > 1e-3  # the experts differ: the check can fail


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["low", "both"])
def test_only_the_trained_experts_are_optimised_and_checkpointed(trained, stand_in_paths, tmp_path):
    policy = policy_for(stand_in_paths, trained_experts=trained)
    names = {"low": ["transformer_2"], "both": ["transformer", "transformer_2"]}[trained]
    frozen = sorted(set(EXPERT) - set(names))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    module = grpo(policy, kl_beta=0.1)  # full fine-tuning's KL reference: a frozen copy of the trained experts only
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    assert count(module.parameters()) - count(policy.parameters()) == sum(count(getattr(policy, name).parameters()) for name in names)
    trainer, record = fit(module, default_root_dir=tmp_path)
    assert record.metrics[0]["train/ratio/first_update_max_dev"] <= 1e-6  # the copies swapped in are the initial experts
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    expected = {id(p) for name in names for p in getattr(policy, name).parameters()}
    assert optimised == expected
    trainer.save_checkpoint(tmp_path / "grpo.ckpt")
    saved = set(torch.load(tmp_path / "grpo.ckpt", map_location="cpu", weights_only=True)["state_dict"])
    assert saved == {f"policy.{n}" for name in names for n, _ in getattr(policy, name).named_parameters(prefix=name)}
    moved = {n.split(".")[0] for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(names)  # each trained expert moved; the frozen one and the encoders did not
    for name in frozen:
        assert not any(p.requires_grad for p in getattr(policy, name).parameters())


@pytest.mark.slow
def test_both_experts_lora_export_loads_into_both_experts_through_diffusers(stand_in_paths, tmp_path):
    policy = policy_for(stand_in_paths, trained_experts="both", lora_rank=2, lora_alpha=4.0)
    randomise_lora(policy)
    out = policy.export(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / LOW_NOISE_LORA_FILE).is_file()
    pipe = plain_pipeline(policy, stand_in_paths[NAME])
    noise = noise_for(policy)
    expected = policy_sample(policy, noise)
    pipe.load_lora_weights(str(out))
    only_high = pipeline_sample(pipe, policy, noise)
    pipe.load_lora_weights(str(out), weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)
    torch.testing.assert_close(pipeline_sample(pipe, policy, noise), expected, atol=1e-5, rtol=0)
    assert (only_high - expected).abs().max() > 1e-3  # the low-noise expert's adapters matter


@pytest.mark.parametrize(("trained", "expected"), [("high", [True, True, False, False]), ("low", [False, False, True, True]), ("both", [True] * 4)])
def test_updates_train_only_the_steps_a_trained_expert_denoises(trained, expected, stand_in_paths):
    """A step the frozen expert denoises has no gradient: the objectives draw the trained steps
    among the trained experts' (`trained_at`; timesteps 1000, 857.7 | 602.2, 8.9 around 700)."""
    from lightning_grpo.samplers.step_schedule import trainable_policy_steps

    policy = policy_for(stand_in_paths, trained_experts=trained)
    sampler = policy.build_sampler()
    assert policy.trained_at(sampler.timesteps).tolist() == expected
    candidates = torch.arange(STEPS)
    assert trainable_policy_steps(policy, sampler, candidates).tolist() == [i for i in range(STEPS) if expected[i]]
