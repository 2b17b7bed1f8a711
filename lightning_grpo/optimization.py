"""The optimizer of `GRPOModule` and its guarded step: AdamW with a linear warm-up, the gradient
norm (clipped to `max_grad_norm`) and the non-finite guard around every optimizer step.

The guard (`nonfinite="stop"|"skip"`): the gradient norm (the same on every rank: gradients are
all-reduced, so a NaN loss on one rank reaches every rank's norm) is checked before the step, the
trainable weights after it; a failing check stops the run with a `NonFiniteError` naming the
optimizer step, the quantity and the step's mean loss, or (gradient norm, "skip") drops that
optimizer step. Nothing of a failing step is ever checkpointed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_grpo.checkpointing import nonfinite_tensors
from lightning_grpo.errors import NonFiniteError


def adamw_with_warmup(policy: Any, hp: Any) -> dict[str, Any]:
    """AdamW (`learning_rate`, `adam_betas`, `adam_eps`, `weight_decay`) of the policy's trainable
    parameters and a linear warm-up over `lr_warmup_steps` optimizer steps, constant after:
    Lightning's `configure_optimizers` dict. ValueError when nothing is trainable."""
    params = policy.trainable_parameters()
    if not params:
        raise ValueError(f"{type(policy).__name__} has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, betas=tuple(hp.adam_betas), eps=hp.adam_eps, weight_decay=hp.weight_decay)
    warmup = max(0, hp.lr_warmup_steps)
    # LambdaLR, not LinearLR: LinearLR updates the rate by a chained ratio each step, which drifts
    # by an ulp (1e-5 after a 3-step warm-up stays at 9.999999999999999e-06 for the whole run);
    # this closed form is exactly learning_rate·(k+1)/warmup, then exactly learning_rate.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def gradient_norm(params: list[torch.nn.Parameter]) -> Tensor:
    """‖g‖₂ over every parameter's gradient (`torch.nn.utils.get_total_norm`, what
    `clip_grad_norm_` computes); under FSDP reduced over every rank's shards."""
    if not params:
        return torch.zeros(())
    return _full(torch.nn.utils.get_total_norm([p.grad for p in params]))


def guarded_step(module: Any, optimizer: Any, scheduler: Any, losses: list[Tensor]) -> Tensor:
    """Clip, step, and guard against non-finite values (see the module docstring); returns the
    gradient norm before clipping. `losses`: the step's micro-batch losses, for the messages."""
    hp = module.hparams
    params = [p for p in module.policy.trainable_parameters() if p.grad is not None]
    grad_norm = gradient_norm(params)  # computed once: checked, clipped with, logged
    if not torch.isfinite(grad_norm):
        message = nonfinite_message(module, "gradient norm", float(grad_norm), losses)
        if hp.nonfinite == "stop":
            raise NonFiniteError(message)
        warnings.warn(f"{message}: skipping this optimizer step (nonfinite='skip')", RuntimeWarning, stacklevel=4)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
    if hp.max_grad_norm is not None:  # clip_grad_norm_'s second half, with the norm above
        torch.nn.utils.clip_grads_with_norm_(params, hp.max_grad_norm, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    check_weights_finite(module, losses)
    return grad_norm


def check_weights_finite(module: Any, losses: list[Tensor] | None) -> None:
    """NonFiniteError naming the first trainable tensor holding NaN/inf after a step
    (`checkpointing.nonfinite_tensors`: a fused norm per tensor, on this rank's shards); with
    several ranks the verdict is all-reduced (a sharded model's NaN may sit on one rank only,
    and a rank stopping alone would leave the others waiting)."""
    named = [(name, p.detach()) for name, p in module.policy.named_parameters() if p.requires_grad]
    named = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in named]
    named = [(name, t) for name, t in named if t.numel()]
    bad_indices = nonfinite_tensors([t for _, t in named])
    bad = torch.tensor([1.0 if bad_indices else 0.0], device=module.device)
    if module._world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if not bad.item():
        return
    name = f"policy.{named[bad_indices[0]][0]}" if bad_indices else "on another rank"
    raise NonFiniteError(nonfinite_message(module, f"weight {name}", float("nan"), losses, after_step=True))


def nonfinite_message(module: Any, quantity: str, value: float, losses: list[Tensor] | None, after_step: bool = False) -> str:
    """"training diverged at optimizer step N: the <quantity> is <value> (mean loss ...)" with the remedy."""
    step = module.trainer.global_step if module._trainer is not None else 0
    step = step if after_step else step + 1  # the optimizer step that was being made
    loss = torch.stack([l.detach().float() for l in losses]).mean().item() if losses else None
    what = "not finite after the update" if after_step else f"{value}"
    return (
        f"training diverged at optimizer step {step}: the {quantity} is {what}"
        + ("" if loss is None else f" (mean loss of the step: {loss:.4g})")
        + f"; lower model.learning_rate (now {module.hparams.learning_rate:g}) or set model.max_grad_norm; "
        "nothing of this step is saved, the last checkpoint holds the weights before it"
    )


def _full(value: Tensor) -> Tensor:
    """A DTensor's full value (a norm reduced over the ranks' shards), a plain tensor as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


__all__ = ["adamw_with_warmup", "check_weights_finite", "gradient_norm", "guarded_step", "nonfinite_message"]
