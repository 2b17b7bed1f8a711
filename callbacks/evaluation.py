"""Held-out evaluation before and after a fit: did GRPO improve the rewards on unseen prompts?

Uses `lightning_grpo.evaluation.evaluate` (deterministic ODE samples from per-sample seeds, own
generators, global RNG preserved), so the before and after numbers compare the same noise, and
evaluating never changes training.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_grpo.artifacts import ArtifactReference, Comparison, artifact_stats, format_comparisons, resolve_encoder
from lightning_grpo.callbacks._logging import RunFolder, add_video, logging_step, tensorboard_writers
from lightning_grpo.callbacks.ema import ema_weights
from lightning_grpo.evaluation import EvaluationResult, evaluate, format_before_after
from lightning_grpo.first_frames import frame_size
from lightning_grpo.rewards.base import MultiReward, Reward


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file (one per line; blank lines and lines starting with '#' skipped) or
    of a JSONL file (key "prompt" or "caption" per record)."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines()]
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in lines if line]
        return [str(r.get("prompt", r.get("caption"))) for r in records]
    return [line for line in lines if line and not line.startswith("#")]


class HeldOutEvaluation(Callback):
    """Evaluate the policy on held-out prompts at fit start and fit end; report the change.

    Scores with the module's rewards plus `extra_rewards` (e.g. an exact-match verifier that is
    not trained on). Prompt sets: `prompts_file`, and/or named `splits` (e.g. the shapes worlds'
    "new_combinations", "new_phrasings", "both"), each evaluated and reported separately. Per
    set it logs `heldout/{reward}` (mean) and `heldout/{reward}_ci_low`/`_ci_high` (95% interval)
    — `heldout/{split}/{reward}...` for a named split — at the step of each evaluation, writes
    results.csv, results.md and grid.png (rows = prompts with their text, columns = samples;
    videos as film strips, plus grid.gif animating every frame) into `<log_dir>/heldout_before/`
    and `<log_dir>/heldout_after/` (a split in its own subfolder), logs the grid as TensorBoard
    image `heldout/grid_{before,after}` and, for videos, the playable clip
    `heldout/video_{before,after}` (`add_video`); at the end it prints (and writes
    `<log_dir>/heldout_before_after.md`) the before/after table of every set. When an `EMA`
    callback is present the "after" evaluation uses the EMA weights.

    Image-to-video: each prompt's first frame comes from `first_frames` (a module called as
    ``first_frames(prompts, (height, width))``, e.g. `lightning_grpo.worlds.moving_shapes.data.MotionFirstFrames`),
    else from the module's own `first_frames` source when it has one; the same frames before and
    after, and the rewards receive them (e.g. a first-frame fidelity measure).

    Several processes share the work: each rank generates and scores about 1/W of the samples
    (under FSDP each runs the sharded forward on its own samples) and the scores are gathered on
    every rank (`evaluate(split_over_ranks=True)`), the pixels on rank zero, which measures the
    artifacts, writes and logs. The samples are those of one process: each keeps its own seed.

    Artifact and drift measures (`artifacts`, lightning_grpo/artifacts.py): the "before" samples
    set each measure's warning band (the base's seed-to-seed spread); the "after" samples are
    measured against it, logged as `heldout/artifacts/{name}` (`heldout/{split}/artifacts/...`)
    at both evaluations, and tabled under the before/after table ("outside" marks a measure that
    left the base's band).

    Resume: the "before" scores and the artifact reference are the callback's checkpoint state,
    so a resumed run reports the change from the base policy, not from the resumed weights, and
    does not evaluate "before" again.

    Args:
        prompts_file: held-out prompts, .txt (one per line) or .jsonl ("prompt"/"caption").
        samples_per_prompt: samples per prompt (sample j of prompt i has its own seeded noise).
        seed: base seed of the evaluation noise (the same before and after).
        batch_size: samples generated and scored at once (memory knob; results do not change).
        extra_rewards: rewards scored in addition to the module's (names must differ from them).
        before: evaluate when the fit starts.
        after: evaluate when the fit ends.
        max_prompts: use only the first this many prompts of each file.
        grid: write grid.png (and grid.gif for videos) of the samples with the results.
        splits: split name -> prompts file, evaluated and reported separately (names: letters,
            digits, "_" and "-").
        first_frames: first-frame source for image-to-video (see above).
        fps: frames per second of the logged videos and GIFs.
        artifacts: measure artifacts and drift of the "after" samples against the "before" ones.
        artifact_z: half-width of each measure's band, in the base's standard errors.
        kid_encoder: image encoder for KID (see `RewardHackingMonitor`); None: the first
            CLIP-like reward among the module's and `extra_rewards` (no KID when there is none).
    """

    def __init__(
        self,
        prompts_file: str | None = None,
        samples_per_prompt: int = 1,
        seed: int = 1234,
        batch_size: int = 32,
        extra_rewards: list[Reward] | None = None,
        before: bool = True,
        after: bool = True,
        max_prompts: int | None = None,
        grid: bool = True,
        splits: dict[str, str] | None = None,
        first_frames: nn.Module | None = None,
        fps: int = 4,
        artifacts: bool = True,
        artifact_z: float = 3.0,
        kid_encoder: nn.Module | None = None,
    ) -> None:
        if artifact_z <= 0:
            raise ValueError(f"artifact_z must be > 0, got {artifact_z}")
        self.artifacts, self.artifact_z, self.kid_encoder = artifacts, artifact_z, kid_encoder
        self.references: dict[str, ArtifactReference] = {}  # set name -> the "before" samples' measures and bands
        self.comparisons: dict[str, dict[str, dict[str, Comparison]]] = {}  # when -> set name -> measure -> comparison
        self._restored_before = False
        self.sets: dict[str, list[str]] = {}
        files = ({"": prompts_file} if prompts_file is not None else {}) | dict(splits or {})
        if not files:
            raise ValueError("HeldOutEvaluation needs a prompts_file or splits")
        for name, path in files.items():
            if name and not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"split name {name!r} must be letters, digits, '_' or '-'")
            self.sets[name] = read_prompts(path)[:max_prompts]
            if not self.sets[name]:
                raise ValueError(f"no prompts in {path}")
        self.prompts = next(iter(self.sets.values()))
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.extra_rewards = list(extra_rewards or [])
        self.before, self.after = before, after
        self.grid = grid
        self.first_frames = first_frames
        self.fps = fps
        self.results: dict[str, EvaluationResult] = {}  # when -> result of the first set
        self.split_results: dict[str, dict[str, EvaluationResult]] = {}  # when -> set name -> result
        self._folder = RunFolder()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._folder.resolve(trainer)  # a collective: on every rank here, read by rank zero in `_write`
        for module in [*self.extra_rewards, self.first_frames]:  # not part of the module: move them along explicitly
            if module is not None:
                module.to(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored_before:  # resumed: "before" was measured on the base weights
            self._restored_before = False
            return
        if self.before:
            self._run(trainer, pl_module, "before", use_ema=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.after:
            return
        self._run(trainer, pl_module, "after", use_ema=True)
        if trainer.is_global_zero and "before" in self.split_results:
            tables = []
            for name, prompts in self.sets.items():
                table = format_before_after(self.split_results["before"][name], self.split_results["after"][name])
                title = f"Held-out evaluation{f' ({name})' if name else ''} ({len(prompts)} prompts x {self.samples_per_prompt})"
                tables.append(f"{title}:\n{table}")
                comparisons = self.comparisons.get("after", {}).get(name)
                if comparisons:
                    tables.append(f"Artifact and drift measures{f' ({name})' if name else ''}, after against the "
                                  f"before samples' band (z = {self.artifact_z:g}):\n{format_comparisons(comparisons)}")
            text = "\n".join(tables)
            (self._log_dir(trainer) / "heldout_before_after.md").write_text(text)
            print(text, flush=True)

    def evaluate(self, pl_module: LightningModule, prompts: list[str] | None = None) -> EvaluationResult:
        """Score the module's policy now on `prompts` (default: the first prompt set), the samples
        shared out over the ranks (every rank must call it; the pixels are kept on rank zero)."""
        prompts = self.prompts if prompts is None else prompts
        rewards = MultiReward([*pl_module.rewards.rewards, *self.extra_rewards])
        return evaluate(
            pl_module.policy, pl_module.sampler, prompts, rewards, samples_per_prompt=self.samples_per_prompt,
            seed=self.seed, batch_size=self.batch_size, keep_pixels=self.grid or self.artifacts, show_progress=False,
            images=first_frames_for(pl_module, prompts, self.first_frames), split_over_ranks=True,
        )

    def _measure_artifacts(self, pl_module: LightningModule, when: str, name: str, result: EvaluationResult) -> None:
        """Artifact stats of one set's samples: "before" sets the reference, later ones are compared with it."""
        if not self.artifacts or result.pixels is None:
            return
        conditioning = result.images if result.pixels.ndim == 5 else None
        encoder = resolve_encoder(self.kid_encoder, [*self.extra_rewards, *pl_module.rewards.rewards])
        stats = artifact_stats(result.pixels, conditioning, encoder, self.samples_per_prompt, self.batch_size)
        if when == "before" or name not in self.references:
            self.references[name] = ArtifactReference(stats, z=self.artifact_z)
        self.comparisons.setdefault(when, {})[name] = self.references[name].compare(stats)

    def _run(self, trainer: Trainer, pl_module: LightningModule, when: str, use_ema: bool) -> None:
        context = ema_weights(trainer, pl_module) if use_ema else nullcontext()
        with context:
            results = {name: self.evaluate(pl_module, prompts) for name, prompts in self.sets.items()}  # every rank, its share
        self.split_results[when] = results
        self.results[when] = next(iter(results.values()))
        if trainer.is_global_zero:
            for name, result in results.items():
                self._measure_artifacts(pl_module, when, name, result)
                self._write(trainer, result, when, name)
            for logger in trainer.loggers:
                logger.save()
        trainer.strategy.barrier("heldout_evaluation")

    def _write(self, trainer: Trainer, result: EvaluationResult, when: str, name: str) -> None:
        """Files, TensorBoard grid (and video) and metrics of one prompt set's evaluation."""
        prefix = f"heldout/{name}/" if name else "heldout/"
        folder = self._log_dir(trainer) / f"heldout_{when}" / name
        result.write(folder, grid=self.grid, fps=self.fps)
        step = logging_step(trainer)
        if self.grid and result.pixels is not None:  # the same grid as grid.png (and grid.gif), in TensorBoard
            for writer in tensorboard_writers(trainer):
                writer.add_image(f"{prefix}grid_{when}", result.grid(), global_step=step)
                if result.pixels.ndim == 5:
                    add_video(writer, f"{prefix}video_{when}", result.video(), step, fps=self.fps)
        metrics = {}
        for reward, (mean, low, high, _) in result.summary().items():
            metrics.update({f"{prefix}{reward}": mean, f"{prefix}{reward}_ci_low": low, f"{prefix}{reward}_ci_high": high})
        for measure, comparison in self.comparisons.get(when, {}).get(name, {}).items():
            metrics[f"{prefix}artifacts/{measure}"] = comparison.value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The "before" evaluation (per-sample scores of every set, no pixels) and the artifact
        references: what the end-of-fit table compares with after a resume."""
        before = self.split_results.get("before")
        if before is None:
            return {}
        return {
            "before": {name: {"prompts": r.prompts, "scores": dict(r.scores), "samples_per_prompt": r.samples_per_prompt}
                       for name, r in before.items()},
            "references": {name: ref.state_dict() for name, ref in self.references.items()},
            "sets": {name: list(prompts) for name, prompts in self.sets.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or "before" not in state_dict:
            return
        if state_dict.get("sets") != {name: list(prompts) for name, prompts in self.sets.items()}:
            rank_zero_warn("HeldOutEvaluation: the held-out prompts differ from the checkpoint's; evaluating 'before' "
                           "again on the resumed weights")
            return
        self.split_results["before"] = {
            name: EvaluationResult(prompts=list(r["prompts"]), scores=dict(r["scores"]),
                                   samples_per_prompt=int(r["samples_per_prompt"]))
            for name, r in state_dict["before"].items()
        }
        self.results["before"] = next(iter(self.split_results["before"].values()))
        self.references = {name: ArtifactReference.from_state(ref) for name, ref in state_dict.get("references", {}).items()}
        self._restored_before = True

    def _log_dir(self, trainer: Trainer) -> Path:
        return self._folder.get(trainer)


def first_frames_for(pl_module: LightningModule, prompts: list[str], source: nn.Module | None = None) -> Tensor | None:
    """First frames [P, 3, H, W] of `prompts` for image-to-video, on the module's device: from
    `source` (called as ``source(prompts, (height, width))``), else from the module's own
    `first_frames` source when it has one; None for text-to-image/video."""
    source = source if source is not None else getattr(pl_module, "first_frames", None)
    if source is None:
        return None
    return source(list(prompts), frame_size(pl_module.policy)).to(pl_module.device)
