"""Does GRPO make the toy pipeline follow its prompts better? Held-out accuracy before and after,
on three held-out splits, judged by the strict pixel verifier, with gold measures beside it.

    python bench/demo_learning.py                 # toy FLUX (rectified flow), configs/demo.yaml
    python bench/demo_learning.py --family sd     # toy Stable Diffusion (DDIM), configs/demo_sd.yaml
    python bench/demo_learning.py --family t2v    # toy HunyuanVideo text-to-video, configs/demo_t2v.yaml
    python bench/demo_learning.py --family i2v    # toy SkyReels-V1 image-to-video, configs/demo_i2v.yaml

The video families are judged in the moving-shapes world (`lightning_grpo.worlds.moving_shapes.verifier`):
text-to-video by exact match (colour, shape and motion right, one object in every frame),
image-to-video by motion accuracy (the exact motion check; the first frame, the same before and
after, fixes colour and shape), with the first-frame fidelity beside it (does the clip still start
from its conditioning image?).

1. Builds the demo exactly as `lightning-grpo fit -c <config>` does (same LightningCLI parsing).
2. Evaluates the base pipeline on the three held-out splits (`lightning_grpo.worlds.shapes.prompts`):
   new combinations (attribute triples RL never sees, training phrasings; 80 prompts), new
   phrasings (training triples in reserved phrasings no training ever used; 96 prompts), and
   both (48 prompts): deterministic ODE sampling (eta = 0) from fixed seeds,
   `--samples-per-prompt` per prompt, scored by the strict verifier (exact match = the judge,
   and dense) and by gold measures training never optimises: the lenient verifier's exact match
   and the toy CLIP score.
3. Runs the demo's GRPO training (`trainer.fit`).
4. Evaluates again with the SAME seeds (with the EMA weights where the config has an `EMA`
   callback, as its `HeldOutEvaluation` does), and prints every split's before/after table with 95%
   intervals (Wilson for exact match, Student-t otherwise), and the artifact and drift measures of
   the new-combination samples against the base samples' warning band (`lightning_grpo.artifacts`:
   periodic and background energy, chroma, luminance, clipped highlights, hue shift, KID on the toy
   CLIP's image features; video: flicker, and for image-to-video first-frame adherence on the
   object). `--grids DIR` also writes their before/after grids.
The last line printed is the absolute improvement of the judge (strict exact match; motion accuracy
for image-to-video) on new combinations, in points.

Over seeds (`--seeds 0,1,2`): the base is evaluated once (the same pipeline and evaluation seeds for
every training seed), then steps 3-4 run once per seed with `seed_everything` set to it (a fresh
module, datamodule and run folder each; the rollout noise and prompt order follow the seed). After
every seed's tables, a summary prints each seed's change of the judge (and, for image-to-video,
of the measures that must not fall) on new combinations, their minimum, and last their mean. The
mean's interval pools the seeds' samples (the after-proportion over seeds × samples, Wilson), so
"intervals do not overlap" there compares the base with the mean of the trained runs.
A config is chosen on that mean over seeds, never on one seed (docs/results.md).

Judging finished runs again (`--checkpoints a.ckpt,b.ckpt,c.ckpt`, one per `--seeds` entry, in
order; one without `--seeds`): step 3 is replaced by loading each checkpoint's trained weights
into the freshly built demo (`lightning_grpo.export.load_trained_weights`), so runs trained
earlier are evaluated, and their artifact measures banded, by the code and measures of today,
with the same base evaluation and summary as a training run would print.

Extra arguments after `--` go to the CLI, e.g. `-- --trainer.max_steps=50`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"flux": ROOT / "configs" / "demo.yaml", "sd": ROOT / "configs" / "demo_sd.yaml",
           "t2v": ROOT / "configs" / "demo_t2v.yaml", "i2v": ROOT / "configs" / "demo_i2v.yaml"}
JUDGE = {"flux": "exact_match", "sd": "exact_match", "t2v": "exact_match", "i2v": "motion_accuracy"}
"""The measure each family is judged by (acceptance: its change on new combinations)."""
TOY_CLIP = ROOT / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "clip"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(CONFIGS), default="flux", help="which toy pipeline (default flux)")
    parser.add_argument("--config", type=Path, default=None, help="demo config (default: the family's)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="held-out samples per prompt, every split")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the evaluation noise")
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated training seeds (seed_everything), e.g. 0,1,2: trains once per seed and "
                             "prints each seed's gain, the minimum and the mean (default: the config's seed, once)")
    parser.add_argument("--splits", type=split_list, default=None,
                        help=f"comma-separated held-out splits to evaluate (default all: {', '.join(SPLITS)}); "
                             "new_combinations is always included (the gain is read there)")
    parser.add_argument("--batch-size", type=int, default=80, help="samples generated at once in evaluation")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--grids", type=Path, default=None,
                        help="write the new-combination samples' grids here: before.png, after_seed<k>.png (after.png "
                             "without --seeds); video: film strips, image-to-video with the conditioning frame first")
    parser.add_argument("--checkpoints", type=checkpoint_list, default=None,
                        help="judge these finished runs instead of training: comma-separated checkpoints of the demo, "
                             "one per --seeds entry in order (one without --seeds), each loaded into the freshly built "
                             "demo and evaluated as 'after'")
    parser.add_argument("--ckpt-path", type=Path, default=None,
                        help="continue training from this checkpoint of the same demo (exact resume: e.g. a 500-step "
                             "run's last.ckpt with `-- --trainer.max_steps=1000` equals a 1000-step run); 'before' is "
                             "still the base pipeline")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.seeds is not None and args.ckpt_path is not None:
        parser.error("--ckpt-path continues one run; it cannot be combined with --seeds")
    if args.checkpoints is not None:
        if args.ckpt_path is not None:
            parser.error("--checkpoints judges finished runs without training; it cannot be combined with --ckpt-path")
        wanted = 1 if args.seeds is None else len(args.seeds)
        if len(args.checkpoints) != wanted:
            parser.error(f"--checkpoints gives {len(args.checkpoints)} checkpoint(s) for {wanted} run(s) "
                         f"({'--seeds ' + ','.join(map(str, args.seeds)) if args.seeds else 'no --seeds: one'})")
    if any(a.startswith("--seed_everything") for a in extra) and args.seeds is not None:
        parser.error("give the training seeds with --seeds, not --seed_everything after --")
    return args, extra


SPLITS = ("new_combinations", "new_phrasings", "both")
"""The held-out splits of both worlds (`lightning_grpo.worlds.shapes.prompts`, `lightning_grpo.worlds.moving_shapes.prompts`)."""


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers (a clear error for anything else)."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def checkpoint_list(text: str) -> list[Path]:
    """'a.ckpt,b.ckpt' -> existing checkpoint files (a clear error naming a missing one)."""
    paths = [Path(part.strip()) for part in text.split(",") if part.strip()]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise argparse.ArgumentTypeError(f"--checkpoints takes existing checkpoint files, comma-separated; "
                                         f"{'none given' if not paths else 'not found: ' + ', '.join(missing)}")
    return paths


def split_list(text: str) -> list[str]:
    """'new_combinations,both' -> the named splits in `SPLITS` order, new_combinations always included."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(SPLITS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown held-out split(s) {unknown}; choose from {list(SPLITS)}")
    return [s for s in SPLITS if s in names or s == "new_combinations"]


