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
- `mean_over_ranks`, `gather_objects_to_zero`, `broadcast_object`: the logged reward over every
  rank's samples, evaluation results split over the ranks and gathered (`evaluation.evaluate`);
- `denoiser_blocks`: the trainable denoiser and its block classes, the FSDP units;
- `DenoiserFSDPStrategy`: FSDP2 of the denoiser's blocks, sharded checkpoints (docs/scaling.md);

Every function is a no-op on one process, so the module calls them unconditionally.
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch import distributed as dist

from lightning_grpo.compat import set_module_device


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


def gather_objects_to_zero(value: Any) -> list[Any] | None:
    """[value of rank 0, value of rank 1, ...] on rank zero, None on the others ([value] on one
    process): for what only rank zero writes (an evaluation's pixels)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (`value` itself on one process)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_tensor(value: Tensor) -> Tensor:
    """[W, *value.shape]: every rank's `value` (same shape on every rank), rank-major."""
    if not is_distributed():
        return value.unsqueeze(0)
    parts = [torch.empty_like(value) for _ in range(world_size())]
    dist.all_gather(parts, value.contiguous())
    return torch.stack(parts)


def mean_over_ranks(sums: Tensor, count: int | float) -> Tensor | None:
    """Σ_ranks sums / Σ_ranks count ([K] per-quantity means over every rank's samples, weighted by
    their numbers: one all-reduce of [K + 1] values), or None when no rank counted a sample. Every
    rank must call it (a rank without samples with zero sums and count 0)."""
    local = torch.cat([sums.detach().double().flatten(), sums.new_tensor([float(count)], dtype=torch.float64)])
    if is_distributed():
        dist.all_reduce(local)
    return None if local[-1] <= 0 else (local[:-1] / local[-1]).to(sums.dtype)


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
def denoiser_blocks(policy: nn.Module) -> tuple[str, set[type[nn.Module]]]:
    """(attribute name, block classes) of the adapter's denoiser, as its family states them
    (`PolicyAdapter.denoiser_name`, `.block_classes`: the classes its diffusers
    `_no_split_modules` names, FSDP's units); a weight-free adapter is its own denoiser ("")
    and its own unit."""
    return policy.denoiser_name, policy.block_classes


__all__ = [
    "DenoiserFSDPStrategy", "GatheredScores", "UpdateSchedule", "all_gather_objects", "all_gather_tensor",
    "broadcast_object", "denoiser_blocks", "gather_by_key", "gather_objects_to_zero",
    "local_selection", "mean_over_ranks", "members_of_rank", "replicated_state_names", "skip_gradient_sync",
    "update_schedule",
]


