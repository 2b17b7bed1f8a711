"""Time and denoiser calls to a held-out accuracy at equal CPU time: GRPO (full SDE, MixGRPO window, Flow-GRPO-Fast branch) vs DiffusionNFT.

    OMP_NUM_THREADS=1 python bench/time_to_accuracy.py                     # configs/demo.yaml, 240 s per variant
    OMP_NUM_THREADS=1 python bench/time_to_accuracy.py --budget 10 --eval-every 2   # smoke run

Each variant trains the toy FLUX demo exactly as `lightning-grpo fit -c configs/demo.yaml` builds
it (same seeds, same prompts, same noise streams), changing only the rollout's step schedule:

- full SDE:      every step an SDE step, `timestep_fraction` 0.6 of them trained (today's demo);
- mixed window:  MixGRPO's sliding window (`SlidingWindow`), SDE and training on its w steps only;
- mixed window + 2nd-order tail: MixGRPO-Flash, the window plus `MultistepODETail` after it;
- branching:     Flow-GRPO-Fast (`RandomBranch`), ODE to a random step, k SDE steps, ODE after;
- DiffusionNFT:  the objective `DiffusionNFT` (`--model.objective=DiffusionNFT`): ODE rollouts with
                 the old policy, trained on the forward process (β = `--nft-beta`, the demo's
                 timestep_fraction and adv_clip_max; lightning_grpo/objectives/nft.py).

With `--jobs N` the variants run as N parallel processes (one thread each) started by this
command, so all of them train under the same machine load at the same time.

Every `--eval-every` rollouts the training clock stops and the policy is evaluated on held-out
prompts (deterministic ODE samples from fixed seeds, `lightning_grpo.evaluation.evaluate`, shapes
verifier exact match, as `bench/demo_learning.py`); the evaluation time is reported separately.
A variant stops after `--budget` seconds of training on `--clock`: process CPU time by default
(one thread, so it is the compute spent, and it does not depend on what else runs on a shared
machine), or wall time; both are reported. Denoiser calls are counted with a forward pre-hook on
the transformer (rollout + update; evaluation calls excluded).

Beside the accuracy, the artifact measures of `lightning_grpo.artifacts` (periodic energy, stray
background energy, chroma, luminance, clipped highlights, hue shift) of the last evaluation's
samples against the base policy's samples of the same prompts and seeds: how many measures left
the base's warning band (`compare_samples`, z = 3), and which.

Printed: one table (rollouts, calls, time until the held-out exact match first reaches base +
`--target-points`, accuracy at the budget, artifacts), the best GRPO variant's time to target
relative to full SDE, then, last, the key ratio: DiffusionNFT's time to target relative to GRPO's
(full SDE) on the `--clock` clock (a bound against the budget where one did not reach it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
SCHEDULES = "lightning_grpo.samplers"


def variants(window: int, shift_interval: int, branch_steps: int, compression: float, nft_beta: float = 1.0) -> dict[str, list[str]]:
    """CLI overrides of each variant on top of configs/demo.yaml. Each variant states its step
    schedule, timestep fraction and KL weight, so the comparison does not change when the demo's
    own choice does (since issue 28 the demo itself is the branching schedule with KL 0.01; the
    recorded comparisons ran without KL, as here)."""
    no_kl = ["--model.kl_beta=0"]
    mixed = [
        f"--model.step_schedule={SCHEDULES}.SlidingWindow", f"--model.step_schedule.size={window}",
        f"--model.step_schedule.shift_interval={shift_interval}", "--model.step_schedule.stride=1",
        "--model.timestep_fraction=1.0", *no_kl,
    ]
    return {
        "full SDE": ["--model.step_schedule=null", "--model.timestep_fraction=0.6", *no_kl],
        "mixed window": mixed,
        "mixed window + 2nd-order tail": [
            *mixed, f"--model.ode_tail={SCHEDULES}.MultistepODETail", f"--model.ode_tail.compression={compression}",
        ],
        "branching": [
            f"--model.step_schedule={SCHEDULES}.RandomBranch", f"--model.step_schedule.num_sde_steps={branch_steps}",
            "--model.step_schedule.high=null", "--model.timestep_fraction=1.0", *no_kl,
        ],
        NFT: ["--model.objective=DiffusionNFT", f"--model.objective.init_args.beta={nft_beta}", "--model.step_schedule=null",
              "--model.timestep_fraction=0.6", *no_kl],
    }


NFT = "DiffusionNFT"
REFERENCE = "full SDE"
ARTIFACT_MEASURES = ("periodic_energy", "background_energy", "chroma", "luminance", "clipped", "hue_shift")


@dataclass
class Point:
    """One held-out evaluation during training."""

    rollouts: int
    train_seconds: float  # on the chosen clock (see --clock)
    wall_seconds: float
    cpu_seconds: float
    denoiser_calls: int
    denoiser_samples: int
    exact_match: float


@dataclass
class Curve:
    name: str
    overrides: list[str]
    points: list[Point] = field(default_factory=list)
    eval_seconds: float = 0.0
    artifacts: dict[str, float] = field(default_factory=dict)  # measure -> value at the last evaluation
    artifacts_outside: list[str] = field(default_factory=list)  # measures outside the base's band there

    def first_reaching(self, target: float) -> Point | None:
        return next((p for p in self.points if p.exact_match >= target - 1e-9), None)


class DenoiserCounter:
    """Counts forward calls (and the samples in them) of a module through a forward pre-hook."""

    def __init__(self, module) -> None:
        self.calls = self.samples = 0
        self.enabled = False  # on inside training batches only (see Stopwatch)
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        if self.enabled:
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.calls += 1
            self.samples += int(x.shape[0]) if x is not None else 0


def make_stopwatch(curve: Curve, counter: DenoiserCounter, held_out, every: int, budget: float, clock: str):
    """A Lightning callback timing training steps (wall and process CPU time), evaluating every
    `every` rollouts (clocks stopped, calls not counted) and stopping the fit once `budget`
    seconds of training are spent on `clock`."""
    from lightning.pytorch import Callback

    class Stopwatch(Callback):
        def __init__(self) -> None:
            self.wall = self.cpu = 0.0
            self.rollouts = 0
            self._start = (0.0, 0.0)

        @property
        def train_seconds(self) -> float:
            return self.cpu if clock == "cpu" else self.wall

        def on_train_start(self, trainer, pl_module) -> None:
            self._evaluate(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            counter.enabled = True
            self._start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.wall += time.perf_counter() - self._start[0]
            self.cpu += time.process_time() - self._start[1]
            counter.enabled = False
            self.rollouts += 1
            out_of_time = self.train_seconds >= budget
            if self.rollouts % every == 0 or out_of_time:
                self._evaluate(pl_module, last=out_of_time)
            if out_of_time:
                trainer.should_stop = True

        def _evaluate(self, pl_module, last: bool = False) -> None:
            started = time.perf_counter()
            accuracy, pixels = held_out(pl_module)
            if self.rollouts == 0:
                self.base_pixels = pixels
            elif last:
                measure_artifacts(curve, self.base_pixels, pixels)
            curve.eval_seconds += time.perf_counter() - started
            curve.points.append(Point(self.rollouts, round(self.train_seconds, 2), round(self.wall, 2), round(self.cpu, 2),
                                      counter.calls, counter.samples, accuracy))
            print(f"  [{curve.name}] rollouts {self.rollouts:4d}  train {self.wall:7.1f} s wall {self.cpu:7.1f} s cpu  "
                  f"calls {counter.calls:6d}  held-out exact match {100 * accuracy:5.1f}%", flush=True)

    return Stopwatch()


def measure_artifacts(curve: Curve, base: Any, current: Any) -> None:
    """The artifact measures of `current` samples against the `base` policy's (same prompts and
    seeds), into `curve` (`lightning_grpo.artifacts.compare_samples`; no image encoder: no KID)."""
    from lightning_grpo.artifacts import compare_samples

    report = compare_samples(base, current, samples_per_prompt=1)
    curve.artifacts = {name: round(c.value, 6) for name, c in report.items() if name in ARTIFACT_MEASURES}
    curve.artifacts_outside = [name for name, c in report.items() if c.outside]


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, held_out) -> Curve:
    from lightning_grpo.cli import run

    cli = run(["-c", str(args.config), "--trainer.logger=false", "--trainer.max_steps=1000000",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0", *overrides], subcommand=False)
    module, trainer = cli.model, cli.trainer
    curve = Curve(name, overrides)
    counter = DenoiserCounter(module.policy.transformer)
    # only our stopwatch: checkpoints, visualiser, diversity and the config's own held-out
    # evaluation would add the same cost to every variant and blur the comparison
    trainer.callbacks = [make_stopwatch(curve, counter, held_out, args.eval_every, args.budget, args.clock)]
    trainer.fit(module, datamodule=cli.datamodule)
    return curve


def run_in_parallel(names: list[str], argv: list[str], jobs: int) -> list[Curve]:
    """Each variant in its own process (this script with `--only NAME --jobs 1`), `jobs` at a
    time; their curves come back through JSON files, in the order of `names`."""
    import subprocess
    import tempfile

    passed, skip = [], False
    for token in argv:  # drop our own --only/--json/--jobs values
        if skip and not token.startswith("--"):
            continue
        skip = token in ("--only", "--json", "--jobs")
        if not skip:
            passed.append(token)
    with tempfile.TemporaryDirectory() as tmp:
        pending, running, files = list(enumerate(names)), [], {}
        while pending or running:
            while pending and len(running) < jobs:
                index, name = pending.pop(0)
                files[index] = Path(tmp) / f"{index}.json"
                command = [sys.executable, __file__, *passed, "--jobs", "1", "--only", name, "--json", str(files[index])]
                running.append(subprocess.Popen(command))
            oldest = running.pop(0)
            if oldest.wait():
                raise RuntimeError(f"variant process failed ({oldest.returncode}): {' '.join(oldest.args)}")
        curves = []
        for index in range(len(names)):
            data = json.loads(files[index].read_text())["curves"][0]
            curves.append(Curve(data["name"], data["overrides"], [Point(**p) for p in data["points"]], data["eval_seconds"],
                                data.get("artifacts", {}), data.get("artifacts_outside", [])))
    return curves


PROGRESS = re.compile(
    r"\[(?P<name>[^\]]+)\] rollouts\s+(?P<rollouts>\d+)\s+train\s+(?P<wall>[\d.]+) s wall\s+(?P<cpu>[\d.]+) s cpu\s+"
    r"calls\s+(?P<calls>\d+)\s+held-out exact match\s+(?P<acc>[\d.]+)%"
)


def curves_from_log(path: Path, names: list[str], budget: float, clock: str) -> list[Curve]:
    """Curves rebuilt from the progress lines of an interrupted run's log, cut at `budget`
    seconds on `clock` (evaluation time and per-sample counts are not in the log: 0)."""
    found: dict[str, Curve] = {}
    for line in path.read_text().splitlines():
        match = PROGRESS.search(line)
        if match is None:
            continue
        wall, cpu = float(match["wall"]), float(match["cpu"])
        if (cpu if clock == "cpu" else wall) > budget:
            continue
        point = Point(int(match["rollouts"]), cpu if clock == "cpu" else wall, wall, cpu, int(match["calls"]), 0,
                      float(match["acc"]) / 100)
        found.setdefault(match["name"], Curve(match["name"], [])).points.append(point)
    return [found[name] for name in names if name in found]


def table(curves: list[Curve], base: float, target: float, budget: float, clock: str) -> str:
    lines = [
        f"held-out exact match: base {100 * base:.1f}%, target {100 * target:.1f}% (base + {100 * (target - base):.0f} pts); "
        f"budget {budget:.0f} s of training ({clock} clock) per variant",
        "| variant | calls / rollout | rollouts to target | denoiser calls to target | wall time to target | CPU time to target | "
        "rollouts in budget | exact match at budget | best exact match | eval time (excluded) | artifacts outside the base's band at budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        last, hit = c.points[-1], c.first_reaching(target)
        per_rollout = last.denoiser_calls / max(last.rollouts, 1)
        reach = (f"{hit.rollouts} | {hit.denoiser_calls} | {hit.wall_seconds:.1f} s | {hit.cpu_seconds:.1f} s" if hit
                 else "not reached | – | – | –")
        best = max(p.exact_match for p in c.points)
        outside = (", ".join(c.artifacts_outside) or "none") if c.artifacts else "–"
        lines.append(f"| {c.name} | {per_rollout:.1f} | {reach} | {last.rollouts} | {100 * last.exact_match:.1f}% | "
                     f"{100 * best:.1f}% | {c.eval_seconds:.0f} s | {outside} |")
    measured = [c for c in curves if c.artifacts]
    if measured:
        names = list(measured[0].artifacts)
        lines += ["", "artifact measures of the held-out samples at the budget (per-sample means; hue_shift: degrees from the "
                  "base policy's samples)", "| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {c.name} | " + " | ".join(f"{c.artifacts[n]:.4g}" for n in names) + " |" for c in measured]
    return "\n".join(lines)


def key_ratio(curves: list[Curve], target: float, budget: float) -> str:
    """Best GRPO variant's time to target relative to full SDE (full SDE not reaching it: vs the budget, a bound)."""
    reference = curves[0].first_reaching(target)
    reached = [(c.first_reaching(target).train_seconds, c.name) for c in curves[1:] if c.first_reaching(target) and c.name != NFT]
    if not reached:
        return "no faster variant reached the target within the budget"
    seconds, name = min(reached)
    calls = next(c for c in curves if c.name == name).first_reaching(target).denoiser_calls
    if reference is None:
        return f"{name}: target in {seconds:.1f} s; full SDE did not reach it in {budget:.0f} s: time to target <= {seconds / budget:.2f}x full SDE"
    return (f"{name}: denoiser calls to target {calls / reference.denoiser_calls:.2f}x full SDE; time to target "
            f"{seconds:.1f} s vs {reference.train_seconds:.1f} s = {seconds / reference.train_seconds:.2f}x full SDE "
            f"({100 * (1 - seconds / reference.train_seconds):.0f}% less)")


