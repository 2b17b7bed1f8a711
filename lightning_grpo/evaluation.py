"""Held-out evaluation: deterministic (eta = 0) samples from per-sample seeds, scored by rewards,
summarised with confidence intervals, written as CSV / markdown / image grid.

Used by `GRPOModule.test_step` (`lightning-grpo test`), by the `HeldOutEvaluation` callback
(before/after a fit) and by scripts such as `bench/demo_learning.py`.

Reproducibility: sample j of prompt i starts from noise drawn by its own generator seeded from
(seed, i, j), and the ODE sampler adds no noise, so the result depends neither on `batch_size`
nor on the global random stream (which is saved and restored around the call, in case a
reward draws from it: evaluating in the middle of training never changes training).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_grpo.grids import captioned_grid, filmstrip, save_gif, save_png, with_condition
from lightning_grpo.noise import sample_seed
from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.rewards.base import MultiReward, Reward
from lightning_grpo.rollout import ode_from
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.stopping import check_stop

__all__ = ["EvaluationResult", "evaluate", "evaluation_grid", "evaluation_video", "eval_mode", "format_before_after", "is_binary", "mean_ci", "preserve_rng", "sample_seed"]

Summary = tuple[float, float, float, int]
"""(mean, low, high, n) of one reward."""


# ---------------------------------------------------------------------------- statistics
def is_binary(values: Tensor) -> bool:
    """True when every value is 0 or 1 (a verifier / thresholded reward): proportions get Wilson intervals."""
    values = torch.as_tensor(values).flatten()
    return values.numel() > 0 and bool(((values == 0) | (values == 1)).all())


def mean_ci(values: Tensor, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided `confidence` interval: (mean, low, high).

    - values all in {0, 1}: Wilson score interval of a proportion (well behaved at 0 %, 100 % and
      small n, unlike the normal approximation), defined for any n >= 1;
    - otherwise: Student-t interval mean ± t_{n-1}·s/√n (s the sample std), which tends to the
      normal interval for large n.
    Edge cases: n = 0 gives (nan, nan, nan); a non-binary n = 1 gives (value, nan, nan) because
    one sample says nothing about the spread.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = torch.as_tensor(values).detach().flatten().double().cpu()
    n = values.numel()
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = values.mean().item()
    if is_binary(values):
        return (mean, *_wilson(mean, n, confidence))
    if n == 1:
        return (mean, math.nan, math.nan)
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * values.std().item() / math.sqrt(n)
    return (mean, mean - half, mean + half)


def _wilson(p: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (Wilson 1927)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def student_t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom, for q in (0.5, 1).

    No scipy here: the CDF is 1/2 + ∫_0^x pdf by Simpson's rule, inverted by bisection
    (accurate to ~1e-7, checked against tabulated values in the tests).
    """
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"need 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = torch.linspace(0.0, x, 4001, dtype=torch.float64)
        pdf = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(grid**2 / df))
        weights = torch.ones(4001, dtype=torch.float64)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return 0.5 + (x / 4000 / 3) * float((weights * pdf).sum())

    low, high = 0.0, 1.0
    while cdf(high) < q:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < q else (low, middle)
    return (low + high) / 2