# ---------------------------------------------------------------------------- FSDP
ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"]
SHARDING_STRATEGIES: tuple[str, ...] = get_args(ShardingStrategy)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DenoiserFSDPStrategy(ModelParallelStrategy):
    """FSDP for GRPO: the denoiser's blocks are the sharded units, everything frozen is replicated.

    Lightning's `ModelParallelStrategy` with FSDP2 (`torch.distributed.fsdp.fully_shard`) applied
    to the denoiser only, by `GRPOModule.configure_model` calling `shard_module`: each block of the
    family's block classes (`denoiser_blocks`: FluxTransformerBlock, HunyuanVideoTransformerBlock,
    the UNet's BasicTransformerBlock, ...) is one unit, the denoiser itself the root unit of what
    is left (embedders, final norm and projection), and the full fine-tuning KL reference (a
    frozen copy of the denoiser) is sharded the same way. Why not Lightning's `FSDPStrategy`
    (FSDP1): it wraps the whole LightningModule as the FSDP root, so `manual_backward` inside
    `training_step` runs inside the root's forward (FSDP1 refuses: Lightning issue 19626), and a
    denoiser call outside `training_step` (visualiser, held-out evaluation, monitor) sees flat
    shard views. FSDP2 gathers each unit in its own forward hooks wherever it is called.

    Frozen text encoders, VAE and rewards are not sharded: Lightning moves them to the training
    device, where every rank keeps a full copy (no communication for them). Checkpoints are
    torch distributed checkpoint folders: each rank writes its shard of the trainable weights and
    of the optimizer state (nothing is gathered), rank zero the rest (`meta.pt`); the frozen
    weights are left out as with any strategy (`GRPOModule.rebuilt_keys`).

    Args:
        sharding_strategy: "FULL_SHARD" (weights, gradients and optimizer state sharded over all
            ranks, each block re-sharded after its forward), "SHARD_GRAD_OP" (the same, but blocks
            stay gathered from forward to backward: more memory, one all-gather less per block),
            "HYBRID_SHARD" (sharded within a node, replicated across nodes: all-gathers and
            reduce-scatters stay on a node's fast links, one all-reduce across nodes per
            gradient; needs the same number of devices on every node).
        cpu_offload: keep the sharded weights, gradients and optimizer state in CPU memory
            (FSDP2 `CPUOffloadPolicy`): each block is copied to the device for its forward and
            backward, and AdamW steps on the CPU. Saves the optimizer state's 8 bytes per trained
            parameter (and the weights' and gradients') of device memory, at the cost of the
            copies and a CPU optimizer step. On CUDA the default process group then pairs gloo
            (for the offloaded CPU tensors) with NCCL.
        param_dtype: dtype the gathered weights are computed in ("bfloat16": half the all-gather
            traffic and memory of a gathered block; the sharded fp32 weights stay the master
            copy); None: the weights' own dtype.
        reduce_dtype: dtype gradients are reduce-scattered in (None: `param_dtype`'s).
        process_group_backend, timeout: as Lightning's `ModelParallelStrategy`.
    """

    def __init__(
        self,
        sharding_strategy: ShardingStrategy = "FULL_SHARD",
        cpu_offload: bool = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"sharding_strategy must be one of {', '.join(SHARDING_STRATEGIES)}, got {sharding_strategy!r}")
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(DTYPES)} or None, got {value!r}")
        if cpu_offload and process_group_backend is None and torch.cuda.is_available():
            # offloaded gradients are CPU tensors: their norm's all-reduce needs a CPU backend
            # beside NCCL (the usual set-up for FSDP2 CPU offload; not run here: no GPU was lent)
            process_group_backend = "cpu:gloo,cuda:nccl"
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend, timeout=timeout)
        self.sharding_strategy = sharding_strategy
        self.cpu_offload = cpu_offload
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self._shard_mesh: Any = None

    # -- process groups
    def setup_environment(self) -> None:
        """Lightning's set-up (process group, its 2-D mesh), then the mesh FSDP shards over: all
        ranks (1-D), or nodes × devices per node (replicate × shard) for HYBRID_SHARD."""
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        world, nodes = self.world_size, max(self.num_nodes, 1)
        if self.sharding_strategy == "HYBRID_SHARD":
            if world % nodes:
                raise ValueError(f"HYBRID_SHARD needs the same number of devices on every node: world size {world}, {nodes} nodes")
            self._shard_mesh = init_device_mesh(self.root_device.type, (nodes, world // nodes), mesh_dim_names=("replicate", "shard"))
        else:
            self._shard_mesh = init_device_mesh(self.root_device.type, (world,), mesh_dim_names=("shard",))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank is a data-parallel rank (FSDP shards weights, not data); Lightning's
        default counts the data-parallel dimension of its 2-D mesh only, i.e. the nodes."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # -- sharding
    def fully_shard_options(self) -> dict[str, Any]:
        """Keyword arguments of every `fully_shard` call (mesh, resharding, offload, precision)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        if self._shard_mesh is None:
            raise RuntimeError("DenoiserFSDPStrategy shards after the processes are set up (Trainer.fit/validate/test)")
        options: dict[str, Any] = {"mesh": self._shard_mesh, "reshard_after_forward": self.sharding_strategy != "SHARD_GRAD_OP"}
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if self.param_dtype is not None or self.reduce_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=DTYPES.get(self.param_dtype or ""), reduce_dtype=DTYPES.get(self.reduce_dtype or ""),
            )
        return options

    def shard_module(self, module: nn.Module) -> None:
        """Shard `module.policy`'s denoiser (and a full-fine-tuning KL reference) block by block.

        Called by `GRPOModule.configure_model`; a second call (fit, then test on the same module)
        finds them sharded and does nothing. Raises when a trainable parameter is left outside
        every unit: nothing would average its gradient over the ranks.
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.distributed.tensor import DTensor

        name, classes = denoiser_blocks(module.policy)
        reference = getattr(module, "reference_policy", None)
        # the family's trainable denoiser(s), and full fine-tuning's frozen denoiser copy
        targets = module.policy.fsdp_roots(reference if isinstance(reference, nn.Module) else None)
        options = self.fully_shard_options()
        for target in targets:
            if isinstance(target, FSDPModule):
                continue
            # deepest first: a unit's parameters are those not already in a unit below it
            for block in reversed(list(target.modules())):
                if type(block) in classes and block is not target:
                    fully_shard(block, **options)
            fully_shard(target, **options)
        outside = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if outside:
            raise ValueError(
                f"DenoiserFSDPStrategy shards the denoiser {name or type(module.policy).__name__!r} only, but "
                f"{len(outside)} trainable parameters are outside it, e.g. {outside[:3]}"
            )

    def model_to_device(self) -> None:
        """Everything not sharded to the training device. With `cpu_offload` the sharded units
        stay where FSDP2 keeps them (CPU): `Module.to` would move their shards to the device."""
        assert self.model is not None
        if not self.cpu_offload:
            self.model.to(self.root_device)
            return
        _move_unsharded(self.model, self.root_device)
        # LightningModule.device is read from a property that only `.to()` updates (private API: compat)
        set_module_device(self.model, self.root_device)

    # -- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's shards (DTensors, nothing gathered) and the unsharded trainable state,
        without what the module rebuilds from its config (frozen weights, rewards)."""
        assert self.model is not None
        skipped = _rebuilt_keys(self.lightning_module)
        return {key: value for key, value in self.model.state_dict().items() if key not in skipped}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the sharded checkpoint into a sibling folder, record the CRC-32 of every file in
        its `checksums.json`, then (rank zero, after every rank finished) put it in place of
        `filepath`: a crash while writing never leaves a partial checkpoint under the real name
        (each rank writes its own shard file; `meta.pt` last), and the folder is never in place
        without its checksums, which `verify_checkpoint` checks before a resume or a test reads
        it (the `.distcp` shards are not zip archives that carry CRCs of their own).

        The checksums are computed by every rank for its share of the files (file i by rank
        i mod W, mostly its own shard, just written), gathered to rank zero, which writes the
        manifest: no rank reads the whole checkpoint."""
        from lightning_grpo.checkpointing import checksum_entries, record_checksums

        target = Path(self.broadcast(str(filepath)))
        staging = target.with_name(f".{target.name}.partial")
        if self.is_global_zero and staging.exists():
            shutil.rmtree(staging)
        self.barrier("fsdp_checkpoint_staging")
        shards: dict[str, Any] = {}
        if "callbacks" in checkpoint:  # e.g. the EMA of sharded weights: each rank's part, not rank zero's meta.pt
            checkpoint["callbacks"] = _split_sharded(checkpoint["callbacks"], "callbacks", shards)
        super().save_checkpoint(checkpoint, staging, storage_options)
        if shards:
            from torch.distributed.checkpoint import save as dcp_save

            dcp_save(shards, checkpoint_id=staging / CALLBACK_SHARDS)
        self.barrier("fsdp_checkpoint_written")
        entries: dict[str, list[int]] = {}
        for part in all_gather_objects(checksum_entries(staging, part=(self.global_rank, self.world_size))):
            entries.update(part)
        if self.is_global_zero:
            record_checksums(staging, entries)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(staging, target)
        self.barrier("fsdp_checkpoint_in_place")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the shards of a sharded checkpoint into this rank's weights and optimizer state
        (torch distributed checkpoint reshards when the world size changed); return the rest.

        Only the keys the checkpoint holds are loaded (the rebuilt frozen ones are not in it), and
        they must be exactly the module's trainable state: each difference is named."""
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from lightning_grpo.checkpointing import SHARDED_METADATA, CheckpointError, is_sharded_checkpoint, sharded_keys

        path = Path(self.broadcast(str(checkpoint_path)))
        self._check_checkpoint(path)
        if not is_sharded_checkpoint(path):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a single file (written by DDP or one device); DenoiserFSDPStrategy "
                "resumes from its own sharded checkpoint folders only: resume it with the strategy that wrote it"
            )
        assert self.model is not None
        skipped = _rebuilt_keys(self.lightning_module)
        model_state = {key: value for key, value in self.model.state_dict().items() if key not in skipped}
        saved = sharded_keys(path, verify=False)
        missing, unexpected = sorted(set(model_state) - saved), sorted(saved - set(model_state))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not hold this model's trainable state: missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
        loaded = {"state_dict": model_state}
        dcp_load(loaded, checkpoint_id=path)  # in place, into this rank's shards
        self.model.load_state_dict(loaded["state_dict"], strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp_load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key])
        rest = torch.load(path / SHARDED_METADATA, weights_only=weights_only)
        if "callbacks" in rest:
            rest["callbacks"] = self._load_sharded_callbacks(path, rest["callbacks"])
        return rest

    def _load_sharded_callbacks(self, path: Path, states: Any) -> Any:
        """The callbacks' states with each sharded entry (`save_checkpoint` left a placeholder in
        `meta.pt`) read from the `callbacks/` shards into a DTensor sharded as the denoiser's
        parameters are now (torch distributed checkpoint reshards a checkpoint of another world
        size), its local part on the CPU."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        keys: list[str] = []
        _find_placeholders(states, keys)
        if not keys:
            return states
        folder = path / CALLBACK_SHARDS
        from lightning_grpo.checkpointing import CheckpointError

        if not (folder / SHARD_INDEX_NAME).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: its callbacks' sharded state {keys[:2]} is not in {CALLBACK_SHARDS}/")
        saved = FileSystemReader(folder).read_metadata().state_dict_metadata
        absent = [key for key in keys if key not in saved]
        if absent:
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {absent[:3]} missing from {CALLBACK_SHARDS}/")
        loaded = {key: self._sharded_empty(list(saved[key].size), saved[key].properties.dtype) for key in keys}
        dcp_load(loaded, checkpoint_id=folder)
        return _fill_placeholders(states, loaded)

    def _sharded_empty(self, size: list[int], dtype: torch.dtype) -> Any:
        """An uninitialised DTensor of global `size`, sharded as FSDP2 shards a parameter on this
        strategy's mesh (dim 0 in `torch.chunk` pieces over the shard dimension, replicated over
        HYBRID_SHARD's node dimension), its local part on the CPU."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = self._shard_mesh
        shard = (Shard(0),) if size else (Replicate(),)
        placements = (Replicate(), *shard) if mesh.ndim == 2 else shard
        local = list(size)
        for dim, placement in enumerate(placements):
            if isinstance(placement, Shard):
                local[0] = _chunk_length(local[0], mesh.size(dim), mesh.get_local_rank(dim))
        stride = [math.prod(size[i + 1 :]) for i in range(len(size))]
        return DTensor.from_local(torch.empty(local, dtype=dtype), device_mesh=mesh, placements=placements,
                                  shape=torch.Size(size), stride=tuple(stride), run_check=False)


    def _check_checkpoint(self, path: Path) -> None:
        """`check_checkpoint_file` shared by the ranks: each checks its share of a folder's files
        (file i by rank i mod W), the verdicts are gathered, and every rank raises the first
        error (naming the file), so none is left waiting in a collective and no rank reads the
        whole checkpoint."""
        from lightning_grpo.checkpointing import CheckpointError, check_checkpoint_file

        error: str | None = None
        try:
            check_checkpoint_file(path, part=(self.global_rank, self.world_size))
        except CheckpointError as err:
            error = str(err)
        found = next((e for e in all_gather_objects(error) if e is not None), None)
        if found is not None:
            raise CheckpointError(found)


