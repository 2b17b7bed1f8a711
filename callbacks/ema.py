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
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn


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
        self._pending: dict[str, Any] | None = None  # state loaded before setup
        self._swapped = False

    # ------------------------------------------------------------------ state
    @staticmethod
    def tracked(pl_module: LightningModule) -> dict[str, nn.Parameter]:
        """The averaged parameters: the policy's trainable ones, by name."""
        trainable = {id(p) for p in pl_module.policy.trainable_parameters()}
        return {name: p for name, p in pl_module.policy.named_parameters() if id(p) in trainable}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.weights:
            self.weights = {name: p.detach().clone().to(self.device or p.device) for name, p in self.tracked(pl_module).items()}
        if stage == "fit" and self.use_for_rollouts:
            pl_module.rollout_weights = lambda: self.applied(pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.use_for_rollouts:
            pl_module.rollout_weights = nullcontext

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu() for k, v in self.weights.items()}
        return {"weights": weights, "num_updates": self.num_updates, "last_update_step": self.last_update_step}

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
            self.weights[name].copy_(value)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refuse_sharded(pl_module)
        self._apply_pending(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refuse_sharded(pl_module)
        self._apply_pending(pl_module)

    def _refuse_sharded(self, pl_module: LightningModule) -> None:
        """EMA keeps full copies of the weights and saves them in rank zero's part of the
        checkpoint: under FSDP (sharded DTensor weights) that would be one rank's shards only."""
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.tracked(pl_module).values()):
            raise ValueError(
                "the EMA callback does not support sharded weights (DenoiserFSDPStrategy): its averaged weights would be "
                "full copies on every rank and be checkpointed from rank zero's shards only; remove EMA or train with DDP"
            )

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
        for name, p in self.tracked(pl_module).items():
            self.weights[name].lerp_(p.detach().to(self.weights[name].device), 1 - decay)
        self.num_updates += 1
        self.last_update_step = step

    # ------------------------------------------------------------------ swapping
    @contextmanager
    def applied(self, pl_module: LightningModule) -> Iterator[None]:
        """Within the block, the policy's trainable parameters hold the EMA values; the current
        values are restored on exit (swapped, so no extra copy of the weights is kept: inside the
        block `self.weights` holds the current values)."""
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
        for name, p in self.tracked(pl_module).items():
            ema = self.weights[name]
            current = p.detach().clone()
            p.copy_(ema.to(p.device))
            ema.copy_(current.to(ema.device))
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.use_for_validation and not self._swapped:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.use_for_validation and self._swapped:
            self._swap(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
