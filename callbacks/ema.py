"""Exponential moving average (EMA) of the policy's trainable weights.

Why not Lightning's `WeightAveraging` / `EMAWeightAveraging` (present in lightning 2.6)? It wraps
the *whole* LightningModule in `torch.optim.swa_utils.AveragedModel`, i.e. deep-copies frozen text
encoders, the VAE, reward models and the KL reference too (tens of GB for FLUX + HPS), and its
`on_save_checkpoint` puts the averaged full state into `state_dict` and the current one under
`current_model_state`, which defeats GRPOModule leaving frozen weights out of checkpoints. It also
copies the average into the model when training ends (so `last.ckpt` would resume from EMA
weights), swaps only for validation, and has no hook for rollouts. This callback averages only
`policy.trainable_parameters()` (the denoiser or its LoRA weights), keeps them in its own
`state_dict` (saved under `checkpoint["callbacks"]`), and swaps them in only where asked.

Sharded weights (`DenoiserFSDPStrategy`, FSDP2): each rank averages its own shards (the local
part of each DTensor parameter, `to_local()`), so the average costs 1/W of the weights per rank
and no communication; the averaged shards are checkpointed as DTensors, which the strategy writes
into the sharded checkpoint (every rank its own part, nothing gathered) and loads back on resume;
swapping writes the averaged shards into the parameters' shards, so every sharded forward
(evaluation, test, visualiser) computes with the average.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn


def _local(value: Tensor) -> Tensor:
    """This rank's part of a DTensor (a sharded parameter); a plain tensor as is."""
    to_local = getattr(value, "to_local", None)
    return to_local() if callable(to_local) else value


def _resharded(pl_module: LightningModule) -> None:
    """Register every FSDP2 unit of the policy's sharded parameters (a unit left gathered after a
    forward without backward, `reshard_after_forward=False`, shows its full tensors instead)."""
    from torch.distributed.fsdp import FSDPModule

    for module in pl_module.policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _shards_parameters(trainer: Trainer | None) -> bool:
    """Whether the trainer's strategy shards the policy in `configure_model` (after `setup`)."""
    return trainer is not None and callable(getattr(getattr(trainer, "strategy", None), "shard_module", None))