CALLBACK_SHARDS = "callbacks"
"""Subfolder of a sharded checkpoint holding the callbacks' sharded state (a torch distributed
checkpoint of its own, e.g. the EMA of the sharded weights); `meta.pt` keeps a placeholder."""
SHARD_INDEX_NAME = ".metadata"
_PLACEHOLDER = "__sharded_in_callbacks_folder__"


def _split_sharded(tree: Any, where: str, found: dict[str, Any]) -> Any:
    """`tree` (nested dicts and lists) with every DTensor replaced by a placeholder naming its key
    in `found`, where the DTensor is put (keys are the leaves' paths)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        found[where] = tree
        return {_PLACEHOLDER: where}
    if isinstance(tree, dict):
        return {k: _split_sharded(v, f"{where}/{k}", found) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_split_sharded(v, f"{where}/{i}", found) for i, v in enumerate(tree))
    return tree


def _find_placeholders(tree: Any, keys: list[str]) -> None:
    if isinstance(tree, dict):
        if set(tree) == {_PLACEHOLDER}:
            keys.append(tree[_PLACEHOLDER])
            return
        for value in tree.values():
            _find_placeholders(value, keys)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _find_placeholders(value, keys)


def _fill_placeholders(tree: Any, loaded: dict[str, Any]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_PLACEHOLDER}:
            return loaded[tree[_PLACEHOLDER]]
        return {k: _fill_placeholders(v, loaded) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill_placeholders(v, loaded) for v in tree)
    return tree


def _chunk_length(total: int, parts: int, index: int) -> int:
    """Length of piece `index` of `total` rows cut in `parts` by `torch.chunk` (pieces of
    ceil(total / parts), the last ones shorter or empty): how FSDP2 and DTensor's Shard split."""
    size = -(-total // parts)
    start = min(total, index * size)
    return min(total, start + size) - start


def _rebuilt_keys(module: Any) -> set[str]:
    """State keys the module rebuilds from its config (`GRPOModule.rebuilt_keys`); none otherwise."""
    rebuilt = getattr(module, "rebuilt_keys", None)
    return set(rebuilt()) if callable(rebuilt) else set()


def _move_unsharded(module: nn.Module, device: torch.device) -> None:
    """`module.to(device)` for every part outside FSDP units (their shards stay where they are)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return
    if not any(isinstance(m, FSDPModule) for m in module.modules()):
        module.to(device)
        return
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise ValueError(f"{type(module).__name__} holds tensors of its own beside sharded submodules: cannot offload around it")
    for child in module.children():
        _move_unsharded(child, device)


# ============================================================================ the rank choreography of a step
# Where each group's samples live, which of them train, and how the ranks keep their collectives
# paired: everything of a training step that depends on the rank, in one place. GRPOModule calls
# `rank_prompts` before its rollout, `select_for_update` after scoring, `plan_update` and
# `micro_backward` for its update loop; each is the plain single-process computation on one process.
@dataclass
class RankPrompts:
    """What this rank rolls out: prompts P (every rank's when groups span ranks), their first
    frames [P, 3, H, W] or None, the global index of the first group, and the members of each
    group (None: all G)."""

    prompts: list[str]
    images: Tensor | None
    first_group: int
    members: range | None


def rank_prompts(prompts: list[str], images: Tensor | None, group_size: int, spans_ranks: bool) -> RankPrompts:
    """Groups on one rank: its own P prompts, groups rank·P.. (DDP's sampler gives every rank the
    same P), all G members. Groups spanning ranks: every rank's prompts (gathered, rank order),
    groups 0.., and this rank's G/W members of each."""
    if not spans_ranks:
        return RankPrompts(list(prompts), images, rank() * len(prompts), None)
    device = images.device if images is not None else None
    parts = all_gather_objects((list(prompts), None if images is None else images.cpu()))
    gathered = [p for part, _ in parts for p in part]
    frames = None if images is None else torch.cat([f for _, f in parts]).to(device)
    return RankPrompts(gathered, frames, 0, members_of_rank(group_size, rank(), world_size()))


@dataclass
class StepSelection:
    """What this rank trains on in one step, after scoring (`select_for_update`).

    Attributes:
        trained: the samples this rank trains [B'] (none: every group dropped, or best-of-n kept
            none of its members).
        targets: their `objectives.Targets` (`per_reward` of the `kept` samples).
        scores: {name: Tensor} of the trained samples, every rank's when groups span ranks (logging).
        kept: this rank's samples of the groups kept (the step record, the zero-weight padding).
        pixels: the kept samples' pixels.
        kept_scores: {name: Tensor} of the kept samples.
        group_size: samples per prompt on this rank (G, or G/W when groups span ranks).
        partial: groups were dropped, so the last optimizer step may hold fewer samples.
        all_dropped: no group was kept (`reward_failure="drop_group"`).
    """

    trained: Any
    targets: Any
    scores: dict[str, Tensor]
    kept: Any
    pixels: Tensor
    kept_scores: dict[str, Tensor]
    group_size: int
    partial: bool
    all_dropped: bool = False

    def record(self, reward_names: list[str], empty: bool = False) -> Any:
        """The step's `StepRecord` for callbacks. `empty`: the record of a rank that trained
        nothing while others did: no sample, its rollout's shapes (callbacks run collectives on
        records, so every rank must hold one: issue 27; they skip records without samples)."""
        from lightning_grpo.types import StepRecord

        kept, pixels = self.kept, self.pixels
        if empty:
            none = torch.zeros(0, device=pixels.device)
            return StepRecord(prompts=[], group_size=self.group_size, latents=kept.latents[:0, -1].detach(), pixels=pixels[:0].detach(),
                              scores={n: none for n in reward_names}, reward_advantages={n: none for n in reward_names}, advantages=none)
        return StepRecord(
            prompts=kept.prompts, group_size=self.group_size,
            latents=kept.latents[:, -1].detach().clone(),  # clone: do not keep all T+1 steps alive
            pixels=pixels.detach(), scores={k: v.detach() for k, v in self.kept_scores.items()},
            reward_advantages=self.targets.per_reward, advantages=self.targets.advantages,
        )


def select_for_update(
    rollout: Any, pixels: Tensor, scores: dict[str, Tensor], *, targets_of: Any, filter_groups: Any | None,
    group_size: int, spans_ranks: bool, members: range | None,
) -> StepSelection:
    """Steps 3b-4: drop the groups with a non-finite reward (`filter_groups`: the module's
    `GroupFilter` of scores, None to keep all), make the objective's targets (`targets_of`: scores
    of whole groups → `Targets`) and pick this rank's trained samples.

    Groups spanning ranks: the ranks' rewards are gathered by sample key, every rank drops and
    selects the same groups from the whole groups and keeps its own members of the result, which
    is exactly what one process holding every group computes."""
    if spans_ranks:
        return _select_spanning(rollout, pixels, scores, targets_of, filter_groups, group_size, members)
    num_rolled = rollout.batch_size
    if filter_groups is not None:
        kept = filter_groups(scores, num_rolled)
        if kept.dropped_groups and kept.keep.numel() == 0:  # nothing left; other ranks may still train
            from lightning_grpo.objectives.base import Targets

            empty = rollout.select(torch.zeros(0, dtype=torch.long))
            return StepSelection(empty, Targets.empty(), {}, rollout, pixels, scores, group_size, False, all_dropped=True)
        if kept.dropped_groups:
            keep = kept.keep.to(pixels.device)
            rollout, pixels, scores = rollout.select(keep), pixels[keep], {n: s[keep.to(s.device)] for n, s in scores.items()}
    targets = targets_of(scores)
    chosen = targets.chosen
    trained = rollout if chosen is None else rollout.select(chosen)
    trained_scores = scores if chosen is None else {n: s[chosen.to(s.device)] for n, s in scores.items()}
    return StepSelection(trained, targets, trained_scores, rollout, pixels, scores, group_size, rollout.batch_size < num_rolled)


def _select_spanning(rollout, pixels, scores, targets_of, filter_groups, group_size: int, members: range | None) -> StepSelection:
    """`select_for_update` on the gathered groups (see there)."""
    from lightning_grpo.objectives.base import Targets

    gathered = gather_by_key(scores, rollout.sample_keys, group_size)
    full, num_full = gathered.scores, gathered.num_groups * group_size
    kept_full = torch.arange(num_full, device=gathered.position.device)
    if filter_groups is not None:  # every rank sees every reward: the same groups go
        kept_full = filter_groups(full, num_full).keep.to(kept_full.device)
        full = {n: s[kept_full] for n, s in full.items()}
    kept, kept_rows = local_selection(gathered.position, kept_full, num_full)
    record = dict(kept=rollout.select(kept), pixels=pixels[kept], kept_scores={n: s[kept] for n, s in scores.items()},
                  group_size=len(members) if members is not None else group_size)
    partial = record["kept"].batch_size < rollout.batch_size
    if kept_full.numel() == 0:
        return StepSelection(rollout.select(kept), Targets.empty(), {}, partial=partial, all_dropped=True, **record)
    targets = targets_of(full)
    chosen_full = kept_full if targets.chosen is None else kept_full[targets.chosen]
    local, rows = local_selection(gathered.position, chosen_full, num_full)
    trained_scores = full if targets.chosen is None else {n: s[targets.chosen.to(s.device)] for n, s in full.items()}
    targets = targets.rows(rows)
    targets.per_reward = {n: v[kept_rows] for n, v in targets.per_reward.items()}
    return StepSelection(rollout.select(local), targets, trained_scores, partial=partial, **record)


@dataclass
class MicroStep:
    """One backward of the update: samples [m] (positions into this rank's trained samples) at
    trained column `column`; the loss is multiplied by m · `weight` (see `UpdateSchedule.weight`,
    divided by the columns per sample) so that every optimizer step follows the mean gradient over
    all ranks' samples × columns. `sync`: the last backward of its optimizer step, after which DDP
    all-reduces (every other one runs under `skip_gradient_sync`). `padding`: this rank has no
    sample in the optimizer step; a zero-weight backward keeps its all-reduce paired."""

    samples: Tensor
    column: int
    weight: float
    sync: bool
    padding: bool = False


def optimizer_steps(
    num_samples: int, per_update: int | None, agree: bool, order: Tensor, micro_batch_size: int, num_columns: int,
) -> list[list[MicroStep]]:
    """Per optimizer step of this rank's update, its backwards (`MicroStep`s), in the order they
    run: optimizer steps of `per_update` samples of the shuffled `order` [B] (`update_schedule`,
    the same number on every rank when `agree`), each made of micro-batches × columns."""
    schedule = update_schedule(num_samples, per_update, agree)
    steps = []
    for k_opt, positions in enumerate(schedule.local):
        samples_of_step = order[positions.start : positions.stop]
        # not split() alone: it cuts an empty tensor into one empty micro-batch, not into none
        micro_batches = samples_of_step.split(micro_batch_size) if len(positions) else ()
        weight = schedule.weight(k_opt) / num_columns
        calls = [(m, k) for m in micro_batches for k in range(num_columns)]
        if not calls:
            steps.append([MicroStep(order[:0], 0, 0.0, sync=True, padding=True)])
            continue
        steps.append([MicroStep(m, k, weight, sync=n == len(calls) - 1) for n, (m, k) in enumerate(calls)])
    return steps


def plan_update(
    num_samples: int, partial: bool, *, per_update: int | None, micro_batch_size: int, num_columns: int, order_seed: int,
    agree: bool, device: torch.device,
) -> list[list[MicroStep]]:
    """This rank's `optimizer_steps` over its `num_samples` trained samples in a random order (a
    generator of `order_seed`), after checking they split evenly (unless groups were dropped,
    `partial`, or the ranks `agree` on a schedule whose last step may be short)."""
    if not (partial or agree):
        check_divides(num_samples, per_update or num_samples, micro_batch_size)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(order_seed)).to(device)  # [B]
    return optimizer_steps(num_samples, per_update, agree, order, micro_batch_size, num_columns)


def micro_backward(module: Any, step: MicroStep, loss_of: Any, padding_rollout: Any) -> tuple[Tensor, Any] | None:
    """Run one `MicroStep`: `loss_of(samples, column)` → (mean loss, statistics), backpropagated
    with the weight m · `step.weight`, under `skip_gradient_sync` unless it is its optimizer step's
    synchronised backward; a padding step runs `padding_backward` on `padding_rollout` (None back)."""
    if step.padding:  # nothing of ours in this optimizer step: keep the all-reduce in step
        padding_backward(module, padding_rollout)
        return None
    strategy_model = module.trainer.strategy.model if module._trainer is not None else None
    with nullcontext() if step.sync else skip_gradient_sync(strategy_model):
        loss, stats = loss_of(step.samples, step.column)
        module.manual_backward(loss * step.samples.numel() * step.weight)
    return loss, stats


def padding_backward(module: Any, rollout: Any) -> None:
    """A backward of weight 0 through the policy on one sample of `rollout`: a rank with no sample
    in an optimizer step (`MicroStep.padding`) still runs the step's synchronised backward, so the
    ranks' gradient all-reduces stay paired (its gradients are zeros; the others' are averaged)."""
    x = rollout.latents[:1, 0]  # [1, *L] the initial noise: finite wherever the rollout skipped steps
    t = module.sampler.timesteps[:1].to(x.device)  # [1]
    condition = {key: value[:1] for key, value in rollout.condition.items()}
    module.manual_backward(module.policy.predict(x, t, condition).float().sum() * 0.0)


def check_divides(num_samples: int, per_update: int, micro_batch_size: int) -> None:
    """The trained samples must split into optimizer steps of `per_update`, each into micro-batches."""
    if num_samples % per_update or per_update % micro_batch_size:
        raise ValueError(
            f"{num_samples} trained samples per rollout must split into optimizer steps of samples_per_update="
            f"{per_update}, each made of micro-batches of {micro_batch_size}"
        )


def counts_may_differ(world: int, drop_nonfinite: bool, spans_ranks: bool, selects: bool) -> bool:
    """Ranks may train on different numbers of samples (so they must agree on the update schedule):
    groups dropped per rank, or a selection (best-of-n) over groups whose members live on several ranks."""
    return world > 1 and (drop_nonfinite or (spans_ranks and selects))


__all__ += [
    "MicroStep", "RankPrompts", "StepSelection", "check_divides", "counts_may_differ", "micro_backward", "optimizer_steps", "padding_backward",
    "plan_update", "rank_prompts", "select_for_update",
]
