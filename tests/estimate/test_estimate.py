"""`lightning-grpo estimate` on tiny models: parameter bytes against counts worked out by hand from
the weights files, the strategy arithmetic by hand, the activation tracker by hand, the whole
estimate against the peak memory of a real training step on the CPU, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lightning_grpo.estimate import GIB, LiveBytes, estimate, fit_warning, read_recipe, warn_if_over_capacity

ROOT = Path(__file__).resolve().parents[2]
TOY_FLUX = ROOT / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "flux"
MIB = 2**20


def stored_params(folder: Path) -> int:
    """Parameters of a safetensors weights file, read from its header (nothing built)."""
    (path,) = folder.glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel") else _numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tiny_config(**model) -> dict:
    """The toy FLUX (shipped, CPU-sized) as a recipe dict, with a model-free reward."""
    policy = {"pretrained_model_name_or_path": str(TOY_FLUX), "height": 32, "width": 32, "max_sequence_length": 16,
              "num_sampling_steps": 4, "sampling_eta": 1.0}
    policy.update(model.pop("policy", {}))
    return {
        "trainer": model.pop("trainer", {"devices": 1}),
        "model": {
            "policy": {"class_path": "lightning_grpo.policies.FluxPolicy", "init_args": policy},
            "rewards": [{"class_path": "lightning_grpo.worlds.shapes.verifier.ShapesVerifier", "init_args": {"mode": "graded"}}],
            "group_size": 4, "micro_batch_size": 4, "decode_batch_size": 8, "timestep_fraction": 0.5, **model,
        },
        "data": {"class_path": "lightning_grpo.datamodules.prompts.PromptDataModule", "init_args": {"batch_size": 2}},
    }


# ------------------------------------------------------------------ the tracker, by hand
def test_live_bytes_counts_each_storage_once_and_ignores_registered_ones():
    weights = torch.empty(1024)  # 4 KiB that exist before: registered, never counted
    tracker = LiveBytes()
    tracker.ignore(weights)
    with tracker:
        a = torch.empty(256 * 1024)  # 1 MiB
        view = weights.view(32, 32).t()  # a view of a registered storage: nothing new
        b = a * 2  # 1 MiB more
        del a
        c = torch.empty(128 * 1024)  # 0.5 MiB while b is alive
    assert tracker.peak == 2 * MIB
    assert tracker.current == int(1.5 * MIB)
    del b, c, view
    assert tracker.current == 0


# ------------------------------------------------------------------ parameters, by hand
def test_parameter_bytes_match_the_weights_files_and_the_strategy_arithmetic():
    """Weights, gradients, AdamW states and DDP buckets of the toy FLUX: P parameters read from its
    safetensors header; full fine-tuning in fp32 is 4P bytes each, AdamW 8P; frozen parts 4 B per
    stored parameter; FSDP over 4 GPUs divides the denoiser's states by 4."""
    p = stored_params(TOY_FLUX / "transformer")
    frozen = sum(stored_params(TOY_FLUX / sub) for sub in ("text_encoder", "text_encoder_2", "vae"))
    ddp = estimate(read_recipe(tiny_config(trainer={"devices": 2}), devices=2))
    assert ddp.row("denoiser weights").rollout == 4 * p
    assert ddp.row("gradients").update == 4 * p
    assert ddp.row("DDP gradient buckets").update == 4 * p
    assert ddp.row("AdamW states (exp_avg, exp_avg_sq)").checkpoint == 8 * p
    assert ddp.row("frozen: text_encoder, text_encoder_2, vae").rollout == 4 * frozen
    assert ddp.row("AdamW step temporaries").update == 4 * p

    fsdp_trainer = {"devices": 4, "precision": "bf16-mixed", "strategy": {
        "class_path": "lightning_grpo.distributed.DenoiserFSDPStrategy", "init_args": {"sharding_strategy": "FULL_SHARD"}}}
    fsdp = estimate(read_recipe(tiny_config(trainer=fsdp_trainer)))
    assert fsdp.row("denoiser weights (sharded /4)").rollout == 4 * p / 4
    assert fsdp.row("gradients (sharded /4)").update == 4 * p / 4
    assert fsdp.row("AdamW states (exp_avg, exp_avg_sq)").update == 8 * p / 4
    assert "DDP gradient buckets" not in [r.name for r in fsdp.rows]
    # one FluxTransformerBlock / FluxSingleTransformerBlock unsharded in bf16 (FSDP's param_dtype)
    block = fsdp.row("FSDP: one unsharded block")
    assert block.rollout % 2 == 0 and 0 < block.rollout < 2 * p / 2
    assert block.update == 2 * block.rollout  # its gradient too