# ---------------------------------------------------------------------------- result
@dataclass
class EvaluationResult:
    """Per-sample scores of an evaluation, in prompt-major order (sample j of prompt i at i·S + j).

    Attributes:
        prompts: [N] the prompt of each sample.
        scores: reward name -> Tensor[N] float on CPU.
        pixels: [N, C, H, W] (or video [N, F, C, H, W]) in [0, 1] on CPU when `keep_pixels`, else None.
        samples_per_prompt: S, used to lay out the image grid one prompt per row.
        images: image-to-video conditioning frames [P, C, H, W] on CPU (one per prompt) when
            pixels were kept, shown as the grid's first column; else None.
    """

    prompts: list[str]
    scores: dict[str, Tensor]
    pixels: Tensor | None = None
    samples_per_prompt: int = field(default=1)
    images: Tensor | None = None

    def summary(self, confidence: float = 0.95) -> dict[str, Summary]:
        """reward name -> (mean, low, high, n), see `mean_ci`."""
        return {name: (*mean_ci(values, confidence), values.numel()) for name, values in self.scores.items()}

    def to_markdown(self, confidence: float = 0.95) -> str:
        """A markdown table: reward | mean | interval | n (proportions shown in %)."""
        level = f"{confidence:.0%}"
        lines = [f"| reward | mean | {level} interval | n |", "|---|---|---|---|"]
        for name, (mean, low, high, n) in self.summary(confidence).items():
            binary = is_binary(self.scores[name])
            lines.append(f"| {name} | {_number(mean, binary)} | [{_number(low, binary)}, {_number(high, binary)}] | {n} |")
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """One row per sample: index, prompt, sample (j within its prompt), one column per reward."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self.scores)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "prompt", "sample", *names])
            for index, prompt in enumerate(self.prompts):
                row = [f"{self.scores[name][index].item():.6g}" for name in names]
                writer.writerow([index, prompt, index % self.samples_per_prompt, *row])
        return path

    def grid(self, cell_size: int = 96, rows_per_block: int = 20) -> Tensor:
        """Readable grid [3, H, W] of the kept pixels: rows = prompts (caption under each), columns =
        samples, the first reward's score under each cell; 20 prompts per column block. Videos
        show a film strip of (up to 5) frames per cell; image-to-video clips the conditioning
        frame first."""
        return evaluation_grid(self._kept(), self.prompts, self.samples_per_prompt, self.scores, cell_size, rows_per_block,
                               conditioning=self.images)

    def video(self, cell_size: int = 96, rows_per_block: int = 20) -> Tensor:
        """The grid of `grid` once per frame, as a clip [F, 3, H, W] (videos only): what grid.gif shows."""
        return evaluation_video(self._kept(), self.prompts, self.samples_per_prompt, self.scores, cell_size, rows_per_block,
                                conditioning=self.images)

    def _kept(self) -> Tensor:
        if self.pixels is None or not len(self.pixels):
            raise ValueError("no pixels kept: evaluate(..., keep_pixels=True) to draw a grid")
        return self.pixels

    def write(self, directory: str | Path, grid: bool = True, fps: int = 4) -> dict[str, Path]:
        """Write results.csv, results.md and (when pixels were kept and `grid`) grid.png into
        `directory`, and for videos grid.gif (the grid animated over the frames, `fps` frames per
        second); returns {"csv": ..., "markdown": ..., "grid": ..., "gif": ...} for the files written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = {"csv": self.to_csv(directory / "results.csv")}
        markdown = directory / "results.md"
        markdown.write_text(self.to_markdown())
        written["markdown"] = markdown
        if grid and self.pixels is not None and len(self.pixels):
            written["grid"] = save_png(self.grid(), directory / "grid.png")
            if self.pixels.ndim == 5:
                written["gif"] = save_gif(self.video(), directory / "grid.gif", fps=fps)
        return written


def evaluation_grid(
    pixels: Tensor,
    prompts: Sequence[str],
    samples_per_prompt: int = 1,
    scores: dict[str, Tensor] | None = None,
    cell_size: int = 96,
    rows_per_block: int = 20,
    conditioning: Tensor | None = None,
) -> Tensor:
    """Grid [3, H, W] of prompt-major samples ([N, C, H, W], or video [N, F, C, H, W] shown as a
    film strip of up to 5 frames, `lightning_grpo.grids.filmstrip`): one row per prompt with the
    prompt under it, one column per sample, and the first score of `scores` under each cell (see
    `lightning_grpo.grids.captioned_grid`). `conditioning` ([P, C, H, W], image-to-video): each
    prompt's conditioning frame as a first column ("condition")."""
    images = filmstrip(pixels) if pixels.ndim == 5 else pixels  # [N, C, H, W'] (W' = strip width for videos)
    if len(images) % samples_per_prompt or len(prompts) != len(images):
        raise ValueError(f"{len(images)} samples, {len(prompts)} prompts, {samples_per_prompt} per prompt do not tile")
    cells = images.reshape(-1, samples_per_prompt, *images.shape[1:])  # [P, S, C, H, W]
    name, values = next(iter(scores.items())) if scores else (None, None)
    titles = [f"sample {j}" + (f" · {name}" if name else "") for j in range(samples_per_prompt)]
    captions = None
    if values is not None:
        captions = [[f"{v:.3g}" for v in row] for row in values.reshape(-1, samples_per_prompt).tolist()]
    if conditioning is not None:
        cells = with_condition(cells, conditioning)  # [P, 1 + S, C, H, W']
        titles = ["condition", *titles]
        captions = None if captions is None else [["", *row] for row in captions]
    return captioned_grid(cells, row_captions=list(prompts[::samples_per_prompt]), column_titles=titles,
                          cell_captions=captions, cell_size=cell_size, rows_per_block=rows_per_block)


