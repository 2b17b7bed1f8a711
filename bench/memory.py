"""Peak memory of one GRPO step vs a ReFL-style step on a toy HunyuanVideo text-to-video model, by frames.

The paper's central memory claim (DanceGRPO §1, §3): GRPO never back-propagates through the VAE
or the reward model, so its memory grows slowly with the clip length, where reward
back-propagation (ReFL, DRaFT) must keep the VAE decoder's and the reward's activations of every
frame for the backward pass. This bench measures both on the real diffusers classes
(`HunyuanVideoTransformer3DModel`, `AutoencoderKLHunyuanVideo`) at toy size, built here from
configs (or loaded from a pipeline folder with ``--model``), at 9, 17, 33 and 65 frames: the
HunyuanVideo VAE is causal with ×4 temporal compression, so it takes 4k + 1 frames (k + 1 latent
frames), and these are the valid counts next to 8, 16, 32 and 64.

One sample, one trained timestep, the same model, latents, text condition and VAE settings
(the pipeline's defaults: frame-wise tiled decoding above 16 frames) in both:

* **GRPO step**: the project's `rollout()` (flow SDE, no grad, `--steps` steps), VAE decode and
  reward under no_grad, then the update on one timestep: the transformer's prediction with
  gradient, `FlowSDESampler.step(prev_sample=...)` log-prob and `clipped_surrogate_loss`
  (lightning_grpo/samplers/flow_sde.py, lightning_grpo/grpo/loss.py), backward.
* **ReFL step**: ODE (no grad) to the same timestep, one transformer prediction with gradient,
  x̂0 = x − σ·v (flow_sde.py eq. F1), VAE decode **with** gradient, a differentiable reward, and
  backward through all of it into the transformer.

The reward is a small per-frame conv net (a stand-in for a learned video reward: VideoAlign is a
2B VLM, whose activations would add far more to the ReFL side, so the ReFL figures are a lower
bound). Text encoders run once under no_grad in both and are left out (a fixed random condition).

Memory: the peak of live tensor bytes over the step (parameters, gradients, activations saved
for backward, temporaries). On CUDA: ``torch.cuda.max_memory_allocated`` minus what was
allocated before the step, plus the models' own bytes. On the CPU: `LiveTensorBytes`, a
dispatch-mode tracker that counts every tensor storage while it is alive, backward included
(PyTorch's CPU allocator keeps no statistics), because the process's peak RSS cannot be reset
between configurations, also counts the allocator's cached and fragmented pages and the runtime
(hundreds of MB of noise against a few MB here), and `tracemalloc` does not see torch's
allocations at all. Both count the same thing: what the allocator must hold at the worst moment.

    OMP_NUM_THREADS=1 python bench/memory.py [--frames 9 17 33 65] [--model PATH] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from lightning_grpo.grpo.loss import clipped_surrogate_loss
from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers import FlowSDESampler
from lightning_grpo.types import Condition

MIB = 2**20
GUIDANCE = 6.0  # HunyuanVideo's distilled guidance (the pipeline passes guidance_scale × 1000)


# --------------------------------------------------------------------------- the toy model


def build_toy_model(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A toy HunyuanVideo transformer and VAE of the real classes, random weights.

    VAE: 3 blocks, ×4 in space and ×4 in time (F = 4k + 1 frames → k + 1 latent frames), 4 latent
    channels; transformer: 1 dual + 1 single stream block, 2 heads of 16, 2×2 patches.
    """
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        spatial_compression_ratio=4, temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    return transformer, vae