def test_lora_trains_only_the_adapters_and_keeps_the_base_frozen_in_its_dtype():
    """LoRA rank r on to_q/to_k/to_v/to_out.0 of the toy FLUX: each adapted d_in→d_out linear adds
    r·(d_in + d_out) fp32 parameters; the base stays in bf16 (2 B per stored parameter)."""
    config = tiny_config(policy={"lora_rank": 2, "denoiser_dtype": "bfloat16"})
    result = estimate(read_recipe(config))
    hidden = 2 * 32  # heads × head dim of the toy transformer (its config.json)
    transformer = json.loads((TOY_FLUX / "transformer" / "config.json").read_text())
    assert transformer["num_attention_heads"] * transformer["attention_head_dim"] == hidden
    # dual blocks: to_q/k/v/out.0 (4) + add_q/k/v_proj are not targets; single blocks: to_q/k/v (3, no to_out)
    adapted = transformer["num_layers"] * 4 + transformer["num_single_layers"] * 3
    lora_params = adapted * 2 * (hidden + hidden)
    assert result.row("gradients").update == 4 * lora_params
    assert result.row("AdamW states (exp_avg, exp_avg_sq)").update == 8 * lora_params
    assert result.row("denoiser weights").rollout == 2 * stored_params(TOY_FLUX / "transformer") + 4 * lora_params


def test_activations_grow_with_the_batch_and_gradient_checkpointing_lowers_the_update():
    small = estimate(read_recipe(tiny_config(rollout_batch_size=2)))
    large = estimate(read_recipe(tiny_config(rollout_batch_size=8)))
    name = next(r.name for r in small.rows if r.name.startswith("denoiser activations"))
    other = next(r.name for r in large.rows if r.name.startswith("denoiser activations"))
    assert 2 < large.row(other).rollout / small.row(name).rollout <= 4.5
    plain = estimate(read_recipe(tiny_config()))
    checkpointed = estimate(read_recipe(tiny_config(policy={"gradient_checkpointing": True})))
    update = lambda e: next(r for r in e.rows if r.name.startswith("denoiser activations")).update
    assert update(checkpointed) < 0.8 * update(plain)


# ------------------------------------------------------------------ against a real step
@pytest.mark.timeout(300)
def test_estimate_is_within_15_percent_of_real_training_steps_on_the_cpu():
    """Two real GRPO steps (rollout, decode, reward, update, AdamW) of the toy FLUX on the CPU,
    measured with the same tracker on real tensors (weights and optimizer states included),
    against the estimate's largest phase for the same recipe. Two: the AdamW states exist from
    the first optimizer step on, so the second step is the steady state the estimate describes
    (the first peaks lower by those states)."""
    from lightning.pytorch import Trainer

    from lightning_grpo.module import GRPOModule
    from lightning_grpo.policies import FluxPolicy
    from lightning_grpo.worlds.shapes.verifier import ShapesVerifier

    config = tiny_config(micro_batch_size=8, rollout_batch_size=8)
    predicted = estimate(read_recipe(config)).largest[1]

    torch.manual_seed(0)
    policy = FluxPolicy(**config["model"]["policy"]["init_args"])
    module = GRPOModule(policy=policy, rewards=[ShapesVerifier(mode="graded")], group_size=4, micro_batch_size=8,
                        rollout_batch_size=8, decode_batch_size=8, timestep_fraction=0.5, show_progress=False)
    prompts = ["a red circle at the top right", "a blue square at the bottom left"]
    loader = torch.utils.data.DataLoader([{"prompts": prompts}] * 2, batch_size=None)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[])
    tracker = LiveBytes()
    for tensor in list(module.parameters()) + list(module.buffers()):  # the weights count, from the start
        tracker._count(tensor.untyped_storage())
    with tracker:
        trainer.fit(module, train_dataloaders=loader)
    measured = tracker.peak
    print(f"estimate {predicted / MIB:.2f} MiB, measured {measured / MIB:.2f} MiB")
    assert trainer.global_step == 2
    assert 0.85 * measured <= predicted <= 1.15 * measured, (predicted / MIB, measured / MIB)


