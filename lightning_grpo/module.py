"""GRPOModule: the GRPO algorithm as a LightningModule, for any policy adapter, sampler and rewards."""

from __future__ import annotations

import time
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from lightning_grpo.checkpointing import (
    SIGNATURE_KEY,
    apply_resume_overrides,
    check_finite,
    check_max_steps,
    check_signature,
    model_signature,
    nonfinite_tensors,
)
from lightning_grpo.distributed import (
    all_gather_objects,
    gather_by_key,
    local_selection,
    mean_over_ranks,
    members_of_rank,
    replicated_state_names,
    skip_gradient_sync,
    update_schedule,
)
from lightning_grpo.evaluation import EvaluationResult, evaluate, gather_results, sample_seed
from lightning_grpo.first_frames import FirstFrames, frame_size
from lightning_grpo.grpo.advantages import (
    BestOfNAdvantages,
    MultiRewardForm,
    StdMode,
    effective_advantages,
    grpo_advantages,
    multi_reward_advantages,
    zero_variance_fraction,
)
from lightning_grpo.grpo.filtering import filter_nonfinite_groups
from lightning_grpo.grpo.loss import clipped_surrogate_loss, gaussian_kl
from lightning_grpo.noise import keyed_timestep_indices
from lightning_grpo.policies.base import PolicyAdapter, check_sampler_matches
from lightning_grpo.rewards.base import MultiReward, Reward
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.samplers.ode_tail import MultistepODETail
from lightning_grpo.samplers.step_schedule import StepSchedule, trainable_steps
from lightning_grpo.scoring import AsyncScoring, checkpoint_entry, rank_state
from lightning_grpo.types import GRPOStats, Rollout, StepRecord, index_condition
from lightning_grpo.errors import NonFiniteError
from lightning_grpo.validation import SkipGuard, check_module_options, check_reward_weights, validate_fit