class EMA(Callback):
    """EMA of the policy's trainable weights, swapped in for validation, test, visualisation and
    held-out evaluation, and optionally for rollouts.

    After every optimizer step that passes `update_every_n_steps` / `start_step`:
    ema ← decay·ema + (1 − decay)·θ. Before `start_step` the EMA simply tracks θ.

    Args:
        decay: EMA decay per update (0.999 ≈ an average over the last ~1000 updates).
        update_every_n_steps: update after every this many optimizer steps.
        start_step: optimizer step from which averaging starts (the EMA copies θ until then).
        use_for_validation: swap EMA weights in during validation epochs.
        use_for_test: swap EMA weights in during `lightning-grpo test` (from the callback state in
            `--ckpt_path`; without EMA state the current weights are tested, with a warning).
        use_for_rollouts: roll out (sample the training trajectories) with EMA weights. The update
            still differentiates the current weights, so the first ratio of a step is no longer 1:
            the behaviour policy is the EMA; keep `clip_range` wide enough for that gap.
        device: where to keep the EMA weights (default: with the policy; "cpu" saves accelerator
            memory at the cost of a copy per update).

    Under FSDP (`DenoiserFSDPStrategy`) each rank keeps the average of its own shards (see the
    module doc); they are built once the strategy has sharded the policy.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        use_for_validation: bool = True,
        use_for_test: bool = True,
        use_for_rollouts: bool = False,
        device: str | None = None,
    ) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.use_for_validation = use_for_validation
        self.use_for_test = use_for_test
        self.use_for_rollouts = use_for_rollouts
        self.device = torch.device(device) if device is not None else None
        self.weights: dict[str, Tensor] = {}  # parameter name (within the policy) -> EMA value
        self.num_updates = 0
        self.last_update_step = 0
        self._pending: dict[str, Any] | None = None  # state loaded before the weights were built
        self._swapped = False
        self._layout: dict[str, tuple[Any, ...]] = {}  # sharded: name -> (mesh, placements, shape, stride) of its DTensor

    # ------------------------------------------------------------------ state
    @staticmethod
    def tracked(pl_module: LightningModule) -> dict[str, nn.Parameter]:
        """The averaged parameters: the policy's trainable ones, by name."""
        trainable = {id(p) for p in pl_module.policy.trainable_parameters()}
        return {name: p for name, p in pl_module.policy.named_parameters() if id(p) in trainable}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.weights and not _shards_parameters(trainer):  # sharded: built after `configure_model`
            self._materialize(pl_module)
        if stage == "fit" and self.use_for_rollouts:
            pl_module.rollout_weights = lambda: self.applied(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.use_for_rollouts:
            pl_module.rollout_weights = nullcontext

    def _tracked_local(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The tracked parameters' values on this rank: whole tensors, or each DTensor's local shard."""
        _resharded(pl_module)
        return {name: _local(p) for name, p in self.tracked(pl_module).items()}

    @torch.no_grad()
    def _materialize(self, pl_module: LightningModule) -> None:
        """Start the average from the current weights (this rank's shards when sharded), where
        none is kept yet, then take in a state loaded from a checkpoint before that."""
        if not self.weights:
            self._layout = {}
            _resharded(pl_module)
            for name, p in self.tracked(pl_module).items():
                local = _local(p)
                self.weights[name] = local.detach().clone().to(self.device or local.device)
                if local is not p:  # a DTensor: how to checkpoint the shard as one (see `state_dict`)
                    self._layout[name] = (p.device_mesh, tuple(p.placements), p.shape, p.stride())
        self._apply_pending(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (CPU) and the counters. Sharded: each weight is a DTensor of this
        rank's averaged shard, which `DenoiserFSDPStrategy` writes into the sharded checkpoint
        (each rank its part; nothing is gathered)."""
        if not self.weights and self._pending is not None:  # loaded, not yet applied
            weights = dict(self._pending)
        else:
            weights = {k: self._as_saved(k, v.detach().cpu()) for k, v in self.weights.items()}
        return {"weights": weights, "num_updates": self.num_updates, "last_update_step": self.last_update_step}

    def _as_saved(self, name: str, value: Tensor) -> Tensor:
        layout = getattr(self, "_layout", {}).get(name)
        if layout is None:
            return value
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = layout
        return DTensor.from_local(value, device_mesh=mesh, placements=placements, shape=shape, stride=stride, run_check=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self.last_update_step = state_dict["last_update_step"]
        if self.weights:
            self._load_weights(state_dict["weights"])
        else:
            self._pending = state_dict["weights"]

    def _load_weights(self, saved: dict[str, Tensor]) -> None:
        if set(saved) != set(self.weights):
            raise KeyError(f"EMA state does not match the policy's trainable parameters: {sorted(set(saved) ^ set(self.weights))}")
        for name, value in saved.items():
            local = _local(value)  # a sharded checkpoint's DTensor: this rank's part
            if local.shape != self.weights[name].shape:
                raise ValueError(
                    f"EMA state of {name!r} has shape {list(local.shape)} on this rank, the weights {list(self.weights[name].shape)}: "
                    "a checkpoint of whole weights cannot be loaded into sharded ones, or the other way round"
                )
            self.weights[name].copy_(local)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._materialize(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._materialize(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._materialize(pl_module)

    def _apply_pending(self, pl_module: LightningModule) -> None:
        if self._pending is not None:
            self._load_weights(self._pending)
            self._pending = None

    # ------------------------------------------------------------------ averaging
    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Once per rollout, after its optimizer steps (the update is inside `training_step`)."""
        step, every = trainer.global_step, self.update_every_n_steps
        if step // every <= self.last_update_step // every:  # no multiple of `every` crossed since the last update
            return
        decay = self.decay if step > self.start_step else 0.0
        self._materialize(pl_module)
        for name, value in self._tracked_local(pl_module).items():  # sharded: this rank's shards only
            self.weights[name].lerp_(value.detach().to(self.weights[name].device), 1 - decay)
        self.num_updates += 1
        self.last_update_step = step

    # ------------------------------------------------------------------ swapping
    @contextmanager
    def applied(self, pl_module: LightningModule) -> Iterator[None]:
        """Within the block, the policy's trainable parameters hold the EMA values; the current
        values are restored on exit (swapped, so no extra copy of the weights is kept: inside the
        block `self.weights` holds the current values)."""
        if not self._swapped:
            self._materialize(pl_module)
        if self._swapped or not self.weights:  # nested use or nothing to swap
            yield
            return
        self._swap(pl_module)
        try:
            yield
        finally:
            self._swap(pl_module)

    @torch.no_grad()
    def _swap(self, pl_module: LightningModule) -> None:
        """Exchange the parameters' values (sharded: this rank's shards, in place, which FSDP2
        gathers in the next forward) with the kept ones."""
        for name, value in self._tracked_local(pl_module).items():
            ema = self.weights[name]
            current = value.detach().clone()
            value.copy_(ema.to(value.device))
            ema.copy_(current.to(ema.device))
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._materialize(pl_module)
        if self.use_for_validation and not self._swapped:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.use_for_validation and self._swapped:
            self._swap(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._materialize(pl_module)
        if self.use_for_test and not self._swapped:
            if self.num_updates == 0:
                rank_zero_warn("EMA: no averaged weights (no EMA state in the checkpoint); testing the current weights")
            self._swap(pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.use_for_test and self._swapped:
            self._swap(pl_module)


def ema_weights(trainer: Trainer | None, pl_module: LightningModule):
    """A context that swaps in the EMA weights of the trainer's `EMA` callback, or does nothing
    when there is none (used by the visualiser and held-out evaluation)."""
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, EMA):
            return callback.applied(pl_module)
    return nullcontext()
