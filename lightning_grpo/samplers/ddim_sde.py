"""DDIM-SDE sampler for diffusion models (DDPO/DanceGRPO form), on diffusers' DDIMScheduler.

The schedule (timesteps, ᾱ) comes from a real `diffusers.DDIMScheduler`, so a model's own
scheduler config (spacing, offsets, `set_alpha_to_one`, prediction type) is honoured; only the
transition math is restated here, because GRPO needs its mean and std, which `DDIMScheduler.step`
does not return.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_grpo.samplers.base import LogProbReduction, Sampler, gather_per_sample


def load_ddim_scheduler(pretrained_model_name_or_path: str, subfolder: str | None = "scheduler"):
    """DDIMScheduler from a local diffusers folder or hub id, with a clear error if absent."""
    from diffusers import DDIMScheduler

    try:
        return DDIMScheduler.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder)
    except (OSError, ValueError) as err:
        where = f"{pretrained_model_name_or_path}/{subfolder}" if subfolder else pretrained_model_name_or_path
        raise FileNotFoundError(f"cannot load a DDIM scheduler config from {where!r}: {err}") from err


class DDIMSDESampler(Sampler):
    """DDIM with η > 0: a Gaussian step whose mean equals `DDIMScheduler.step` without its noise.

    With ᾱ_t, ᾱ_prev the cumulative alphas of this and the next (less noisy) timestep:
        x̂0, ε̂ from the model output: ε-prediction x̂0 = (x − sqrt(1−ᾱ_t)·ε̂)/sqrt(ᾱ_t);
            v-prediction x̂0 = sqrt(ᾱ_t)·x − sqrt(1−ᾱ_t)·v, ε̂ = sqrt(ᾱ_t)·v + sqrt(1−ᾱ_t)·x;
            sample-prediction ε̂ = (x − sqrt(ᾱ_t)·x̂0)/sqrt(1−ᾱ_t)           (DDIM eq. 12)
        σ_t  = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))              (DDIM eq. 16)
        mean = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − σ_t²)·ε̂                 (DDIM eq. 12)
        std  = σ_t
    A step with σ_t = 0 (the last one when `set_alpha_to_one` is true) is deterministic: its
    log-prob is reported as 0 and `stochastic_steps()` leaves it out of training.

    Args:
        num_steps: DDIM steps T (DanceGRPO SD 1.4: 50).
        eta: DDIM η (SD 1.4 recipe: 1.0); 0 gives the deterministic DDIM ODE step.
        scheduler: a `diffusers.DDIMScheduler` (any other diffusers scheduler's config is converted).
        pretrained_model_name_or_path: alternatively, the diffusers folder or hub id to read
            `scheduler/scheduler_config.json` from.
        log_prob_reduction: "mean" (default) or "sum" over non-batch dimensions.
    """

    paradigm = "diffusion"

    def __init__(
        self,
        num_steps: int = 50,
        eta: float = 1.0,
        scheduler=None,
        pretrained_model_name_or_path: str | None = None,
        log_prob_reduction: LogProbReduction = "mean",
    ) -> None:
        from diffusers import DDIMScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if log_prob_reduction not in ("mean", "sum"):
            raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got {log_prob_reduction!r}")
        if scheduler is None:
            if pretrained_model_name_or_path is None:
                scheduler = DDIMScheduler()
            else:
                scheduler = load_ddim_scheduler(pretrained_model_name_or_path)
        elif not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        if scheduler.config.thresholding:
            raise ValueError("DDIMSDESampler does not support dynamic thresholding (scheduler.config.thresholding=True)")
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {scheduler.config.prediction_type!r}")
        scheduler.set_timesteps(num_steps)
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.eta = float(eta)
        self.log_prob_reduction = log_prob_reduction
        self.prediction_type = scheduler.config.prediction_type
        self.clip_sample_range = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None

        timesteps = scheduler.timesteps.long()  # [T] descending
        prev = timesteps - scheduler.config.num_train_timesteps // num_steps
        alphas = scheduler.alphas_cumprod.double()
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        self.timesteps = timesteps
        self.alpha_prod = alphas[timesteps].float()  # [T] ᾱ_t
        self.alpha_prod_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final).float()  # [T] ᾱ_prev
        # fp32 in DDIMScheduler._get_variance's order, so both round alike where 1 − ᾱ_prev − σ_t² cancels
        a, a_prev = self.alpha_prod, self.alpha_prod_prev
        self.variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # [T] σ_t² / η²

    def stochastic_steps(self) -> Tensor:
        if self.eta == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(self.variance > 0).flatten()

    def predict_x0_eps(self, model_output: Tensor, sample: Tensor, index: int | Tensor) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) from the model output for the scheduler's prediction type (DDIM eq. 12)."""
        x, out = sample.float(), model_output.float()
        a_t = gather_per_sample(self.alpha_prod, index, x)
        sqrt_a, sqrt_b = a_t.sqrt(), (1 - a_t).sqrt()
        if self.prediction_type == "epsilon":
            x0, eps = (x - sqrt_b * out) / sqrt_a, out
        elif self.prediction_type == "v_prediction":
            x0, eps = sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x
        else:
            x0, eps = out, (x - sqrt_a * out) / sqrt_b
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def mean_and_std(self, model_output: Tensor, sample: Tensor, index: int | Tensor, eta: float) -> tuple[Tensor, Tensor]:
        x0, eps = self.predict_x0_eps(model_output, sample, index)
        a_prev = gather_per_sample(self.alpha_prod_prev, index, x0)  # [B, 1, ...]
        std = eta * gather_per_sample(self.variance, index, x0).sqrt()  # (eq. 16)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps  # (eq. 12)
        return mean, std

    def __repr__(self) -> str:
        return (
            f"DDIMSDESampler(num_steps={self.num_steps}, eta={self.eta}, "
            f"prediction_type={self.prediction_type!r}, log_prob_reduction={self.log_prob_reduction!r})"
        )