def judge_and_gold_measures(family: str = "flux") -> list:
    """Images: the strict verifier (exact match: the judge; dense) and the gold measures (lenient
    verifier, toy CLIP). Video: the moving-shapes verifiers, exact (the judge) and dense, and for
    image-to-video the first-frame fidelity."""
    if family in ("t2v", "i2v"):
        return video_measures(family)
    from lightning_grpo.rewards import ClipScore
    from lightning_grpo.worlds.shapes.verifier import ShapesVerifier

    return [
        ShapesVerifier(mode="exact", name="exact_match"),
        ShapesVerifier(mode="dense", name="attributes"),
        ShapesVerifier(mode="exact", strict=False, name="exact_match_lenient"),
        ClipScore(checkpoint=str(TOY_CLIP / "open_clip_model.safetensors"), architecture=str(TOY_CLIP), name="toy_clip"),
    ]


def video_measures(family: str) -> list:
    """The moving-shapes measures: exact match, motion accuracy (exact motion), appearance (exact),
    the dense forms, and for image-to-video whether the first and the last frame keep the
    conditioning image's object (`FirstFrameAdherence`) and the first-frame fidelity (1 − mean
    |frame 0 − image|, over every pixel)."""
    from lightning_grpo.worlds.moving_shapes.verifier import FirstFrameAdherence, FirstFrameFidelity, MovingShapesVerifier

    measures = [
        MovingShapesVerifier(aspect="all", mode="exact", name="exact_match"),
        MovingShapesVerifier(aspect="motion", mode="exact", name="motion_accuracy"),
        MovingShapesVerifier(aspect="appearance", mode="exact", name="appearance_exact"),
        MovingShapesVerifier(aspect="motion", mode="dense", name="motion_dense"),
        MovingShapesVerifier(aspect="appearance", mode="dense", name="appearance_dense"),
    ]
    image_to_video = [FirstFrameAdherence(), FirstFrameAdherence(frame=-1), FirstFrameFidelity()]
    return measures + (image_to_video if family == "i2v" else [])


