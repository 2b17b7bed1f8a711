"""Held-out evaluation: deterministic (eta = 0) samples from per-sample seeds, scored by rewards,
summarised with confidence intervals, written as CSV / markdown / image grid.

Used by `GRPOModule.test_step` (`lightning-grpo test`), by the `HeldOutEvaluation` callback
(before/after a fit) and by scripts such as `bench/demo_learning.py`.

Reproducibility: sample j of prompt i starts from noise drawn by its own generator seeded from
(seed, i, j), and the ODE sampler adds no noise, so the result depends neither on `batch_size`
nor on the global random stream (which is saved and restored around the call, in case a
reward draws from it: evaluating in the middle of training never changes training).

Many processes: with `split_over_ranks` the samples are shared out over the ranks (each
generates about 1/W of them; under FSDP each rank still runs the sharded forward, on its own
inputs) and gathered, so every rank holds the scores of one process evaluating them all (the
same seeds); `gather_results` does the same for `test`, whose prompts the data already split.
"""

from __future__ import annotations

import csv
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_grpo.distributed import all_gather_objects, gather_objects_to_zero, rank, world_size
from lightning_grpo.grids import captioned_grid, filmstrip, save_gif, save_png, with_condition
from lightning_grpo.noise import sample_seed
from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.rewards.base import MultiReward, Reward
from lightning_grpo.rollout import ode_from
from lightning_grpo.samplers.base import Sampler
from lightning_grpo.stopping import check_stop

