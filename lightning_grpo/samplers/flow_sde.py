"""Rectified-flow SDE sampler (DanceGRPO form, Flow-GRPO form as an option).

The flow model predicts a velocity v ≈ ε − x̂0 along x_σ = (1 − σ)·x0 + σ·ε, and the ODE
dx = v·dσ runs from σ = 1 (noise) to σ = 0 (data). GRPO needs stochastic steps with a known
Gaussian density, obtained by adding the score term of the reverse-time SDE.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from lightning_grpo.samplers.base import LogProbReduction, Sampler, gather_per_sample

NoiseForm = Literal["dance_grpo", "flow_grpo"]


def shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """σ_i = shift·t / (1 + (shift − 1)·t), t = linspace(1, 0, N + 1)   (SD3 time shift).

    Returns Tensor[N + 1] from 1 to 0; shift > 1 spends more steps at high noise.
    """
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1.0 + (shift - 1.0) * t)).float()


class FlowSDESampler(Sampler):
    """Stochastic Euler sampler for rectified flow with a per-step Gaussian log-prob.

    DanceGRPO form (default), with σ = σ_i, σ' = σ_{i+1}, dσ = σ' − σ < 0, η = eta:
        x̂0    = x − σ·v                                  (eq. F1)
        score = −(x − (1 − σ)·x̂0) / σ²                   (eq. F2)
        mean  = x + dσ·v − ½·η²·score·dσ                 (eq. F3)
        std   = η·sqrt(σ − σ')                           (eq. F4)
    Flow-GRPO form (noise_form="flow_grpo"), with s = η·sqrt(σ / (1 − σ)) (σ = 1 uses σ_1 in the
    denominator, as Flow-GRPO does, to stay finite):
        mean = x·(1 + s²·dσ / (2σ)) + v·(1 + s²·(1 − σ) / (2σ))·dσ   (eq. G1)
        std  = s·sqrt(−dσ)                                        (eq. G2)
    η = 0 reduces both to the Euler ODE step x + dσ·v.

    Args:
        num_steps: sampling steps T (DanceGRPO: 16).
        eta: SDE noise level η (FLUX 0.3, HunyuanVideo 0.25, SkyReels 0.3).
        shift: SD3 time shift of the sigma schedule (FLUX 3, HunyuanVideo 5, SkyReels 7).
        noise_form: "dance_grpo" (eqs. F1–F4) or "flow_grpo" (eqs. G1–G2).
        sigmas: explicit schedule of T + 1 decreasing values in [0, 1] (overrides `shift`), e.g.
            to reproduce a diffusers pipeline's own schedule.
        log_prob_reduction: "mean" (DanceGRPO) or "sum" of the per-element log-density.
    """

    paradigm = "flow"

    def __init__(
        self,
        num_steps: int = 16,
        eta: float = 0.3,
        shift: float = 3.0,
        noise_form: NoiseForm = "dance_grpo",
        sigmas: Sequence[float] | None = None,
        log_prob_reduction: LogProbReduction = "mean",
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if noise_form not in ("dance_grpo", "flow_grpo"):
            raise ValueError(f"noise_form must be 'dance_grpo' or 'flow_grpo', got {noise_form!r}")
        if log_prob_reduction not in ("mean", "sum"):
            raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got {log_prob_reduction!r}")
        if sigmas is None:
            schedule = shifted_sigmas(num_steps, shift)
        else:
            schedule = torch.as_tensor(list(sigmas), dtype=torch.float32)
            if schedule.ndim != 1 or len(schedule) != num_steps + 1:
                raise ValueError(f"sigmas must hold num_steps + 1 = {num_steps + 1} values, got {len(schedule)}")
            if not bool((schedule[1:] < schedule[:-1]).all()) or schedule[-1] < 0 or schedule[0] > 1:
                raise ValueError(f"sigmas must decrease strictly within [0, 1], got {schedule.tolist()}")
        self.num_steps = num_steps
        self.eta = float(eta)
        self.shift = float(shift)
        self.noise_form = noise_form
        self.log_prob_reduction = log_prob_reduction
        self.sigmas = schedule  # [T + 1]
        self.timesteps = schedule[:-1] * 1000.0  # [T], diffusers' flow-matching convention

    def mean_and_std(self, model_output: Tensor, sample: Tensor, index: int | Tensor, eta: float) -> tuple[Tensor, Tensor]:
        x = sample.float()  # [B, *L]
        v = model_output.float()  # [B, *L]
        sigma = gather_per_sample(self.sigmas[:-1], index, x)  # [B, 1, ...]
        sigma_next = gather_per_sample(self.sigmas[1:], index, x)  # [B, 1, ...]
        dsigma = sigma_next - sigma
        if self.noise_form == "dance_grpo":
            x0_hat = x - sigma * v  # (F1)
            score = -(x - (1.0 - sigma) * x0_hat) / sigma**2  # (F2)
            mean = x + dsigma * v - 0.5 * eta**2 * score * dsigma  # (F3)
            std = eta * torch.sqrt(sigma - sigma_next)  # (F4)
            return mean, std
        # Flow-GRPO: σ = 1 would divide by zero; it uses σ_1 in the denominator instead.
        sigma_max = float(self.sigmas[1])
        denom = torch.where(sigma >= 1.0, torch.full_like(sigma, 1.0 - sigma_max), 1.0 - sigma)
        s = eta * torch.sqrt(sigma / denom)
        mean = x * (1.0 + s**2 * dsigma / (2 * sigma)) + v * (1.0 + s**2 * (1.0 - sigma) / (2 * sigma)) * dsigma  # (G1)
        std = s * torch.sqrt(-dsigma)  # (G2)
        return mean, std

    def __repr__(self) -> str:
        return (
            f"FlowSDESampler(num_steps={self.num_steps}, eta={self.eta}, shift={self.shift}, "
            f"noise_form={self.noise_form!r}, log_prob_reduction={self.log_prob_reduction!r})"
        )


__all__ = ["FlowSDESampler", "shifted_sigmas"]