def heldout_split_prompts(family: str) -> dict[str, list[str]]:
    """split name -> prompts: the shapes world's splits, or the moving-shapes world's for video."""
    if family in ("t2v", "i2v"):
        from lightning_grpo.worlds.moving_shapes.prompts import motion_heldout_splits

        return motion_heldout_splits()
    from lightning_grpo.worlds.shapes.prompts import heldout_splits

    return heldout_splits()


def split_figures(before, after) -> dict:
    """{measure: {"before": {"mean", "ci95"}, "after": ..., "change"}} of one split (change in points
    for the 0/1 measures: exact match, motion accuracy)."""
    from lightning_grpo.evaluation import is_binary

    out = {}
    for name, (b_mean, b_low, b_high, n) in before.summary().items():
        a_mean, a_low, a_high, _ = after.summary()[name]
        scale = 100 if is_binary(before.scores[name]) and is_binary(after.scores[name]) else 1
        out[name] = {"n": n, "before": {"mean": b_mean, "ci95": [b_low, b_high]},
                     "after": {"mean": a_mean, "ci95": [a_low, a_high]}, "change": scale * (a_mean - b_mean),
                     "intervals_overlap": a_low <= b_high and b_low <= a_high}
    return out


SEED_MEASURES = {"flux": ("exact_match",), "sd": ("exact_match",),
                 "t2v": ("exact_match", "motion_accuracy", "appearance_exact"),
                 "i2v": ("motion_accuracy", "exact_match", "appearance_exact", "appearance_dense", "first_frame_adherence")}
"""Measures summarised over seeds (new combinations): the judge first, then what must rise or hold beside it."""


def train_and_evaluate(args: argparse.Namespace, extra: list[str], seed: int | None, splits: dict[str, list[str]],
                       metrics: list, before: dict | None, checkpoint: Path | None = None) -> tuple[dict, dict, dict]:
    """One training run (the config's seed, or `seed_everything=seed`): (before, after, figures), where
    before / after map split -> EvaluationResult; the base is evaluated only when `before` is None.
    With `checkpoint`, no training: that finished run's weights are loaded and judged as 'after'."""
    from lightning_grpo.callbacks.ema import ema_weights
    from lightning_grpo.cli import run
    from lightning_grpo.evaluation import evaluate

    config = args.config or CONFIGS[args.family]
    cli = run(["-c", str(config), *extra, *([] if seed is None else [f"--seed_everything={seed}"])], subcommand=False)
    module, trainer = cli.model, cli.trainer
    frames = {split: first_frames(args.family, prompts, module.policy) for split, prompts in splits.items()}

    def held_out() -> dict:
        return {split: evaluate(module.policy, module.sampler, prompts, metrics, samples_per_prompt=args.samples_per_prompt,
                                seed=args.seed, batch_size=args.batch_size, images=frames[split], show_progress=False,
                                keep_pixels=True)
                for split, prompts in splits.items()}

    before = held_out() if before is None else before
    if checkpoint is not None:
        steps = load_finished_run(module, checkpoint)
        after = held_out()
        figures = {"family": args.family, "config": str(config), "cli_overrides": extra, "seed": seed,
                   "judged_checkpoint": str(checkpoint), "run_dir": str(checkpoint.parent.parent),
                   "optimizer_steps": steps, "train_seconds": None, "splits": {}}
    else:
        started = time.perf_counter()
        trainer.fit(module, datamodule=cli.datamodule, ckpt_path=None if args.ckpt_path is None else str(args.ckpt_path))
        train_seconds = time.perf_counter() - started
        with ema_weights(trainer, module):  # the EMA weights when the config has an EMA callback, as HeldOutEvaluation
            after = held_out()
        figures = {"family": args.family, "config": str(config), "cli_overrides": extra, "seed": seed,
                   "resumed_from": None if args.ckpt_path is None else str(args.ckpt_path),
                   "run_dir": trainer.log_dir, "optimizer_steps": trainer.global_step,
                   "train_seconds": round(train_seconds, 1), "splits": {}}
    for split in splits:
        figures["splits"][split] = split_figures(before[split], after[split])
    figures["artifacts"] = artifact_figures(before["new_combinations"], after["new_combinations"], args.samples_per_prompt)
    if args.grids is not None:
        write_grids(args.grids, before["new_combinations"], after["new_combinations"], seed)
    return before, after, figures


