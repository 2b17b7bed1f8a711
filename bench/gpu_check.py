"""GPU check of `lightning-grpo estimate`: the full-size FLUX.1-dev transformer with random weights,
the LoRA recipe's rollout and update at its resolution, peak memory beside the estimate.

What runs (the recipe's settings, read from configs/flux_hps_lora.yaml by `estimate.read_recipe`):
the transformer built from configs/models/FLUX.1-dev/transformer/config.json directly on the
device in the recipe's denoiser dtype (no weights are downloaded: random initialisation), the
recipe's LoRA (rank, alpha, targets) and gradient checkpointing; then `--steps` GRPO iterations of
the denoiser alone: a rollout of `rollout_batch_size` samples through all sampling steps under
no_grad (the FLUX family's predict + FlowSDESampler.step, so the family's own code), and an update of
`micro_batch_size` samples on a few timesteps (log-prob, clipped surrogate loss, backward, AdamW
step). Text encoders, VAE and reward are left out on both sides: the prompt condition is random.

Measured: peak allocated bytes per phase (`torch.cuda.max_memory_allocated`; on the CPU the
estimate's own `LiveBytes` tracker over real tensors), from the second iteration on (the AdamW
states exist then). Estimated: the same parts of `lightning-grpo estimate` (denoiser weights,
LoRA gradients and AdamW states, AdamW step temporaries, activations measured on fake tensors at
the same batch sizes). Printed: both per phase, the step times, and the ratio measured / estimate
of the larger phase last.

    python bench/gpu_check.py                                   # on the GPU, the recipe's full size
    python bench/gpu_check.py --reduced --device cpu --steps 2  # the CPU test's size (tests/bench)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_grpo.estimate import GIB, LiveBytes, _Geometry, _predictor, _setting, _size, denoiser_figures, read_recipe  # noqa: E402
from lightning_grpo.grpo.loss import clipped_surrogate_loss  # noqa: E402
from lightning_grpo.policies.loading import add_lora  # noqa: E402
from lightning_grpo.policies.registry import FAMILIES  # noqa: E402
from lightning_grpo.samplers import FlowSDESampler  # noqa: E402

FLUX_CONFIGS = ROOT / "configs" / "models" / "FLUX.1-dev"
REDUCED = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 32,
           "axes_dims_rope": [8, 12, 12], "joint_attention_dim": 64, "pooled_projection_dim": 64}
"""--reduced: a FLUX transformer of the same classes and input layout, CPU-sized."""


def model_folder(reduced: bool, where: Path) -> Path:
    """A folder with transformer/ and vae/ configs: the published ones, or reduced in size."""
    transformer = json.loads((FLUX_CONFIGS / "transformer" / "config.json").read_text())
    if reduced:
        transformer.update(REDUCED)
    for sub, config in (("transformer", transformer), ("vae", json.loads((FLUX_CONFIGS / "vae" / "config.json").read_text()))):
        (where / sub).mkdir(parents=True, exist_ok=True)
        (where / sub / "config.json").write_text(json.dumps(config))
    return where


def recipe_for(args: argparse.Namespace, folder: Path):
    recipe = read_recipe(args.config, devices=1, nodes=1)
    recipe.policy_args["pretrained_model_name_or_path"] = str(folder)
    if args.reduced:
        recipe.policy_args.update(height=args.size or 64, width=args.size or 64, max_sequence_length=16, lora_rank=4, lora_alpha=8)
    elif args.size:
        recipe.policy_args.update(height=args.size, width=args.size)
    recipe.model["group_size"] = max(int(recipe.model.get("rollout_batch_size") or 1), int(recipe.model.get("micro_batch_size", 1)))
    recipe.batch_size = 1
    return recipe


def build(recipe, device: torch.device):
    from diffusers import FluxTransformer2DModel

    setting = _setting(recipe)
    config = json.loads((Path(recipe.policy_args["pretrained_model_name_or_path"]) / "transformer" / "config.json").read_text())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(setting.denoiser)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    args = recipe.policy_args
    family = FAMILIES["flux"].policy_type()
    add_lora(transformer, int(args["lora_rank"]), args.get("lora_alpha"), args.get("lora_target_modules") or family.default_lora_targets)
    if args.get("gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    geometry = _Geometry(recipe, family, {"transformer": config, "vae": json.loads((FLUX_CONFIGS / "vae" / "config.json").read_text())})
    return _predictor(family, transformer, recipe, geometry), geometry, setting


class Peaks:
    """Peak bytes per phase: CUDA's allocator statistics, or `LiveBytes` on the CPU."""

    def __init__(self, device: torch.device, modules) -> None:
        self.device = device
        self.tracker = None
        if device.type != "cuda":
            self.tracker = LiveBytes()
            for module in modules:
                for tensor in list(module.parameters()) + list(module.buffers()):
                    self.tracker._count(tensor.untyped_storage())

    def context(self):
        return self.tracker if self.tracker is not None else nullcontext()

    def start(self) -> None:
        if self.tracker is not None:
            self.tracker.reset_peak()
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.tracker is not None:
            return self.tracker.peak
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def run(args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(args, model_folder(args.reduced, Path(tmp)))
        figures = denoiser_figures(recipe)  # the estimate's measurement, on fake tensors
        policy, geometry, setting = build(recipe, device)
    transformer = policy.transformer
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-4)
    model = recipe.model
    sampler = FlowSDESampler(num_steps=figures.steps, eta=float(recipe.policy_args.get("sampling_eta", 0.3)),
                             shift=float(recipe.policy_args.get("sampling_shift", 3.0)))
    autocast = torch.autocast(device.type, dtype=setting.compute) if setting.compute is not None else nullcontext()
    peaks = Peaks(device, [transformer])
    generator = torch.Generator(device).manual_seed(0)
    trained_steps = max(1, int(figures.steps * float(model.get("timestep_fraction", 0.6))) // 3)  # a few, to keep it short
    rows: dict[str, list[float]] = {"rollout": [], "update": []}
    times: dict[str, list[float]] = {"rollout": [], "update": []}
    with peaks.context():
        for iteration in range(args.steps):
            # rollout: rollout_batch_size samples through every step, no gradient
            peaks.start()
            start = time.perf_counter()
            b = figures.rollout_batch
            x = torch.randn(b, *geometry.latent, generator=generator, device=device)
            condition = {k: v.to(device) for k, v in geometry.condition(b, setting.frozen).items()}
            latents, log_probs = [x], []
            with torch.no_grad(), autocast:
                for i in range(figures.steps):
                    t = sampler.timesteps.to(device)[i].expand(b)
                    out = sampler.step(policy.predict(x, t, condition), x, i, generator=generator)
                    x = out.prev_sample
                    latents.append(x)
                    log_probs.append(out.log_prob)
            _sync(device)
            times["rollout"].append(time.perf_counter() - start)
            rows["rollout"].append(peaks.peak())
            # update: micro_batch_size samples, a few timesteps, one AdamW step
            peaks.start()
            start = time.perf_counter()
            m = figures.micro_batch
            stacked = torch.stack(latents, dim=1)  # [b, T + 1, *L]
            old = torch.stack(log_probs, dim=1)  # [b, T]
            index = torch.arange(m, device=device) % b
            condition = {k: v[index] for k, v in condition.items()}
            advantages = torch.randn(m, generator=generator, device=device)
            for k in range(trained_steps):
                with autocast:
                    t = sampler.timesteps.to(device)[k].expand(m)
                    out = sampler.step(policy.predict(stacked[index, k], t, condition), stacked[index, k], k, prev_sample=stacked[index, k + 1])
                    loss, _ = clipped_surrogate_loss(out.log_prob, old[index, k], advantages, clip_range=1e-4, adv_clip_max=5.0)
                (loss / trained_steps).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times["update"].append(time.perf_counter() - start)
            rows["update"].append(peaks.peak())
            del stacked, old, latents, log_probs, x, out, loss

    weights = figures.trainable * _size(figures.train_dtype) + figures.frozen_base * _size(setting.denoiser)
    states = 2 * figures.trainable * _size(figures.train_dtype)
    grads = figures.trainable * _size(figures.train_dtype)
    estimate = {
        "rollout": weights + states + figures.rollout_activations,
        "update": weights + states + grads + max(figures.update_activations, grads),
    }
    steady = slice(1, None) if args.steps > 1 else slice(0, None)  # from the 2nd iteration: AdamW states exist
    measured = {phase: max(values[steady]) for phase, values in rows.items()}
    what = "reduced FLUX transformer" if args.reduced else "FLUX.1-dev transformer (11.9B, random weights)"
    print(f"{what} + LoRA r={recipe.policy_args['lora_rank']} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{geometry.height}x{geometry.width}, {figures.steps} steps, rollout batch {figures.rollout_batch}, micro-batch {figures.micro_batch}, "
          f"{trained_steps} trained steps per update, precision {recipe.precision}")
    unit, scale = ("GiB", GIB) if max(measured.values()) >= GIB else ("MiB", 2**20)
    print(f"{'phase':<10}{'measured ' + unit:>16}{'estimate ' + unit:>16}{'ratio':>8}{'seconds (mean)':>16}")
    for phase in ("rollout", "update"):
        seconds = sum(times[phase][steady]) / len(times[phase][steady])
        print(f"{phase:<10}{measured[phase] / scale:16.2f}{estimate[phase] / scale:16.2f}{measured[phase] / estimate[phase]:8.2f}{seconds:16.2f}")
    phase = max(estimate, key=estimate.get)
    ratio = measured[phase] / estimate[phase]
    print(f"measured / estimate of the peak phase ({phase}): {ratio:.3f}")
    return ratio


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "flux_hps_lora.yaml"), help="the LoRA recipe whose settings run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="GRPO iterations (the first is a warm-up)")
    parser.add_argument("--reduced", action="store_true", help="a CPU-sized transformer (1 + 1 blocks, 2 heads), 64², LoRA r=4")
    parser.add_argument("--size", type=int, default=None, help="override the recipe's resolution (pixels, square)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
