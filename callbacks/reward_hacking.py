"""Watch for reward hacking: does the training reward keep rising while measures it was meant to
stand for (gold measures, never optimised) fall?

Every `every_n_steps` optimizer steps (and at fit start and end) `RewardHackingMonitor` samples a
FIXED held-out set (same prompts, same per-sample seeds, eta = 0, through
`lightning_grpo.evaluation.evaluate`, so the global RNG and training are untouched) and scores it
with the module's training rewards (their weighted sum is "the training reward") and with the
gold measures: any `Reward`s (a second reward model, a stricter verifier, CLIP alignment) and,
optionally, within-prompt pixel diversity (mean RMS distance between the samples of one prompt).

Logged (TensorBoard and any logger): `hacking/train_reward`, `hacking/gold/{name}` (means), and
`hacking/gap/{name}`: the training reward's change since the first evaluation minus the gold
measure's, each in units of its own spread at the first evaluation (so rewards on different scales
compare). A gap that grows says the training reward is improving faster than what it stands for.

Warning rule (per gold measure, at each evaluation): take the evaluation where the gold measure was
highest so far; warn if, since then, the training reward rose AND the gold measure fell, both by
more than `z` standard errors of the paired per-sample differences (the same samples are scored
each time, so the differences are paired). The warning goes to the console (`rank_zero_warn`) and
to TensorBoard text `hacking/warning`; every evaluation is also a row of `<log_dir>/reward_hacking.csv`.

Artifact and drift measures (`artifacts=True`, lightning_grpo/artifacts.py), independent of every
reward: periodic-pattern energy, energy off the object, colour and exposure (chroma, luma,
clipped highlights, hue shift), KID against the base samples on the features of an encoder the
run already loads (`kid_encoder`, by default the visual tower of the first CLIP-like gold or
training reward), and for video flicker and first-frame adherence on the object. The first
evaluation (the base policy at fit start) is the reference: its samples set each measure's
warning band (`artifact_z`, `ArtifactReference`); a later evaluation whose measure leaves the band
warns, naming the measure, its value, the band and the step the excursion began. Logged as
`hacking/artifacts/{name}` (with `_band_low` / `_band_high` where finite).

Acting on it: `stop_on_hacking=True` stops the run after the evaluation that warned;
`GRPOCheckpoint(keep_good=k)` keeps the last k checkpoints saved at an evaluation this monitor
found clean (`verdicts`), so a run that began to hack still holds its last good model.
The history, the artifact reference and the verdicts are saved in the checkpoint: a resumed
run keeps its baseline (the base policy's samples), not the resumed weights'.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_grpo.artifacts import ArtifactReference, ArtifactStats, Comparison, artifact_stats, resolve_encoder
from lightning_grpo.callbacks._logging import RunFolder, logging_step, tensorboard_writers
from lightning_grpo.callbacks.diversity import pairwise_distances
from lightning_grpo.callbacks.ema import ema_weights
from lightning_grpo.distributed import broadcast_object, rank
from lightning_grpo.callbacks.evaluation import first_frames_for, read_prompts
from lightning_grpo.evaluation import EvaluationResult, evaluate
from lightning_grpo.rewards.base import MultiReward, Reward

TRAIN = "train_reward"
DIVERSITY = "pixel_diversity"


@dataclass
class Observation:
    """One evaluation of the fixed set: per-unit values of every measure (samples, or prompts for diversity)."""

    step: int
    values: dict[str, Tensor]  # name -> Tensor[n] (training reward and gold measures)

    def mean(self, name: str) -> float:
        return float(self.values[name].mean())


def paired_change(before: Tensor, after: Tensor) -> tuple[float, float]:
    """(mean of after − before, its standard error std/√n) over paired units; SE 0 for n = 1."""
    diff = (after - before).double()
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return float(diff.mean()), se


@dataclass
class HackingDetector:
    """The warning rule of the module doc, on a history of `Observation`s (pure, testable).

    Args:
        gold: names of the gold measures (keys of each observation besides `TRAIN`).
        z: standard errors a change must exceed to count (2: about a 2.3% one-sided false-alarm rate per check).
        min_change: smallest absolute change (in the measure's units) that counts, besides `z`.
    """

    gold: list[str]
    z: float = 2.0
    min_change: float = 0.0
    history: list[Observation] = field(default_factory=list)

    def add(self, observation: Observation) -> list[str]:
        """Record an evaluation; return one message per gold measure that now looks hacked."""
        self.history.append(observation)
        return [message for name in self.gold if (message := self._check(name)) is not None]

    def _significant(self, change: float, se: float) -> bool:
        return change > max(self.z * se, self.min_change)

    def _check(self, name: str) -> str | None:
        now = self.history[-1]
        earlier = self.history[:-1]
        if not earlier:
            return None
        best = max(earlier, key=lambda o: o.mean(name))  # where the gold measure was highest
        rise, rise_se = paired_change(best.values[TRAIN], now.values[TRAIN])
        fall, fall_se = paired_change(now.values[name], best.values[name])
        if self._significant(rise, rise_se) and self._significant(fall, fall_se):
            return (f"possible reward hacking at step {now.step}: since step {best.step} the training reward rose "
                    f"{best.mean(TRAIN):.4g} -> {now.mean(TRAIN):.4g} (+{rise:.3g} ± {rise_se:.2g} SE) while gold measure "
                    f"{name!r} fell {best.mean(name):.4g} -> {now.mean(name):.4g} (-{fall:.3g} ± {fall_se:.2g} SE)")
        return None

    def gaps(self) -> dict[str, float]:
        """name -> (Δ training reward / σ_train) − (Δ gold / σ_gold), changes since the first evaluation,
        σ the spread of the per-unit values at the first evaluation (1 where that is 0)."""
        first, now = self.history[0], self.history[-1]

        def standardised(name: str) -> float:
            spread = float(first.values[name].double().std()) if first.values[name].numel() > 1 else 0.0
            return (now.mean(name) - first.mean(name)) / (spread if spread > 0 else 1.0)

        return {name: standardised(TRAIN) - standardised(name) for name in self.gold}


def within_prompt_diversity(pixels: Tensor, samples_per_prompt: int) -> Tensor:
    """Tensor[P]: mean RMS distance between the samples of each prompt (pixels [P·S, ...], prompt-major)."""
    if samples_per_prompt < 2:
        raise ValueError("pixel diversity needs samples_per_prompt >= 2")
    groups = pixels.reshape(-1, samples_per_prompt, *pixels.shape[1:])
    upper = torch.ones(samples_per_prompt, samples_per_prompt, dtype=torch.bool).triu(1)
    return torch.stack([pairwise_distances(group, "rms")[upper].mean() for group in groups])


class RewardHackingMonitor(Callback):
    """Track gold measures beside the training reward on a fixed held-out set; warn on divergence.

    Works with any rewards: e.g. a run trained on HPS with PickScore and CLIP score as gold, or the
    shapes demo trained on the verifier with the toy CLIP as gold. Several processes share the
    samples (each rank generates and scores about 1/W of them; under FSDP each runs the sharded
    forward on its own) and gather the scores; rank zero, which receives the pixels, computes the
    pixel diversity and the artifact measures and sends them to the others, so every rank keeps
    the same history and verdicts; rank zero logs.

    Args:
        prompts_file: the fixed held-out prompts (.txt or .jsonl, as `HeldOutEvaluation`).
        gold_rewards: rewards never optimised (names must differ from the training rewards').
        diversity: also track within-prompt pixel diversity as a gold measure (needs
            samples_per_prompt ≥ 2; falls whenever samples of one prompt converge, which is also
            what learning the right answer looks like in a world with one right image).
        samples_per_prompt: samples per prompt (each with its own seeded noise, same every time).
        every_n_steps: evaluate every this many optimizer steps (plus fit start and end).
        seed: base seed of the evaluation noise.
        batch_size: samples generated and scored at once (memory knob; results do not change).
        max_prompts: use only the first this many prompts.
        z: standard errors of the paired differences a rise / fall must exceed to warn.
        min_change: smallest absolute rise / fall that counts, besides `z`.
        first_frames: first-frame source for image-to-video, as `HeldOutEvaluation`'s (None: the
            module's own `first_frames` source, if any).
        artifacts: also track the artifact and drift measures (module doc) against the base
            samples' band; they count as gold measures (a monitor with only these is valid).
        artifact_z: half-width of each measure's warning band, in the base's standard errors.
        kid_encoder: image encoder for KID (images [B, 3, H, W] in [0, 1] -> features [B, D]),
            or a CLIP-like reward whose visual tower to use; None: the first gold or training
            reward with an open_clip visual tower (no KID when there is none).
        stop_on_hacking: stop training after an evaluation that warned (gold or artifact).
    """

    def __init__(
        self,
        prompts_file: str,
        gold_rewards: list[Reward] | None = None,
        diversity: bool = False,
        samples_per_prompt: int = 2,
        every_n_steps: int = 50,
        seed: int = 4321,
        batch_size: int = 32,
        max_prompts: int | None = None,
        z: float = 2.0,
        min_change: float = 0.0,
        first_frames: nn.Module | None = None,
        artifacts: bool = True,
        artifact_z: float = 3.0,
        kid_encoder: nn.Module | None = None,
        stop_on_hacking: bool = False,
    ) -> None:
        self.first_frames = first_frames
        self.prompts = read_prompts(prompts_file)[:max_prompts]
        if not self.prompts:
            raise ValueError(f"no prompts in {prompts_file}")
        self.gold_rewards = list(gold_rewards or [])
        self.diversity = diversity
        if not self.gold_rewards and not diversity and not artifacts:
            raise ValueError("RewardHackingMonitor needs at least one gold measure (gold_rewards, diversity=True or artifacts=True)")
        if artifact_z <= 0:
            raise ValueError(f"artifact_z must be > 0, got {artifact_z}")
        if diversity and samples_per_prompt < 2:
            raise ValueError(f"diversity needs samples_per_prompt >= 2, got {samples_per_prompt}")
        if every_n_steps < 1 or samples_per_prompt < 1:
            raise ValueError(f"every_n_steps and samples_per_prompt must be >= 1, got {every_n_steps}, {samples_per_prompt}")
        names = [r.name for r in self.gold_rewards] + ([DIVERSITY] if diversity else [])
        if len(set(names)) != len(names) or TRAIN in names:
            raise ValueError(f"gold measure names must be unique and not {TRAIN!r}: {names}")
        self.samples_per_prompt = samples_per_prompt
        self.every_n_steps = every_n_steps
        self.seed, self.batch_size = seed, batch_size
        self.detector = HackingDetector(names, z=z, min_change=min_change)
        self.artifacts, self.artifact_z = artifacts, artifact_z
        self.kid_encoder = kid_encoder
        self.stop_on_hacking = stop_on_hacking
        self.reference: ArtifactReference | None = None  # the base samples' measures and bands
        self.artifact_history: list[tuple[int, dict[str, float]]] = []  # (step, measure -> value)
        self.out_since: dict[str, int] = {}  # measure -> step its current excursion out of the band began
        self.verdicts: dict[int, bool] = {}  # step -> no warning at that evaluation (GRPOCheckpoint keep_good)
        self.warnings: list[str] = []
        self._stats: ArtifactStats | None = None
        self._last_step = -1
        self._folder = RunFolder()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._folder.resolve(trainer)  # a collective: on every rank here, read by rank zero in `_append_csv`
        for module in [*self.gold_rewards, self.first_frames]:  # not part of the module: move them along explicitly
            if module is not None:
                module.to(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.detector.history and self.detector.history[-1].step == trainer.global_step:
            return  # resumed from a checkpoint saved right after this step's evaluation
        self._observe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step // self.every_n_steps > max(self._last_step, 0) // self.every_n_steps:
            self._observe(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self._observe(trainer, pl_module)

    # ------------------------------------------------------------------ measuring
    def measure(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """Per-unit values now: `TRAIN` (weighted sum of the module's rewards) and each gold measure
        (and, with `artifacts`, the samples' `ArtifactStats` in `self._stats`)."""
        training = list(pl_module.rewards.rewards)
        images = first_frames_for(pl_module, self.prompts, self.first_frames)
        result: EvaluationResult = evaluate(
            pl_module.policy, pl_module.sampler, self.prompts, MultiReward([*training, *self.gold_rewards]),
            samples_per_prompt=self.samples_per_prompt, seed=self.seed, batch_size=self.batch_size,
            keep_pixels=self.diversity or self.artifacts, show_progress=False, images=images, split_over_ranks=True,
        )
        values = {TRAIN: sum(r.weight * result.scores[r.name] for r in training)}
        values.update({r.name: result.scores[r.name] for r in self.gold_rewards})
        pixel_measures: tuple[Tensor | None, ArtifactStats | None] = (None, None)
        if rank() == 0 and (self.diversity or self.artifacts):  # the pixels are on rank zero only
            diversity = within_prompt_diversity(result.pixels, self.samples_per_prompt) if self.diversity else None
            stats = None
            if self.artifacts:
                conditioning = images if result.pixels.ndim == 5 else None
                encoder = resolve_encoder(self.kid_encoder, [*self.gold_rewards, *training])
                stats = artifact_stats(result.pixels, conditioning, encoder, self.samples_per_prompt, self.batch_size)
            pixel_measures = (diversity, stats)
        if self.diversity or self.artifacts:
            pixel_measures = broadcast_object(pixel_measures)  # every rank: the same history and verdicts
        if self.diversity:
            values[DIVERSITY] = pixel_measures[0]
        self._stats = pixel_measures[1]
        return values

    def check_artifacts(self, step: int, stats: ArtifactStats) -> tuple[dict[str, Comparison], list[str]]:
        """Compare `stats` with the reference (the first stats seen become it): (comparisons,
        one warning per measure outside its band, naming the step its excursion began)."""
        if self.reference is None:
            self.reference = ArtifactReference(stats, z=self.artifact_z)
        comparisons = self.reference.compare(stats)
        messages = []
        for name, comparison in comparisons.items():
            if not comparison.outside:
                self.out_since.pop(name, None)
                continue
            began = self.out_since.setdefault(name, step)
            messages.append(f"possible reward hacking at step {step}: artifact measure {name!r} left the base samples' band "
                            f"at step {began}: {comparison.describe()}")
        self.artifact_history.append((step, {name: c.value for name, c in comparisons.items()}))
        return comparisons, messages

    def _observe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure on every rank, each its share of the samples (`measure`; every rank ends with
        the same values); rank zero logs and warns."""
        self._last_step = trainer.global_step
        with ema_weights(trainer, pl_module):
            values = self.measure(pl_module)
        # every rank keeps the same detector, reference and verdicts (same prompts, seeds, weights)
        messages = self.detector.add(Observation(trainer.global_step, values))
        comparisons: dict[str, Comparison] = {}
        if self._stats is not None:
            comparisons, artifact_messages = self.check_artifacts(trainer.global_step, self._stats)
            messages += artifact_messages
        self.verdicts[trainer.global_step] = not messages
        if trainer.is_global_zero:
            self._log(trainer, messages, comparisons)
        stop = bool(messages) and self.stop_on_hacking
        trainer.strategy.barrier("reward_hacking_monitor")
        if self.stop_on_hacking and trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True
            if trainer.is_global_zero:
                rank_zero_warn(f"RewardHackingMonitor: stop_on_hacking: stopping the run at step {trainer.global_step}")

    def _log(self, trainer: Trainer, messages: list[str], comparisons: dict[str, Comparison] | None = None) -> None:
        now = self.detector.history[-1]
        metrics = {f"hacking/{TRAIN}": now.mean(TRAIN)}
        metrics.update({f"hacking/gold/{name}": now.mean(name) for name in self.detector.gold})
        metrics.update({f"hacking/gap/{name}": gap for name, gap in self.detector.gaps().items()})
        for name, comparison in (comparisons or {}).items():
            metrics[f"hacking/artifacts/{name}"] = comparison.value
            for bound in ("low", "high"):
                if math.isfinite(getattr(comparison.band, bound)):
                    metrics[f"hacking/artifacts/{name}_band_{bound}"] = getattr(comparison.band, bound)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logging_step(trainer))
        for message in messages:
            rank_zero_warn(f"RewardHackingMonitor: {message}")
            for writer in tensorboard_writers(trainer):
                writer.add_text("hacking/warning", message, global_step=logging_step(trainer))
        self.warnings.extend(messages)
        self._append_csv(trainer, metrics, messages)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The history, the artifact reference (the base samples' stats and bands), the current
        excursions and verdicts: a resumed run keeps comparing with the base, not the resumed weights."""
        return {
            "history": [(o.step, dict(o.values)) for o in self.detector.history],
            "reference": None if self.reference is None else self.reference.state_dict(),
            "artifact_history": list(self.artifact_history),
            "out_since": dict(self.out_since),
            "verdicts": dict(self.verdicts),
            "warnings": list(self.warnings),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.history = [Observation(step, dict(values)) for step, values in state_dict.get("history", [])]
        reference = state_dict.get("reference")
        self.reference = None if reference is None else ArtifactReference.from_state(reference)
        self.artifact_history = [(int(step), dict(values)) for step, values in state_dict.get("artifact_history", [])]
        self.out_since = dict(state_dict.get("out_since", {}))
        self.verdicts = {int(k): bool(v) for k, v in state_dict.get("verdicts", {}).items()}
        self.warnings = list(state_dict.get("warnings", []))
        self._last_step = int(state_dict.get("last_step", -1))

    def _append_csv(self, trainer: Trainer, metrics: dict[str, float], messages: list[str]) -> None:
        path = self._folder.get(trainer) / "reward_hacking.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", *metrics, "warnings"])
            writer.writerow([trainer.global_step, *(f"{v:.6g}" for v in metrics.values()), " | ".join(messages)])
