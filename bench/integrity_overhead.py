"""What the reliability checks cost: checkpoint verification against loading, and the per-step
non-finite guard against the optimizer step it guards.

- checkpoint: a synthetic Lightning-shaped checkpoint of `--megabytes` of fp32 weights plus AdamW's
  two moments (3× the weights on disk), written by `AtomicCheckpointIO` (CRC-32 per record, as
  always); `verify_checkpoint` (every record re-read and its CRC checked) is timed against
  `torch.load` of the same file. The file is read once before timing (page cache warm for both).
- guard: what the guard adds to an optimizer step, `GRPOModule._check_weights_finite`'s work
  (`checkpointing.nonfinite_tensors`: a fused L2 norm per trainable tensor) plus the finiteness
  test of the gradient norm
  (computed before the guard existed, for logging), against `torch.optim.AdamW.step` on the same
  `--params-millions` parameters with gradients.
Medians of `--repeats` runs after one warm-up. The last line is the guard's share of an optimizer step.

    OMP_NUM_THREADS=1 python bench/integrity_overhead.py [--megabytes 256 --params-millions 16 --repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import timeit
from pathlib import Path

import torch

from lightning_grpo.checkpointing import _VERIFIED, AtomicCheckpointIO, nonfinite_tensors, verify_checkpoint


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls after one warm-up call (timeit's clock)."""
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def tensors(total_elements: int, count: int = 64) -> list[torch.Tensor]:
    size = max(1, total_elements // count)
    return [torch.randn(size) for _ in range(count)]


def checkpoint_costs(megabytes: int, repeats: int) -> tuple[float, float, int]:
    """(verify seconds, load seconds, file bytes)."""
    weights = tensors(megabytes * 2**20 // 4)
    checkpoint = {
        "state_dict": {f"policy.w{i}": w for i, w in enumerate(weights)},
        "optimizer_states": [{"state": {i: {"exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)} for i, w in enumerate(weights)}}],
        "global_step": 1,
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
        path.read_bytes()  # warm the page cache for both readers

        def verify() -> None:
            _VERIFIED.clear()  # no memo: the full check every time
            verify_checkpoint(path)

        verify_s = median_time(verify, repeats)
        load_s = median_time(lambda: torch.load(path, map_location="cpu", weights_only=True), repeats)
        return verify_s, load_s, path.stat().st_size


def guard_costs(millions: float, repeats: int) -> tuple[float, float]:
    """(guard seconds, AdamW step seconds) per optimizer step."""
    params = [torch.nn.Parameter(t) for t in tensors(int(millions * 1e6))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def guard() -> None:
        assert math.isfinite(float(norm))
        assert not nonfinite_tensors([p.detach() for p in params])

    return median_time(guard, repeats), median_time(optimizer.step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256, help="fp32 weights in the checkpoint (the file holds 3x with AdamW state)")
    parser.add_argument("--params-millions", type=float, default=16.0, help="trainable parameters for the guard")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    verify_s, load_s, size = checkpoint_costs(args.megabytes, args.repeats)
    print(f"checkpoint {size / 2**20:.0f} MiB: verify {verify_s:.3f} s ({size / 2**30 / verify_s:.2f} GiB/s), torch.load {load_s:.3f} s")
    print(f"verify / load: {verify_s / load_s:.2f}")
    guard_s, step_s = guard_costs(args.params_millions, args.repeats)
    print(f"{args.params_millions:g} M parameters: guard {guard_s * 1e3:.1f} ms, AdamW step {step_s * 1e3:.1f} ms")
    print(f"guard / optimizer step: {guard_s / step_s:.3f}")


if __name__ == "__main__":
    main()
