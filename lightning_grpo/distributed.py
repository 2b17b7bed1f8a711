"""What GRPO needs from torch.distributed, on top of Lightning's strategies (DDP, FSDP).

Lightning launches the processes, wraps the module and all-reduces gradients; this module adds
the few collective steps that are specific to GRPO:

- `skip_gradient_sync`: accumulation micro-steps run under DDP's `no_sync`, so gradients are
  all-reduced once per optimizer step (Lightning's manual optimisation otherwise all-reduces at
  every `manual_backward`);
- `update_schedule`: when ranks train on different numbers of samples (groups dropped for a
  non-finite reward, best-of-n over groups spanning ranks) they still run the same number of
  optimizer steps, each ending in one synchronised backward, and the loss of every sample is
  weighted by the *global* count of its optimizer step;
- `gather_by_key`: rewards of all ranks, placed by sample key, for group statistics of groups
  whose members live on several ranks;
- `denoiser_blocks`: the trainable denoiser and its block classes, the FSDP wrapping policy;
- `CommHookCounter`: a DDP communication hook that counts gradient all-reduces (tests, bench).

Every function is a no-op on one process, so the module calls them unconditionally.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch import distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def skip_gradient_sync(strategy_model: Any) -> AbstractContextManager:
    """`no_sync()` of a DDP-wrapped model (`trainer.strategy.model`): backward passes inside
    accumulate local gradients only; the next backward outside all-reduces the accumulated sum.

    Only DDP: FSDP's `no_sync` would keep full unsharded gradients on every rank (the memory
    FSDP exists to save), so FSDP reduce-scatters at every micro-step (docs/scaling.md).
    """
    if isinstance(strategy_model, nn.parallel.DistributedDataParallel):
        return strategy_model.no_sync()
    return nullcontext()


def all_gather_objects(value: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] (just [value] on one process)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_tensor(value: Tensor) -> Tensor:
    """[W, *value.shape]: every rank's `value` (same shape on every rank), rank-major."""
    if not is_distributed():
        return value.unsqueeze(0)
    parts = [torch.empty_like(value) for _ in range(world_size())]
    dist.all_gather(parts, value.contiguous())
    return torch.stack(parts)


# ---------------------------------------------------------------------------- update schedule
@dataclass
class UpdateSchedule:
    """How one rank's N local samples split into optimizer steps agreed by all ranks.

    Attributes:
        local: per optimizer step, the positions (into this rank's sample order) trained in it;
            an empty step still runs one zero-weight synchronised backward.
        global_counts: per optimizer step, the samples trained in it summed over ranks: the
            denominator of the mean gradient (DDP averages over ranks, so each rank weights a
            sample by world_size / global count).
        world_size: W.
    """

    local: list[range]
    global_counts: list[int]
    world_size: int = 1

    def weight(self, step: int) -> float:
        """Loss weight of one sample in optimizer step `step` (before dividing by K timesteps)."""
        return self.world_size / self.global_counts[step]


def update_schedule(num_samples: int, per_update: int | None, agree: bool) -> UpdateSchedule:
    """Split `num_samples` into consecutive optimizer steps of `per_update` samples (None: one
    step) — the same number of steps on every rank when `agree` (one all-gather of the counts).

    Without `agree` the ranks are assumed to hold equally many samples (DDP's padded sampler,
    groups on one rank) and nothing is communicated.
    """
    counts = [int(c) for c in all_gather_objects(num_samples)] if agree else [num_samples] * world_size()
    size = per_update or max(counts) or 1
    num_steps = max(math.ceil(c / size) for c in counts)
    local = [range(k * size, min((k + 1) * size, num_samples)) for k in range(num_steps)]
    totals = [sum(max(0, min(size, c - k * size)) for c in counts) for k in range(num_steps)]
    return UpdateSchedule(local=local, global_counts=totals, world_size=len(counts))


# ---------------------------------------------------------------------------- groups across ranks
@dataclass
class GatheredScores:
    """Every rank's rewards placed by sample key: full[name][g·G + j] is the reward of member j of
    group g, wherever it was rolled out; `position[b]` is where this rank's sample b sits."""

    scores: dict[str, Tensor]  # name -> [N·G]
    position: Tensor  # [B] long, into the full vectors
    num_groups: int