def nft_ratio(curves: list[Curve], target: float, budget: float, clock: str) -> str:
    """DiffusionNFT's time to target relative to GRPO's (full SDE) on the budget's clock; where one
    of them did not reach the target within the budget, a bound against the budget."""
    by_name = {c.name: c for c in curves}
    if NFT not in by_name or REFERENCE not in by_name:
        return f"DiffusionNFT vs GRPO: needs both the {NFT!r} and the {REFERENCE!r} variants"
    nft, grpo = by_name[NFT].first_reaching(target), by_name[REFERENCE].first_reaching(target)
    if nft is None and grpo is None:
        return (f"DiffusionNFT vs GRPO (full SDE): neither reached the target in {budget:.0f} s {clock}; exact match at budget "
                f"{100 * by_name[NFT].points[-1].exact_match:.1f}% vs {100 * by_name[REFERENCE].points[-1].exact_match:.1f}%")
    if grpo is None:
        return (f"DiffusionNFT vs GRPO (full SDE): NFT reached the target in {nft.train_seconds:.1f} s {clock}, GRPO not in "
                f"{budget:.0f} s: time to target <= {nft.train_seconds / budget:.2f}x GRPO")
    if nft is None:
        return (f"DiffusionNFT vs GRPO (full SDE): GRPO reached the target in {grpo.train_seconds:.1f} s {clock}, NFT not in "
                f"{budget:.0f} s: time to target >= {budget / grpo.train_seconds:.2f}x GRPO")
    return (f"DiffusionNFT vs GRPO (full SDE): time to target {nft.train_seconds:.1f} s vs {grpo.train_seconds:.1f} s {clock} = "
            f"{nft.train_seconds / grpo.train_seconds:.2f}x GRPO; denoiser calls {nft.denoiser_calls / grpo.denoiser_calls:.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the demo config (default configs/demo.yaml)")
    parser.add_argument("--budget", type=float, default=240.0, help="training wall seconds per variant")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="clock of the budget and the key ratio: process CPU time (default; robust on a shared "
                             "machine, one thread) or wall time; both are reported")
    parser.add_argument("--eval-every", type=int, default=10, help="rollouts between held-out evaluations")
    parser.add_argument("--templates", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="prompt templates of the held-out set (16 scenes each; default 4 → 64 samples)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the evaluation noise")
    parser.add_argument("--target-points", type=float, default=20.0, help="target = base accuracy + this many points")
    parser.add_argument("--window", type=int, default=2, help="MixGRPO window size w")
    parser.add_argument("--shift-interval", type=int, default=25, help="MixGRPO shift interval τ (rollouts)")
    parser.add_argument("--branch-steps", type=int, default=2, help="Flow-GRPO-Fast SDE steps k")
    parser.add_argument("--compression", type=float, default=0.4, help="MixGRPO-Flash tail compression")
    parser.add_argument("--nft-beta", type=float, default=1.0, help="DiffusionNFT's beta (official default 1.0)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, as parallel processes")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (names as in the table)")
    parser.add_argument("--json", type=Path, default=None, help="also write every curve to this JSON file")
    parser.add_argument("--from-log", type=Path, default=None,
                        help="no training: rebuild the table from an interrupted run's log, cut at --budget")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    os.chdir(ROOT)  # the config names repository-relative paths
    from lightning_grpo.evaluation import evaluate
    from lightning_grpo.worlds.shapes.prompts import heldout_prompts
    from lightning_grpo.worlds.shapes.verifier import ShapesVerifier

    prompts = heldout_prompts(templates=args.templates)
    metric = [ShapesVerifier(mode="exact", name="exact_match")]

    def held_out(module) -> tuple[float, Any]:
        result = evaluate(module.policy, module.sampler, prompts, metric, seed=args.seed, batch_size=len(prompts), show_progress=False,
                          keep_pixels=True)
        return float(result.scores["exact_match"].mean()), result.pixels

    chosen = variants(args.window, args.shift_interval, args.branch_steps, args.compression, args.nft_beta)
    if args.only:
        chosen = {name: chosen[name] for name in args.only}
    if args.from_log is not None:
        curves = curves_from_log(args.from_log, list(chosen), args.budget, args.clock)
    elif args.jobs > 1 and len(chosen) > 1:
        curves = run_in_parallel(list(chosen), argv if argv is not None else sys.argv[1:], args.jobs)
    else:
        curves = []
        for name, overrides in chosen.items():
            print(f"== {name}: {' '.join(overrides) or '(configs/demo.yaml as is)'}", flush=True)
            curves.append(run_variant(name, overrides, args, held_out))
    base = curves[0].points[0].exact_match
    if any(c.points[0].exact_match != base for c in curves):
        print("warning: the variants' step-0 accuracies differ; the base is the first variant's", file=sys.stderr)
    target = base + args.target_points / 100
    print(f"\n{len(prompts)} held-out samples; command: python bench/time_to_accuracy.py {' '.join(sys.argv[1:])}")
    print(table(curves, base, target, args.budget, args.clock))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "base": base, "target": target,
                                         "curves": [asdict(c) for c in curves]}, indent=2) + "\n")
    print(key_ratio(curves, target, args.budget) if math.isfinite(target) else "no target")
    print(nft_ratio(curves, target, args.budget, args.clock) if math.isfinite(target) else "no target")


if __name__ == "__main__":
    main()
