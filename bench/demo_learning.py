"""Does GRPO make the toy pipeline follow its prompts better? Held-out accuracy before and after,
on three held-out splits, judged by the strict pixel verifier, with gold measures beside it.

    python bench/demo_learning.py                 # toy FLUX (rectified flow), configs/demo.yaml
    python bench/demo_learning.py --family sd     # toy Stable Diffusion (DDIM), configs/demo_sd.yaml
    python bench/demo_learning.py --family t2v    # toy HunyuanVideo text-to-video, configs/demo_t2v.yaml
    python bench/demo_learning.py --family i2v    # toy SkyReels-V1 image-to-video, configs/demo_i2v.yaml

The video families are judged in the moving-shapes world (`lightning_grpo.toy.motion_verifier`):
text-to-video by exact match (colour, shape and motion right, one object in every frame),
image-to-video by motion accuracy (the exact motion check; the first frame, the same before and
after, fixes colour and shape), with the first-frame fidelity beside it (does the clip still start
from its conditioning image?).

1. Builds the demo exactly as `lightning-grpo fit -c <config>` does (same LightningCLI parsing).
2. Evaluates the base pipeline on the three held-out splits (`lightning_grpo.toy.prompts`):
   new combinations (attribute triples RL never sees, training phrasings; 80 prompts), new
   phrasings (training triples in reserved phrasings no training ever used; 96 prompts), and
   both (48 prompts): deterministic ODE sampling (eta = 0) from fixed seeds,
   `--samples-per-prompt` per prompt, scored by the strict verifier (exact match = the judge,
   and dense) and by gold measures training never optimises: the lenient verifier's exact match
   and the toy CLIP score.
3. Runs the demo's GRPO training (`trainer.fit`).
4. Evaluates again with the SAME seeds (with the EMA weights where the config has an `EMA`
   callback, as its `HeldOutEvaluation` does), and prints every split's before/after table with 95%
   intervals (Wilson for exact match, Student-t otherwise).
The last line printed is the absolute improvement of the judge (strict exact match; motion accuracy
for image-to-video) on new combinations, in points.

Extra arguments after `--` go to the CLI, e.g. `-- --trainer.max_steps=50`.
"""

from __future__ import annotations

import argparse
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
TOY_CLIP = ROOT / "lightning_grpo" / "toy" / "pretrained" / "clip"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(CONFIGS), default="flux", help="which toy pipeline (default flux)")
    parser.add_argument("--config", type=Path, default=None, help="demo config (default: the family's)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="held-out samples per prompt, every split")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the evaluation noise")
    parser.add_argument("--batch-size", type=int, default=80, help="samples generated at once in evaluation")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--ckpt-path", type=Path, default=None,
                        help="continue training from this checkpoint of the same demo (exact resume: e.g. a 500-step "
                             "run's last.ckpt with `-- --trainer.max_steps=1000` equals a 1000-step run); 'before' is "
                             "still the base pipeline")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    return args, extra


def judge_and_gold_measures(family: str = "flux") -> list:
    """Images: the strict verifier (exact match: the judge; dense) and the gold measures (lenient
    verifier, toy CLIP). Video: the moving-shapes verifiers, exact (the judge) and dense, and for
    image-to-video the first-frame fidelity."""
    if family in ("t2v", "i2v"):
        return video_measures(family)
    from lightning_grpo.rewards import ClipScore
    from lightning_grpo.toy.verifier import ShapesVerifier

    return [
        ShapesVerifier(mode="exact", name="exact_match"),
        ShapesVerifier(mode="dense", name="attributes"),
        ShapesVerifier(mode="exact", strict=False, name="exact_match_lenient"),
        ClipScore(checkpoint=str(TOY_CLIP / "open_clip_model.safetensors"), architecture=str(TOY_CLIP), name="toy_clip"),
    ]