def gather_by_key(scores: dict[str, Tensor], keys: Tensor, group_size: int) -> GatheredScores:
    """All-gather the rewards of every rank and place them by (group, member) key.

    Args:
        scores: name -> Tensor[B] of this rank's samples.
        keys: LongTensor[B, 2] (global group, member) of those samples (`Rollout.sample_keys`).
        group_size: G; together the ranks must hold every member of every group exactly once.
    """
    device = next(iter(scores.values())).device
    position = (keys[:, 0] * group_size + keys[:, 1]).to(device)  # [B]
    names = list(scores)
    local = torch.stack([scores[n].float() for n in names] + [position.float()], dim=1)  # [B, R+1]
    gathered = all_gather_tensor(local).flatten(0, 1)  # [W·B, R+1]
    where = gathered[:, -1].long()
    total = where.numel()
    if total % group_size or not torch.equal(torch.sort(where).values, torch.arange(total, device=device)):
        raise ValueError(f"the ranks' samples do not cover every member of {total // group_size} groups exactly once")
    full = torch.empty_like(gathered[:, :-1])
    full[where] = gathered[:, :-1]
    return GatheredScores({n: full[:, i] for i, n in enumerate(names)}, position, total // group_size)


def members_of_rank(group_size: int, rank_: int, world: int) -> range:
    """The members j of every group that rank `rank_` rolls out when groups span `world` ranks."""
    if group_size % world:
        raise ValueError(f"groups spanning ranks need group_size ({group_size}) divisible by the world size ({world})")
    per_rank = group_size // world
    return range(rank_ * per_rank, (rank_ + 1) * per_rank)


def local_selection(position: Tensor, chosen: Tensor, num_full: int) -> tuple[Tensor, Tensor]:
    """Which of this rank's samples a full-index selection keeps, in selection order.

    Returns (local indices [B'], their rank in `chosen` [B']), so values computed on the chosen
    full samples (advantages) can be read for the local ones.
    """
    slot = torch.full((num_full,), -1, dtype=torch.long, device=position.device)
    slot[chosen.to(position.device)] = torch.arange(chosen.numel(), device=position.device)
    rows = slot[position]  # [B], -1 = not chosen
    local = torch.nonzero(rows >= 0).flatten()
    order = torch.argsort(rows[local])  # keep the selection's order (groups contiguous)
    return local[order], rows[local[order]]


# ---------------------------------------------------------------------------- DDP
def replicated_state_names(module: nn.Module) -> list[str]:
    """Names (within `module`) of its frozen parameters and of all its buffers: the state that DDP
    must neither broadcast nor reduce (`GRPOModule._ddp_params_and_buffers_to_ignore`).

    Why each can be left alone:
    - frozen parameters (text encoders, VAE, rewards, KL reference) are loaded from the same
      files on every rank and never change; DDP would broadcast them from rank zero when it wraps
      the module, and Lightning's `_sync_module_states` at every `validate`/`test` (gigabytes for
      T5-XXL or a reward VLM) for nothing;
    - buffers: GRPO keeps the policy in eval mode (`GRPOModule.train`) and every frozen part is a
      constant, so no forward changes a buffer (no BatchNorm statistics). DDP's default
      `broadcast_buffers` broadcasts them from rank zero at *every* wrapped forward (each
      `training_step`): a collective per step for nothing, and one that couples the ranks: a
      collective that one rank calls alone (e.g. `Trainer.log_dir` in a rank-zero branch) pairs
      with the other rank's buffer broadcast and writes its bytes into the text encoder's
      `position_ids` (the "index out of range" of issue 27). DDP also re-reads the module's
      buffers before each broadcast, so a buffer created lazily on one rank only would misalign
      the ranks' coalesced broadcasts. With every buffer ignored DDP's buffer list is empty and it
      skips the broadcast altogether (`DistributedDataParallel.will_sync_module_buffers`).
    Trainable parameters stay in: DDP broadcasts them once at wrap time (equal starting weights)
    and all-reduces their gradients.
    """
    frozen = [name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]
    return frozen + [name for name, _ in module.named_buffers(remove_duplicate=False)]


# ---------------------------------------------------------------------------- sharding
DENOISER_NAMES = ("transformer", "unet")
"""Attribute names under which the family adapters keep their trainable denoiser."""


def denoiser_blocks(policy: nn.Module) -> tuple[str, set[type[nn.Module]]]:
    """(attribute name, block classes) of the adapter's denoiser: the classes its diffusers
    `_no_split_modules` names (FluxTransformerBlock, BasicTransformerBlock, ...), which FSDP
    wraps as its units. Falls back to the denoiser's direct children's classes when the model
    declares none (the weight-free TinyPolicy has no denoiser attribute: its own class).

    Until the family layer exposes these, they are read by the names in `DENOISER_NAMES`.
    """
    for name in DENOISER_NAMES:
        denoiser = getattr(policy, name, None)
        if isinstance(denoiser, nn.Module):
            wanted = set(getattr(denoiser, "_no_split_modules", None) or [])
            base = getattr(denoiser, "base_model", denoiser)  # a peft-wrapped denoiser
            classes = {type(m) for m in base.modules() if type(m).__name__ in wanted}
            return name, classes or {type(child) for child in denoiser.children()}
    return "", {type(policy)}


# ---------------------------------------------------------------------------- counting
@dataclass
class CommHookCounter:
    """State of `count_allreduce_hook`: gradient buckets all-reduced so far, by bucket index.

    Register with `DDPStrategy(ddp_comm_state=counter, ddp_comm_hook=count_allreduce_hook)` on
    CUDA; Lightning registers comm hooks on CUDA only, so on CPU call
    `trainer.strategy.model.register_comm_hook(counter, count_allreduce_hook)` (e.g. at train start)."""

    process_group: Any = None
    calls: int = 0
    buckets: list[int] = field(default_factory=list)


def count_allreduce_hook(state: CommHookCounter, bucket):  # (state, dist.GradBucket) -> Future[Tensor]
    """DDP communication hook: count, then all-reduce the bucket as DDP's default does.

    Unannotated on purpose: DDP checks the annotations of a hook and rejects the strings that
    `from __future__ import annotations` makes of them."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.calls += 1
    state.buckets.append(bucket.index())
    return allreduce_hook(state.process_group, bucket)


__all__ = [
    "CommHookCounter", "DenoiserFSDPStrategy", "GatheredScores", "UpdateSchedule", "all_gather_objects", "all_gather_tensor",
    "count_allreduce_hook", "denoiser_blocks", "gather_by_key", "local_selection", "members_of_rank",
    "replicated_state_names", "skip_gradient_sync", "update_schedule",
]



# ---------------------------------------------------------------------------- FSDP
def frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The GRPOModule's parts without a trainable parameter: the policy's frozen components
    (text encoders, VAE), the rewards and the KL reference."""
    parts = [child for child in module.policy.children() if not any(p.requires_grad for p in child.parameters())]
    parts += [m for m in (getattr(module, "rewards", None), getattr(module, "reference_policy", None)) if m is not None]
    return [m for m in parts if any(True for _ in m.parameters())]


def sharded_root(strategy_model: Any) -> Any:
    """The FSDP root module when the strategy shards (its `clip_grad_norm_` gives the global
    norm over all shards), else None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return strategy_model if isinstance(strategy_model, FullyShardedDataParallel) else None


class DenoiserFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, wrapping the adapter's denoiser blocks as FSDP units.

    The wrapping policy is read from the module when it is set up (`denoiser_blocks`: e.g.
    FluxTransformerBlock, or the UNet's BasicTransformerBlock), unless `auto_wrap_policy` is
    given. `replicate_frozen` (default) leaves the frozen components, rewards and KL reference
    out of FSDP (`ignored_states`): each rank keeps a full copy and no all-gather runs for them;
    False shards them with the root unit (less memory, more communication). Every other
    argument is Lightning's `FSDPStrategy`'s (sharding_strategy, cpu_offload, mixed_precision...).
    """

    def __init__(self, *args: Any, replicate_frozen: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replicate_frozen = replicate_frozen

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(denoiser_blocks(model.policy)[1])
        if self.replicate_frozen and "ignored_states" not in self.kwargs:
            self.kwargs["ignored_states"] = frozen_modules(model)
        return super()._setup_model(model)
