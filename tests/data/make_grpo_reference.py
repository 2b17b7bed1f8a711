"""GRPO runs whose every number is stored, to prove a restructuring changed nothing.

Each case trains a few steps (the weight-free TinyPolicy in Python, the shipped toy FLUX pipeline
and configs/tiny.yaml through the CLI with the default callbacks) and records, after every
training step, a SHA-256 of the trainable weights (their float32 bytes), every logged `train/`
value as `float.hex()` and a SHA-256 of the step record's advantages. `tests/training/
test_grpo_reference.py` runs the same cases with the code of today and compares exactly.

Every case runs under `PINNED_NUMERICS` (one thread; ATen, MKL and oneDNN capped at AVX2), which
the script sets for itself by re-executing: threads and instruction sets then no longer change the
bits (the first file, recorded without the cap, failed on a CI machine of another
CPU by an ulp). The file records the variables under "numerics".

The cap is not the whole story: under the same variables an Intel Xeon with AVX-512 computes
other bits than the AMD EPYC (AVX2 only) the first pinned file was recorded on (an ulp in
`flow_default`'s step-0 reward; MKL's other CNR branches, oneDNN switched off and numpy's AVX-512
dispatch disabled did not make them agree). So there is one recording per kind of machine seen
(`RECORDINGS`, each file naming its CPU under "machine"), each made the same way from the same old
code, and the test passes when today's code equals one of them to the bit.

The file `grpo_reference.json` beside this script was written by running it in a checkout of the
code the restructuring of issue 30 started from (commit 8c37f8c, its "commit" entry), with the
flat GRPO options that both versions accept (`GRPOModule(clip_range=...)`, the shorthand of the
GRPO objective), from that checkout's root, with that time's configs/demo.yaml as the frozen demo YAML
and ddp_run.py's `--samples-per-update` (commit 19e72d5) put into it:

    git archive 8c37f8c | tar -x -C /tmp/base && cd /tmp/base
    git -C <this repository> show 8c37f8c:configs/demo.yaml > tests/data/grpo_reference_demo.yaml
    git -C <this repository> show 19e72d5 -- tests/distributed/ddp_run.py | patch -p1
    HF_HUB_OFFLINE=1 python <this repository>/tests/data/make_grpo_reference.py \
        --out <this repository>/tests/data/grpo_reference.json

The two-process cases (`DDP_CASES`) run tests/distributed/ddp_run.py on 2 gloo processes.

The demo cases (`DEMO_CASES`: the SD, text-to-video and image-to-video demos through the CLI, each
from a frozen copy of its YAML in this folder, cut to `DEMO_STEPS` steps and a four-prompt held-out
evaluation and reward-hacking watch) were added before the worlds left `lightning_grpo/toy`
(issue 30, acceptance 1) and recorded with the code of that time (the commit in "case_commits",
7a13ff0, with the frozen YAMLs of commit d3ccd03, which name lightning_grpo/toy), merged into the
stored file without touching the other cases:

    git archive 7a13ff0 | tar -x -C /tmp/base_demo && cd /tmp/base_demo
    for f in sd t2v i2v; do git -C <this repository> show d3ccd03:tests/data/grpo_reference_demo_$f.yaml \
        > tests/data/grpo_reference_demo_$f.yaml; done
    HF_HUB_OFFLINE=1 python <this repository>/tests/data/make_grpo_reference.py \
        --out <this repository>/tests/data/grpo_reference.json --update --cases demo_sd_cli demo_t2v_cli demo_i2v_cli

`grpo_reference_xeon.json` was made by the same commands on an Intel Xeon (AVX-512), with `--out`
naming it; both files' "commit" and "case_commits" were filled in by hand (the archives are not git
checkouts, so the script reads no commit there).

Besides every training step they record the held-out figures: per set, reward and "before" /
"after", the mean (`float.hex()`) and a SHA-256 of the per-sample scores, and every observation of
the reward-hacking watch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

STEPS = 3

# The numeric environment every case runs in, recording and comparing alike. Bits depend on the
# CPU's kernels, not only on the code: CI's machines differ (the first file, recorded on one
# machine without a cap, failed on an AVX2 CI machine by an ulp in a gradient norm, and failed on
# an AMD EPYC with AVX2 too, with one thread or two; the recording machine was probably an AVX-512
# one), and two threads reduce in another order than one. So the cases run in a subprocess with
# one thread and with ATen's, MKL's and oneDNN's dispatch capped at AVX2, which every x86-64
# machine of this project has (an AMD and an Intel CPU still differ under it: `RECORDINGS`). Each
# variable changes a probe's bits here (matmul, conv, reductions, exp), so each is honoured.
PINNED_NUMERICS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
                   "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


#: The stored recordings, one per kind of machine (module doc): the CPU named in each file's "machine".
RECORDINGS = ("grpo_reference.json", "grpo_reference_xeon.json")


def machine_description() -> str:
    """The CPU's model name and whether it has AVX-512 (from /proc/cpuinfo; the platform elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    return f"{model} ({'AVX-512' if ' avx512f' in info else 'no AVX-512'})"