def load_model(path: str) -> tuple[nn.Module, nn.Module]:
    """The transformer and VAE of a HunyuanVideo pipeline folder (e.g. the shipped toy one)."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    transformer = HunyuanVideoTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32)
    vae = AutoencoderKLHunyuanVideo.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    return transformer, vae


class ToyVideoPolicy(PolicyAdapter):
    """Just enough of a text-to-video adapter for `rollout()`: a fixed text condition, the
    transformer's velocity, the VAE's decode. Not a family (that is `policies/`): a bench harness.

    Latents are the VAE's [B, C, f, h, w]; pixels [B, F, 3, H, W] in [0, 1].
    """

    paradigm = "flow"

    def __init__(self, transformer: nn.Module, vae: nn.Module, num_frames: int, height: int, width: int, text_tokens: int = 16):
        super().__init__()
        spatial, temporal = vae.config.spatial_compression_ratio, vae.config.temporal_compression_ratio
        if (num_frames - 1) % temporal or height % spatial or width % spatial:
            raise ValueError(f"{num_frames} frames of {height}×{width}: the VAE needs 4k + 1 frames and sides divisible by {spatial}")
        self.transformer, self.vae = transformer, vae
        self.vae.requires_grad_(False)
        self.latent_shape = (transformer.config.in_channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("text", torch.randn(1, text_tokens, transformer.config.text_embed_dim, generator=generator))
        self.register_buffer("pooled", torch.randn(1, transformer.config.pooled_projection_dim, generator=generator))

    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        n = len(prompts)
        mask = torch.ones(n, self.text.shape[1], dtype=torch.long, device=self.text.device)
        return {"text": self.text.expand(n, -1, -1), "mask": mask, "pooled": self.pooled.expand(n, -1)}

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(batch_size, *self.latent_shape, generator=generator, device=self.text.device)

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        guidance = torch.full((latents.shape[0],), GUIDANCE * 1000.0, device=latents.device)
        return self.transformer(
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=condition["text"],
            encoder_attention_mask=condition["mask"], pooled_projections=condition["pooled"], guidance=guidance,
            return_dict=False,
        )[0]

    def decode_with_grad(self, latents: Tensor) -> Tensor:
        """VAE decode keeping the graph (ReFL): [B, C, f, h, w] → pixels [B, F, 3, H, W] in [0, 1]."""
        video = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]  # [B, 3, F, H, W]
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.decode_with_grad(latents)


class FrameReward(nn.Module):
    """A differentiable video reward stand-in: a 2-layer conv net on every frame, averaged. [B]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(16, 1, 3, padding=1))
        self.requires_grad_(False)

    def forward(self, pixels: Tensor) -> Tensor:  # pixels [B, F, 3, H, W]
        b, f = pixels.shape[:2]
        return self.net(pixels.flatten(0, 1)).view(b, f, -1).mean(dim=(1, 2))


# --------------------------------------------------------------------------- the two steps


@dataclass
class Bench:
    policy: ToyVideoPolicy
    sampler: FlowSDESampler
    reward: FrameReward
    train_index: int  # the trained timestep

    def zero_grad(self) -> None:
        self.policy.transformer.zero_grad(set_to_none=True)