class GRPOModule(LightningModule):
    """Group Relative Policy Optimisation of a visual generator (DanceGRPO), with manual optimisation.

    Args:
        policy: the base-model adapter (a family of `lightning_grpo.policies`, e.g. FLUX.1).
        sampler: the SDE sampler of the policy's paradigm (FlowSDESampler or DDIMSDESampler);
            None (default) uses `policy.build_sampler()`, the family's matching sampler. A
            sampler of the other paradigm is refused, naming both classes.
        rewards: one or more rewards; each is normalised within its group and weighted by its
            `weight` (combined as `multi_reward` says).
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
        learning_rate, weight_decay, adam_betas, adam_eps: AdamW settings (DanceGRPO: 1e-5, 1e-4).
        lr_warmup_steps: linear warm-up over this many optimizer steps, then constant.
        max_grad_norm: gradient-norm clip per optimizer step (1.0); None disables clipping.
        decode_batch_size: samples decoded and scored at once (memory knob).
        rollout_batch_size: samples rolled out per denoiser batch (memory knob); None = the whole
            rollout at once. Noise is keyed by sample, so the result does not depend on it.
        groups_across_ranks: the G samples of a prompt are split over the ranks (G divisible by
            the world size; e.g. G = 24 on 8 devices): the ranks' prompts are gathered, each rank
            rolls out its G/W members of every group, rewards are all-gathered for the group
            statistics, best-of-n picks per whole group and `drop_group` is agreed by all ranks.
            Off (default): each group lives on one rank and nothing is gathered.
        reward_failure: what a non-finite (NaN/inf) reward does: "raise" a `RewardError` naming the
            reward (default), or "drop_group": every group holding such a sample is left out of
            this step's update (a warning names the reward and the counts; logged as
            `train/reward/dropped_groups`), and the step is skipped if no group is left. A reward
            that raises an exception cannot be attributed to a group and always raises. Under
            DDP the ranks agree on the number of optimizer steps (`distributed.update_schedule`),
            so ranks that keep different numbers of samples still synchronise.
        seed: base seed; rollout noise depends on (seed, global step) and each sample's (global
            group, member) key (`lightning_grpo.noise`), so ranks differ, one process on the
            union of the ranks' prompts draws the same noise, and a resumed run draws the same
            noise it would have drawn.
        show_progress: show progress bars for the rollout and update phases (rank zero, in a terminal).
        test_grid_size: `lightning-grpo test` keeps the pixels of this many samples (per rank) for
            the image grid it writes with its results.
        step_schedule: which rollout steps are SDE steps (noise, log-prob, trainable), the others
            being ODE steps: None = all (DanceGRPO); `SlidingWindow` (MixGRPO) or `RandomBranch`
            (Flow-GRPO-Fast), see `lightning_grpo/samplers/step_schedule.py`. The timestep subset
            (`timestep_fraction`, `drop_last_timestep`) is drawn from the SDE steps only.
        ode_tail: with a step schedule, integrate after its last SDE step with this fewer-step
            2nd-order solver (`MultistepODETail`, MixGRPO-Flash; flow samplers); None: the
            sampler's own ODE step on its grid.
        max_skipped_steps: stop the run (RuntimeError) after this many training steps in a row
            were skipped because every group was dropped (or every optimizer step of the step was
            skipped under `nonfinite="skip"`): such steps make no optimizer step, so `max_steps`
            would never be reached.
        nonfinite: what a NaN/inf gradient norm does (a NaN/inf loss makes one): "stop" the run
            with a `NonFiniteError` naming the optimizer step, the gradient norm and the loss
            (default), or "skip" that optimizer step (gradients dropped, weights unchanged, a
            warning; `max_skipped_steps` skipped training steps in a row stop the run). Weights
            that are NaN/inf after an optimizer step always stop the run. Nothing of the failing
            step is ever checkpointed (checkpoints with NaN/inf are refused besides).
        constant_reward_steps: warn when every advantage was 0 (each reward constant within
            every group: nothing is learned) for this many training steps in a row.
        first_frames: image-to-video without images in the data: a `FirstFrames` source (e.g.
            `lightning_grpo.first_frames.GeneratedFirstFrames` with an image policy) called for
            every batch without `"images"`, at the policy's resolution; None (default): batches
            bring their own (`ImagePromptDataModule`) or none (text-to-X).
        async_scoring: score each rollout in the background while the next one is rolled out,
            and train each step on the previous rollout once its scores are in (one step of
            staleness; see `lightning_grpo/scoring.py`): a step takes about max(rollout + update,
            scoring) instead of their sum, which pays when the rewards run elsewhere
            (`RemoteReward`). The first step only rolls out; resume is exact (the pending rollout
            is saved in checkpoints, every rank's under DDP/FSDP). Off (default): score, then
            train on the same rollout.

    Attributes for callbacks:
        last_step: `StepRecord` of the last training step (scores, per-reward normalised
            advantages, final latents, pixels), or None; released when the next step starts.
            On several ranks a rank that trained nothing while others did holds an empty record
            (`num_samples` 0), so callbacks with collectives run on every rank alike.
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
        best_of_n_advantages: BestOfNAdvantages = "group",
        multi_reward: MultiRewardForm = "sum",
        kl_beta: float = 0.0,
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        lr_warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        decode_batch_size: int = 8,
        rollout_batch_size: int | None = None,
        groups_across_ranks: bool = False,
        reward_failure: Literal["raise", "drop_group"] = "raise",
        seed: int = 0,
        show_progress: bool = True,
        test_grid_size: int = 64,
        step_schedule: StepSchedule | None = None,
        ode_tail: MultistepODETail | None = None,
        max_skipped_steps: int = 5,
        first_frames: FirstFrames | None = None,
        async_scoring: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
        constant_reward_steps: int = 5,
    ) -> None:  # pragma: no mutate block (a mutmut trampoline would hide these arguments from save_hyperparameters)
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "sampler", "rewards", "step_schedule", "ode_tail", "first_frames"])
        sampler = policy.build_sampler() if sampler is None else sampler  # the family's own sampler by default
        check_sampler_matches(policy, sampler)
        check_module_options(dict(self.hparams), prefix="")  # every numeric option in its range (validation.MODULE_RANGES)
        _check_training_sampler(sampler)
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if reward_failure not in ("raise", "drop_group"):
            raise ValueError(f"reward_failure must be 'raise' or 'drop_group', got {reward_failure!r}")
        if multi_reward not in ("sum", "per_reward"):
            raise ValueError(f"multi_reward must be 'sum' or 'per_reward', got {multi_reward!r}")
        if best_of_n_advantages not in ("group", "kept"):
            raise ValueError(f"best_of_n_advantages must be 'group' or 'kept', got {best_of_n_advantages!r}")
        self.policy = policy
        self.sampler = sampler
        self.step_schedule = step_schedule
        if step_schedule is not None:  # fail at construction if the schedule does not fit the sampler
            step_schedule.sde_steps(sampler.num_steps, 0, torch.Generator().manual_seed(0))
        if ode_tail is not None:
            if step_schedule is None:
                raise ValueError("ode_tail needs a step_schedule: without one every step is an SDE step and there is no tail")
            ode_tail.sigmas(sampler, 0)  # a flow sampler, or a clear error
        self.ode_tail = ode_tail
        self.first_frames = first_frames
        self.rewards = MultiReward(list(rewards or []))  # raises without a reward
        check_reward_weights(self.rewards.weights)
        self._skips = SkipGuard(max_skipped_steps)
        self._constant_steps = 0  # training steps in a row whose advantages were all 0
        self._step_losses: list[Tensor] = []  # micro-batch losses of the optimizer step being made
        # KL reference: only what the initial policy needs beyond the trained one (LoRA: nothing)
        self.reference_policy = policy.kl_reference() if kl_beta > 0 else None
        self.automatic_optimization = False
        self.last_step: StepRecord | None = None
        self.rollout_weights: Callable[[], AbstractContextManager] = nullcontext
        self.test_results: EvaluationResult | None = None
        self._test_parts: list[EvaluationResult] = []
        self._scoring = AsyncScoring(self._score) if async_scoring else None

    def train(self, mode: bool = True) -> GRPOModule:
        """Lightning toggles train mode; the policy stays in eval mode (no dropout), because GRPO
        recomputes the log-probs of its own samples and must see the function that drew them."""
        super().train(mode)
        self.policy.eval()
        if self.reference_policy is not None:
            self.reference_policy.eval()
        return self

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What DDP leaves alone (read by `DistributedDataParallel` when Lightning's DDP strategy
        wraps this module, and by Lightning's state sync before `validate`/`test`): every frozen
        parameter and every buffer, so the frozen parts are never broadcast and no buffer
        broadcast runs in the forward (`distributed.replicated_state_names` says why). A property,
        so the list is made when DDP asks, from the parameters trainable at that moment; any DDP
        strategy a config names gets it, without a flag."""
        return replicated_state_names(self)

    # ------------------------------------------------------------------ optimisation set-up
    def configure_model(self) -> None:
        """Let a sharding strategy shard the denoiser (`DenoiserFSDPStrategy.shard_module`: its
        blocks become FSDP units) once the processes are set up and before the optimizer is
        built; nothing under any other strategy."""
        shard = getattr(self.trainer.strategy, "shard_module", None) if self._trainer is not None else None
        if callable(shard):
            shard(self)

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
        4. Advantages: each reward normalised within its group; optional best-of-n keeps the
           top/bottom trajectories of each group by Σ_k w_k·A_k (advantages over the full group,
           or re-normalised within the kept ones); combined as `multi_reward` says.
        5. Update: for a random subset of each sample's timesteps, recompute log-probs with
           gradient, clipped surrogate loss, accumulate over samples × timesteps, clip the grad
           norm and step the optimizer every `samples_per_update` samples (CFG on: once).
        """
        self.last_step = None  # release the previous step's tensors
        hp = self.hparams
        timer = _PhaseTimer(self.device)
        prompts, images, first_group, members = self._rank_prompts(batch)
        if not prompts:  # every image of a whole block of the data was unreadable (on every rank alike)
            warnings.warn("empty training batch (no readable record in it): skipping this step", RuntimeWarning, stacklevel=2)
            self._skips.step(
                True, why="every record of the data's block was malformed or its image unreadable",
                what="their batches were empty", remedy="fix the data (the malformed records are named in the warnings above)",
            )
            return
        # 1-2. rollout (in chunks of rollout_batch_size; noise keyed by global group and member)
        with timer("rollout"), self.rollout_weights():
            trajectories = rollout(
                self.policy, self.sampler, prompts, hp.group_size, self._rollout_generator(),
                shared_noise=hp.shared_noise, images=images, progress=self._progress("rollout"),
                chunk_size=hp.rollout_batch_size, first_group=first_group, members=members,
                sde_steps=self._sde_steps(), ode_tail=self.ode_tail,
            )
        # 3. decode + reward, in chunks of decode_batch_size
        if self._scoring is None:
            pixels, scores = self._decode_and_score(trajectories, timer)  # [B, C, H, W] or [B, F, C, H, W]; {name: [B]}
        else:  # asynchronous: this rollout is scored in the background; train on the previous one
            pixels = self._decode(trajectories, timer)
            with timer("reward_wait"):
                scored = self._scoring.exchange(trajectories, pixels)
            if scored is None:  # the first rollout of the run: nothing scored yet, no update
                return
            trajectories, pixels, scores = scored.trajectories, scored.pixels, scored.scores
        num_rolled = trajectories.batch_size
        rolled_out, record_size, reward_advantages = trajectories, hp.group_size, None
        if self._spans_ranks():  # 4. on the gathered groups
            local_scores = scores
            trajectories, scores, advantages, kept, reward_advantages = self._advantages_across_ranks(trajectories, local_scores)
            rolled_out, pixels, record_size = rolled_out.select(kept), pixels[kept], len(members)
            all_scores = {name: s[kept] for name, s in local_scores.items()}
            if hp.reward_failure == "drop_group":  # the gathered groups: every rank agrees
                self._skips.step(not scores, why="reward_failure='drop_group'; each failing reward is named in the warnings above")
        else:
            if hp.reward_failure == "drop_group":
                trajectories, pixels, scores = self._drop_nonfinite_groups(trajectories, pixels, scores)
                if self._world_size() == 1:  # ranks drop different groups: a stop on one rank alone would hang the others
                    self._skips.step(trajectories is None, why="reward_failure='drop_group'; each failing reward is named in the warnings above")
                if trajectories is None and self._world_size() == 1:  # every group dropped: no update
                    return
            if trajectories is None:  # other ranks still update: take part with no sample of our own
                trajectories, scores, advantages = rolled_out.select(torch.zeros(0, dtype=torch.long)), {}, torch.zeros(0)
            else:
                # 4. advantages (+ best-of-n)
                rolled_out, all_scores = trajectories, scores
                trajectories, scores, advantages = self._advantages(trajectories, scores)
        self._watch_constant_reward(advantages)
        # 5. update
        with timer("update"):
            dropped = rolled_out.batch_size < num_rolled
            stats, grad_norms = self._update(trajectories, advantages, allow_partial=dropped, padding=rolled_out)
        if trajectories.batch_size == 0:
            if self._world_size() > 1:  # other ranks trained: the callbacks run alike on every rank
                self.last_step = self._empty_record(rolled_out, pixels, record_size)
                self._log_reward({}, 0)  # its part (none) of the reward's all-reduce
            return
        if hp.nonfinite == "skip":
            self._skips.step(
                not any(torch.isfinite(g) for g in grad_norms), why="nonfinite='skip'",
                what="every optimizer step had a NaN/inf gradient norm", remedy="lower model.learning_rate, check the reward",
            )
        self._log_step(scores, advantages, stats, grad_norms, timer, trajectories.batch_size)
        self.last_step = self._step_record(rolled_out, pixels, all_scores, advantages, record_size, reward_advantages)

    def _step_record(
        self, rolled_out: Rollout, pixels: Tensor, scores: dict[str, Tensor], advantages: Tensor,
        group_size: int, per_reward: dict[str, Tensor] | None = None,
    ) -> StepRecord:
        """The light-weight summary of a step that callbacks read (see `StepRecord`); `group_size`
        is this rank's samples per prompt, `per_reward` the normalised rewards when the groups
        were normalised elsewhere (spanning ranks)."""
        hp = self.hparams
        if per_reward is None:
            _, per_reward = multi_reward_advantages(scores, self.rewards.weights, group_size, std_mode=hp.advantage_std)
        return StepRecord(
            prompts=rolled_out.prompts, group_size=group_size,
            latents=rolled_out.latents[:, -1].detach().clone(),  # clone: do not keep all T+1 steps alive
            pixels=pixels.detach(), scores={k: v.detach() for k, v in scores.items()},
            reward_advantages=per_reward, advantages=effective_advantages(advantages.detach(), self._loss_weights(advantages)),
        )

    def _empty_record(self, rolled_out: Rollout, pixels: Tensor, group_size: int) -> StepRecord:
        """The step record of a rank that trained no sample while others did (it dropped every
        group, or best-of-n kept none of its members): no sample, the shapes of its rollout.

        Callbacks run a collective on a step's record (DiversityMonitor's metric sync), so under
        DDP every rank must hold a record or none: a rank without one would leave the others
        waiting in that collective (issue 27). Callbacks skip a record without samples
        (`StepRecord.num_samples`) apart from their collectives."""
        none = torch.zeros(0, device=pixels.device)
        return StepRecord(
            prompts=[], group_size=group_size, latents=rolled_out.latents[:0, -1].detach(), pixels=pixels[:0].detach(),
            scores={r.name: none for r in self.rewards.rewards}, reward_advantages={r.name: none for r in self.rewards.rewards},
            advantages=none,
        )

    def setup(self, stage: str) -> None:
        """Start-up checks that need the trainer and data (batch divisibility per rank, trainer
        options manual optimisation refuses): they fail here, before any rollout or evaluation."""
        if stage == "fit" and self._trainer is not None:
            validate_fit(self, self.trainer)

    def on_fit_start(self) -> None:
        if self._spans_ranks():
            members_of_rank(self.hparams.group_size, self.global_rank, self.trainer.world_size)  # validates G % W

    # ------------------------------------------------------------------ ranks
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _strategy_model(self) -> Any:
        """The strategy's wrapped model (DDP / FSDP), or None outside a Trainer."""
        return self.trainer.strategy.model if self._trainer is not None else None

    def _spans_ranks(self) -> bool:
        return bool(self.hparams.groups_across_ranks) and self._world_size() > 1

    def _counts_may_differ(self) -> bool:
        """Ranks may train on different numbers of samples: groups dropped per rank, or
        best-of-n over groups whose members live on several ranks."""
        hp = self.hparams
        spanning_selection = self._spans_ranks() and hp.best_of_n is not None
        return self._world_size() > 1 and (hp.reward_failure == "drop_group" or spanning_selection)

    def _rank_prompts(self, batch: dict[str, Any]) -> tuple[list[str], Tensor | None, int, range | None]:
        """(prompts, first frames, global index of the first group, members) this rank rolls out.

        Groups on one rank: its own P prompts, groups rank·P.. (DDP's sampler gives every rank
        the same P), all G members. Groups spanning ranks: every rank's prompts (gathered, rank
        order), groups 0.., and this rank's G/W members of each.
        """
        prompts, images = list(batch["prompts"]), self.batch_first_frames(batch)
        rank = self.global_rank if self._trainer is not None else 0
        if not self._spans_ranks():
            return prompts, images, rank * len(prompts), None
        parts = all_gather_objects((prompts, None if images is None else images.cpu()))
        prompts = [p for part, _ in parts for p in part]
        images = None if images is None else torch.cat([frames for _, frames in parts]).to(self.device)
        return prompts, images, 0, members_of_rank(self.hparams.group_size, rank, self._world_size())

    def batch_first_frames(self, batch: dict[str, Any]) -> Tensor | None:
        """The batch's first frames [P, 3, H, W]: its own `"images"`, else made by `first_frames`
        at the policy's resolution (None without either: text-to-X). Callbacks that sample an
        image-to-video policy on their own prompts take their frames from here too."""
        images = batch.get("images")
        if images is not None or self.first_frames is None or not batch["prompts"]:
            return images
        return self.first_frames(list(batch["prompts"]), frame_size(self.policy)).to(self.device)

    def _decode_and_score(self, trajectories: Rollout, timer: _PhaseTimer) -> tuple[Tensor, dict[str, Tensor]]:
        """Step 3, `decode_batch_size` samples at a time: pixels [B, ...] and {name: [B]} scores
        (non-finite kept with `reward_failure="drop_group"`)."""
        pixels = self._decode(trajectories, timer)
        with timer("reward"):
            return pixels, self._score(trajectories, pixels)

    def _decode(self, trajectories: Rollout, timer: _PhaseTimer) -> Tensor:
        """The final latents decoded, `decode_batch_size` at a time: pixels [B, C, H, W] or [B, F, C, H, W]."""
        final = trajectories.latents[:, -1]
        with timer("decode"), torch.no_grad():
            return torch.cat([self.policy.decode(final[chunk]) for chunk in self._decode_chunks(trajectories.batch_size, final.device)])

    def _score(self, trajectories: Rollout, pixels: Tensor) -> dict[str, Tensor]:
        """{name: [B]} scores of every reward, on `decode_batch_size` samples at a time (non-finite
        kept with `reward_failure="drop_group"`). Runs on the scoring thread with `async_scoring`:
        it must not log."""
        drop = self.hparams.reward_failure == "drop_group"
        images, scores = trajectories.images, {}
        for chunk in self._decode_chunks(trajectories.batch_size, pixels.device):
            prompts = [trajectories.prompts[i] for i in chunk.tolist()]
            chunk_scores = self.rewards(pixels[chunk], prompts, None if images is None else images[chunk], allow_nonfinite=drop)
            for name, values in chunk_scores.items():
                scores.setdefault(name, []).append(values)
        return {name: torch.cat(values) for name, values in scores.items()}

    def _decode_chunks(self, num_samples: int, device: torch.device) -> tuple[Tensor, ...]:
        return torch.arange(num_samples, device=device).split(self.hparams.decode_batch_size)

    def _advantages_across_ranks(self, trajectories: Rollout, scores: dict[str, Tensor]):
        """Step 3b-4 for groups spanning ranks, on the gathered rewards of whole groups.

        Returns (this rank's trained samples, the trained scores of all ranks (for logging),
        their advantages [B'], this rank's samples of the kept groups [B''], those samples'
        per-reward normalised rewards), identical to what one process holding every group computes.
        """
        hp = self.hparams
        gathered = gather_by_key(scores, trajectories.sample_keys, hp.group_size)
        full, num_full = gathered.scores, gathered.num_groups * hp.group_size
        kept_full = torch.arange(num_full, device=gathered.position.device)
        if hp.reward_failure == "drop_group":  # every rank sees every reward: the same groups go
            kept_full = self._nonfinite_filter(full, num_full).keep.to(kept_full.device)
            full = {name: s[kept_full] for name, s in full.items()}
        kept, kept_rows = local_selection(gathered.position, kept_full, num_full)
        if kept_full.numel() == 0:
            return trajectories.select(kept), {}, torch.zeros(0), kept, {}
        _, per_reward = multi_reward_advantages(full, self.rewards.weights, hp.group_size, std_mode=hp.advantage_std)
        chosen, trained_scores, advantages = self._select(full)
        chosen_full = kept_full if chosen is None else kept_full[chosen]
        local, rows = local_selection(gathered.position, chosen_full, num_full)
        return (
            trajectories.select(local), trained_scores, advantages[rows], kept,
            {name: v[kept_rows] for name, v in per_reward.items()},
        )

    def _drop_nonfinite_groups(self, trajectories: Rollout, pixels: Tensor, scores: dict[str, Tensor]) -> tuple[Rollout | None, Tensor, dict[str, Tensor]]:
        """Step 3b (`reward_failure="drop_group"`): keep the groups whose rewards are all finite,
        warn naming each failing reward; (None, ...) when no group is left."""
        kept = self._nonfinite_filter(scores, trajectories.batch_size)
        if not kept.dropped_groups:
            return trajectories, pixels, scores
        if kept.keep.numel() == 0:
            return None, pixels, scores
        keep = kept.keep.to(pixels.device)
        return trajectories.select(keep), pixels[keep], {name: s[keep.to(s.device)] for name, s in scores.items()}

    def _nonfinite_filter(self, scores: dict[str, Tensor], num_samples: int):
        """The groups to keep (`filter_nonfinite_groups`), logged, with a warning naming each
        failing reward when any group is dropped."""
        kept = filter_nonfinite_groups(scores, self.hparams.group_size)
        self.log("train/reward/dropped_groups", float(kept.dropped_groups), on_step=True, batch_size=max(num_samples, 1))
        if kept.dropped_groups:
            counts = ", ".join(f"{name!r} on {n} sample(s)" for name, n in kept.nonfinite_samples.items())
            outcome = "skipping this update" if kept.keep.numel() == 0 else "training on the others"
            step = self.trainer.global_step if self._trainer is not None else 0
            warnings.warn(
                f"non-finite reward from {counts}: dropping {kept.dropped_groups} of {kept.num_groups} groups "
                f"at step {step}, {outcome}", RuntimeWarning, stacklevel=3,
            )
        return kept

    def _advantages(self, trajectories: Rollout, scores: dict[str, Tensor]) -> tuple[Rollout, dict[str, Tensor], Tensor]:
        """Step 4 (`lightning_grpo.grpo.advantages.grpo_advantages`): advantages [B'] ("sum") or
        [B', K] ("per_reward") of the trained samples, and those samples (best-of-n)."""
        chosen, scores, advantages = self._select(scores)
        return (trajectories if chosen is None else trajectories.select(chosen)), scores, advantages

    def _select(self, scores: dict[str, Tensor]) -> tuple[Tensor | None, dict[str, Tensor], Tensor]:
        """Step 4 on whole groups: (best-of-n indices or None, their scores, their advantages)."""
        hp = self.hparams
        result = grpo_advantages(
            scores, self.rewards.weights, hp.group_size, form=hp.multi_reward, best_of_n=hp.best_of_n,
            best_of_n_advantages=hp.best_of_n_advantages, std_mode=hp.advantage_std, clip_max=hp.adv_clip_max,
        )
        if result.chosen is None:
            return None, scores, result.advantages
        return result.chosen, {name: s[result.chosen.to(s.device)] for name, s in scores.items()}, result.advantages

    def _loss_weights(self, advantages: Tensor) -> Tensor | None:
        """Tensor[K] reward weights for per-reward advantages [B, K] (reward order), else None."""
        if advantages.ndim == 1:
            return None
        return torch.tensor([r.weight for r in self.rewards.rewards], dtype=torch.float32, device=advantages.device)

    def _update(
        self, trajectories: Rollout, advantages: Tensor, allow_partial: bool = False, padding: Rollout | None = None,
    ) -> tuple[list[GRPOStats], list[Tensor]]:
        """Step 5: recompute log-probs on random timesteps and apply the clipped loss.

        Each optimizer step accumulates micro-batches × timesteps; every backward but the last
        of a step runs under DDP's `no_sync`, so gradients are all-reduced once per optimizer
        step. A sample's loss is weighted by world_size / (samples of its optimizer step over
        all ranks) / K: DDP's average then makes the gradient the mean over every rank's samples
        × timesteps, whatever each rank holds. `allow_partial` (groups were dropped): the last
        optimizer step may hold fewer than `samples_per_update` samples. When ranks may hold
        different numbers of samples they agree on the number of optimizer steps; a rank with
        none in a step runs one zero-weight backward on a sample of `padding` to take part in
        the all-reduce."""
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        num_samples = trajectories.batch_size
        per_update = None if self.policy.uses_cfg or hp.samples_per_update is None else hp.samples_per_update
        agree = self._counts_may_differ()
        if not (allow_partial or agree):
            _check_divides(num_samples, per_update or num_samples, hp.micro_batch_size)
        schedule = update_schedule(num_samples, per_update, agree)
        candidates = trainable_steps(self.sampler, trajectories.sde_steps, hp.drop_last_timestep)
        steps = self._timestep_indices(trajectories, candidates).to(self.device)  # [B, K]
        order = torch.randperm(num_samples, generator=self._generator(offset=1, device="cpu")).to(self.device)  # [B]
        num_trained = steps.shape[1]
        stats, grad_norms = [], []
        for k_opt, positions in enumerate(self._progress("update")(schedule.local)):
            samples_of_step = order[positions.start : positions.stop]
            # not split() alone: it cuts an empty tensor into one empty micro-batch, not into none
            micro_batches = samples_of_step.split(hp.micro_batch_size) if len(positions) else ()
            calls = [(m, k) for m in micro_batches for k in range(num_trained)]
            weight = schedule.weight(k_opt) / num_trained
            if not calls:  # nothing of ours in this step: a zero-weight backward keeps the all-reduce in step
                pad = torch.zeros(1, dtype=torch.long, device=self.device)
                loss, _ = self._micro_loss(padding, torch.zeros(1, device=self.device), pad, candidates[:1].to(self.device))
                self.manual_backward(loss * 0.0)
            losses = []
            for n, (samples, k) in enumerate(calls):
                with nullcontext() if n == len(calls) - 1 else skip_gradient_sync(self._strategy_model()):
                    loss, step_stats = self._micro_loss(trajectories, advantages, samples, steps[samples, k])
                    self.manual_backward(loss * samples.numel() * weight)
                stats.append(step_stats)
                losses.append(loss.detach())
            self._step_losses = losses  # named by the non-finite guard's message
            grad_norms.append(self._optimizer_step(optimizer, scheduler))
        return stats, grad_norms

    def _watch_constant_reward(self, advantages: Tensor) -> None:
        """Warn once `constant_reward_steps` training steps in a row had every advantage 0 (each
        reward constant within every group): such steps change nothing."""
        if advantages.numel() == 0:
            return
        self._constant_steps = self._constant_steps + 1 if bool((advantages == 0).all()) else 0
        if self._constant_steps == self.hparams.constant_reward_steps:
            step = self.trainer.global_step if self._trainer is not None else 0
            warnings.warn(
                f"the reward was constant within every group for {self._constant_steps} training steps in a row (up to "
                f"optimizer step {step}): every advantage is 0 and nothing is learned; check the reward (one that never "
                "varies, e.g. a verifier that always fails?) or sample more varied groups (group_size, the sampler's eta)",
                RuntimeWarning, stacklevel=3,
            )

    def _timestep_indices(self, trajectories: Rollout, candidates: Tensor) -> Tensor:
        """Each sample's random subset of trained steps [B, K], keyed by its (group, member), so
        it is the same on any rank and in any batch (see `lightning_grpo.noise`)."""
        seed = self._generator(offset=1, device="cpu", per_rank=False).initial_seed()
        return keyed_timestep_indices(trajectories.sample_keys, candidates, self.hparams.timestep_fraction, seed)

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
            reward_weights=self._loss_weights(advantages),
        )

    def _optimizer_step(self, optimizer, scheduler) -> Tensor:
        """Clip, step, and guard against non-finite values: the gradient norm (the same on every
        rank: gradients are all-reduced, so a NaN loss on one rank reaches every rank's norm) is
        checked before the step, the trainable weights after it (`nonfinite`)."""
        losses, self._step_losses = self._step_losses, []
        max_norm = self.hparams.max_grad_norm
        params = [p for p in self.policy.trainable_parameters() if p.grad is not None]
        sharded = any(isinstance(p, DTensor) for p in params)
        if sharded:  # FSDP: the norm over every rank's shards
            grad_norm = _full(torch.nn.utils.get_total_norm([p.grad for p in params]))
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params])) if params else torch.zeros(())
        if not torch.isfinite(grad_norm):
            message = self._nonfinite_message("gradient norm", float(grad_norm), losses)
            if self.hparams.nonfinite == "stop":
                raise NonFiniteError(message)
            warnings.warn(f"{message}: skipping this optimizer step (nonfinite='skip')", RuntimeWarning, stacklevel=3)
            optimizer.zero_grad(set_to_none=True)
            return grad_norm
        if max_norm is not None and sharded:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)
        elif max_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._check_weights_finite(losses)
        return grad_norm

    def _check_weights_finite(self, losses: list[Tensor] | None) -> None:
        """NonFiniteError naming the first trainable tensor holding NaN/inf after a step
        (`checkpointing.nonfinite_tensors`: a fused norm per tensor, on this rank's shards); with
        several ranks the verdict is all-reduced (a sharded model's NaN may sit on one rank only,
        and a rank stopping alone would leave the others waiting)."""
        named = [(name, p.detach()) for name, p in self.policy.named_parameters() if p.requires_grad]
        named = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in named]
        named = [(name, t) for name, t in named if t.numel()]
        bad_indices = nonfinite_tensors([t for _, t in named])
        bad = torch.tensor([1.0 if bad_indices else 0.0], device=self.device)
        if self._world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            return
        name = f"policy.{named[bad_indices[0]][0]}" if bad_indices else "on another rank"
        raise NonFiniteError(self._nonfinite_message(f"weight {name}", float("nan"), losses, after_step=True))

    def _nonfinite_message(self, quantity: str, value: float, losses: list[Tensor] | None, after_step: bool = False) -> str:
        """"training diverged at optimizer step N: the <quantity> is <value> (mean loss ...)" with the remedy."""
        step = self.trainer.global_step if self._trainer is not None else 0
        step = step if after_step else step + 1  # the optimizer step that was being made
        loss = torch.stack([l.detach().float() for l in losses]).mean().item() if losses else None
        what = "not finite after the update" if after_step else f"{value}"
        return (
            f"training diverged at optimizer step {step}: the {quantity} is {what}"
            + ("" if loss is None else f" (mean loss of the step: {loss:.4g})")
            + f"; lower model.learning_rate (now {self.hparams.learning_rate:g}) or set model.max_grad_norm; "
            "nothing of this step is saved, the last checkpoint holds the weights before it"
        )

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._val_parts = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_parts.append(self._evaluate(batch, batch_idx, "val"))

    def on_validation_epoch_end(self) -> None:
        """Log `val/reward/{name}`: the mean over every rank's samples, each held-out prompt once."""
        self._log_evaluation(gather_results(getattr(self, "_val_parts", []), 0), "val")
        self._val_parts = []

    def on_test_epoch_start(self) -> None:
        self._test_parts = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._test_parts.append(self._evaluate(batch, batch_idx, "test"))

    def on_test_epoch_end(self) -> None:
        """Gather every rank's test samples (each held-out prompt once, in the split's order: the
        repeats that pad the last block are dropped), log mean and 95% interval per reward
        (`test/reward/{name}`, `..._ci_low`, `..._ci_high`) and, on rank zero, write results.csv,
        results.md and grid.png into `<log_dir>/test/` and print the table."""
        result = gather_results(self._test_parts, self.hparams.test_grid_size)
        self._test_parts, self.test_results = [], result
        self._log_evaluation(result, "test")
        for name, (mean, low, high, n) in result.summary().items():
            interval = {f"test/reward/{name}_ci_low": low, f"test/reward/{name}_ci_high": high, f"test/reward/{name}_n": float(n)}
            self.log_dict(interval, sync_dist=True)  # the same on every rank (gathered)
        directory = Path(self.trainer.log_dir or ".") / "test"  # a collective (a broadcast): on every rank
        if self.trainer.is_global_zero:
            result.write(directory)
            print(f"Held-out test, {len(result.prompts)} samples (written to {directory}):\n{result.to_markdown()}")

    def _evaluate(self, batch: dict[str, Any], batch_idx: int, stage: str) -> EvaluationResult:
        """Deterministic (eta = 0) samples from fixed per-sample seeds, scored by every reward.

        Noise is keyed by (seed, the prompt's position in the held-out split, sample), through
        `lightning_grpo.evaluation` with its own generators: any number of ranks draws the samples
        of one process, and evaluating never moves the training random stream. (A batch without
        positions, from another datamodule, keys it by (seed, batch, rank, position).)
        """
        indices = batch.get("indices")
        rank = self.global_rank if self._trainer is not None else 0
        seed = self.hparams.seed if indices is not None else sample_seed(self.hparams.seed, batch_idx, rank)
        keep = stage == "test" and sum(len(p.prompts) for p in self._test_parts) < self.hparams.test_grid_size
        return evaluate(
            self.policy, self.sampler, batch["prompts"], self.rewards, seed=seed, batch_size=self.hparams.decode_batch_size,
            keep_pixels=keep, images=self.batch_first_frames(batch), show_progress=False,
            allow_nonfinite=self.hparams.reward_failure == "drop_group", indices=indices,
        )

    def _log_evaluation(self, result: EvaluationResult, stage: str) -> None:
        """`{stage}/reward/{name}`: the mean over the gathered samples (the same on every rank; with
        `drop_group`, of the finite ones, and `..._nonfinite` counts the others)."""
        if not result.prompts:  # nothing evaluated (no batch, or blocks without one readable image)
            return
        for name, s in result.scores.items():
            finite = torch.isfinite(s)
            mean = s[finite].mean() if finite.any() else torch.tensor(float("nan"))
            # sync_dist: every rank holds the same gathered value (its mean over ranks is itself)
            self.log(f"{stage}/reward/{name}", mean.to(self.device), batch_size=len(s), sync_dist=True)
            if self.hparams.reward_failure == "drop_group":
                self.log(f"{stage}/reward/{name}_nonfinite", (~finite).sum().float().to(self.device), batch_size=len(s), sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def rebuilt_keys(self) -> set[str]:
        """State the config rebuilds exactly, left out of checkpoints: reward models, the KL
        reference, the first-frame image policy, and the policy's frozen weights (text encoders, VAE, LoRA base weights), which
        would otherwise add gigabytes (T5-XXL, ViT-H, Qwen2-VL) to every checkpoint. (Under FSDP
        `state_dict()` returns each rank's shards: nothing is gathered to list the keys.)"""
        saved = set(self.state_dict())
        keys = {k for k in saved if k.startswith(("rewards.", "reference_policy.", "first_frames."))}
        # remove_duplicate=False: tied weights (T5's encoder.embed_tokens = shared) under every name
        keys |= {f"policy.{name}" for name, p in self.policy.named_parameters(remove_duplicate=False) if not p.requires_grad}
        # the policy's buffers too: rebuilt from its config and never trained (SD3's sin-cos position table)
        keys |= {f"policy.{name}" for name, _ in self.policy.named_buffers(remove_duplicate=False)} & saved
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in self.rebuilt_keys() & set(state):
            del state[key]
        checkpoint[SIGNATURE_KEY] = model_signature(self)
        if self._scoring is not None:  # the rollout being scored, with its scores: exact resume
            checkpoint[ASYNC_SCORING_KEY] = checkpoint_entry(self._scoring.state_dict())  # every rank's, on rank zero
        # never write NaN/inf weights or optimizer state (the non-finite guard stops a run first)
        check_finite(checkpoint, "refusing to write a checkpoint")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (naming what differs) or one with nothing left to
        train; write changed optimizer settings into its optimizer state (see `checkpointing`)."""
        path = self.trainer.ckpt_path if self._trainer is not None else None
        check_signature(checkpoint, self, path)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            check_max_steps(checkpoint, self.trainer.max_steps, path)
            changes = apply_resume_overrides(_with_loaded_optimizers(checkpoint, self.trainer), self.hparams)
            if changes:
                listed = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
                rank_zero_info(f"Resuming with changed settings (applied from the next step): {listed}")
        if "state_dict" not in checkpoint:  # sharded (FSDP): the strategy loaded the weights already
            return
        # keep strict loading: the rebuilt entries are filled in from the freshly built module
        state, current = checkpoint["state_dict"], self.state_dict()
        for key in self.rebuilt_keys():
            state.setdefault(key, current[key])
        if self._scoring is not None:
            rank = self.global_rank if self._trainer is not None else 0
            self._scoring.load_state_dict(rank_state(checkpoint.get(ASYNC_SCORING_KEY), rank, self._world_size()))

    def teardown(self, stage: str) -> None:
        if self._scoring is not None:  # stop the scoring thread; a pending rollout lives on in the last checkpoint
            self._scoring.close()

    # ------------------------------------------------------------------ helpers
    def _sde_steps(self) -> Tensor | None:
        """This rollout's SDE-step mask from `step_schedule` (None: all steps). Its iteration is the
        rollout's index in training (restored on resume); its generator depends on (seed,
        iteration) only, so every rank branches at the same steps. Logs the first SDE step."""
        if self.step_schedule is None:
            return None
        iteration = self.trainer.fit_loop.epoch_loop.total_batch_idx if self._trainer is not None else 0
        generator = torch.Generator().manual_seed((self.hparams.seed * 1_000_003 + max(iteration, 0) * 1_009 + 17) % (2**63))
        mask = self.step_schedule.sde_steps(self.sampler.num_steps, max(iteration, 0), generator)
        if self._trainer is not None:
            self.log("train/sde_steps/first", float(mask.nonzero()[0, 0]) if mask.any() else -1.0, on_step=True, batch_size=1)
        return mask

    def _rollout_generator(self) -> torch.Generator:
        """The rollout's noise generator: keyed by the global step (synchronous scoring), or by
        the rollout's index in training with `async_scoring` (whose first two rollouts share
        global step 0). Both are restored on resume; the sample keys are added by `rollout`."""
        if self._scoring is None or self._trainer is None:
            return self._generator(offset=0, per_rank=False)
        iteration = max(self.trainer.fit_loop.epoch_loop.total_batch_idx, 0)
        return torch.Generator(device=self.device).manual_seed((self.hparams.seed * 1_000_003 + iteration * 1_009 + 7) % (2**63))

    def _generator(self, offset: int, device: torch.device | str | None = None, per_rank: bool = True) -> torch.Generator:
        """Seeded by (seed, global step, rank, offset): distinct per rank, reproducible on resume.
        `per_rank=False` leaves the rank out, for what is keyed by sample instead (the rollout)."""
        rank = self.global_rank if self._trainer is not None and per_rank else 0
        step = self.trainer.global_step if self._trainer is not None else 0
        seed = (self.hparams.seed * 1_000_003 + step * 1_009 + rank * 101 + offset) % (2**63)
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def _progress(self, phase: str):
        enabled = self.hparams.show_progress and (self._trainer is None or self.trainer.is_global_zero)
        # disable=None: tqdm turns itself off when stderr is not a terminal (a log file would get
        # a carriage-return-joined line of bar frames per rollout)
        return lambda iterable: tqdm(iterable, desc=phase, leave=False, disable=None if enabled else True, dynamic_ncols=True)

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
        self._log_reward(scores, num_samples)

    def _log_reward(self, scores: dict[str, Tensor], num_samples: int) -> None:
        """Log `reward`, the mean of the rewards' means over every rank's trained samples (one
        all-reduce, on every rank: a rank that trained nothing adds zeros), so the number the
        progress bar shows and `GRPOCheckpoint` ranks checkpoints by is the run's, not rank zero's."""
        names = [r.name for r in self.rewards.rewards]
        sums = torch.stack([scores[n].float().sum() if n in scores else torch.zeros((), device=self.device) for n in names])
        means = mean_over_ranks(sums, num_samples)
        if means is not None:
            self.log("reward", means.mean(), prog_bar=True, batch_size=max(num_samples, 1))

    def _trained_group_size(self) -> int:
        best = self.hparams.best_of_n
        return self.hparams.group_size if best is None else sum(best)


ASYNC_SCORING_KEY = "grpo_async_scoring"
"""Checkpoint entry of the rollout pending under `async_scoring` (see `AsyncScoring.state_dict`)."""


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


def _full(value: Tensor) -> Tensor:
    """A DTensor's full value (a norm reduced over the ranks' shards), a plain tensor as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _with_loaded_optimizers(checkpoint: dict[str, Any], trainer: Any) -> dict[str, Any]:
    """The checkpoint, or, when the strategy has already loaded the optimizer state itself (a
    sharded checkpoint holds it in its shards, not under "optimizer_states"), the checkpoint with
    the live optimizers' parameter groups in that place, so resume overrides are written there."""
    if "optimizer_states" in checkpoint or "state_dict" in checkpoint:
        return checkpoint
    return {**checkpoint, "optimizer_states": [{"param_groups": o.param_groups} for o in trainer.strategy.optimizers]}


def _check_training_sampler(sampler: Sampler) -> None:
    if sampler.eta <= 0:
        raise ValueError(f"the training sampler needs eta > 0 (got {sampler.eta}): an ODE sampler has no log-probability")


def _check_divides(num_samples: int, per_update: int, micro_batch_size: int) -> None:
    if num_samples % per_update or per_update % micro_batch_size:
        raise ValueError(
            f"{num_samples} trained samples per rollout must split into optimizer steps of samples_per_update="
            f"{per_update}, each made of micro-batches of {micro_batch_size}"
        )