def numerics_are_pinned() -> bool:
    return all(os.environ.get(key) == value for key, value in PINNED_NUMERICS.items())


def run_pinned(names: list[str]) -> dict[str, list[dict]]:
    """Run `names` with this script in a subprocess under `PINNED_NUMERICS` (torch reads them at
    import, so they cannot be set in a process that has imported it); their recorded steps."""
    import subprocess

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "cases.json"
        env = {**os.environ, **PINNED_NUMERICS, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--cases", *names],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        if done.returncode:
            raise RuntimeError(f"reference cases {names} failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())["cases"]


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def _hex(value) -> str:
    value = float(value)
    return "nan" if math.isnan(value) else value.hex()


def _recorder():
    from lightning.pytorch import Callback

    class Recorder(Callback):
        """After each training step: weights, logged train/ values and the record's advantages."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights = torch.cat([p.detach().float().flatten() for p in pl_module.policy.trainable_parameters()])
            metrics = {k: _hex(v) for k, v in sorted(trainer.callback_metrics.items()) 
                       if (k.startswith("train/") and not k.startswith("train/time/")) or k == "reward"}
            record = pl_module.last_step
            self.steps.append({
                "global_step": trainer.global_step, "weights": _sha(weights), "metrics": metrics,
                "advantages": None if record is None else _sha(record.advantages),
                "scores": None if record is None else {k: _sha(v) for k, v in sorted(record.scores.items())},
            })

    return Recorder()


# ------------------------------------------------------------------------------------ Python cases
def _tiny_case(name: str):
    """(module, datamodule) of a Python case: TinyPolicy, Redness (and friends)."""
    from lightning_grpo.module import GRPOModule
    from lightning_grpo.policies.tiny import TinyPolicy
    from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler
    from lightning_grpo.samplers.ode_tail import MultistepODETail
    from lightning_grpo.samplers.step_schedule import RandomBranch, SlidingWindow
    from tests.training.fixtures import PROMPTS, ListPrompts, Redness

    class Greenness(Redness):
        default_name = "greenness"

        def score(self, pixels, prompts, images=None):
            return (pixels[:, 1] - pixels[:, 2]).flatten(1).mean(1)

    class FailingOnSquares(Redness):
        """NaN for every sample of the prompts that name a square (a reward failing on some groups)."""

        def score(self, pixels, prompts, images=None):
            scores = super().score(pixels, prompts, images)
            failing = torch.tensor(["square" in p for p in prompts], device=scores.device)
            return torch.where(failing, torch.full_like(scores, float("nan")), scores)

    base = dict(group_size=4, timestep_fraction=0.5, micro_batch_size=2, samples_per_update=4, clip_range=0.2,
                learning_rate=1e-3, show_progress=False)
    flow = FlowSDESampler(num_steps=4, eta=0.7)
    cases = {
        "flow_default": lambda: (dict(base), flow, [Redness()], "flow", 1.0),
        "per_reward_best_of_n_kl": lambda: (
            dict(base, group_size=4, best_of_n=(1, 1), best_of_n_advantages="kept", multi_reward="per_reward", kl_beta=0.1,
                 advantage_std="global", drop_last_timestep=True, lr_warmup_steps=2, max_grad_norm=0.01, samples_per_update=2,
                 timestep_fraction=1.0, adv_clip_max=0.8),
            flow, [Redness(weight=1.0), Greenness(weight=0.5)], "flow", 1.0),
        "sum_best_of_n_group_warmup": lambda: (
            dict(base, best_of_n=(2, 1), samples_per_update=None, lr_warmup_steps=3, max_grad_norm=0.05, seed=3),
            flow, [Redness(), Greenness(weight=2.0)], "flow", 1.0),
        "ddim_cfg_kl": lambda: (
            dict(base, kl_beta=0.05, samples_per_update=None, micro_batch_size=4, timestep_fraction=0.75),
            DDIMSDESampler(num_steps=4, eta=1.0), [Redness()], "diffusion", 2.0),
        "sliding_window_ode_tail": lambda: (
            dict(base, step_schedule=SlidingWindow(size=2, shift_interval=1), ode_tail=MultistepODETail(compression=0.5),
                 rollout_batch_size=3, shared_noise=False, timestep_fraction=1.0),
            FlowSDESampler(num_steps=6, eta=0.7), [Redness()], "flow", 1.0),
        "random_branch_flow_grpo": lambda: (
            dict(base, step_schedule=RandomBranch(num_sde_steps=2, high=4), seed=7),
            FlowSDESampler(num_steps=5, eta=0.5, noise_form="flow_grpo"), [Redness()], "flow", 1.0),
        "drop_group": lambda: (
            dict(base, reward_failure="drop_group", samples_per_update=4),
            flow, [FailingOnSquares()], "flow", 1.0),
        "async_scoring": lambda: (dict(base, async_scoring=True), flow, [Redness()], "flow", 1.0),
    }
    options, sampler, rewards, paradigm, guidance = cases[name]()
    policy = TinyPolicy(paradigm=paradigm, resolution=8, guidance_scale=guidance)
    module = GRPOModule(policy=policy, sampler=sampler, rewards=rewards, **options)
    return module, ListPrompts(PROMPTS, batch_size=2)


PYTHON_CASES = ["flow_default", "per_reward_best_of_n_kl", "sum_best_of_n_group_warmup", "ddim_cfg_kl",
                "sliding_window_ode_tail", "random_branch_flow_grpo", "drop_group", "async_scoring"]


def run_python_case(name: str) -> list[dict]:
    import warnings

    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0, verbose=False)
    module, data = _tiny_case(name)
    recorder = _recorder()
    trainer = Trainer(max_steps=STEPS * (2 if name == "async_scoring" else 1), accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    return recorder.steps


# ------------------------------------------------------------------------------------ CLI cases
ROOT = Path(__file__).resolve().parents[2]


def _cli_config(name: str, folder: Path) -> list[str]:
    """Arguments of a CLI case: the shipped YAML, trimmed to a short run (and, for the toy FLUX
    demo, without its held-out evaluation and monitor, whose samples do not touch training). The
    demo's YAML is the copy of configs/demo.yaml as it was at 8c37f8c (tests/data/
    grpo_reference_demo.yaml): the demo's tuning moves on (issue 28), the reference must not."""
    if name in DEMO_CASES:
        return _demo_config(name, folder)
    if name == "tiny_cli":
        return ["-c", str(ROOT / "configs" / "tiny.yaml"), f"--trainer.logger.init_args.save_dir={folder}",
                f"--trainer.max_steps={STEPS}"]
    raw = yaml.safe_load((ROOT / "tests" / "data" / "grpo_reference_demo.yaml").read_text())
    raw["trainer"]["callbacks"] = [c for c in raw["trainer"]["callbacks"] if c["class_path"].rsplit(".", 1)[-1]
                                   in ("GRPOCheckpoint", "ODEVisualizer")]
    raw["trainer"]["logger"]["init_args"]["save_dir"] = str(folder)
    raw["trainer"]["max_steps"] = STEPS
    raw["model"].update(group_size=4, micro_batch_size=4, samples_per_update=4)
    raw["data"]["init_args"]["batch_size"] = 2
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return ["-c", str(path)]


# demo case -> its frozen YAML in tests/data (copies of configs/demo_*.yaml, see their headers)
DEMO_CASES = {"demo_sd_cli": "grpo_reference_demo_sd.yaml", "demo_t2v_cli": "grpo_reference_demo_t2v.yaml",
              "demo_i2v_cli": "grpo_reference_demo_i2v.yaml"}
DEMO_STEPS = 2
DEMO_PROMPTS = 4  # held-out prompts (the first of the file) of the evaluation and of the hacking watch


def _demo_config(name: str, folder: Path) -> list[str]:
    """A demo's frozen YAML cut to seconds: `DEMO_STEPS` steps of groups of 4 (best-of-n 1 + 1
    where the demo selects), a held-out evaluation and a hacking watch (every step) of
    `DEMO_PROMPTS` prompts x 2 samples; every callback of the demo kept."""
    raw = yaml.safe_load((ROOT / "tests" / "data" / DEMO_CASES[name]).read_text())
    trainer, model = raw["trainer"], raw["model"]
    for callback in trainer["callbacks"]:
        kind, options = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        if kind in ("HeldOutEvaluation", "RewardHackingMonitor"):
            options.update(max_prompts=DEMO_PROMPTS, samples_per_prompt=2, batch_size=2 * DEMO_PROMPTS)
        if kind == "RewardHackingMonitor":
            options["every_n_steps"] = 1
    trainer["logger"]["init_args"]["save_dir"] = str(folder)
    trainer["max_steps"] = DEMO_STEPS
    model.update(group_size=4, micro_batch_size=4, samples_per_update=4)
    if model.get("best_of_n") is not None:
        model["best_of_n"] = [1, 1]
    raw["data"]["init_args"]["batch_size"] = 2
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return ["-c", str(path)]


def _heldout_record(callbacks) -> dict | None:
    """The held-out figures of a finished run: per HeldOutEvaluation set, "before"/"after" and
    reward, the mean and the per-sample scores' digest; each RewardHackingMonitor observation."""
    from lightning_grpo.callbacks import HeldOutEvaluation, RewardHackingMonitor

    record: dict = {}
    for callback in callbacks:
        if isinstance(callback, HeldOutEvaluation):
            record["heldout"] = {
                f"{when}/{name}/{reward}": {"mean": _hex(scores.float().mean()), "scores": _sha(scores)}
                for when, sets in sorted(callback.split_results.items()) for name, result in sorted(sets.items())
                for reward, scores in sorted(result.scores.items())}
        if isinstance(callback, RewardHackingMonitor):
            record["monitor"] = [{"step": o.step, "values": {k: _sha(v) for k, v in sorted(o.values.items())}}
                                 for o in callback.detector.history]
    return record or None


CLI_CASES = ["tiny_cli", "demo_flux_cli", *DEMO_CASES]


# ------------------------------------------------------------------------------------ two processes
DDP_CASES = {
    # groups of 4 spanning 2 ranks, best-of-n over whole groups, a reward failing on one prompt
    "ddp_spanning_best_of_n_drop": ["--groups-across-ranks", "--best-of-n", "1", "1", "--failing-prompt", "a red photo"],
    # groups on one rank each; rank 1 drops a group, so the ranks agree on the update schedule
    "ddp_drop_group": ["--failing-prompt", "a red photo"],
    # ... in optimizer steps of 4 samples: rank 0 makes 2, rank 1 (4 samples left) 1 and a zero-weight one
    "ddp_drop_group_padding": ["--failing-prompt", "a red photo", "--samples-per-update", "4"],
}
DDP_PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "cat", "dog") for s in ("circle", "square", "sofa", "photo")]


