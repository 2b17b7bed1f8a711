"""Regenerate tests/data/hacking_samples.npz: the stored sample sets of the reward-hacking
regression tests (tests/callbacks/test_artifacts_regression.py).

What it does, for each demo (`flux`: configs/demo.yaml, the grid of dim blobs that appears from
about step 250; `i2v`: configs/demo_i2v.yaml, red drifting to yellow/orange and frame 0 leaving
its conditioning image):

1. trains the demo config as shipped through the CLI (`lightning-grpo fit -c <copy>`), the copy
   changed only where it does not touch training: checkpoints every 50 steps, all kept, into
   `--work`; the evaluation callbacks (ODEVisualizer, HeldOutEvaluation, RewardHackingMonitor)
   left out, as they sample on their own generators under `preserve_rng` and never change the
   training stream (tested in tests/callbacks; checked here too: the toy FLUX weights at steps 50
   and 100 are bit for bit those of the config with every callback on), and they cost time on 2
   cores. A run over hundreds of RL steps amplifies rounding differences, so the samples depend
   on the thread count: the stored sets were made with OMP_NUM_THREADS=1;
2. samples the base policy (the shipped weights) and the trained checkpoints deterministically
   (eta = 0, `lightning_grpo.evaluation.evaluate`) on the 16 scenes of the monitor's held-out
   set (one phrasing each), 3 samples per prompt (I2V: 2), at two seed sets for the base
   (`base`, and `base_other` to check the monitor stays silent on a fresh draw of the base);
3. renders clean scenes of the same prompts with the toy renderer (`clean`, `clean_other`: two
   jitter seeds) and, for I2V, stores the conditioning frames;
4. writes everything as uint8 into one LZMA-compressed .npz (keys `<demo>/<set>`, plus
   `<demo>/prompts` and `<demo>/samples_per_prompt`) and a preview PNG per set into `--work`.

The stored sets were made at commit 1dec9fd, with the demo configs of then (FLUX: full SDE, lr 1e-4,
500 steps; I2V: the motion reward alone): the failures they hold are those configs'. Today's demo
configs no longer fail that way (docs/results.md, issue 28), so the sets are remade by running this
script in a checkout of 1dec9fd, not on today's configs.

Run from the repository root (minutes on 2 cores; OMP_NUM_THREADS=1 as the demos are measured):
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python tests/data/make_hacking_samples.py --work /tmp/hacking_runs
Re-sampling existing runs without training again: add --skip-train.
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "hacking_samples.npz"

DEMOS = {
    # demo name -> (config, prompts file of its monitor, trained steps to store)
    # FLUX: the background pattern is strongest around step 150 in the OMP_NUM_THREADS=1 run and
    # fainter by step 500 (periodic energy 4.2x the base at 150, 1.0x at 500; background energy
    # 7.6x and 2.0x; docs/results.md)
    "flux": ("configs/demo.yaml", "configs/prompts/shapes_heldout_both.txt", [150, 500]),
    "i2v": ("configs/demo_i2v.yaml", "configs/prompts/motion_heldout_both.txt", [150]),
}
EVALUATION_CALLBACKS = ("ODEVisualizer", "HeldOutEvaluation", "RewardHackingMonitor")
SEED, OTHER_SEED = 1234, 98765
#: samples per prompt: 3 for FLUX; 2 for I2V, whose noisy-background clips compress poorly (the file stays near 1 MB)
SAMPLES_PER_PROMPT = {"flux": 3, "i2v": 2}


def one_per_scene(prompts: list[str], phrasings: int = 3) -> list[str]:
    """The monitor's sets list each scene in `phrasings` phrasings in a row: take scene i's
    phrasing i mod `phrasings`, so every scene is there once and every phrasing is used."""
    return [prompts[i * phrasings + i % phrasings] for i in range(len(prompts) // phrasings)]


def training_config(config: str, work: Path, name: str, max_steps: int) -> Path:
    """A copy of `config` that keeps every 50-step checkpoint in `work/name` and drops the evaluation callbacks."""
    data = yaml.safe_load((ROOT / config).read_text())
    trainer = data["trainer"]
    trainer["max_steps"] = max_steps
    trainer["logger"]["init_args"].update(save_dir=str(work), name=name)
    callbacks = [c for c in trainer["callbacks"] if not c["class_path"].endswith(EVALUATION_CALLBACKS)]
    for callback in callbacks:
        if callback["class_path"].endswith("GRPOCheckpoint"):
            callback["init_args"].update(every_n_train_steps=50, keep_last=-1)
    # the default ODEVisualizer comes back when the config lists none: turn it into a no-op
    callbacks.append({"class_path": "lightning_grpo.callbacks.ODEVisualizer",
                      "init_args": {"prompts": [], "at_fit_start": False, "at_fit_end": False, "every_n_steps": 10**9}})
    trainer["callbacks"] = callbacks
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train(config: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "lightning_grpo", "fit", "-c", str(config)], cwd=ROOT, env=env, check=True)


def build_module(config: str):
    from lightning_grpo.cli import run

    cli = run(["-c", str(ROOT / config), "--trainer.logger=false"], subcommand=False)
    return cli.model


def checkpoint_for(work: Path, name: str, step: int) -> Path:
    matches = sorted((work / name).glob(f"version_*/checkpoints/*step={step}.ckpt"))
    if not matches:
        raise FileNotFoundError(f"no checkpoint of step {step} under {work / name}: train first (without --skip-train)")
    return matches[-1]


def load_weights(module, path: Path) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state, current = checkpoint["state_dict"], module.state_dict()
    for key in module._rebuilt_keys():
        state.setdefault(key, current[key])
    module.load_state_dict(state)


def sample(module, prompts: list[str], seed: int, images: torch.Tensor | None, samples_per_prompt: int) -> np.ndarray:
    from lightning_grpo.evaluation import evaluate

    result = evaluate(module.policy, module.sampler, prompts, module.rewards, samples_per_prompt=samples_per_prompt, seed=seed,
                      batch_size=16, keep_pixels=True, images=images, show_progress=False)
    return to_uint8(result.pixels)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def clean_renders(demo: str, prompts: list[str], seed: int) -> np.ndarray:
    """Toy renderer scenes of the prompts, `SAMPLES_PER_PROMPT[demo]` per prompt (prompt-major, as the samples)."""
    if demo == "flux":
        from lightning_grpo.worlds.shapes.prompts import parse_prompt
        from lightning_grpo.worlds.shapes.render import render_scenes

        scenes = [parse_prompt(p) for p in prompts for _ in range(SAMPLES_PER_PROMPT[demo])]
        return to_uint8(render_scenes(scenes, size=32, seed=seed))
    from lightning_grpo.worlds.moving_shapes.prompts import parse_motion_prompt
    from lightning_grpo.worlds.moving_shapes.render import render_motion_scenes

    scenes = [parse_motion_prompt(p) for p in prompts for _ in range(SAMPLES_PER_PROMPT[demo])]
    return to_uint8(render_motion_scenes(scenes, frames=9, size=32, seed=seed))


def save_lzma_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz (a zip of .npy files, what `np.load` reads) compressed with LZMA instead of
    `np.savez_compressed`'s deflate: about 20% smaller on these clips."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            archive.writestr(f"{key}.npy", buffer.getvalue())


def preview(arrays: np.ndarray, path: Path, samples_per_prompt: int) -> None:
    """One PNG of a set (rows = prompts, columns = samples; videos: frames 0, 4, 8)."""
    from lightning_grpo.grids import captioned_grid, filmstrip, save_png

    pixels = torch.from_numpy(arrays).float() / 255
    if pixels.ndim == 5:
        pixels = filmstrip(pixels, max_frames=3)
    save_png(captioned_grid(pixels.reshape(-1, samples_per_prompt, *pixels.shape[1:]), cell_size=64, rows_per_block=8), path)


def scan(module, work: Path, demo: str, prompts: list[str], images, per_prompt: int, base: np.ndarray, last: int) -> None:
    """Print each 50-step checkpoint's measures against the base's band (`*`: outside)."""
    from lightning_grpo.artifacts import ArtifactReference, artifact_stats

    def stats(arrays: np.ndarray):
        return artifact_stats(torch.from_numpy(arrays).float() / 255, images, samples_per_prompt=per_prompt)

    reference = ArtifactReference(stats(base))
    for step in range(50, last + 1, 50):
        load_weights(module, checkpoint_for(work, demo, step))
        report = reference.compare(stats(sample(module, prompts, SEED, images, per_prompt)))
        print(f"{demo} step {step}: " + " ".join(f"{n}={c.value:.3g}{'*' if c.outside else ''}" for n, c in report.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder of the training runs and previews")
    parser.add_argument("--demos", default="flux,i2v", help="comma-separated: flux, i2v")
    parser.add_argument("--skip-train", action="store_true", help="sample the runs already in --work")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--scan", action="store_true",
                        help="only print the measures of every 50-step checkpoint in --work against the base (nothing stored)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    args.work.mkdir(parents=True, exist_ok=True)
    from lightning_grpo.callbacks.evaluation import read_prompts

    stored: dict[str, np.ndarray] = dict(np.load(args.out)) if args.out.exists() else {}
    for demo in [d.strip() for d in args.demos.split(",") if d.strip()]:
        config, prompts_file, steps = DEMOS[demo]
        if not args.skip_train:
            train(training_config(config, args.work, demo, max(steps)))
        prompts = one_per_scene(read_prompts(prompts_file))
        module = build_module(config)
        images = None
        if demo == "i2v":
            from lightning_grpo.worlds.moving_shapes.data import MotionFirstFrames

            images = MotionFirstFrames(seed=0)(prompts, 32)  # as the config's HeldOutEvaluation and monitor
            stored[f"{demo}/conditioning"] = to_uint8(images)
        per_prompt = SAMPLES_PER_PROMPT[demo]
        sets = {"base": sample(module, prompts, SEED, images, per_prompt),
                "base_other": sample(module, prompts, OTHER_SEED, images, per_prompt)}
        if args.scan:
            scan(module, args.work, demo, prompts, images, per_prompt, sets["base"], max(steps))
            continue
        for step in steps:
            load_weights(module, checkpoint_for(args.work, demo, step))
            sets[f"step{step}"] = sample(module, prompts, SEED, images, per_prompt)
        sets["clean"], sets["clean_other"] = clean_renders(demo, prompts, 0), clean_renders(demo, prompts, 1)
        for name, arrays in sets.items():
            stored[f"{demo}/{name}"] = arrays
            preview(arrays, args.work / f"{demo}_{name}.png", per_prompt)
        stored[f"{demo}/prompts"] = np.array(prompts)
        stored[f"{demo}/samples_per_prompt"] = np.array(per_prompt)
    if args.scan:
        return
    save_lzma_npz(args.out, stored)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB): {sorted(stored)}")


if __name__ == "__main__":
    main()
