"""GRPOModule: the GRPO algorithm as a LightningModule, for any policy adapter, sampler and rewards."""

from __future__ import annotations

import time
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from tqdm.auto import tqdm

from lightning_grpo.evaluation import EvaluationResult, evaluate, sample_seed
from lightning_grpo.grpo.advantages import StdMode, multi_reward_advantages, zero_variance_fraction
from lightning_grpo.grpo.filtering import filter_nonfinite_groups
from lightning_grpo.grpo.loss import clipped_surrogate_loss, gaussian_kl
from lightning_grpo.grpo.selection import best_of_n_indices, sample_timestep_indices
from lightning_grpo.policies.base import PolicyAdapter, check_sampler_matches
from lightning_grpo.rewards.base import MultiReward, Reward
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.types import GRPOStats, Rollout, StepRecord, index_condition


class GRPOModule(LightningModule):
    """Group Relative Policy Optimisation of a visual generator (DanceGRPO), with manual optimisation.

    Args:
        policy: the base-model adapter (e.g. `lightning_grpo.policies.FluxPolicy`).
        sampler: the SDE sampler of the policy's paradigm (FlowSDESampler or DDIMSDESampler);
            None (default) uses `policy.build_sampler()`, the family's matching sampler. A
            sampler of the other paradigm is refused, naming both classes.
        rewards: one or more rewards; each is normalised within its group and weighted by its
            `weight` (multi-reward advantage A = Σ_k w_k·A_k).
        group_size: G, samples per prompt (FLUX 12, SD 16, HunyuanVideo 24, SkyReels 8).
        shared_noise: same initial noise for the G samples of a prompt (the paper's finding; on).
        timestep_fraction: share of the sampling steps trained per sample, a random subset per
            sample (0.6 for the flow recipes, 1.0 for SD).
        drop_last_timestep: never train on the last sampling step.
        micro_batch_size: samples per forward/backward in the update (memory knob; the result is
            the same for any value).
        samples_per_update: samples whose gradients are accumulated per optimizer step (must divide
            the number of trained samples); None = one step per rollout. With CFG on it is ignored:
            exactly one optimizer step per rollout.
        clip_range: ε of the clipped ratio (FLUX recipe: 1e-4).
        adv_clip_max: advantages are clamped to ±adv_clip_max (5).
        advantage_std: "group" (per-group std, DanceGRPO) or "global" (batch std).
        best_of_n: (keep_top, keep_bottom) trajectories per group to train on, e.g. (4, 4) for the
            HunyuanVideo recipe; None trains on all.
        kl_beta: weight of the KL to the frozen initial policy (0 = GRPO without KL, the paper's
            default; > 0 keeps `policy.kl_reference()`: nothing more with LoRA, whose reference
            is the denoiser with its adapters disabled; a frozen copy of the denoiser alone with
            full fine-tuning).
        learning_rate, weight_decay, adam_betas, adam_eps: AdamW settings (DanceGRPO: 1e-5, 1e-4).
        lr_warmup_steps: linear warm-up over this many optimizer steps, then constant.
        max_grad_norm: gradient-norm clip per optimizer step (1.0); None disables clipping.
        decode_batch_size: samples decoded and scored at once (memory knob).
        reward_failure: what a non-finite (NaN/inf) reward does: "raise" a `RewardError` naming the
            reward (default), or "drop_group": every group holding such a sample is left out of
            this step's update (a warning names the reward and the counts; logged as
            `train/reward/dropped_groups`), and the step is skipped if no group is left. A reward
            that raises an exception cannot be attributed to a group and always raises. Single
            process only: ranks that drop different numbers of groups would run different
            numbers of backward passes, which DDP cannot synchronise.
        seed: base seed; rollout noise depends on (seed, global step, rank), so ranks differ and a
            resumed run draws the same noise it would have drawn.
        show_progress: show progress bars for the rollout and update phases (rank zero).
        test_grid_size: `lightning-grpo test` keeps the pixels of this many samples (per rank) for
            the image grid it writes with its results.

    Attributes for callbacks:
        last_step: `StepRecord` of the last training step (scores, per-reward normalised
            advantages, final latents, pixels), or None; released when the next step starts.
        rollout_weights: context-manager factory entered around the rollout (default: nothing);
            the EMA callback sets it to roll out with averaged weights (`use_for_rollouts`).
        test_results: `EvaluationResult` of the last `lightning-grpo test` (all ranks gathered).
    """

    def __init__(
        self,
        policy: PolicyAdapter,
        sampler: Sampler | None = None,
        rewards: list[Reward] | None = None,  # required; a default only because `sampler` before it has one
        group_size: int = 12,
        shared_noise: bool = True,
        timestep_fraction: float = 0.6,
        drop_last_timestep: bool = False,
        micro_batch_size: int = 1,
        samples_per_update: int | None = None,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        advantage_std: StdMode = "group",
        best_of_n: tuple[int, int] | None = None,
        kl_beta: float = 0.0,
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        lr_warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        decode_batch_size: int = 8,
        reward_failure: Literal["raise", "drop_group"] = "raise",
        seed: int = 0,
        show_progress: bool = True,
        test_grid_size: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "sampler", "rewards"])
        sampler = policy.build_sampler() if sampler is None else sampler  # the family's own sampler by default
        check_sampler_matches(policy, sampler)
        _validate_options(group_size, timestep_fraction, micro_batch_size, samples_per_update, clip_range, best_of_n, sampler)
        if reward_failure not in ("raise", "drop_group"):
            raise ValueError(f"reward_failure must be 'raise' or 'drop_group', got {reward_failure!r}")
        self.policy = policy
        self.sampler = sampler
        self.rewards = MultiReward(list(rewards or []))  # raises without a reward
        # KL reference: only what the initial policy needs beyond the trained one (LoRA: nothing)
        self.reference_policy = policy.kl_reference() if kl_beta > 0 else None
        self.automatic_optimization = False
        self.last_step: StepRecord | None = None
        self.rollout_weights: Callable[[], AbstractContextManager] = nullcontext
        self.test_results: EvaluationResult | None = None
        self._test_parts: list[EvaluationResult] = []

    def train(self, mode: bool = True) -> GRPOModule:
        """Lightning toggles train mode; the policy stays in eval mode (no dropout), because GRPO
        recomputes the log-probs of its own samples and must see the function that drew them."""
        super().train(mode)
        self.policy.eval()
        if self.reference_policy is not None:
            self.reference_policy.eval()
        return self

    # ------------------------------------------------------------------ optimisation set-up
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.policy.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self.policy).__name__} has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, betas=tuple(hp.adam_betas), eps=hp.adam_eps, weight_decay=hp.weight_decay)
        warmup = max(0, hp.lr_warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One GRPO iteration on a batch of prompts.

        1. Take the batch's P prompts; each becomes a group of G samples (shared initial noise
           within a group when `shared_noise`).
        2. Roll out all P·G trajectories under no_grad with the SDE sampler, batched, keeping
           latents, log-probs and the condition.
        3. Decode the final latents and score them with every reward under no_grad
           (`reward_failure="drop_group"`: drop the groups with a non-finite reward).
        4. Advantages: each reward normalised within its group, weighted sum, clamp; optional
           best-of-n keeps the top/bottom trajectories of each group and re-normalises.
        5. Update: for a random subset of each sample's timesteps, recompute log-probs with
           gradient, clipped surrogate loss, accumulate over samples × timesteps, clip the grad
           norm and step the optimizer every `samples_per_update` samples (CFG on: once).
        """
        self.last_step = None  # release the previous step's tensors
        timer = _PhaseTimer(self.device)
        generator = self._generator(offset=0)
        # 1-2. rollout
        with timer("rollout"), self.rollout_weights():
            trajectories = rollout(
                self.policy, self.sampler, batch["prompts"], self.hparams.group_size, generator,
                shared_noise=self.hparams.shared_noise, images=batch.get("images"), progress=self._progress("rollout"),
            )
        # 3. decode + reward
        with timer("decode"):
            pixels = self._decode(trajectories.latents[:, -1])  # [B, C, H, W] or [B, F, C, H, W]
        with timer("reward"):
            drop = self.hparams.reward_failure == "drop_group"
            scores = self.rewards(pixels, trajectories.prompts, trajectories.images, allow_nonfinite=drop)  # {name: [B]}
        if drop:
            trajectories, pixels, scores = self._drop_nonfinite_groups(trajectories, pixels, scores)
            if trajectories is None:  # every group dropped: no update this step
                return
        # 4. advantages (+ best-of-n)
        rolled_out, all_scores = trajectories, scores
        trajectories, scores, advantages = self._advantages(trajectories, scores)
        # 5. update
        with timer("update"):
            dropped = rolled_out.batch_size < len(batch["prompts"]) * self.hparams.group_size
            stats, grad_norms = self._update(trajectories, advantages, allow_partial=dropped)
        self._log_step(scores, advantages, stats, grad_norms, timer, trajectories.batch_size)
        self.last_step = self._step_record(rolled_out, pixels, all_scores, advantages)

    def _step_record(self, rolled_out: Rollout, pixels: Tensor, scores: dict[str, Tensor], advantages: Tensor) -> StepRecord:
        """The light-weight summary of a step that callbacks read (see `StepRecord`)."""
        hp = self.hparams
        _, per_reward = multi_reward_advantages(scores, self.rewards.weights, hp.group_size, std_mode=hp.advantage_std)
        return StepRecord(
            prompts=rolled_out.prompts, group_size=hp.group_size,
            latents=rolled_out.latents[:, -1].detach().clone(),  # clone: do not keep all T+1 steps alive
            pixels=pixels.detach(), scores={k: v.detach() for k, v in scores.items()},
            reward_advantages=per_reward, advantages=advantages.detach(),
        )

    def on_fit_start(self) -> None:
        if self.hparams.reward_failure == "drop_group" and self.trainer.world_size > 1:
            raise ValueError(
                "reward_failure='drop_group' needs a single process: ranks dropping different numbers of groups "
                "would run different numbers of backward passes, which DDP cannot synchronise"
            )

    def _drop_nonfinite_groups(self, trajectories: Rollout, pixels: Tensor, scores: dict[str, Tensor]) -> tuple[Rollout | None, Tensor, dict[str, Tensor]]:
        """Step 3b (`reward_failure="drop_group"`): keep the groups whose rewards are all finite,
        warn naming each failing reward; (None, ...) when no group is left."""
        kept = filter_nonfinite_groups(scores, self.hparams.group_size)
        self.log("train/reward/dropped_groups", float(kept.dropped_groups), on_step=True, batch_size=trajectories.batch_size)
        if not kept.dropped_groups:
            return trajectories, pixels, scores
        counts = ", ".join(f"{name!r} on {n} sample(s)" for name, n in kept.nonfinite_samples.items())
        outcome = "skipping this update" if kept.keep.numel() == 0 else "training on the others"
        step = self.trainer.global_step if self._trainer is not None else 0
        warnings.warn(
            f"non-finite reward from {counts}: dropping {kept.dropped_groups} of {kept.num_groups} groups "
            f"at step {step}, {outcome}", RuntimeWarning, stacklevel=2,
        )
        if kept.keep.numel() == 0:
            return None, pixels, scores
        keep = kept.keep.to(pixels.device)
        return trajectories.select(keep), pixels[keep], {name: s[keep.to(s.device)] for name, s in scores.items()}

    def _advantages(self, trajectories: Rollout, scores: dict[str, Tensor]) -> tuple[Rollout, dict[str, Tensor], Tensor]:
        hp = self.hparams
        advantages = self._combine(scores, hp.group_size)
        if hp.best_of_n is not None:
            chosen = best_of_n_indices(advantages, hp.group_size, *hp.best_of_n)
            trajectories = trajectories.select(chosen)
            scores = {name: s[chosen] for name, s in scores.items()}
            advantages = self._combine(scores, self._trained_group_size())
        return trajectories, scores, advantages

    def _combine(self, scores: dict[str, Tensor], group_size: int) -> Tensor:
        hp = self.hparams
        total, _ = multi_reward_advantages(scores, self.rewards.weights, group_size, std_mode=hp.advantage_std, clip_max=hp.adv_clip_max)
        return total

    def _update(self, trajectories: Rollout, advantages: Tensor, allow_partial: bool = False) -> tuple[list[GRPOStats], list[Tensor]]:
        """Step 5: recompute log-probs on random timesteps and apply the clipped loss.

        `allow_partial` (groups were dropped): the last optimizer step may hold fewer
        than `samples_per_update` samples; its gradient is still the mean over its own samples."""
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        num_samples = trajectories.batch_size
        per_update = num_samples if self.policy.uses_cfg or hp.samples_per_update is None else hp.samples_per_update
        if not allow_partial:
            _check_divides(num_samples, per_update, hp.micro_batch_size)
        cpu_gen = self._generator(offset=1, device="cpu")
        candidates = self.sampler.stochastic_steps()
        if hp.drop_last_timestep:
            candidates = candidates[candidates != self.sampler.num_steps - 1]
        steps = sample_timestep_indices(num_samples, candidates, hp.timestep_fraction, cpu_gen).to(self.device)  # [B, K]
        order = torch.randperm(num_samples, generator=cpu_gen).to(self.device)  # [B]
        num_trained = steps.shape[1]
        stats, grad_norms = [], []
        for start in self._progress("update")(range(0, num_samples, hp.micro_batch_size)):
            samples = order[start : start + hp.micro_batch_size]  # [m]
            in_step = min(per_update, num_samples - start // per_update * per_update)  # samples of this optimizer step
            scale = samples.numel() / in_step / num_trained  # mean over accumulated samples × timesteps
            for k in range(num_trained):
                loss, step_stats = self._micro_loss(trajectories, advantages, samples, steps[samples, k])
                self.manual_backward(loss * scale)
                stats.append(step_stats)
            if (start + samples.numel()) % per_update == 0 or start + samples.numel() == num_samples:
                grad_norms.append(self._optimizer_step(optimizer, scheduler))
        return stats, grad_norms

    def _micro_loss(self, trajectories: Rollout, advantages: Tensor, samples: Tensor, index: Tensor) -> tuple[Tensor, GRPOStats]:
        """Clipped loss of samples `samples` [m] at their timestep indices `index` [m]."""
        x = trajectories.latents[samples, index]  # [m, *L]
        x_next = trajectories.latents[samples, index + 1]  # [m, *L]
        condition = index_condition(trajectories.condition, samples)
        t = self.sampler.timesteps.to(self.device)[index]  # [m]
        step = self.sampler.step(self.policy.predict(x, t, condition), x, index, prev_sample=x_next)
        kl = None
        hp = self.hparams
        if hp.kl_beta > 0:
            with torch.no_grad():
                ref_out = self.policy.reference_predict(self.reference_policy, x, t, condition)
                ref_mean, _ = self.sampler.mean_and_std(ref_out, x, index, self.sampler.eta)
            kl = gaussian_kl(step.mean, ref_mean, step.std)
        return clipped_surrogate_loss(
            step.log_prob, trajectories.log_probs[samples, index], advantages[samples],
            clip_range=hp.clip_range, adv_clip_max=hp.adv_clip_max, kl=kl, kl_beta=hp.kl_beta,
        )

    def _optimizer_step(self, optimizer, scheduler) -> Tensor:
        params = [p for p in self.policy.trainable_parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])) if params else torch.zeros(())
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return grad_norm

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_test_epoch_start(self) -> None:
        self._test_parts = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._test_parts.append(self._evaluate(batch, batch_idx, "test"))

    def on_test_epoch_end(self) -> None:
        """Gather every rank's test samples, log mean and 95% interval per reward
        (`test/reward/{name}`, `..._ci_low`, `..._ci_high`) and, on rank zero, write results.csv,
        results.md and grid.png into `<log_dir>/test/` and print the table."""
        result = _gather_results(self._test_parts, self.hparams.test_grid_size)
        self._test_parts, self.test_results = [], result
        for name, (mean, low, high, n) in result.summary().items():
            interval = {f"test/reward/{name}_ci_low": low, f"test/reward/{name}_ci_high": high, f"test/reward/{name}_n": float(n)}
            self.log_dict(interval, rank_zero_only=True)
        if self.trainer.is_global_zero:
            directory = Path(self.trainer.log_dir or ".") / "test"
            result.write(directory)
            print(f"Held-out test, {len(result.prompts)} samples (written to {directory}):\n{result.to_markdown()}")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> EvaluationResult:
        """Deterministic (eta = 0) samples from fixed per-sample seeds, scored by every reward.

        Noise is seeded from (seed, batch, rank, position) through `lightning_grpo.evaluation`, with
        its own generators: evaluating never moves the training random stream.
        """
        rank = self.global_rank if self._trainer is not None else 0
        keep = stage == "test" and sum(len(p.prompts) for p in self._test_parts) < self.hparams.test_grid_size
        result = evaluate(
            self.policy, self.sampler, batch["prompts"], self.rewards, seed=sample_seed(self.hparams.seed, batch_idx, rank),
            batch_size=self.hparams.decode_batch_size, keep_pixels=keep, images=batch.get("images"), show_progress=False,
        )
        for name, s in result.scores.items():
            self.log(f"{stage}/reward/{name}", s.mean(), batch_size=len(s), sync_dist=True)
        return result

    # ------------------------------------------------------------------ checkpoints
    def _rebuilt_keys(self) -> set[str]:
        """State the config rebuilds exactly, left out of checkpoints: reward models, the KL
        reference, and the policy's frozen weights (text encoders, VAE, LoRA base weights), which
        would otherwise add gigabytes (T5-XXL, ViT-H, Qwen2-VL) to every checkpoint."""
        keys = {k for k in self.state_dict() if k.startswith(("rewards.", "reference_policy."))}
        # remove_duplicate=False: tied weights (T5's encoder.embed_tokens = shared) under every name
        keys |= {f"policy.{name}" for name, p in self.policy.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self._rebuilt_keys() & set(state):
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # keep strict loading: the rebuilt entries are filled in from the freshly built module
        state, current = checkpoint["state_dict"], self.state_dict()
        for key in self._rebuilt_keys():
            state.setdefault(key, current[key])

    # ------------------------------------------------------------------ helpers
    def _decode(self, latents: Tensor) -> Tensor:
        with torch.no_grad():
            chunks = latents.split(self.hparams.decode_batch_size)
            return torch.cat([self.policy.decode(chunk) for chunk in chunks])

    def _generator(self, offset: int, device: torch.device | str | None = None) -> torch.Generator:
        """Seeded by (seed, global step, rank, offset): distinct per rank, reproducible on resume."""
        rank = self.global_rank if self._trainer is not None else 0
        step = self.trainer.global_step if self._trainer is not None else 0
        seed = (self.hparams.seed * 1_000_003 + step * 1_009 + rank * 101 + offset) % (2**63)
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def _progress(self, phase: str):
        enabled = self.hparams.show_progress and (self._trainer is None or self.trainer.is_global_zero)
        return lambda iterable: tqdm(iterable, desc=phase, leave=False, disable=not enabled, dynamic_ncols=True)

    def _log_step(self, scores, advantages, stats, grad_norms, timer, num_samples) -> None:
        logs: dict[str, Tensor | float] = {}
        group_size = self._trained_group_size()
        for name, s in scores.items():
            logs.update({f"reward/{name}_mean": s.mean(), f"reward/{name}_std": s.std(), f"reward/{name}_min": s.min(), f"reward/{name}_max": s.max()})
            logs[f"reward/{name}_zero_var_groups"] = zero_variance_fraction(s, group_size)
        logs.update({"advantage/mean": advantages.mean(), "advantage/std": advantages.std(), "advantage/abs_max": advantages.abs().max()})
        logs.update({
            "loss": torch.stack([s.loss for s in stats]).mean(),
            "ratio/mean": torch.stack([s.ratio_mean for s in stats]).mean(),
            "ratio/min": torch.stack([s.ratio_min for s in stats]).min(),
            "ratio/max": torch.stack([s.ratio_max for s in stats]).max(),
            "ratio/first_update_max_dev": (stats[0].ratio_max - 1).abs().maximum((stats[0].ratio_min - 1).abs()),
            "clip_fraction": torch.stack([s.clip_fraction for s in stats]).mean(),
            "approx_kl": torch.stack([s.approx_kl for s in stats]).mean(),
            "kl": torch.stack([s.kl for s in stats]).mean(),
            "grad_norm": torch.stack(grad_norms).mean(),
            "lr": self.optimizers().param_groups[0]["lr"],
            "optimizer_steps": float(len(grad_norms)),
        })
        logs.update({f"time/{phase}": seconds for phase, seconds in timer.seconds.items()})
        logs["time/samples_per_s"] = num_samples / max(sum(timer.seconds.values()), 1e-9)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=num_samples)
        self.log("reward", sum(s.mean() for s in scores.values()) / len(scores), prog_bar=True, batch_size=num_samples)

    def _trained_group_size(self) -> int:
        best = self.hparams.best_of_n
        return self.hparams.group_size if best is None else sum(best)


class _PhaseTimer:
    """Wall-clock seconds per phase (synchronising CUDA so the numbers mean something)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _gather_results(parts: list[EvaluationResult], grid_size: int) -> EvaluationResult:
    """This rank's test results concatenated, then those of every rank in rank order."""
    local = _concat_results(parts, grid_size)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return local
    gathered: list[EvaluationResult] = [local] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return _concat_results(gathered, grid_size)