def video_measures(family: str) -> list:
    """The moving-shapes measures: exact match, motion accuracy (exact motion), appearance (exact),
    the dense forms, and for image-to-video the first-frame fidelity (1 − mean |frame 0 − image|)."""
    from lightning_grpo.toy.motion_verifier import FirstFrameFidelity, MovingShapesVerifier

    measures = [
        MovingShapesVerifier(aspect="all", mode="exact", name="exact_match"),
        MovingShapesVerifier(aspect="motion", mode="exact", name="motion_accuracy"),
        MovingShapesVerifier(aspect="appearance", mode="exact", name="appearance_exact"),
        MovingShapesVerifier(aspect="motion", mode="dense", name="motion_dense"),
        MovingShapesVerifier(aspect="appearance", mode="dense", name="appearance_dense"),
    ]
    return measures + ([FirstFrameFidelity()] if family == "i2v" else [])


def heldout_split_prompts(family: str) -> dict[str, list[str]]:
    """split name -> prompts: the shapes world's splits, or the moving-shapes world's for video."""
    if family in ("t2v", "i2v"):
        from lightning_grpo.toy.motion_prompts import motion_heldout_splits

        return motion_heldout_splits()
    from lightning_grpo.toy.prompts import heldout_splits

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


def main(argv: list[str] | None = None) -> float:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args, extra = parse_args(argv)
    from lightning_grpo.callbacks.ema import ema_weights
    from lightning_grpo.cli import run
    from lightning_grpo.evaluation import evaluate, format_before_after

    config = args.config or CONFIGS[args.family]
    cli = run(["-c", str(config), *extra], subcommand=False)
    module, trainer = cli.model, cli.trainer
    metrics = judge_and_gold_measures(args.family)
    splits = heldout_split_prompts(args.family)
    frames = {split: first_frames(args.family, prompts, module.policy) for split, prompts in splits.items()}

    def held_out() -> dict:
        return {split: evaluate(module.policy, module.sampler, prompts, metrics, samples_per_prompt=args.samples_per_prompt,
                                seed=args.seed, batch_size=args.batch_size, images=frames[split], show_progress=False)
                for split, prompts in splits.items()}

    before = held_out()
    started = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule, ckpt_path=None if args.ckpt_path is None else str(args.ckpt_path))
    train_seconds = time.perf_counter() - started
    with ema_weights(trainer, module):  # the EMA weights when the config has an EMA callback, as HeldOutEvaluation
        after = held_out()
    figures = {"family": args.family, "config": str(config), "cli_overrides": extra,
               "resumed_from": None if args.ckpt_path is None else str(args.ckpt_path),
               "optimizer_steps": trainer.global_step, "train_seconds": round(train_seconds, 1), "splits": {}}
    for split in splits:
        print(f"\n### held-out split: {split} ({len(splits[split])} prompts x {args.samples_per_prompt})\n")
        print(format_before_after(before[split], after[split]))
        figures["splits"][split] = split_figures(before[split], after[split])
    print(json.dumps(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    judge = JUDGE[args.family]
    for split, measures in figures["splits"].items():
        m = measures[judge]
        (b, bl, bh), (a, al, ah) = ([m[w]["mean"], *m[w]["ci95"]] for w in ("before", "after"))
        print(f"{split}: {judge} {100 * b:.1f}% [{100 * bl:.1f}, {100 * bh:.1f}] -> "
              f"{100 * a:.1f}% [{100 * al:.1f}, {100 * ah:.1f}] (n = {m['n']} each), {m['change']:+.1f} pts"
              + ("" if m["intervals_overlap"] else ", intervals do not overlap"))
    improvement = figures["splits"]["new_combinations"][judge]["change"]
    print(f"improvement (new combinations, {judge}): {improvement:+.1f} points")
    return improvement


def first_frames(family: str, prompts: list[str], policy):
    """Image-to-video: each prompt's first frame (the shape at its start, the same frame for a
    prompt in every run: `lightning_grpo.toy.motion_data.first_frames_for_prompts`); else None."""
    if family != "i2v":
        return None
    from lightning_grpo.toy.motion_data import first_frames_for_prompts

    return first_frames_for_prompts(prompts, size=policy.height)


if __name__ == "__main__":
    main()