def evaluation_video(
    pixels: Tensor,
    prompts: Sequence[str],
    samples_per_prompt: int = 1,
    scores: dict[str, Tensor] | None = None,
    cell_size: int = 96,
    rows_per_block: int = 20,
    conditioning: Tensor | None = None,
) -> Tensor:
    """The evaluation grid of videos [N, F, C, H, W] once per frame: a clip [F, 3, H', W'] whose
    frame f shows frame f of every sample in the layout of `evaluation_grid` (the conditioning
    frame, when given, in the first column of every frame)."""
    if pixels.ndim != 5:
        raise ValueError(f"evaluation_video needs videos [N, F, C, H, W], got {tuple(pixels.shape)}")
    return torch.stack([evaluation_grid(pixels[:, f], prompts, samples_per_prompt, scores, cell_size, rows_per_block, conditioning)
                        for f in range(pixels.shape[1])])


def _number(value: float, binary: bool) -> str:
    if math.isnan(value):
        return "nan"
    return f"{100 * value:.1f}%" if binary else f"{value:.4g}"


def format_before_after(before: EvaluationResult, after: EvaluationResult, confidence: float = 0.95) -> str:
    """Markdown table: reward | before mean [CI] | after mean [CI] | change.

    Rewards whose scores are all 0/1 in both results are shown in % and their change in
    percentage points ("pts"); other rewards show the raw difference after − before.
    """
    level = f"{confidence:.0%}"
    first, second = before.summary(confidence), after.summary(confidence)
    lines = [f"| reward | before mean [{level} CI] | after mean [{level} CI] | change |", "|---|---|---|---|"]
    for name in list(first) + [n for n in second if n not in first]:
        binary = all(is_binary(r.scores[name]) for r in (before, after) if name in r.scores)
        cells = [_cell(summary.get(name), binary) for summary in (first, second)]
        if name in first and name in second:
            delta = second[name][0] - first[name][0]
            change = f"{100 * delta:+.1f} pts" if binary else f"{delta:+.4g}"
        else:
            change = "–"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {change} |")
    return "\n".join(lines) + "\n"


def _cell(summary: Summary | None, binary: bool) -> str:
    if summary is None:
        return "–"
    mean, low, high, n = summary
    return f"{_number(mean, binary)} [{_number(low, binary)}, {_number(high, binary)}] (n={n})"


# ---------------------------------------------------------------------------- sampling
@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put `module` in eval mode and restore each submodule's own train flag afterwards."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextmanager
def preserve_rng(device: torch.device | str | None = None) -> Iterator[None]:
    """Restore the global CPU (and the device's CUDA) random state on exit, so whatever runs
    inside cannot shift the training random stream."""
    from lightning.pytorch.utilities.seed import isolate_rng

    device = torch.device(device) if device is not None else torch.device("cpu")
    with isolate_rng(include_cuda=device.type == "cuda"):  # Python's and NumPy's random states too
        yield


def check_finite_outputs(pixels: Tensor, prompts: Sequence[str]) -> None:
    """NonFiniteError when a generated sample holds NaN/inf: its scores would mean nothing (NaN
    pixels turn into black images, which rewards score like any other), so the evaluation of a
    broken model (diverged or corrupt weights) is an error, not a number."""
    finite = torch.isfinite(pixels.reshape(len(pixels), -1)).all(dim=1)  # [b]
    if bool(finite.all()):
        return
    from lightning_grpo.errors import NonFiniteError

    bad = int((~finite).sum())
    first = prompts[int((~finite).nonzero()[0, 0])]
    raise NonFiniteError(
        f"the model's outputs are not finite (NaN/inf pixels) for {bad} of {len(pixels)} samples, e.g. prompt {first!r}: "
        "its weights are broken (a diverged run, or a corrupt checkpoint); scores of such samples would mean nothing"
    )


def _initial_noise(policy: PolicyAdapter, seeds: Sequence[int]) -> Tensor:
    """x_0 [len(seeds), *L], each sample from its own generator."""
    noise = [policy.prepare_latents(1, torch.Generator(device=policy.device).manual_seed(s)) for s in seeds]
    return torch.cat(noise)


