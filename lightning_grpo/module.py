"""GRPOModule: online RL of a visual generator as a LightningModule: any policy adapter, sampler,
rewards and objective (GRPO by default, DiffusionNFT: `lightning_grpo.objectives`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_grpo import distributed as ranks
from lightning_grpo.checkpointing import load_module_checkpoint, rebuilt_keys, save_module_checkpoint
from lightning_grpo.evaluation import EvaluationResult, evaluate_batch, gather_results, log_evaluation
from lightning_grpo.first_frames import FirstFrames, batch_first_frames
from lightning_grpo.grpo.advantages import BestOfNAdvantages, MultiRewardForm, StdMode
from lightning_grpo.grpo.filtering import filter_nonfinite_groups
from lightning_grpo.objectives import GRPO, Objective
from lightning_grpo.objectives.base import resolve_objective
from lightning_grpo.optimization import adamw_with_warmup, guarded_step
from lightning_grpo.noise import StepStreams
from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.progress import PhaseTimer, log_reward, phase_bar, step_logs
from lightning_grpo.rewards.base import MultiReward, Reward
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.samplers.ode_tail import MultistepODETail
from lightning_grpo.samplers.step_schedule import StepSchedule
from lightning_grpo.scoring import ASYNC_SCORING_KEY, AsyncScoring, Scored, decode_and_score, score  # noqa: F401 (ASYNC_SCORING_KEY: its home was here)
from lightning_grpo.types import Rollout, StepRecord
from lightning_grpo.validation import ConstantRewardWatch, SkipGuard, check_module_parts, check_reward_weights, validate_fit, watch_selection


class GRPOModule(LightningModule):
    """Online RL of a visual generator (DanceGRPO's GRPO by default), with manual optimisation.

    Each training step: roll out G samples per prompt → decode and score them → the objective
    turns the scores into training targets → update (micro-batches × the objective's trained
    columns, `samples_per_update` samples per optimizer step) → log. Options of the objective
    (GRPO's `clip_range`, `best_of_n`, ...) live in `objective`; docs/architecture.md has the contract.

    Args:
        policy: the base-model adapter (a family of `lightning_grpo.policies`, e.g. FLUX.1).
        sampler: the sampler of the policy's paradigm; None (default): `policy.build_sampler()`.
        rewards: one or more rewards, each normalised within its group and weighted by its `weight`.
        objective: the RL objective (`lightning_grpo.objectives.GRPO` when None, `DiffusionNFT`).
        group_size: G, samples per prompt (FLUX 12, SD 16, HunyuanVideo 24, SkyReels 8).
        shared_noise: same initial noise for the G samples of a prompt; None: the objective's
            choice (GRPO: shared, the DanceGRPO finding; ODE rollouts: each its own).
        micro_batch_size: samples per forward/backward in the update (memory knob).
        samples_per_update: samples whose gradients are accumulated per optimizer step (must divide
            the trained samples); None = one step per rollout; ignored with CFG (one step).
        learning_rate, weight_decay, adam_betas, adam_eps: AdamW settings (DanceGRPO: 1e-5, 1e-4).
        lr_warmup_steps: linear warm-up over this many optimizer steps, then constant.
        max_grad_norm: gradient-norm clip per optimizer step (1.0); None disables clipping.
        decode_batch_size: samples decoded and scored at once (memory knob).
        rollout_batch_size: samples rolled out at once (memory knob; None = all). Noise is keyed by sample.
        groups_across_ranks: the G samples of a prompt are split over the ranks (G divisible by
            the world size); rewards are all-gathered for the group statistics (`distributed`).
        reward_failure: a non-finite reward "raise"s a `RewardError` (default) or, "drop_group",
            leaves every group holding such a sample out of the update (logged as
            `train/reward/dropped_groups`; the step is skipped if no group is left).
        seed: base seed of the rollout noise and the update's random choices (`lightning_grpo.noise`).
        show_progress: progress bars for the rollout and update phases (rank zero, in a terminal).
        step_schedule: which rollout steps are SDE steps (MixGRPO `SlidingWindow`, Flow-GRPO-Fast
            `RandomBranch`); None = all.
        ode_tail: a fewer-step `MultistepODETail` after the last SDE step (MixGRPO-Flash).
        max_skipped_steps: stop after this many training steps in a row were skipped.
        first_frames: image-to-video without images in the data: a `FirstFrames` source.
        async_scoring: score each rollout in the background and train on the previous one
            (`lightning_grpo/scoring.py`); the first step only rolls out. Resume stays exact.
        nonfinite: a NaN/inf gradient norm "stop"s the run with a `NonFiniteError` or ("skip")
            skips that optimizer step (`lightning_grpo.optimization`).
        constant_reward_steps: warn after this many steps in a row with every advantage 0.
        timestep_fraction, drop_last_timestep, clip_range, adv_clip_max, advantage_std, best_of_n,
            best_of_n_advantages, multi_reward, kl_beta: the `GRPO` objective's options, flat (the
            form of recipes written before objectives existed): one that is set overrides the
            objective's option of that name; one the objective does not take is refused unless it
            equals GRPO's default (`objectives.base.resolve_objective`).

    Attributes for callbacks:
        last_step: `StepRecord` of the last training step (an empty one on a rank that trained
            nothing while others did), or None; released when the next step starts.
        rollout_weights: context-manager factory entered around the rollout (the EMA callback's
            `use_for_rollouts`).
    """

    def __init__(
        self,
        policy: PolicyAdapter,
        sampler: Sampler | None = None,
        rewards: list[Reward] | None = None,  # required; a default only because `sampler` before it has one
        objective: Objective | None = None,
        group_size: int = 12,
        shared_noise: bool | None = None,
        micro_batch_size: int = 1,
        samples_per_update: int | None = None,
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
        step_schedule: StepSchedule | None = None,
        ode_tail: MultistepODETail | None = None,
        max_skipped_steps: int = 5,
        first_frames: FirstFrames | None = None,
        async_scoring: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
        constant_reward_steps: int = 5,
        # the GRPO objective's options, flat (None: the objective's own value)
        timestep_fraction: float | None = None, drop_last_timestep: bool | None = None, clip_range: float | None = None,
        adv_clip_max: float | None = None, advantage_std: StdMode | None = None, best_of_n: tuple[int, int] | None = None,
        best_of_n_advantages: BestOfNAdvantages | None = None, multi_reward: MultiRewardForm | None = None, kl_beta: float | None = None,
    ) -> None:  # pragma: no mutate block (a mutmut trampoline would hide these arguments from save_hyperparameters)
        super().__init__()
        ignored = ["policy", "sampler", "rewards", "objective", "step_schedule", "ode_tail", "first_frames"]
        self.save_hyperparameters(ignore=ignored)
        self.objective = resolve_objective(objective, {name: self.hparams[name] for name in GRPO.option_names()})
        self.hparams.update({name: getattr(self.objective, name, None) for name in GRPO.option_names()})  # what it trains with
        sampler = policy.build_sampler() if sampler is None else sampler  # the family's own sampler by default
        check_module_parts(self.hparams, self.objective, policy, sampler, step_schedule, ode_tail)
        self.policy, self.sampler, self.step_schedule, self.ode_tail, self.first_frames = policy, sampler, step_schedule, ode_tail, first_frames
        self.rewards = MultiReward(list(rewards or []))  # raises without a reward
        check_reward_weights(self.rewards.weights)
        self.objective.attach(self)
        # KL reference: only what the initial policy needs beyond the trained one (LoRA: nothing)
        self.reference_policy = policy.kl_reference() if self.objective.uses_reference else None
        self._skips, self._constant = SkipGuard(max_skipped_steps), ConstantRewardWatch(constant_reward_steps)
        self._step_losses: list[Tensor] = []  # micro-batch losses of the optimizer step being made
        self.automatic_optimization = False
        self.last_step: StepRecord | None = None
        self.rollout_weights: Callable[[], AbstractContextManager] = nullcontext
        self.keep_test_pixels = False  # set by the TestReport callback while its grid wants samples
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
        """What DDP leaves alone: every frozen parameter and every buffer (read when DDP wraps
        this module and by Lightning's state sync; `distributed.replicated_state_names` says why)."""
        return ranks.replicated_state_names(self)

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        """Let a sharding strategy shard the denoiser (`DenoiserFSDPStrategy.shard_module`) once
        the processes are set up and before the optimizer is built; nothing under any other."""
        shard = getattr(self.trainer.strategy, "shard_module", None) if self._trainer is not None else None
        if callable(shard):
            shard(self)

    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(self.policy, self.hparams)

    def setup(self, stage: str) -> None:
        """Checks that need the trainer and data (batch divisibility per rank, trainer options
        manual optimisation refuses): they fail here, before any rollout or evaluation."""
        if stage == "fit" and self._trainer is not None:
            validate_fit(self, self.trainer)

    def on_fit_start(self) -> None:
        if self._spans_ranks():
            ranks.members_of_rank(self.hparams.group_size, self.global_rank, self.trainer.world_size)  # validates G % W

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One iteration: rollout → score → objective targets → update → log."""
        self.last_step, timer = None, PhaseTimer(self.device)  # release the last step's tensors
        work = ranks.rank_prompts(batch["prompts"], self.batch_first_frames(batch), self.hparams.group_size, self._spans_ranks())
        if not work.prompts:  # every image of a whole block of the data was unreadable (on every rank alike)
            return self._skips.empty_batch()
        with timer("rollout"), self.rollout_weights(), self.objective.sampling_weights(self):
            trajectories = self._rollout(work)
        scored = decode_and_score(self.policy, trajectories, self.hparams.decode_batch_size, self._score, self._scoring, timer)
        if scored is None:  # async scoring, first rollout: nothing scored yet
            return
        selection = self._select(scored, work.members)  # the objective's targets, the samples this rank trains
        if not self._count_dropped(selection):  # every group dropped: no update
            return
        with timer("update"):
            stats, grad_norms = self._update(selection)
        self.objective.after_update(self)
        if selection.trained.batch_size == 0:  # other ranks trained: callbacks run alike on every rank
            self.last_step = selection.record(list(self.rewards.weights), empty=True) if self._world_size() > 1 else None
            return log_reward(self, {}, 0) if self._world_size() > 1 else None  # its part (none) of the reward's all-reduce
        self._log_step(selection, stats, grad_norms, timer)
        self.last_step = selection.record(list(self.rewards.weights))

    def _count_dropped(self, selection: ranks.StepSelection) -> bool:
        """`validation.watch_selection`: skipped steps, constant rewards; False: nothing to update here."""
        world, step = self._world_size(), self.trainer.global_step if self._trainer is not None else 0
        return watch_selection(self._skips, self._constant, selection, self.hparams.reward_failure == "drop_group",
                               whole_groups=self._spans_ranks() or world == 1, alone=world == 1, step=step)

    def _rollout(self, work: ranks.RankPrompts) -> Rollout:
        """P·G trajectories (this rank's members), `rollout_batch_size` at a time, noise keyed by
        (global group, member); SDE steps where the objective needs log-probs, else ODE."""
        hp, needs = self.hparams, self.objective.needs
        shared = needs.shared_noise if hp.shared_noise is None else hp.shared_noise
        sde_steps = self._sde_steps() if needs.log_probs else torch.zeros(self.sampler.num_steps, dtype=torch.bool)
        asynchronous = self._scoring is not None and self._trainer is not None  # rollouts keyed by their index in training
        return rollout(
            self.policy, self.sampler, work.prompts, hp.group_size, self._streams().rollout(self._iteration() if asynchronous else None, self.device), shared_noise=shared,
            images=work.images, progress=self._progress("rollout"), chunk_size=hp.rollout_batch_size,
            first_group=work.first_group, members=work.members, sde_steps=sde_steps, ode_tail=self.ode_tail,
        )

    def _score(self, trajectories: Rollout, pixels: Tensor) -> dict[str, Tensor]:
        drop = self.hparams.reward_failure == "drop_group"
        return score(self.rewards, trajectories, pixels, self.hparams.decode_batch_size, allow_nonfinite=drop)

    def _select(self, scored: Scored, members: range | None) -> ranks.StepSelection:
        """Steps 3b-4 (`distributed.select_for_update`): dropped groups, targets, trained samples."""
        hp = self.hparams
        return ranks.select_for_update(
            scored.trajectories, scored.pixels, scored.scores, targets_of=lambda s: self.objective.targets(s, self.rewards.weights, hp.group_size),
            filter_groups=self._nonfinite_filter if hp.reward_failure == "drop_group" else None,
            group_size=hp.group_size, spans_ranks=self._spans_ranks(), members=members,
        )

    def _update(self, selection: ranks.StepSelection) -> tuple[list[Any], list[Tensor]]:
        """Step 5: micro-batches × the objective's columns per optimizer step (`distributed.
        plan_update`: the mean gradient over every rank's samples; DDP all-reduces once per
        optimizer step; a rank without samples in a step runs a zero-weight backward)."""
        hp, optimizer, scheduler = self.hparams, self.optimizers(), self.lr_schedulers()
        per_update = None if self.policy.uses_cfg or hp.samples_per_update is None else hp.samples_per_update
        agree = ranks.counts_may_differ(self._world_size(), hp.reward_failure == "drop_group", self._spans_ranks(), self.objective.selects)
        prepared = self.objective.prepare(self, selection.trained, selection.targets, self._column_seed())
        plan = ranks.plan_update(selection.trained.batch_size, selection.partial, per_update=per_update, micro_batch_size=hp.micro_batch_size,
                                 num_columns=prepared.num_columns, order_seed=self._streams().order_seed(), agree=agree, device=self.device)
        loss_of = lambda samples, column: self.objective.loss(self, prepared, samples, column)  # noqa: E731
        stats, grad_norms = [], []
        for micro_steps in self._progress("update")(plan):
            self._step_losses = []  # named by the non-finite guard's message
            for done in (ranks.micro_backward(self, step, loss_of, selection.kept) for step in micro_steps):
                if done is not None:
                    self._step_losses.append(done[0].detach())
                    stats.append(done[1])
            grad_norms.append(self._optimizer_step(optimizer, scheduler))
        return stats, grad_norms

    def _optimizer_step(self, optimizer: Any, scheduler: Any) -> Tensor:
        """Clip, step and guard (`optimization.guarded_step`); the gradient norm before clipping."""
        losses, self._step_losses = self._step_losses, []
        return guarded_step(self, optimizer, scheduler, losses)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._val_parts: list[EvaluationResult] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_parts.append(evaluate_batch(self, batch, batch_idx, "val"))

    def on_validation_epoch_end(self) -> None:
        """Log `val/reward/{name}`: the mean over every rank's samples, each held-out prompt once."""
        self.log_evaluation(gather_results(getattr(self, "_val_parts", []), 0), "val")
        self._val_parts = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> EvaluationResult:
        """The batch's `EvaluationResult`, gathered, logged and reported by the `TestReport` callback."""
        return evaluate_batch(self, batch, batch_idx, "test")

    def log_evaluation(self, result: EvaluationResult, stage: str) -> None:
        """`{stage}/reward/{name}` of gathered results (`evaluation.log_evaluation`)."""
        log_evaluation(self.log, result, stage, self.hparams.reward_failure == "drop_group", self.device)

    def batch_first_frames(self, batch: dict[str, Any]) -> Tensor | None:
        """The batch's first frames [P, 3, H, W] (`first_frames.batch_first_frames`; None: text-to-X)."""
        return batch_first_frames(batch, self.first_frames, self.policy, self.device)

    # ------------------------------------------------------------------ checkpoints
    def rebuilt_keys(self) -> set[str]:
        """State the config rebuilds exactly, left out of checkpoints (`checkpointing.rebuilt_keys`)."""
        return rebuilt_keys(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_module_checkpoint(self, checkpoint, ASYNC_SCORING_KEY)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_module_checkpoint(self, checkpoint, ASYNC_SCORING_KEY)

    def teardown(self, stage: str) -> None:
        if self._scoring is not None:  # stop the scoring thread; a pending rollout lives on in the last checkpoint
            self._scoring.close()

    # ------------------------------------------------------------------ helpers
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _spans_ranks(self) -> bool:
        return bool(self.hparams.groups_across_ranks) and self._world_size() > 1

    def _nonfinite_filter(self, scores: dict[str, Tensor], num_samples: int):
        """The groups to keep (`filter_nonfinite_groups`), logged and warned about (`GroupFilter.report`)."""
        step = self.trainer.global_step if self._trainer is not None else 0
        return filter_nonfinite_groups(scores, self.hparams.group_size).report(self.log, num_samples, step)

    def _sde_steps(self) -> Tensor | None:
        """This rollout's SDE-step mask from `step_schedule` (None: all steps), by the rollout's
        index in training and a generator of (seed, index) alone, so every rank branches at the
        same steps. Logs the first SDE step."""
        if self.step_schedule is None:
            return None
        mask = self.step_schedule.sde_steps(self.sampler.num_steps, self._iteration(), self._streams().schedule(self._iteration()))
        if self._trainer is not None:
            self.log("train/sde_steps/first", float(mask.nonzero()[0, 0]) if mask.any() else -1.0, on_step=True, batch_size=1)
        return mask

    def _streams(self) -> StepStreams:
        """This step's random streams (`noise.StepStreams`: by seed, global step and rank)."""
        on_trainer = self._trainer is not None
        return StepStreams(self.hparams.seed, self.trainer.global_step if on_trainer else 0, self.global_rank if on_trainer else 0)

    def _iteration(self) -> int:
        """The rollout's index in training (Lightning's count of training batches, restored on resume)."""
        return max(self.trainer.fit_loop.epoch_loop.total_batch_idx, 0) if self._trainer is not None else 0

    def _column_seed(self) -> int:
        return self._streams().column_seed()

    def _progress(self, phase: str):
        return phase_bar(phase, self.hparams.show_progress and (self._trainer is None or self.trainer.is_global_zero))

    def _log_step(self, selection: ranks.StepSelection, stats: list[Any], grad_norms: list[Tensor], timer: PhaseTimer) -> None:
        """Log the step (`progress.step_logs`); with nonfinite="skip", count it as skipped when
        every optimizer step had a NaN/inf gradient norm."""
        if self.hparams.nonfinite == "skip":
            self._skips.step(not any(torch.isfinite(g) for g in grad_norms), why="nonfinite='skip'",
                             what="every optimizer step had a NaN/inf gradient norm", remedy="lower model.learning_rate, check the reward")
        lr, num_samples = self.optimizers().param_groups[0]["lr"], selection.trained.batch_size
        logs = step_logs(selection, self.objective, stats, grad_norms, lr, timer, self.hparams.group_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=num_samples)
        log_reward(self, selection.scores, num_samples)

