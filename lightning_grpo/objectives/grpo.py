"""GRPO (DanceGRPO, arXiv 2505.07818): the clipped surrogate on recomputed SDE log-probabilities."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_grpo.grpo.advantages import (
    BestOfNAdvantages,
    MultiRewardForm,
    StdMode,
    grpo_advantages,
    reward_advantages,
)
from lightning_grpo.grpo.loss import clipped_surrogate_loss, gaussian_kl
from lightning_grpo.noise import keyed_timestep_indices
from lightning_grpo.objectives.base import Prepared, RolloutNeeds, SelectingObjective, Targets
from lightning_grpo.samplers.step_schedule import trainable_policy_steps, trainable_steps
from lightning_grpo.types import GRPOStats, Rollout, index_condition
from lightning_grpo.validation import ConfigError, Range

if TYPE_CHECKING:
    from lightning_grpo.module import GRPOModule


class GRPO(SelectingObjective):
    """Group Relative Policy Optimisation over the denoising steps (DanceGRPO, Flow-GRPO).

    Targets: each reward normalised within its group (A_k = (r_k − mean_g) / (std + 1e-8)),
    optional best-of-n, combined as `multi_reward` says and clamped to ±adv_clip_max
    (`grpo.advantages.grpo_advantages`). Update: for a random subset of each sample's SDE steps,
    the step's log-probability is recomputed with gradient and the clipped surrogate
        mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))) + β·KL,  ρ = exp(log p_θ − log p_old)
    is minimised (`grpo.loss.clipped_surrogate_loss`). Rollouts are SDE rollouts with log-probs.

    Args:
        timestep_fraction: share of a sample's trainable (SDE) steps trained, a random subset per
            sample (0.6 for the flow recipes, 1.0 for SD).
        drop_last_timestep: never train on the last sampling step.
        clip_range: ε of the clipped ratio (FLUX recipe: 1e-4).
        adv_clip_max: advantages are clamped to ±adv_clip_max (5).
        advantage_std: "group" (per-group std, DanceGRPO) or "global" (batch std).
        best_of_n: (keep_top, keep_bottom) trajectories per group to train on, e.g. (4, 4) for the
            HunyuanVideo recipe; None trains on all. Samples are ranked by Σ_k w_k·A_k.
        best_of_n_advantages: "group" (default, DanceGRPO): the kept samples train on the
            advantages computed over the full group; "kept": every reward is re-normalised within
            the kept samples first.
        multi_reward: how several rewards make the loss. "sum" (default): A = clamp(Σ_k w_k·A_k)
            and one clipped loss; "per_reward" (DanceGRPO HunyuanVideo script): each A_k clamped,
            one clipped loss per reward, losses summed with the weights. The two differ when the
            clamp binds or when the ratio leaves the clip range while the A_k disagree in sign.
        kl_beta: weight of the KL to the frozen initial policy (0 = GRPO without KL, the paper's
            default; > 0 keeps `policy.kl_reference()`: nothing more with LoRA, whose reference
            is the denoiser with its adapters disabled; a frozen copy of the denoiser alone with
            full fine-tuning).

    `GRPOModule` takes each of these flat as well (`model.clip_range: ...`, the form of the
    recipes written before objectives existed); a flat option that is set overrides this one.
    """

    needs = RolloutNeeds(log_probs=True, shared_noise=True)
    ranges = {
        "timestep_fraction": Range(0, 1, low_open=True),
        "clip_range": Range(0, low_open=True),
        "adv_clip_max": Range(0, low_open=True, why="advantages are clamped to ±adv_clip_max: 0 makes every advantage 0, "
                                                    "a negative value sets every advantage to -adv_clip_max"),
        "kl_beta": Range(0, why="a negative weight rewards moving away from the initial policy"),
    }

    def __init__(
        self,
        timestep_fraction: float = 0.6,
        drop_last_timestep: bool = False,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantage_std: StdMode = "group",
        best_of_n: tuple[int, int] | None = None,
        best_of_n_advantages: BestOfNAdvantages = "group",
        multi_reward: MultiRewardForm = "sum",
        kl_beta: float = 0.0,
    ) -> None:
        super().__init__()
        self.timestep_fraction, self.drop_last_timestep = timestep_fraction, drop_last_timestep
        self.clip_range, self.adv_clip_max, self.advantage_std = clip_range, adv_clip_max, advantage_std
        self.best_of_n = None if best_of_n is None else tuple(best_of_n)
        self.best_of_n_advantages, self.multi_reward, self.kl_beta = best_of_n_advantages, multi_reward, kl_beta
        self.check_options()
        for name, value, allowed in (("multi_reward", multi_reward, ("sum", "per_reward")),
                                     ("best_of_n_advantages", best_of_n_advantages, ("group", "kept")),
                                     ("advantage_std", advantage_std, ("group", "global"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")

    def attach(self, module: GRPOModule) -> None:
        if module.sampler.eta <= 0:
            raise ValueError(f"the training sampler needs eta > 0 (got {module.sampler.eta}): an ODE sampler has no log-probability")
        check_best_of_n(self.best_of_n, module.hparams.group_size)

    # -- targets -------------------------------------------------------------------------------
    def targets(self, scores: dict[str, Tensor], weights: dict[str, float], group_size: int) -> Targets:
        """Advantages [B'] ("sum") or [B', K] ("per_reward") of the trained samples, best-of-n
        (`grpo.advantages.grpo_advantages`), and every reward's normalised values."""
        result = grpo_advantages(
            scores, weights, group_size, form=self.multi_reward, best_of_n=self.best_of_n,
            best_of_n_advantages=self.best_of_n_advantages, std_mode=self.advantage_std, clip_max=self.adv_clip_max,
        )
        values = result.advantages
        reward_weights = None if values.ndim == 1 else torch.tensor(list(weights.values()), dtype=torch.float32, device=values.device)
        per_reward = reward_advantages(scores, weights, group_size, std_mode=self.advantage_std)
        return Targets(values=values, chosen=result.chosen, per_reward=per_reward, reward_weights=reward_weights)

    # -- update --------------------------------------------------------------------------------
    def prepare(self, module: GRPOModule, rollout: Rollout, targets: Targets, seed: int) -> Prepared:
        """Each sample's random subset of its trainable steps [B', K], keyed by its (group, member)
        (`noise.keyed_timestep_indices`), so it is the same on any rank and in any batch."""
        candidates = trainable_steps(module.sampler, rollout.sde_steps, self.drop_last_timestep)
        candidates = trainable_policy_steps(module.policy, module.sampler, candidates)  # where its trained weights act
        steps = keyed_timestep_indices(rollout.sample_keys, candidates, self.timestep_fraction, seed).to(module.device)
        return Prepared(rollout=rollout, targets=targets, columns=steps, extra={})

    def loss(self, module: GRPOModule, prepared: Prepared, samples: Tensor, column: int) -> tuple[Tensor, GRPOStats]:
        """Clipped loss of samples `samples` [m] at their trained step of column `column`."""
        rollout, targets = prepared.rollout, prepared.targets
        index = prepared.columns[samples, column]  # [m]
        x = rollout.latents[samples, index]  # [m, *L]
        x_next = rollout.latents[samples, index + 1]  # [m, *L]
        condition = index_condition(rollout.condition, samples)
        t = module.sampler.timesteps.to(module.device)[index]  # [m]
        step = module.sampler.step(module.policy.predict(x, t, condition), x, index, prev_sample=x_next)
        kl = None
        if self.kl_beta > 0:
            with torch.no_grad():
                ref_out = module.policy.reference_predict(module.reference_policy, x, t, condition)
                ref_mean, _ = module.sampler.mean_and_std(ref_out, x, index, module.sampler.eta)
            kl = gaussian_kl(step.mean, ref_mean, step.std)
        return clipped_surrogate_loss(
            step.log_prob, rollout.log_probs[samples, index], targets.values[samples],
            clip_range=self.clip_range, adv_clip_max=self.adv_clip_max, kl=kl, kl_beta=self.kl_beta,
            reward_weights=targets.reward_weights,
        )

    def summarize(self, stats: list[GRPOStats]) -> dict[str, Tensor]:
        """Loss, ratio range (and its first update's distance from 1), clipped share, KLs."""
        return {
            "loss": torch.stack([s.loss for s in stats]).mean(),
            "ratio/mean": torch.stack([s.ratio_mean for s in stats]).mean(),
            "ratio/min": torch.stack([s.ratio_min for s in stats]).min(),
            "ratio/max": torch.stack([s.ratio_max for s in stats]).max(),
            "ratio/first_update_max_dev": (stats[0].ratio_max - 1).abs().maximum((stats[0].ratio_min - 1).abs()),
            "clip_fraction": torch.stack([s.clip_fraction for s in stats]).mean(),
            "approx_kl": torch.stack([s.approx_kl for s in stats]).mean(),
            "kl": torch.stack([s.kl for s in stats]).mean(),
        }


def check_best_of_n(best_of_n: tuple[int, int] | None, group_size: int) -> None:
    """best-of-n must keep between 2 and group_size samples per group."""
    if best_of_n is None:
        return
    top, bottom = best_of_n
    if top < 0 or bottom < 0 or not 2 <= top + bottom <= group_size:
        raise ConfigError(f"best_of_n {tuple(best_of_n)} must keep between 2 and group_size ({group_size}) samples per group")


__all__ = ["GRPO", "check_best_of_n"]