# ------------------------------------------------------------------ fit's warning and the CLI
def test_fit_warning_names_the_phase_and_the_knobs_and_is_silent_when_it_fits():
    config = tiny_config()
    message = fit_warning(config, 1, 1, capacity=MIB)
    assert message is not None
    assert "update" in message and "rollout" in message
    for knob in ("rollout_batch_size", "micro_batch_size", "lora_rank", "FSDP", "offload"):
        assert knob in message
    assert fit_warning(config, 1, 1, capacity=80 * GIB) is None


def test_fit_warning_is_skipped_at_once_on_the_cpu():
    class CPUTrainer:
        accelerator = object()

    # a config that would fail to estimate: on the CPU it is never read
    assert warn_if_over_capacity({"model": {}}, CPUTrainer()) is None


def test_bad_recipe_input_is_named():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_recipe("nope.yaml")
    with pytest.raises(ValueError, match="--devices"):
        read_recipe(tiny_config(), devices=0)
    with pytest.raises(ValueError, match="model.policy"):
        read_recipe({"model": {}})


@pytest.mark.timeout(300)
def test_cli_prints_a_table_with_the_largest_figure_last(tmp_path):
    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config()))
    out = subprocess.run(
        [sys.executable, "-m", "lightning_grpo", "estimate", "-c", str(recipe), "--devices", "2"],
        capture_output=True, text=True, timeout=280, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "DDP over 2" in lines[0]
    assert any(line.startswith("total") for line in lines)
    assert lines[-1].startswith("peak per GPU:") and "MiB" in lines[-1]
    bad = subprocess.run([sys.executable, "-m", "lightning_grpo", "estimate", "-c", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


# ------------------------------------------------------------------ the shipped published configs
@pytest.mark.parametrize("folder, class_name, published", [
    ("FLUX.1-dev/transformer", "diffusers.FluxTransformer2DModel", 11.90e9),  # "a 12 billion parameter rectified flow transformer"
    ("FLUX.1-dev/text_encoder_2", "transformers.T5EncoderModel", 4.76e9),  # T5 v1.1 XXL encoder
    ("FLUX.1-dev/text_encoder", "transformers.CLIPTextModel", 123.1e6),  # CLIP ViT-L/14 text tower
    ("stable-diffusion-v1-4/unet", "diffusers.UNet2DConditionModel", 859.5e6),  # "860M UNet"
    ("HunyuanVideo/transformer", "diffusers.HunyuanVideoTransformer3DModel", 12.8e9),  # "13B"
    ("HunyuanVideo/text_encoder", "transformers.LlamaModel", 7.5e9),  # Llama-3-8B without its LM head
])
def test_shipped_configs_build_the_published_sizes(folder, class_name, published):
    from lightning_grpo.estimate import MODEL_CONFIGS, meta_component, param_count

    config = json.loads((MODEL_CONFIGS / folder / "config.json").read_text())
    assert param_count(meta_component(class_name, config)) == pytest.approx(published, rel=0.01)