def load_finished_run(module, checkpoint: Path) -> int:
    """Load a finished run's trained weights into `module.policy` (`load_trained_weights`: every
    trainable weight must be there, mismatches named); returns the run's optimizer step. A run with
    EMA weights is refused: its held-out figures were measured on those, which the checkpoint keeps
    in the callback's state, not in the policy."""
    import torch

    from lightning_grpo.export import load_trained_weights

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if any("EMA" in key for key in state.get("callbacks", {})):
        raise SystemExit(f"--checkpoints: {checkpoint} holds EMA weights (an EMA callback's state); judging it on its "
                         "raw weights would not be the run's own evaluation")
    load_trained_weights(module.policy, checkpoint)
    return int(state.get("global_step", 0))


def artifact_figures(before, after, samples_per_prompt: int) -> dict:
    """The artifact and drift measures (`lightning_grpo.artifacts`: periodic and background energy,
    chroma, luminance, clipped highlights, hue shift, KID on the toy CLIP's image features, and for
    video flicker and first-frame adherence on the object) of the trained samples against the base
    samples' warning band, on the same prompts and seeds: {measure: {"base", "value", "band", "outside"}}."""
    from lightning_grpo.artifacts import compare_samples, encoder_of
    from lightning_grpo.rewards import ClipScore

    clip = ClipScore(checkpoint=str(TOY_CLIP / "open_clip_model.safetensors"), architecture=str(TOY_CLIP), name="toy_clip")
    conditioning = before.images if before.pixels.ndim == 5 else None
    comparisons = compare_samples(before.pixels, after.pixels, conditioning=conditioning, encoder=encoder_of([clip]),
                                  samples_per_prompt=samples_per_prompt)
    return {name: {"base": c.band.base, "value": c.value, "band": [c.band.low, c.band.high], "outside": c.outside}
            for name, c in comparisons.items()}


def write_grids(directory: Path, before, after, seed: int | None) -> None:
    """before.png (once) and after[_seed<k>].png of the new-combination samples (prompt rows, sample columns)."""
    from lightning_grpo.grids import save_png

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "before.png").exists():
        save_png(before.grid(cell_size=64), directory / "before.png")
    save_png(after.grid(cell_size=64), directory / ("after.png" if seed is None else f"after_seed{seed}.png"))


def print_run(args: argparse.Namespace, splits: dict[str, list[str]], before: dict, after: dict, figures: dict) -> float:
    """Every split's before/after table and the judge's line per split; returns the judge's change
    on new combinations (points)."""
    from lightning_grpo.evaluation import format_before_after

    label = "" if figures["seed"] is None else f"seed {figures['seed']}: "
    for split in splits:
        print(f"\n### {label}held-out split: {split} ({len(splits[split])} prompts x {args.samples_per_prompt})\n")
        print(format_before_after(before[split], after[split]))
    print(json.dumps(figures))
    print(f"\n{label}artifact and drift measures (new combinations), after against the base samples' band:\n")
    print(format_artifacts(figures["artifacts"]))
    judge = JUDGE[args.family]
    for split, measures in figures["splits"].items():
        m = measures[judge]
        (b, bl, bh), (a, al, ah) = ([m[w]["mean"], *m[w]["ci95"]] for w in ("before", "after"))
        print(f"{label}{split}: {judge} {100 * b:.1f}% [{100 * bl:.1f}, {100 * bh:.1f}] -> "
              f"{100 * a:.1f}% [{100 * al:.1f}, {100 * ah:.1f}] (n = {m['n']} each), {m['change']:+.1f} pts"
              + ("" if m["intervals_overlap"] else ", intervals do not overlap"))
    return figures["splits"]["new_combinations"][judge]["change"]


def format_artifacts(artifacts: dict) -> str:
    """A markdown table: measure | base | after | base's band | outside."""
    lines = ["| measure | base | after | base's band | outside |", "|---|---|---|---|---|"]
    for name, a in artifacts.items():
        lines.append(f"| {name} | {a['base']:.4g} | {a['value']:.4g} | [{a['band'][0]:.4g}, {a['band'][1]:.4g}] | "
                     f"{'**yes**' if a['outside'] else 'no'} |")
    return "\n".join(lines)


