"""GRPO rollout time ÷ the diffusers pipeline's own __call__, same model, batch, steps, resolution.

Model: the shipped toy FLUX pipeline (FluxTransformer2DModel etc., lightning_grpo/worlds/shapes/pretrained/flux),
loaded once by `FluxPipeline.from_pretrained` and once by `FluxPolicy` (the same weights).
- pipeline: `FluxPipeline(prompts, num_images_per_prompt=G, num_inference_steps=T, output_type="latent")`
- GRPO:     `rollout(policy, FlowSDESampler(T, eta), prompts, G)` (all P·G samples batched, log-probs kept,
            per-sample keyed noise), and `rollout_batch_size=1` (one sample at a time, as the official
            DanceGRPO loop) for the speed-up of batching.
Times are medians of `--repeats` runs after one warm-up. Goal: ratio ≤ 1.05 (printed last).

    OMP_NUM_THREADS=1 python bench/rollout_overhead.py [--prompts 2 --group 8 --steps 8 --size 32]
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from pathlib import Path

import torch

from lightning_grpo.policies import FluxPolicy
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers import FlowSDESampler

TOY_FLUX = Path(__file__).resolve().parents[1] / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "flux"


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls after one warm-up call (timeit's clock)."""
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from diffusers import FluxPipeline

    prompts = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle", "a yellow circle"][: args.prompts]
    pipe = FluxPipeline.from_pretrained(TOY_FLUX).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    policy = FluxPolicy(str(TOY_FLUX), height=args.size, width=args.size, max_sequence_length=pipe.tokenizer_2.model_max_length).eval()
    sampler = FlowSDESampler(num_steps=args.steps, eta=1.0, sigmas=policy.pipeline_sigmas(args.steps))
    max_len = policy.max_sequence_length

    def pipeline_call():
        with torch.no_grad():
            pipe(prompts, num_images_per_prompt=args.group, num_inference_steps=args.steps, height=args.size, width=args.size,
                 output_type="latent", max_sequence_length=max_len, generator=torch.Generator().manual_seed(0))

    def grpo(chunk):
        return lambda: rollout(policy, sampler, prompts, args.group, torch.Generator().manual_seed(0), chunk_size=chunk)

    batch = args.prompts * args.group
    t_pipe = median_time(pipeline_call, args.repeats)
    t_grpo = median_time(grpo(None), args.repeats)
    t_loop = median_time(grpo(1), max(1, args.repeats // 2))
    print(f"batch {batch} samples, {args.steps} steps, {args.size}x{args.size} px, threads {torch.get_num_threads()}")
    print(f"pipeline __call__      {t_pipe * 1000:9.1f} ms")
    print(f"GRPO rollout (batched) {t_grpo * 1000:9.1f} ms")
    print(f"GRPO one sample a time {t_loop * 1000:9.1f} ms  (speed-up of batching: {t_loop / t_grpo:.2f}x)")
    print(f"rollout / pipeline ratio: {t_grpo / t_pipe:.3f}")


if __name__ == "__main__":
    main()