__all__ = ["EvaluationResult", "evaluate", "evaluation_grid", "gather_results", "share_of_rank", "evaluation_video", "eval_mode", "format_before_after", "is_binary", "mean_ci", "preserve_rng", "sample_seed"]

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
        keys: [N] (prompt key, sample j) of each sample, the key of its noise (`evaluate`'s
            `indices`, the prompt's position in a held-out split); `gather_results` orders the
            ranks' samples by it and drops repeats. None when the prompts came without positions.

    The kept pixels may cover only the first samples (`test_grid_size`): the grid shows those.
    """

    prompts: list[str]
    scores: dict[str, Tensor]
    pixels: Tensor | None = None
    samples_per_prompt: int = field(default=1)
    images: Tensor | None = None
    keys: list[tuple[int, int]] | None = None

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
        pixels, prompts, scores, images = self._shown()
        return evaluation_grid(pixels, prompts, self.samples_per_prompt, scores, cell_size, rows_per_block, conditioning=images)

    def video(self, cell_size: int = 96, rows_per_block: int = 20) -> Tensor:
        """The grid of `grid` once per frame, as a clip [F, 3, H, W] (videos only): what grid.gif shows."""
        pixels, prompts, scores, images = self._shown()
        return evaluation_video(pixels, prompts, self.samples_per_prompt, scores, cell_size, rows_per_block, conditioning=images)

    def _shown(self) -> tuple[Tensor, list[str], dict[str, Tensor], Tensor | None]:
        """The kept pixels with the prompts, scores and conditioning frames of those samples (the
        first ones: `test` keeps `test_grid_size`; before, more samples than kept pixels stopped
        `test` with "do not tile" after it had evaluated them all)."""
        if self.pixels is None or not len(self.pixels):
            raise ValueError("no pixels kept: evaluate(..., keep_pixels=True) to draw a grid")
        n = len(self.pixels) - len(self.pixels) % self.samples_per_prompt
        images = None if self.images is None else self.images[: n // self.samples_per_prompt]
        return self.pixels[:n], self.prompts[:n], {name: v[:n] for name, v in self.scores.items()}, images

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
    indices: Sequence[int] | None = None,
    split_over_ranks: bool = False,
) -> EvaluationResult:
    """Sample `samples_per_prompt` deterministic (eta = 0) generations per prompt and score them.

    Args:
        policy: the generator to evaluate (put in eval mode for the call, then restored).
        sampler: its sampler; only `ode_step` (the eta = 0 path) is used.
        prompts: P held-out prompts.
        rewards: rewards to score with (a list, or the module's MultiReward); names must be unique.
        samples_per_prompt: S samples per prompt (N = P·S results, prompt-major).
        seed: base seed; sample j of prompt i starts from noise seeded by `sample_seed(seed, k_i, j)`.
        batch_size: samples generated, decoded and scored at once (memory knob; no effect on results).
        keep_pixels: keep the decoded pixels (on CPU) in the result, e.g. for an image grid.
        images: first frames [P, C, H, W] in [0, 1] for image-to-video, one per prompt.
        show_progress: tqdm progress bar over batches.
        allow_nonfinite: keep NaN/inf scores in the result instead of raising (see `Reward.forward`;
            the module's `reward_failure="drop_group"`).
        indices: the key k_i of each prompt's noise (default i, its position in `prompts`): the
            prompt's position in a larger set, so a part of the set gets the samples the whole
            set would (`test` on several ranks); kept in `EvaluationResult.keys`.
        split_over_ranks: share the N samples out over the processes (every rank must call this
            with the same arguments): rank r generates and scores its contiguous part of about
            N/W samples (`share_of_rank`; a short part is padded with a repeat, so every rank runs
            as many batches, which a sharded denoiser's forward needs), and the scores of all ranks
            are gathered on every rank; the kept pixels go to rank zero only (None elsewhere). The
            result equals one process's (the same seeds). An error on one rank (non-finite
            outputs, a reward failing) is raised on every rank once all have finished, instead of
            leaving the others waiting in a collective.
    """
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt}, {batch_size}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} first frames for {len(prompts)} prompts")
    if indices is not None and len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    scorer = rewards if isinstance(rewards, MultiReward) else MultiReward(list(rewards))
    keys = list(range(len(prompts))) if indices is None else [int(k) for k in indices]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(samples_per_prompt)]  # [N] (prompt, sample)
    world = world_size() if split_over_ranks else 1
    share, real = share_of_rank(pairs, rank() if world > 1 else 0, world)
    names = [r.name for r in scorer.rewards]
    scores, pixels, failure = _sample_and_score(
        policy, sampler, prompts, keys, share, scorer, seed, batch_size, keep_pixels, images, show_progress, allow_nonfinite,
        hold_errors=world > 1,
    )
    local = {name: (torch.cat(scores[name]) if scores[name] else torch.zeros(0))[:real] for name in names}
    kept = torch.cat(pixels)[:real] if pixels else None
    if world > 1:
        parts = all_gather_objects((local, _portable(failure)))
        if failure is not None:
            raise failure
        raised = next((error for _, error in parts if error is not None), None)
        if raised is not None:
            raise raised
        local = {name: torch.cat([part[name] for part, _ in parts]) for name in names}
        if keep_pixels:
            present = [part for part in gather_objects_to_zero(kept) or [] if part is not None]  # rank zero's list; [] elsewhere
            kept = torch.cat(present) if present else None
    on_zero = world == 1 or rank() == 0
    return EvaluationResult(
        prompts=[prompts[i] for i, _ in pairs],
        scores=local,
        pixels=kept,
        samples_per_prompt=samples_per_prompt,
        images=images.detach().float().cpu() if keep_pixels and images is not None and on_zero else None,
        # keys only for prompts with their split positions: without them a batch's keys restart at 0
        # and `gather_results` would drop the next batch's samples as repeats
        keys=None if indices is None else [(keys[i], j) for i, j in pairs],
    )


def share_of_rank(items: Sequence[Any], rank_: int, world: int) -> tuple[list[Any], int]:
    """(rank `rank_`'s part of `items`, how many of it are real): the contiguous part r·m ...
    (r + 1)·m − 1 with m = ceil(N / W), padded to m with a repeat of its last item (or of the
    first item, for a rank past the end), so every rank gets m items and runs as many batches."""
    per = -(-len(items) // world) if world > 0 else len(items)
    share = list(items[rank_ * per : (rank_ + 1) * per])
    filler = share[-1:] or list(items[:1])
    return share + filler * (per - len(share)), len(share)


def _sample_and_score(
    policy: PolicyAdapter, sampler: Sampler, prompts: Sequence[str], keys: list[int], pairs: list[tuple[int, int]],
    scorer: MultiReward, seed: int, batch_size: int, keep_pixels: bool, images: Tensor | None, show_progress: bool,
    allow_nonfinite: bool, hold_errors: bool,
) -> tuple[dict[str, list[Tensor]], list[Tensor], BaseException | None]:
    """Generate and score `pairs` in batches: (scores per reward, kept pixels, the first error).

    `hold_errors`: an error in decoding or scoring a batch (not in the denoiser: its sharded
    forward is a collective) is kept, the batch scored NaN, and the next batches still generated,
    so every rank runs as many denoiser forwards; the caller raises it once the ranks have met."""
    names = [r.name for r in scorer.rewards]
    scores: dict[str, list[Tensor]] = {name: [] for name in names}
    pixels_kept: list[Tensor] = []
    failure: BaseException | None = None
    batches = range(0, len(pairs), batch_size)
    with eval_mode(policy), preserve_rng(policy.device):
        for start in tqdm(batches, desc="evaluate", leave=False, disable=not show_progress, dynamic_ncols=True):
            chunk = pairs[start : start + batch_size]
            batch_prompts = [prompts[i] for i, _ in chunk]
            batch_images = None if images is None else images[torch.tensor([i for i, _ in chunk])].to(policy.device)
            check_stop()  # a stop signal ends an evaluation at its next batch (lightning_grpo.stopping)
            x = _initial_noise(policy, [sample_seed(seed, keys[i], j) for i, j in chunk])  # [b, *L]
            latents = ode_from(policy, sampler, x, batch_prompts, batch_images)
            try:
                pixels = policy.decode(latents)  # [b, C, H, W] or [b, F, C, H, W]
                check_finite_outputs(pixels, batch_prompts)
                batch_scores = scorer(pixels, batch_prompts, batch_images, allow_nonfinite=allow_nonfinite)
            except Exception as err:
                if not hold_errors:
                    raise
                failure = failure or err
                for name in names:
                    scores[name].append(torch.full((len(chunk),), float("nan")))
                continue
            for name, values in batch_scores.items():
                scores[name].append(values.detach().float().cpu())
            if keep_pixels:
                pixels_kept.append(pixels.detach().float().cpu())
    return scores, pixels_kept, failure


def _portable(error: BaseException | None) -> BaseException | None:
    """The error as it can be sent to the other ranks (pickled), or a RuntimeError with its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def gather_results(parts: list[EvaluationResult], grid_size: int) -> EvaluationResult:
    """Every rank's evaluation results as one (call on every rank; each gets the same result).

    With sample keys (`EvaluationResult.keys`: the held-out split's batches carry each prompt's
    position, `PromptDataModule.val_dataloader`), the samples are ordered by (prompt, sample) and
    each is kept once: the repeats that pad the split to equal batches on every rank are dropped,
    so N processes report the rows (and means) of one process. Without keys the ranks' samples are
    concatenated in rank order. Pixels: those of the first `grid_size` rows, where every rank
    kept its first samples'."""
    local = _concat_results(parts)
    gathered = all_gather_objects(local) if world_size() > 1 else [local]
    if any(part.keys is None for part in gathered):
        merged = _concat_results(gathered)
        if merged.pixels is not None:
            merged.pixels = merged.pixels[:grid_size]
        return merged
    rows: dict[tuple[int, int], tuple[str, dict[str, Tensor], Tensor | None]] = {}
    for part in gathered:
        for position, key in enumerate(part.keys or []):
            if key in rows:
                continue  # a repeat that padded the last block
            pixel = part.pixels[position] if part.pixels is not None and position < len(part.pixels) else None
            rows[key] = (part.prompts[position], {name: values[position] for name, values in part.scores.items()}, pixel)
    order = sorted(rows)
    names = list(gathered[0].scores) if gathered else []
    shown: list[Tensor] = []
    for key in order[:grid_size]:
        if rows[key][2] is None:
            break
        shown.append(rows[key][2])
    return EvaluationResult(
        prompts=[rows[key][0] for key in order],
        scores={name: torch.stack([rows[key][1][name] for key in order]) if order else torch.zeros(0) for name in names},
        pixels=torch.stack(shown) if shown else None,
        keys=order,
    )


def _concat_results(parts: list[EvaluationResult]) -> EvaluationResult:
    """One result from several: prompts, scores and keys concatenated; the pixels of each part
    (each covers its first samples) only while every earlier part's samples all have theirs."""
    names = list(parts[0].scores) if parts else []
    pixels: list[Tensor] = []
    for part in parts:
        if part.pixels is None:
            break
        pixels.append(part.pixels)
        if len(part.pixels) < len(part.prompts):
            break
    keys = None if any(part.keys is None for part in parts) else [key for part in parts for key in part.keys or []]
    return EvaluationResult(
        prompts=[prompt for part in parts for prompt in part.prompts],
        scores={name: torch.cat([part.scores[name] for part in parts]) for name in names},
        pixels=torch.cat(pixels) if pixels else None,
        keys=keys,
    )


def evaluate_batch(module: Any, batch: dict[str, Any], batch_idx: int, stage: str) -> EvaluationResult:
    """A `GRPOModule`'s validation or test step: deterministic (eta = 0) samples of the batch's
    prompts, scored by every reward (logged once gathered, `log_evaluation`). Noise is keyed by
    (seed, the prompt's position in the held-out split, sample), so any number of ranks draws the
    samples of one process (a batch without positions, from another datamodule: by (seed, batch,
    rank, position)); own generators, so evaluating never moves the training random stream."""
    indices = batch.get("indices")
    rank = module.global_rank if module._trainer is not None else 0
    seed = module.hparams.seed if indices is not None else sample_seed(module.hparams.seed, batch_idx, rank)
    return evaluate(
        module.policy, module.sampler, batch["prompts"], module.rewards, seed=seed, batch_size=module.hparams.decode_batch_size,
        keep_pixels=stage == "test" and module.keep_test_pixels, images=module.batch_first_frames(batch), show_progress=False,
        allow_nonfinite=module.hparams.reward_failure == "drop_group", indices=indices,
    )


def log_evaluation(log: Callable[..., Any], result: EvaluationResult, stage: str, count_nonfinite: bool, device: Any) -> None:
    """Log gathered results (`gather_results`) through a LightningModule's `log`:
    `<stage>/reward/<name>`, the mean of the finite scores (NaN when none is; the same on every
    rank, so `sync_dist` averages equal values); with `count_nonfinite` (`reward_failure=
    "drop_group"`) also how many were not finite (`<name>_nonfinite`). Nothing without a sample."""
    if not result.prompts:  # nothing evaluated (no batch, or blocks without one readable image)
        return
    for name, s in result.scores.items():
        finite = torch.isfinite(s)
        mean = s[finite].mean() if finite.any() else torch.tensor(float("nan"))
        log(f"{stage}/reward/{name}", mean.to(device), batch_size=len(s), sync_dist=True)
        if count_nonfinite:
            log(f"{stage}/reward/{name}_nonfinite", (~finite).sum().float().to(device), batch_size=len(s), sync_dist=True)


__all__ += ["evaluate_batch", "log_evaluation"]