def _concat_results(parts: list[EvaluationResult], grid_size: int) -> EvaluationResult:
    """One result from several (prompts and scores concatenated; at most `grid_size` pixels kept)."""
    names = list(parts[0].scores) if parts else []
    pixels = [part.pixels for part in parts if part.pixels is not None]
    return EvaluationResult(
        prompts=[prompt for part in parts for prompt in part.prompts],
        scores={name: torch.cat([part.scores[name] for part in parts]) for name in names},
        pixels=torch.cat(pixels)[:grid_size] if pixels else None,
    )


def _validate_options(group_size, timestep_fraction, micro_batch_size, samples_per_update, clip_range, best_of_n, sampler) -> None:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare samples of a prompt), got {group_size}")
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if samples_per_update is not None and (samples_per_update < 1 or samples_per_update % micro_batch_size):
        raise ValueError(f"samples_per_update ({samples_per_update}) must be a positive multiple of micro_batch_size ({micro_batch_size})")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if best_of_n is not None:
        top, bottom = best_of_n
        if top < 0 or bottom < 0 or not 2 <= top + bottom <= group_size:
            raise ValueError(f"best_of_n {tuple(best_of_n)} must keep between 2 and group_size ({group_size}) samples per group")
    if sampler.eta <= 0:
        raise ValueError(f"the training sampler needs eta > 0 (got {sampler.eta}): an ODE sampler has no log-probability")


def _check_divides(num_samples: int, per_update: int, micro_batch_size: int) -> None:
    if num_samples % per_update or per_update % micro_batch_size:
        raise ValueError(
            f"{num_samples} trained samples per rollout must split into optimizer steps of samples_per_update="
            f"{per_update}, each made of micro-batches of {micro_batch_size}"
        )