def run_ddp_case(name: str) -> list[dict]:
    """tests/distributed/ddp_run.py on 2 gloo processes (the tiny FLUX stand-in): per step, each
    rank's weights and logged values."""
    import subprocess

    sys.path.insert(0, str(ROOT / "tests" / "policies"))
    from tiny import build_tiny_flux

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        build_tiny_flux(tmp / "flux")
        (tmp / "prompts.txt").write_text("\n".join(DDP_PROMPTS) + "\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(ROOT / "tests" / "distributed" / "ddp_run.py"), "--flux", str(tmp / "flux"), "--out",
                   str(tmp), "--tag", "run", "--devices", "2", "--steps", "2", "--prompts", str(tmp / "prompts.txt"), *DDP_CASES[name]]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        steps = []
        for rank, path in enumerate(sorted(tmp.glob("run_rank_*.pt"))):
            for step in torch.load(path, weights_only=False)["steps"]:
                steps.append({
                    "rank": rank, "global_step": step["optimizer_steps"], "weights": _sha(step["weights"]),
                    "metrics": {k: _hex(v) for k, v in sorted(step["metrics"].items()) if not k.startswith("train/time/")},
                    "advantages": None if step["advantages"] is None else _sha(step["advantages"]),
                })
        return steps


def run_cli_case(name: str) -> list[dict]:
    from lightning_grpo.cli import run

    previous = os.getcwd()
    os.chdir(ROOT)  # the configs name repository-relative paths
    try:
        with tempfile.TemporaryDirectory() as folder:
            recorder = _recorder()
            cli = run(_cli_config(name, Path(folder)), subcommand=False)
            cli.trainer.callbacks.append(recorder)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            heldout = _heldout_record(cli.trainer.callbacks)
            return recorder.steps + ([heldout] if heldout else [])
    finally:
        os.chdir(previous)


def run_case(name: str) -> list[dict]:
    if name in DDP_CASES:
        return run_ddp_case(name)
    return run_cli_case(name) if name in CLI_CASES else run_python_case(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="*", default=PYTHON_CASES + CLI_CASES + list(DDP_CASES))
    parser.add_argument("--update", action="store_true",
                        help="replace only --cases in the existing --out, recording this commit for them in case_commits")
    args = parser.parse_args()
    if not numerics_are_pinned():  # record only in the pinned environment the test compares in
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_NUMERICS})
    global ROOT
    ROOT = Path.cwd()  # the code under test: the working directory's lightning_grpo and configs
    sys.path.insert(0, str(ROOT))
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = json.loads(args.out.read_text()) if args.update else {"commit": commit, "steps": STEPS, "cases": {}}
    result["numerics"] = PINNED_NUMERICS
    result["machine"] = machine_description()
    for name in args.cases:
        print(f"{name} ...", flush=True)
        result["cases"][name] = run_case(name)
        if args.update:
            result.setdefault("case_commits", {})[name] = commit
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