@torch.no_grad()
def evaluate(
    policy: PolicyAdapter,
    sampler: Sampler,
    prompts: Sequence[str],
    rewards: Sequence[Reward] | MultiReward,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    keep_pixels: bool = False,
    images: Tensor | None = None,
    show_progress: bool = True,
    allow_nonfinite: bool = False,
) -> EvaluationResult:
    """Sample `samples_per_prompt` deterministic (eta = 0) generations per prompt and score them.

    Args:
        policy: the generator to evaluate (put in eval mode for the call, then restored).
        sampler: its sampler; only `ode_step` (the eta = 0 path) is used.
        prompts: P held-out prompts.
        rewards: rewards to score with (a list, or the module's MultiReward); names must be unique.
        samples_per_prompt: S samples per prompt (N = P·S results, prompt-major).
        seed: base seed; sample j of prompt i starts from noise seeded by `sample_seed(seed, i, j)`.
        batch_size: samples generated, decoded and scored at once (memory knob; no effect on results).
        keep_pixels: keep the decoded pixels (on CPU) in the result, e.g. for an image grid.
        images: first frames [P, C, H, W] in [0, 1] for image-to-video, one per prompt.
        show_progress: tqdm progress bar over batches.
        allow_nonfinite: keep NaN/inf scores in the result instead of raising (see `Reward.forward`;
            the module's `reward_failure="drop_group"`).
    """
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt}, {batch_size}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} first frames for {len(prompts)} prompts")
    scorer = rewards if isinstance(rewards, MultiReward) else MultiReward(list(rewards))
    pairs = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]  # [N] (prompt, sample)
    scores: dict[str, list[Tensor]] = {}
    pixels_kept: list[Tensor] = []
    batches = range(0, len(pairs), batch_size)
    with eval_mode(policy), preserve_rng(policy.device):
        for start in tqdm(batches, desc="evaluate", leave=False, disable=not show_progress, dynamic_ncols=True):
            chunk = pairs[start : start + batch_size]
            batch_prompts = [prompts[i] for i, _ in chunk]
            batch_images = None if images is None else images[torch.tensor([i for i, _ in chunk])].to(policy.device)
            check_stop()  # a stop signal ends an evaluation at its next batch (lightning_grpo.stopping)
            x = _initial_noise(policy, [sample_seed(seed, i, j) for i, j in chunk])  # [b, *L]
            pixels = policy.decode(ode_from(policy, sampler, x, batch_prompts, batch_images))  # [b, C, H, W] or [b, F, C, H, W]
            check_finite_outputs(pixels, batch_prompts)
            for name, values in scorer(pixels, batch_prompts, batch_images, allow_nonfinite=allow_nonfinite).items():
                scores.setdefault(name, []).append(values.detach().float().cpu())
            if keep_pixels:
                pixels_kept.append(pixels.detach().float().cpu())
    names = [r.name for r in scorer.rewards]
    return EvaluationResult(
        prompts=[prompts[i] for i, _ in pairs],
        scores={name: torch.cat(scores[name]) if scores else torch.zeros(0) for name in names},
        pixels=torch.cat(pixels_kept) if pixels_kept else None,
        samples_per_prompt=samples_per_prompt,
        images=images.detach().float().cpu() if keep_pixels and images is not None else None,
    )


def evaluate_batch(module: Any, batch: dict[str, Any], batch_idx: int, stage: str) -> EvaluationResult:
    """A `GRPOModule`'s validation or test step: deterministic (eta = 0) samples of the batch's
    prompts from fixed per-sample seeds (seed, batch, rank, position), scored by every reward and
    logged (`log_evaluation`); own generators, so the training stream never moves."""
    rank = module.global_rank if module._trainer is not None else 0
    drop = module.hparams.reward_failure == "drop_group"
    result = evaluate(
        module.policy, module.sampler, batch["prompts"], module.rewards, seed=sample_seed(module.hparams.seed, batch_idx, rank),
        batch_size=module.hparams.decode_batch_size, keep_pixels=stage == "test" and module.keep_test_pixels,
        images=module.batch_first_frames(batch), show_progress=False, allow_nonfinite=drop,
    )
    log_evaluation(module.log, result.scores if batch["prompts"] else {}, stage, count_nonfinite=drop)  # no readable record: nothing
    return result


def log_evaluation(log: Callable[..., Any], scores: dict[str, Tensor], stage: str, count_nonfinite: bool) -> None:
    """Log a batch's evaluation through a LightningModule's `log`: `<stage>/reward/<name>`, the mean
    of the finite scores (NaN when none is), synchronised over ranks; with `count_nonfinite`
    (`reward_failure="drop_group"`) also how many were not finite (`<name>_nonfinite`, summed)."""
    for name, s in scores.items():
        finite = torch.isfinite(s)
        log(f"{stage}/reward/{name}", s[finite].mean() if finite.any() else torch.tensor(float("nan")), batch_size=len(s), sync_dist=True)
        if count_nonfinite:
            log(f"{stage}/reward/{name}_nonfinite", (~finite).sum().float(), batch_size=len(s), reduce_fx="sum", sync_dist=True)


__all__ += ["evaluate_batch", "log_evaluation"]