def seed_summary(family: str, seeds: list[int], before, afters: list) -> dict:
    """{measure: {"per_seed", "min", "mean", "before", "after_pooled", "intervals_overlap", "points"}} on
    new combinations, for the measures of `SEED_MEASURES` the evaluation has. The mean change over
    seeds equals the pooled after-mean minus the base (same n per seed); its interval is that of the
    pooled after-samples (Wilson for 0/1 scores, Student-t otherwise)."""
    import torch

    from lightning_grpo.evaluation import is_binary, mean_ci

    out = {}
    for name in SEED_MEASURES[family]:
        if name not in before.scores:
            continue
        base = before.scores[name]
        pooled = torch.cat([after.scores[name] for after in afters])
        scale = 100 if is_binary(base) and is_binary(pooled) else 1
        b, bl, bh = mean_ci(base)
        a, al, ah = mean_ci(pooled)
        per_seed = [scale * (after.scores[name].mean().item() - b) for after in afters]
        out[name] = {"seeds": seeds, "per_seed": per_seed, "min": min(per_seed), "mean": sum(per_seed) / len(per_seed),
                     "points": scale == 100, "before": {"mean": b, "ci95": [bl, bh], "n": base.numel()},
                     "after_pooled": {"mean": a, "ci95": [al, ah], "n": pooled.numel()},
                     "intervals_overlap": al <= bh and bl <= ah}
    return out


def print_seed_summary(family: str, summary: dict) -> float:
    """The summary lines over seeds; the judge's mean gain is the LAST line. Returns it."""
    judge = JUDGE[family]
    print("\n### over seeds (held-out new combinations)\n")
    for name, s in summary.items():
        unit, fmt = (" pts", lambda v: f"{100 * v:.1f}%") if s["points"] else ("", lambda v: f"{v:.3f}")
        (b, bl, bh), (a, al, ah) = ([s[w]["mean"], *s[w]["ci95"]] for w in ("before", "after_pooled"))
        gains = " / ".join(f"{g:+.1f}" if s["points"] else f"{g:+.3f}" for g in s["per_seed"])
        print(f"{name}: seeds {','.join(map(str, s['seeds']))} change {gains}{unit}; base {fmt(b)} [{fmt(bl)}, {fmt(bh)}] "
              f"-> mean over seeds {fmt(a)} [{fmt(al)}, {fmt(ah)}] (pooled n = {s['after_pooled']['n']})"
              + ("" if s["intervals_overlap"] else ", intervals do not overlap"))
    s = summary[judge]
    for seed, gain in zip(s["seeds"], s["per_seed"]):
        print(f"seed {seed}: gain (new combinations, {judge}) {gain:+.1f} points")
    print(f"minimum over seeds (new combinations, {judge}): {s['min']:+.1f} points")
    print(f"mean gain over seeds {','.join(map(str, s['seeds']))} (new combinations, {judge}): {s['mean']:+.1f} points")
    return s["mean"]


def main(argv: list[str] | None = None) -> float:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args, extra = parse_args(argv)
    metrics = judge_and_gold_measures(args.family)
    splits = {k: v for k, v in heldout_split_prompts(args.family).items() if args.splits is None or k in args.splits}
    checkpoints = args.checkpoints or [None] * (1 if args.seeds is None else len(args.seeds))
    if args.seeds is None:
        before, after, figures = train_and_evaluate(args, extra, None, splits, metrics, None, checkpoints[0])
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        improvement = print_run(args, splits, before, after, figures)
        print(f"improvement (new combinations, {JUDGE[args.family]}): {improvement:+.1f} points")
        return improvement
    before, afters, runs = None, [], []
    for seed, checkpoint in zip(args.seeds, checkpoints):
        before, after, figures = train_and_evaluate(args, extra, seed, splits, metrics, before, checkpoint)
        print_run(args, splits, before, after, figures)
        afters.append(after["new_combinations"])
        runs.append(figures)
        gc.collect()
    summary = seed_summary(args.family, args.seeds, before["new_combinations"], afters)
    outside = {run["seed"]: [name for name, a in run["artifacts"].items() if a["outside"]] for run in runs}
    if args.json is not None:
        args.json.write_text(json.dumps({"family": args.family, "seeds": args.seeds, "runs": runs, "summary": summary,
                                         "artifacts_outside": outside}, indent=2) + "\n")
    print("\n### artifact and drift measures outside the base's band (new combinations)\n")
    for seed, names in outside.items():
        print(f"seed {seed}: {', '.join(names) if names else 'none'}")
    return print_seed_summary(args.family, summary)


def first_frames(family: str, prompts: list[str], policy):
    """Image-to-video: each prompt's first frame (the shape at its start, the same frame for a
    prompt in every run: `lightning_grpo.worlds.moving_shapes.data.first_frames_for_prompts`); else None."""
    if family != "i2v":
        return None
    from lightning_grpo.worlds.moving_shapes.data import first_frames_for_prompts

    return first_frames_for_prompts(prompts, size=policy.height)


if __name__ == "__main__":
    main()
