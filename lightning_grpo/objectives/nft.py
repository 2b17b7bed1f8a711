"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv 2509.16117; official code NVlabs/DiffusionNFT): RL of a flow model on the forward process.

No log-probability and no SDE: the rollout may use any ODE solver, only the clean samples x₀ are
trained on. Each is noised again at timesteps t of the sampling schedule, x_t = (1 − t)·x₀ + t·ε,
and the model's velocity v_θ(x_t) is pushed through two implicit policies of the old (sampling)
policy v_old and the trained one (the paper's policy-improvement objective):

    v⁺ = (1 − β)·v_old + β·v_θ      (implicit positive policy)                       (N1)
    v⁻ = (1 + β)·v_old − β·v_θ      (implicit negative policy)                       (N2)

weighted by the reward mapped to r ∈ [0, 1]: r = clamp(A / (2·A_max) + 1/2, 0, 1), A the group-
normalised advantage clamped to ±A_max (`adv_clip_max`)                                 (N3)

    L = A_max/β · mean_samples[ r·ℓ(v⁺) + (1 − r)·ℓ(v⁻) ] + λ_KL·mean‖v_θ − v_ref‖²      (N4)

where ℓ(v) = mean‖x̂₀(v) − x₀‖² / w (the official code's x₀-space form with adaptive weighting):
x̂₀(v) = x_t − t·v, and w = max(mean|x̂₀(v) − x₀|, 1e-5), a per-sample constant without gradient. Since
x_t − x₀ = t·(ε − x₀), x̂₀(v) − x₀ = t·(v* − v) with v* = ε − x₀ the flow-matching target: without
the weight ℓ is t²‖v − v*‖², the paper's flow-matching loss of the implicit policies. The factor
A_max/β is the official code's scale of the policy loss.

After each rollout's optimizer steps the old policy follows the trained one softly (the official
"decay" schedule): θ_old ← d·θ_old + (1 − d)·θ, d = min(old_decay_rate·max(step − old_decay_start,
0), old_decay_max), 0 before `old_decay_start` (official type 1: rate 0.001, max 0.5, start 0).  (N5)
The rollout samples with θ_old (`sampling_weights`), as the official code does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from lightning_grpo.grpo.advantages import BestOfNAdvantages, StdMode, grpo_advantages, reward_advantages
from lightning_grpo.noise import keyed_timestep_indices, sample_seed
from lightning_grpo.objectives.base import Prepared, RolloutNeeds, SelectingObjective, Targets
from lightning_grpo.objectives.grpo import check_best_of_n
from lightning_grpo.samplers.step_schedule import trainable_policy_steps
from lightning_grpo.types import Rollout, index_condition
from lightning_grpo.validation import ConfigError, Range

if TYPE_CHECKING:
    from lightning_grpo.module import GRPOModule

WEIGHT_FLOOR = 1e-5
"""Lower bound of the adaptive weight w (official value), so a perfect prediction does not divide by 0."""


class DiffusionNFT(SelectingObjective):
    """Diffusion Negative-aware FineTuning: forward-process RL of flow models (module docstring).

    Args:
        beta: β of the implicit policies (N1, N2): how far the trained policy steps from the old
            one (official: 1.0 by default, 0.1 for OCR/PickScore).
        adv_clip_max: A_max, advantages are clamped to ±A_max before being mapped to r (N3) (5).
        timestep_fraction: share of the sampling schedule's timesteps each sample is noised at and
            trained on, a random subset per sample (official 0.99: all but one of 10 or more).
        advantage_std: "group" (per-group std) or "global" (batch std) normalisation of the rewards.
        best_of_n: (keep_top, keep_bottom) samples per group to train on; None trains on all.
        best_of_n_advantages: "group" or "kept", as for `GRPO`.
        kl_beta: λ_KL, weight of ‖v_θ − v_ref‖² to the frozen initial policy (official 1e-4; 0
            keeps no reference).
        old_decay_rate, old_decay_max, old_decay_start: the old policy's soft update (N5)
            (official type 1: 0.001, 0.5, 0; type 2: 0.0075, 0.999, 75).

    Works with the flow families (FLUX, HunyuanVideo, Wan) and any ODE rollout: the sampler's own
    Euler steps (no SDE noise is drawn); a `step_schedule` (which steps are SDE steps) has no
    meaning here and is refused. The old policy is a full copy of the trainable weights (small with
    LoRA); it is not sharded, so FSDP (`DenoiserFSDPStrategy`) is not supported yet.
    """

    needs = RolloutNeeds(log_probs=False, shared_noise=False)
    ranges = {
        "beta": Range(0, low_open=True, why="β scales the step between the old and the trained policy; 0 divides the loss by 0"),
        "adv_clip_max": Range(0, low_open=True),
        "timestep_fraction": Range(0, 1, low_open=True),
        "kl_beta": Range(0, why="a negative weight rewards moving away from the initial policy"),
        "old_decay_rate": Range(0),
        "old_decay_max": Range(0, 1, high_open=True, why="1 would freeze the old policy at the initial weights"),
        "old_decay_start": Range(0, integer=True),
    }

    def __init__(
        self,
        beta: float = 1.0,
        adv_clip_max: float = 5.0,
        timestep_fraction: float = 0.99,
        advantage_std: StdMode = "group",
        best_of_n: tuple[int, int] | None = None,
        best_of_n_advantages: BestOfNAdvantages = "group",
        kl_beta: float = 0.0,
        old_decay_rate: float = 0.001,
        old_decay_max: float = 0.5,
        old_decay_start: int = 0,
    ) -> None:
        super().__init__()
        self.beta, self.adv_clip_max, self.timestep_fraction = beta, adv_clip_max, timestep_fraction
        self.advantage_std, self.best_of_n = advantage_std, None if best_of_n is None else tuple(best_of_n)
        self.best_of_n_advantages, self.kl_beta = best_of_n_advantages, kl_beta
        self.old_decay_rate, self.old_decay_max, self.old_decay_start = old_decay_rate, old_decay_max, old_decay_start
        self.check_options()
        for name, value, allowed in (("best_of_n_advantages", best_of_n_advantages, ("group", "kept")),
                                     ("advantage_std", advantage_std, ("group", "global"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        self._num_old = 0

    # -- set-up --------------------------------------------------------------------------------
    def attach(self, module: GRPOModule) -> None:
        """Refuse what cannot work; keep a copy of the trainable weights as the old policy."""
        sampler = module.sampler
        if sampler.paradigm != "flow" or not hasattr(sampler, "sigmas"):
            raise ConfigError(f"DiffusionNFT trains flow models on x_t = (1 - t)·x0 + t·eps: {type(module.policy).__name__} "
                              f"samples with {type(sampler).__name__} ({sampler.paradigm}); use a flow family (FLUX, HunyuanVideo, Wan)")
        if module.step_schedule is not None:
            raise ConfigError("model.step_schedule picks a rollout's SDE steps; DiffusionNFT rolls out with the ODE and has none: "
                              "remove model.step_schedule (set it to null)")
        if module.ode_tail is not None:
            raise ConfigError("model.ode_tail takes over after a rollout's last SDE step; DiffusionNFT's rollouts have none, "
                              "so the tail would never run: remove model.ode_tail")
        if module.hparams.shared_noise:
            raise ConfigError("model.shared_noise=true: an ODE rollout from a shared x_0 makes every sample of a group the "
                              "same (no reward difference to learn from); DiffusionNFT needs shared_noise false or null")
        check_best_of_n(self.best_of_n, module.hparams.group_size)
        for index, param in enumerate(module.policy.trainable_parameters()):
            self.register_buffer(f"old_{index}", param.detach().clone())  # θ_old, saved in checkpoints
        self._num_old = len(module.policy.trainable_parameters())

    # -- the old policy ------------------------------------------------------------------------
    def old_weights(self) -> list[Tensor]:
        """θ_old, one tensor per trainable parameter of the policy (in its order)."""
        return [getattr(self, f"old_{index}") for index in range(self._num_old)]

    @contextmanager
    def sampling_weights(self, module: GRPOModule) -> Iterator[None]:
        """The policy holds θ_old inside (the rollout samples with the old policy), θ again after."""
        with _swapped(module.policy.trainable_parameters(), self.old_weights()):
            yield

    def old_decay(self, step: int) -> float:
        """d of (N5) after optimizer step `step`."""
        if step < self.old_decay_start:
            return 0.0
        return min(self.old_decay_rate * (step - self.old_decay_start), self.old_decay_max)

    def after_update(self, module: GRPOModule) -> None:
        """θ_old ← d·θ_old + (1 − d)·θ (N5), d by the optimizer steps made so far."""
        step = module.trainer.global_step if module._trainer is not None else 0
        decay = self.old_decay(step)
        with torch.no_grad():
            for old, param in zip(self.old_weights(), module.policy.trainable_parameters(), strict=True):
                old.mul_(decay).add_(param.detach().to(old.dtype), alpha=1.0 - decay)

    # -- targets -------------------------------------------------------------------------------
    def targets(self, scores: dict[str, Tensor], weights: dict[str, float], group_size: int) -> Targets:
        """Advantages A [B'] (Σ_k w_k·A_k of the group-normalised rewards, best-of-n, clamped to
        ±adv_clip_max: `grpo.advantages.grpo_advantages`); the loss maps them to r (N3)."""
        result = grpo_advantages(scores, weights, group_size, form="sum", best_of_n=self.best_of_n,
                                 best_of_n_advantages=self.best_of_n_advantages, std_mode=self.advantage_std, clip_max=self.adv_clip_max)
        per_reward = reward_advantages(scores, weights, group_size, std_mode=self.advantage_std)
        return Targets(values=result.advantages, chosen=result.chosen, per_reward=per_reward)

    def optimality(self, advantages: Tensor) -> Tensor:
        """r ∈ [0, 1] of clamped advantages (N3): −A_max → 0, 0 → 1/2, A_max → 1."""
        clamped = advantages.clamp(-self.adv_clip_max, self.adv_clip_max)
        return (clamped / self.adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)

    # -- update --------------------------------------------------------------------------------
    def prepare(self, module: GRPOModule, rollout: Rollout, targets: Targets, seed: int) -> Prepared:
        """Per sample: its clean latents x₀ and, per trained column, a timestep index of the
        sampling schedule (a random subset, keyed by the sample's key) and a fresh ε (keyed the same
        way); x_t and the old policy's velocity there, computed once with θ_old."""
        sampler = module.sampler
        candidates = trainable_policy_steps(module.policy, sampler, torch.arange(sampler.num_steps))  # where its trained weights act
        steps = keyed_timestep_indices(rollout.sample_keys, candidates, self.timestep_fraction, seed)  # [B', K]
        x0 = rollout.latents[:, -1]  # [B', *L] the clean samples
        noise = _keyed_noise(rollout.sample_keys, steps.shape[1], x0, seed)  # [B', K, *L]
        t = sampler.sigmas.to(x0.device)[steps.to(x0.device)]  # [B', K] in (0, 1]
        t_b = t.view(*t.shape, *([1] * (x0.ndim - 1)))  # [B', K, 1, ...]
        x_t = (1.0 - t_b) * x0.unsqueeze(1).float() + t_b * noise  # [B', K, *L]  forward process
        v_old = torch.empty_like(x_t)
        chunks = torch.arange(rollout.batch_size, device=x0.device).split(max(1, module.hparams.micro_batch_size))
        with torch.no_grad(), self.sampling_weights(module):
            for column in range(steps.shape[1]):
                for rows in chunks:  # micro-batches: the memory of one forward as in the update
                    condition = index_condition(rollout.condition, rows)
                    v_old[rows, column] = module.policy.predict(x_t[rows, column].to(x0.dtype), t[rows, column] * 1000.0, condition).float()
        return Prepared(rollout=rollout, targets=targets, columns=steps.to(module.device),
                        extra={"x0": x0.float(), "x_t": x_t, "t": t, "v_old": v_old})

    def loss(self, module: GRPOModule, prepared: Prepared, samples: Tensor, column: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(N4) of samples `samples` [m] at their column `column`, and its statistics."""
        extra = prepared.extra
        x0, x_t = extra["x0"][samples], extra["x_t"][samples, column]  # [m, *L]
        t, v_old = extra["t"][samples, column], extra["v_old"][samples, column]  # [m], [m, *L]
        condition = index_condition(prepared.rollout.condition, samples)
        v_theta = module.policy.predict(x_t.to(prepared.rollout.latents.dtype), t * 1000.0, condition).float()  # [m, *L]
        r = self.optimality(prepared.targets.values[samples].float())  # [m]
        kl = None
        if self.kl_beta > 0:
            with torch.no_grad():
                v_ref = module.policy.reference_predict(module.reference_policy, x_t.to(prepared.rollout.latents.dtype), t * 1000.0, condition).float()
            kl = (v_theta - v_ref).pow(2).flatten(1).mean(1)  # [m]
        return nft_loss(v_theta, v_old, x0, x_t, t, r, self.beta, self.adv_clip_max, kl=kl, kl_beta=self.kl_beta)

    def summarize(self, stats: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Loss, its positive and negative parts, r's mean, ‖v_θ − v_old‖² and the KL."""
        return {f"nft/{name}" if name != "loss" else "loss": torch.stack([s[name] for s in stats]).mean() for name in stats[0]}


def nft_loss(
    v_theta: Tensor, v_old: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, r: Tensor, beta: float, adv_clip_max: float,
    kl: Tensor | None = None, kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DiffusionNFT loss (N1-N4) of m samples and its statistics.

    Args:
        v_theta: Tensor[m, *L] the trained policy's velocity at x_t (with gradient).
        v_old: Tensor[m, *L] the old policy's velocity there (no gradient).
        x0: Tensor[m, *L] the clean samples; x_t: Tensor[m, *L] them noised at t: Tensor[m].
        r: Tensor[m] optimality in [0, 1] (N3).
        beta, adv_clip_max: β and A_max; kl: Tensor[m] ‖v_θ − v_ref‖² per sample, weighted by kl_beta.
    """
    t_b = t.view(-1, *([1] * (x0.ndim - 1)))  # [m, 1, ...]
    v_pos = (1.0 - beta) * v_old.detach() + beta * v_theta  # (N1)
    v_neg = (1.0 + beta) * v_old.detach() - beta * v_theta  # (N2)
    positive, negative = _weighted_x0_error(x_t - t_b * v_pos, x0), _weighted_x0_error(x_t - t_b * v_neg, x0)  # [m]
    policy = (r * positive + (1.0 - r) * negative) / beta * adv_clip_max  # [m]  (N4)
    loss = policy.mean() + (kl_beta * kl.mean() if kl is not None and kl_beta > 0 else 0.0)
    stats = {
        "loss": loss.detach(), "positive_loss": positive.mean().detach(), "negative_loss": negative.mean().detach(),
        "optimality": r.mean().detach(), "old_deviation": (v_theta - v_old).detach().pow(2).mean(),
        "kl": kl.detach().mean() if kl is not None else torch.zeros((), device=loss.device),
    }
    return loss, stats


def _weighted_x0_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """ℓ per sample [m]: mean (x̂₀ − x₀)² over its elements divided by the adaptive weight
    w = max(mean |x̂₀ − x₀|, 1e-5), computed in float64 and without gradient (module docstring)."""
    error = x0_hat - x0
    with torch.no_grad():
        weight = error.double().abs().flatten(1).mean(1).clamp(min=WEIGHT_FLOOR)  # [m]
    return (error.pow(2).flatten(1).mean(1) / weight.to(error.dtype))


def _keyed_noise(keys: Tensor, columns: int, like: Tensor, seed: int) -> Tensor:
    """ε [B, K, *L] (fp32): per sample, `columns` standard normal draws from its own generator,
    seeded by a hash of its key (`noise.sample_seed`) other than the one its timesteps come from."""
    shape = (columns, *like.shape[1:])
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(sample_seed(seed, g, j), 0, 1)))
             for g, j in keys.tolist()]
    if not draws:
        return torch.zeros((0, *shape), device=like.device)
    return torch.stack(draws).to(like.device)


@contextmanager
def _swapped(params: list[Tensor], weights: list[Tensor]) -> Iterator[None]:
    """The parameters hold `weights` inside (their own values restored on exit)."""
    if len(params) != len(weights):
        raise RuntimeError(f"the old policy holds {len(weights)} tensors, the policy trains {len(params)}")
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, w in zip(params, weights):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


__all__ = ["DiffusionNFT", "nft_loss"]
