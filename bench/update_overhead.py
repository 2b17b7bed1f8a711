"""GRPO update time ÷ the raw forward + backward time of the same denoiser calls.

Model: the shipped toy FLUX pipeline through `FluxPolicy`. The GRPO update (`train/time/update`
of a Lightning fit: timestep subsets, log-probs of the old samples, clipped surrogate loss,
manual_backward, grad-norm clip, AdamW step) is timed against a plain loop making the same
denoiser calls (same micro-batch, same latents and timesteps) with loss = mean(output²), backward
and the same number of AdamW steps. Medians over the steps after the first. Goal ≤ 1.10 (printed last).

    OMP_NUM_THREADS=1 python bench/update_overhead.py [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lightning_grpo.module import GRPOModule
from lightning_grpo.policies import FluxPolicy
from lightning_grpo.samplers import FlowSDESampler
from tests.training.fixtures import ListPrompts, Redness

TOY_FLUX = Path(__file__).resolve().parents[1] / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "flux"


class UpdateTimes(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(float(trainer.callback_metrics["train/time/update"]))


def raw_update(module: GRPOModule, calls: int, micro: int, optimizer_steps: int) -> float:
    """The same number of denoiser forward + backward calls on rollout-shaped inputs, plain."""
    policy, sampler = module.policy, module.sampler
    traj = module.last_step
    x = traj.latents[:micro].clone()
    condition = policy.encode_prompts(traj.prompts[:micro])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6)
    index = torch.arange(micro) % sampler.num_steps
    start = time.perf_counter()
    for n in range(calls):
        out = policy.predict(x, sampler.timesteps[index], condition)
        out.square().mean().backward()
        if (n + 1) % (calls // optimizer_steps) == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO iterations (the first is a warm-up)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    policy = FluxPolicy(str(TOY_FLUX), height=32, width=32, max_sequence_length=16)
    sampler = FlowSDESampler(num_steps=8, eta=1.0, shift=1.583)
    module = GRPOModule(
        policy=policy, sampler=sampler, rewards=[Redness()], group_size=args.group, timestep_fraction=0.5,
        micro_batch_size=args.micro, samples_per_update=None, clip_range=0.2, learning_rate=1e-6, show_progress=False,
    )
    prompts = ["a red circle at the top left", "a blue square at the bottom right"] * args.steps
    times = UpdateTimes()
    trainer = Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[times], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=ListPrompts(prompts, batch_size=2))
    samples, k = 2 * args.group, int(sampler.num_steps * 0.5)
    calls = samples // args.micro * k
    raw = [raw_update(module, calls, args.micro, optimizer_steps=1) for _ in range(args.steps)]
    t_grpo, t_raw = statistics.median(times.seconds[1:]), statistics.median(raw[1:])
    print(f"{samples} samples x {k} timesteps in micro-batches of {args.micro}: {calls} forward+backward calls, 1 AdamW step")
    print(f"GRPO update        {t_grpo * 1000:8.1f} ms (median of {len(times.seconds) - 1})")
    print(f"raw fwd+bwd+AdamW  {t_raw * 1000:8.1f} ms")
    print(f"update / raw ratio: {t_grpo / t_raw:.3f}")


if __name__ == "__main__":
    main()