def grpo_step(bench: Bench, mark: Callable[[str], None] = lambda phase: None) -> float:
    """Rollout, decode and reward without gradient (phase "sample"); GRPO update on one timestep
    (phase "update"). Returns the loss."""
    policy, sampler, i = bench.policy, bench.sampler, bench.train_index
    trajectory = rollout(policy, sampler, ["a clip"], group_size=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bench.reward(policy.decode(trajectory.latents[:, -1]))  # scored, never back-propagated
    mark("sample")
    x, x_next = trajectory.latents[:, i], trajectory.latents[:, i + 1]
    t = sampler.timesteps[i].expand(1).to(x.device)
    step = sampler.step(policy.predict(x, t, trajectory.condition), x, i, prev_sample=x_next)
    loss, _ = clipped_surrogate_loss(step.log_prob, trajectory.log_probs[:, i], torch.ones(1, device=x.device), clip_range=1e-4)
    loss.backward()
    mark("update")
    return float(loss.detach())


def refl_step(bench: Bench, mark: Callable[[str], None] = lambda phase: None) -> float:
    """ODE to the trained timestep without gradient; then x̂0, decode and reward with gradient. Returns the loss."""
    policy, sampler, i = bench.policy, bench.sampler, bench.train_index
    condition = policy.encode_prompts(["a clip"])
    x = policy.prepare_latents(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in range(i):
            x = sampler.ode_step(policy.predict(x, sampler.timesteps[k].expand(1).to(x.device), condition), x, k)
    v = policy.predict(x, sampler.timesteps[i].expand(1).to(x.device), condition)
    x0 = x - sampler.sigmas[i].to(x.device) * v  # flow_sde.py eq. F1
    loss = -bench.reward(policy.decode_with_grad(x0)).mean()
    loss.backward()
    mark("step")
    return float(loss.detach())


STEPS: dict[str, Callable[..., float]] = {"grpo": grpo_step, "refl": refl_step}


# --------------------------------------------------------------------------- measuring


def model_bytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive at once while active, and their peak.

    Every op's outputs pass through ``__torch_dispatch__`` (backward's ops too: the mode is part
    of the thread-local state the autograd engine carries); each new storage is counted once
    (views share it) and uncounted when it is freed (a finalizer on the storage, whose Python
    object PyTorch keeps alive exactly as long as the storage). Hand-written because PyTorch's
    own ``MemTracker`` refuses a module called more than once per iteration, which a rollout does.
    """

    def __init__(self, baseline: int = 0) -> None:
        super().__init__()
        self.current = self.peak = baseline
        self.phases: dict[str, int] = {}
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def mark(self, phase: str) -> None:
        """Record the peak since the last mark as ``phase``'s; the next phase starts from now."""
        self.phases[phase] = self.peak
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor) and value.device.type == "cpu":
                self._count(value.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size


def phase_peaks(fn: Callable[[Callable[[str], None]], object], modules: list[nn.Module], device: torch.device) -> dict[str, int]:
    """Peak live tensor bytes of each phase of ``fn(mark)`` (``mark(name)`` ends a phase), the
    modules' parameters and buffers included."""
    if device.type != "cuda":
        with LiveTensorBytes(baseline=model_bytes(*modules)) as tracker:
            fn(tracker.mark)
        return tracker.phases
    peaks: dict[str, int] = {}
    offset = model_bytes(*modules) - torch.cuda.memory_allocated(device)  # count from the models' bytes, like the CPU

    def mark(phase: str) -> None:
        torch.cuda.synchronize(device)
        peaks[phase] = torch.cuda.max_memory_allocated(device) + offset
        torch.cuda.reset_peak_memory_stats(device)

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(mark)
    return peaks


def measure(transformer: nn.Module, vae: nn.Module, num_frames: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak MiB and seconds of each step at ``num_frames`` frames."""
    device = torch.device(args.device)
    policy = ToyVideoPolicy(transformer, vae, num_frames, args.height, args.width).to(device)
    sampler = FlowSDESampler(num_steps=args.steps, eta=0.25, shift=5.0)  # the HunyuanVideo recipe's eta and shift
    bench = Bench(policy, sampler, FrameReward().to(device), train_index=args.steps // 2)
    row: dict[str, float] = {"latent_frames": policy.latent_shape[1]}
    for name, step in STEPS.items():
        bench.zero_grad()
        start = time.perf_counter()
        peaks = phase_peaks(lambda mark: step(bench, mark), [policy, bench.reward], device)
        row[f"{name}_s"] = time.perf_counter() - start
        row.update({f"{name}_{phase}": peak / MIB for phase, peak in peaks.items()})
        row[name] = max(peaks.values()) / MIB
    bench.zero_grad()
    return row


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def format_table(rows: dict[int, dict[str, float]]) -> str:
    lines = [
        "| frames | latent frames | GRPO: sample, no grad (MiB) | GRPO: update (MiB) | GRPO step peak (MiB) | ReFL step peak (MiB) | ReFL / GRPO |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for frames, row in rows.items():
        lines.append(
            f"| {frames} | {row['latent_frames']:.0f} | {row['grpo_sample']:.1f} | {row['grpo_update']:.1f} | {row['grpo']:.1f} "
            f"| {row['refl']:.1f} | {row['refl'] / row['grpo']:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 65], help="4k + 1 frame counts")
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of the rollout (no grad)")
    parser.add_argument("--model", default=None, help="HunyuanVideo pipeline folder; default: a toy model built here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    transformer, vae = load_model(args.model) if args.model else build_toy_model()
    transformer.requires_grad_(True)
    print(f"model: {args.model or 'toy, built from configs'}; transformer {model_bytes(transformer) / MIB:.2f} MiB, "
          f"VAE {model_bytes(vae) / MIB:.2f} MiB; {args.height}×{args.width}, device {args.device}")
    rows: dict[int, dict[str, float]] = {}
    for frames in args.frames:
        rows[frames] = measure(transformer, vae, frames, args)
        print(f"{frames} frames: GRPO {rows[frames]['grpo']:.1f} MiB ({rows[frames]['grpo_s']:.1f} s), "
              f"ReFL {rows[frames]['refl']:.1f} MiB ({rows[frames]['refl_s']:.1f} s)", flush=True)
    print(format_table(rows))
    frames = list(rows)
    grpo_slope = slope(frames, [rows[f]["grpo"] for f in frames]) if len(frames) > 1 else float("nan")
    refl_slope = slope(frames, [rows[f]["refl"] for f in frames]) if len(frames) > 1 else float("nan")
    last = frames[-1]
    update_slope = slope(frames, [rows[f]["grpo_update"] for f in frames]) if len(frames) > 1 else float("nan")
    print(f"growth per frame: GRPO step {grpo_slope:.3f} MiB (its update alone {update_slope:.3f}), ReFL {refl_slope:.3f} MiB")
    print(f"ReFL peak / GRPO peak at {last} frames: {rows[last]['refl'] / rows[last]['grpo']:.2f}× "
          f"({rows[last]['refl']:.1f} vs {rows[last]['grpo']:.1f} MiB); slope ratio {refl_slope / grpo_slope:.1f}×")


if __name__ == "__main__":
    main()
