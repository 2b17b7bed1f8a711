"""DDP on two gloo processes through the real `lightning-grpo` command, as a user runs it: the
shipped demo configs with their callbacks, the CLI's default callbacks and the TensorBoard logger
on (issue 27). Only sizes are cut (fewer prompts, smaller groups, a few steps) in a copy of the
config; one probe callback is added (`rank_probe.RankWeights`: each rank's trained weights, which
a checkpoint cannot show as Lightning writes rank zero's only).

Each run is a subprocess in its own session, killed with every rank after `RUN_TIMEOUT` seconds,
so a hung collective fails the test instead of hanging CI. Each test asserts exit code 0, that
both ranks hold the same weights, and that the run folder holds every file exactly once (one
version folder per run, one TensorBoard event file, no rank-1 copies, nothing outside it).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from test_ddp import assert_same_training

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RUN_TIMEOUT = 420  # seconds per CLI run (a test-size 3-step FLUX demo fit took 60-70 s on 2 cores at load average 10)
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp"]


# ---------------------------------------------------------------------------- running the CLI
@dataclass
class Run:
    returncode: int
    output: str

    def check(self, what: str) -> None:
        assert self.returncode == 0, f"{what} exited with {self.returncode}:\n{self.output[-4000:]}"


def lightning_grpo(args: list[str], cwd: Path, log: Path, timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None) -> Run:
    """`lightning-grpo <args>` in a new session (Lightning's DDP launcher starts rank 1 as a child
    of rank 0, so the session holds both); every process of it is killed on timeout or exit.
    `env`: variables added to the environment."""
    script = Path(sys.executable).with_name("lightning-grpo")
    command = [str(script), *args] if script.exists() else [sys.executable, "-m", "lightning_grpo", *args]
    paths = [str(HERE), os.environ.get("PYTHONPATH", "")]  # rank_probe; the package comes from the install
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p), **(env or {})}
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # a rank left behind, or the whole hung run
            except ProcessLookupError:
                pass
            process.wait()
    output = log.read_text(errors="replace")
    if returncode is None:
        pytest.fail(f"lightning-grpo {' '.join(args[:3])} ... did not finish in {timeout} s (a hung collective?):\n{output[-4000:]}")
    return Run(returncode, output)


# ---------------------------------------------------------------------------- configs
def absolute_paths(node: Any) -> Any:
    """The config with its repository-relative paths made absolute, so runs can start in an empty
    folder and anything written outside the run folder shows up there."""
    if isinstance(node, dict):
        return {k: absolute_paths(v) for k, v in node.items()}
    if isinstance(node, list):
        return [absolute_paths(v) for v in node]
    if isinstance(node, str) and node.startswith(("configs/", "lightning_grpo/")):
        return str(ROOT / node)
    return node


def callback_args(config: dict, name: str) -> dict:
    """init_args of the config's callback whose class_path ends in `name`."""
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]
    return entry.setdefault("init_args", {})


@dataclass
class Demo:
    """A shipped demo config, cut to CPU-test size; its options for one process on the union."""

    config: str  # file under configs/
    max_steps: int
    checkpoint_every: int  # optimizer steps; the resume test starts from this checkpoint
    model: dict  # model options changed for 2 ranks
    single: list[str]  # CLI options of one process that sees both ranks' prompts
    batch_size: int = 2
    heldout_prompts: int = 4
    samples_per_prompt: int = 2


FLUX = Demo(
    "demo.yaml", max_steps=3, checkpoint_every=2,
    model={"group_size": 4, "micro_batch_size": 8, "samples_per_update": 8, "decode_batch_size": 8},
    # one process, the union of both ranks' prompts: the stream gives rank r the r-th slice of
    # each block of 2 x batch_size prompts, so batch_size 4 reads them in the same order, and
    # the ranks' 2 x 8 samples make one optimizer step of 16
    single=["--data.init_args.batch_size=4", "--model.samples_per_update=16", "--model.micro_batch_size=16"],
)
T2V = Demo(
    "demo_t2v.yaml", max_steps=2, checkpoint_every=1,
    model={"group_size": 4, "best_of_n": [1, 1], "micro_batch_size": 4, "samples_per_update": 4, "decode_batch_size": 8},
    single=["--data.init_args.batch_size=4", "--model.samples_per_update=8", "--model.micro_batch_size=8"],
)


def write_config(demo: Demo, folder: Path, probe: Path) -> Path:
    """A copy of the demo config, cut to test size, writing its runs under `folder/runs`, with the
    rank probe writing into `probe`."""
    config = absolute_paths(yaml.safe_load((ROOT / "configs" / demo.config).read_text()))
    config["trainer"]["max_steps"] = demo.max_steps
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(folder / "runs")
    callback_args(config, "GRPOCheckpoint")["every_n_train_steps"] = demo.checkpoint_every
    callback_args(config, "ODEVisualizer").update(num_prompts=2, seeds=[0])
    callback_args(config, "HeldOutEvaluation").update(max_prompts=demo.heldout_prompts, samples_per_prompt=demo.samples_per_prompt, batch_size=8)
    if any(c["class_path"].endswith("RewardHackingMonitor") for c in config["trainer"]["callbacks"]):
        callback_args(config, "RewardHackingMonitor").update(max_prompts=demo.heldout_prompts, samples_per_prompt=2, batch_size=8)
    config["trainer"]["callbacks"].append({"class_path": "rank_probe.RankWeights", "init_args": {"out": str(probe)}})
    config["model"].update(demo.model)
    config["data"]["init_args"]["batch_size"] = demo.batch_size
    path = folder / f"{Path(demo.config).stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------------------- reading runs
def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def probes(folder: Path, stage: str) -> list[dict]:
    """Both ranks' probe records of `stage`, rank order."""
    found = sorted(folder.glob(f"{stage}_rank*.pt"))
    assert [p.name for p in found] == [f"{stage}_rank0.pt", f"{stage}_rank1.pt"], found
    return [torch.load(p, weights_only=False) for p in found]


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[name].flatten().float() for name in sorted(weights)])


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}


def assert_ranks_equal(records: list[dict], step: int | None) -> torch.Tensor:
    """Both ranks at optimizer step `step` (None: not checked; `test` does not restore it) with
    bit-identical trainable weights; returns them flat."""
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    if step is not None:
        assert [r["global_step"] for r in records] == [step, step]
    first, second = (flat(r["weights"]) for r in records)
    assert torch.equal(first, second), f"the ranks' weights differ by up to {(first - second).abs().max():.3g}"
    return first


# ---------------------------------------------------------------------------- the DDP runs
@dataclass
class FitRun:
    """A 2-process `fit` of a demo: its config, working folder, run folder and probe folder."""

    demo: Demo
    config: Path
    cwd: Path
    runs: Path  # the logger's <save_dir>/<name>
    probe: Path
    output: str

    def version(self, n: int) -> Path:
        return self.runs / f"version_{n}"


def ddp_fit(demo: Demo, tmp: Path) -> FitRun:
    probe = tmp / "probe"
    config = write_config(demo, tmp, probe)
    name = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]["name"]
    run = lightning_grpo(["fit", "-c", str(config), *DDP], cwd=tmp / "cwd", log=tmp / "fit.log")
    run.check("2-process fit")
    return FitRun(demo, config, tmp / "cwd", tmp / "runs" / name, probe, run.output)


@pytest.fixture(scope="module")
def flux_fit(tmp_path_factory) -> FitRun:
    return ddp_fit(FLUX, tmp_path_factory.mktemp("ddp_cli_flux"))


@pytest.fixture(scope="module")
def t2v_fit(tmp_path_factory) -> FitRun:
    return ddp_fit(T2V, tmp_path_factory.mktemp("ddp_cli_t2v"))


def expected_fit_files(demo: Demo, video: bool) -> set[str]:
    """The files one fit of `demo` writes into its version folder (one process or N)."""
    steps = demo.max_steps
    checkpoints = {f"checkpoints/epoch=0-step={s}.ckpt" for s in range(demo.checkpoint_every, steps + 1, demo.checkpoint_every)}
    checkpoints |= {f"checkpoints/epoch=0-step={steps}.ckpt", "checkpoints/last.ckpt", "checkpoints/best.txt", ".lock"}
    media = {f"visualization/ode_samples_step{s:06d}.png" for s in (0, steps)} | {"rollouts/step000000.png"}
    if video:
        media |= {name.replace(".png", ".gif") for name in media}
    heldout = {f"heldout_{when}/{f}" for when in ("before", "after") for f in ("results.csv", "results.md", "grid.png")}
    if video:
        heldout |= {f"heldout_{when}/grid.gif" for when in ("before", "after")}
    heldout.add("heldout_before_after.md")
    monitor = set() if video else {"reward_hacking.csv"}
    return {"config.yaml", "hparams.yaml"} | checkpoints | media | heldout | monitor


def assert_fit_folder(fit: FitRun, version: int, expected: set[str]) -> None:
    folder = fit.version(version)
    written = files_under(folder)
    events = {f for f in written if f.startswith("events.out.tfevents.")}
    assert len(events) == 1, f"one TensorBoard event file per run, found {sorted(events)}"
    assert written - events == expected, f"missing {sorted(expected - written)}, unexpected {sorted(written - events - expected)}"


@pytest.mark.timeout(4 * RUN_TIMEOUT + 60)  # the fixture's fit (when first), fit, resume, test
@pytest.mark.parametrize("demo", ["flux", pytest.param("t2v", marks=pytest.mark.slow)])
def test_ddp_fit_resume_and_test(demo, request, tmp_path):
    """fit (2 ranks, 3 steps), resume from the step-2 checkpoint, and test the result, all on 2
    processes with the default callbacks: ranks agree bit for bit, the resumed run ends on the
    uninterrupted run's weights, and each run folder holds its files once."""
    fit: FitRun = request.getfixturevalue(f"{demo}_fit")
    spec, video = fit.demo, demo == "t2v"
    steps = spec.max_steps
    # -- fit
    assert sorted(p.name for p in fit.runs.iterdir()) == ["version_0"]
    assert_fit_folder(fit, 0, expected_fit_files(spec, video))
    records = probes(fit.probe, "fit")
    trained = assert_ranks_equal(records, steps)
    # issue 27 item 2: DDP broadcasts no buffer in the forward and no frozen weight at wrap time,
    # but still every trainable one (equal starting weights) and all-reduces their gradients
    for record in records:
        sync = record["ddp"]
        assert sync["buffers"] == 0
        assert sync["frozen"] > 0 and sync["frozen_synced"] == 0
        assert sync["trainable_synced"] == len(record["weights"])
    last = fit.version(0) / "checkpoints" / "last.ckpt"
    assert torch.equal(flat(checkpoint_weights(last)), trained)  # rank zero's checkpoint holds what both ranks trained
    initial = flat(checkpoint_weights(fit.version(0) / "checkpoints" / f"epoch=0-step={spec.checkpoint_every}.ckpt"))
    assert not torch.equal(initial, trained)  # the steps after the checkpoint moved the weights
    heldout = csv_rows(fit.version(0) / "heldout_after" / "results.csv")
    assert len(heldout) == spec.heldout_prompts * spec.samples_per_prompt  # written once, not once per rank
    if not video:
        assert [int(row["step"]) for row in csv_rows(fit.version(0) / "reward_hacking.csv")] == [0, steps]
    # the evaluations' samples are shared out: each rank generated half of the held-out ones (before
    # and after) and of the monitor's (at steps 0 and the last); every rank generated them all before
    evaluations = 2 + (0 if video else 2)
    assert [r["evaluated"] for r in records] == [evaluations * spec.heldout_prompts * spec.samples_per_prompt // 2] * 2
    assert list(fit.cwd.iterdir()) == []  # nothing written outside the run folder
    # -- resume from the earlier checkpoint: the same last steps, on 2 processes again
    resumed_probe = tmp_path / "probe_resume"
    early = fit.version(0) / "checkpoints" / f"epoch=0-step={spec.checkpoint_every}.ckpt"
    run = lightning_grpo(["fit", "-c", str(fit.config), *DDP, f"--ckpt_path={early}",
                          f"--trainer.callbacks.out={resumed_probe}"], cwd=fit.cwd, log=tmp_path / "resume.log")
    run.check("2-process resume")
    resumed = assert_ranks_equal(probes(resumed_probe, "fit"), steps)
    assert torch.equal(resumed, trained), f"resume differs from the uninterrupted run by up to {(resumed - trained).abs().max():.3g}"
    # a resumed fit writes on into its checkpoint's run folder (issue 29): no second version folder,
    # a second event file beside the first, the same checkpoint names
    assert sorted(p.name for p in fit.runs.iterdir()) == ["version_0"]
    resumed_files = files_under(fit.version(0))
    assert {"config.yaml", "checkpoints/last.ckpt", f"checkpoints/epoch=0-step={steps}.ckpt"} <= resumed_files
    assert len([f for f in resumed_files if f.startswith("events.out.tfevents.")]) == 2
    # -- test the trained checkpoint on 2 processes: 2 batches of 2 prompts per rank
    test_probe = tmp_path / "probe_test"
    run = lightning_grpo(["test", "-c", str(fit.config), *DDP, f"--ckpt_path={last}", "--trainer.limit_test_batches=2",
                          f"--trainer.callbacks.out={test_probe}"], cwd=fit.cwd, log=tmp_path / "test.log")
    run.check("2-process test")
    assert torch.equal(assert_ranks_equal(probes(test_probe, "test"), None), trained)  # both ranks test the checkpoint
    assert sorted(p.name for p in fit.runs.iterdir()) == ["version_0", "version_1"]
    tested = fit.version(1)
    written = files_under(tested)
    events = {f for f in written if f.startswith("events.out.tfevents.")}
    assert len(events) == 1
    grid = {"test/grid.png"} | ({"test/grid.gif"} if video else set())
    assert written - events == {"config.yaml", "hparams.yaml", "test/results.csv", "test/results.md"} | grid
    rows = csv_rows(tested / "test" / "results.csv")
    heldout_file = yaml.safe_load(fit.config.read_text())["data"]["init_args"]["val_files"]
    first = [line.strip() for line in Path(heldout_file).read_text().splitlines() if line.strip()][: 2 * 2 * spec.batch_size]
    assert [row["prompt"] for row in rows] == first  # every rank's samples, each once, in the split's order
    assert list(fit.cwd.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)  # the fixture's fit (when first), the 1-process fit
@pytest.mark.parametrize("demo", ["flux", "t2v"])
def test_ddp_fit_equals_one_process_on_the_union(demo, request, tmp_path):
    """The 2-process fit against one process reading both ranks' prompts in order (same noise:
    it is keyed by each sample's global group and member), up to summation-order rounding."""
    fit: FitRun = request.getfixturevalue(f"{demo}_fit")
    probe = tmp_path / "probe_single"
    run = lightning_grpo(["fit", "-c", str(fit.config), "--trainer.devices=1", *fit.demo.single,
                          f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.callbacks.out={probe}"],
                         cwd=tmp_path / "cwd", log=tmp_path / "single.log")
    run.check("1-process fit")
    (single,) = [torch.load(p, weights_only=False) for p in sorted(probe.glob("fit_rank*.pt"))]
    assert single["global_step"] == fit.demo.max_steps
    ddp = assert_ranks_equal(probes(fit.probe, "fit"), fit.demo.max_steps)
    assert_same_training(ddp, flat(single["weights"]))
    # the evaluations of the base weights (held-out "before", the monitor's first), which the two
    # ranks shared out, score what one process scores: the same samples (per-sample seeds)
    one = tmp_path / "runs" / fit.runs.name / "version_0"
    assert_same_rows(csv_rows(fit.version(0) / "heldout_before" / "results.csv"), csv_rows(one / "heldout_before" / "results.csv"))
    if demo == "flux":
        assert_same_rows(csv_rows(fit.version(0) / "reward_hacking.csv")[:1], csv_rows(one / "reward_hacking.csv")[:1])


def assert_same_rows(rows: list[dict[str, str]], expected: list[dict[str, str]], tolerance: float = 1e-4) -> None:
    """The same CSV rows: text columns equal, numbers within `tolerance` (relative; written with 6
    significant digits, and batches of another size round differently in the last bits)."""
    assert len(rows) == len(expected) and rows and all(row.keys() == want.keys() for row, want in zip(rows, expected))
    for row, want in zip(rows, expected):
        for key, value in row.items():
            try:
                number, wanted = float(value), float(want[key])
            except ValueError:
                assert value == want[key], (key, row, want)
                continue
            assert number == pytest.approx(wanted, rel=tolerance, abs=1e-6), (key, row, want)


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT + 60)  # the fixture's fit (when first), test on 2 processes and on 1
def test_ddp_test_of_a_split_smaller_than_one_block_equals_one_process(flux_fit, tmp_path):
    """`test` on 2 processes of a held-out split of 3 prompts, fewer than one block of the stream
    (2 ranks × batch 2 = 4): the block is padded with a repeat of the first prompt, so rank 1 tests
    prompts 2 and 0. Each sample's noise is keyed by its prompt's position in the split, the repeat
    is dropped when the ranks' results are gathered: 3 rows, those of one process (before: 4 rows,
    prompt 0 twice with other noise, and rank-keyed noise for the rest)."""
    last = flux_fit.version(0) / "checkpoints" / "last.ckpt"
    heldout = Path(yaml.safe_load(flux_fit.config.read_text())["data"]["init_args"]["val_files"])
    prompts = [line.strip() for line in heldout.read_text().splitlines() if line.strip()][:3]
    small = tmp_path / "three.txt"
    small.write_text("\n".join(prompts) + "\n")
    results = {}
    for label, devices in (("two", DDP), ("one", ["--trainer.devices=1"])):
        runs = tmp_path / label
        run = lightning_grpo(["test", "-c", str(flux_fit.config), *devices, f"--ckpt_path={last}", f"--data.init_args.val_files={small}",
                              f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.callbacks.out={tmp_path / label / 'probe'}"],
                             cwd=tmp_path / f"cwd_{label}", log=tmp_path / f"test_{label}.log")
        run.check(f"test on {label} process(es)")
        (version,) = (runs / "demo").iterdir()
        results[label] = csv_rows(version / "test" / "results.csv")
        assert re.search(r"test/reward/shapes_graded_n\s*│\s*3\.0\s*│", run.output), run.output[-3000:]  # the logged count
    assert [row["prompt"] for row in results["two"]] == prompts  # each once, in the split's order
    assert_same_rows(results["two"], results["one"])


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)  # the fixture's fit (when first), validate
def test_ddp_validate(flux_fit, tmp_path):
    """`validate` of a checkpoint on 2 processes with the default callbacks: exits 0, logs the
    rank-averaged validation reward, and writes its run folder once."""
    last = flux_fit.version(0) / "checkpoints" / "last.ckpt"
    runs = tmp_path / "runs"
    run = lightning_grpo(["validate", "-c", str(flux_fit.config), *DDP, f"--ckpt_path={last}", "--trainer.limit_val_batches=2",
                          f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.callbacks.out={tmp_path / 'probe'}"],
                         cwd=tmp_path / "cwd", log=tmp_path / "validate.log")
    run.check("2-process validate")
    assert "val/reward/shapes_graded" in run.output
    (version,) = (runs / "demo").iterdir()
    written = files_under(version)
    assert len([f for f in written if f.startswith("events.out.tfevents.")]) == 1
    assert {f for f in written if not f.startswith("events.")} == {"config.yaml", "hparams.yaml"}
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT + 60)  # the fixture's fit (when first), export on rank 1 and 0
def test_export_launched_on_two_ranks_writes_once(flux_fit, tmp_path):
    """`export` under a 2-process launcher (torchrun / srun set RANK): rank zero exports, rank 1
    writes nothing and exits 0; the exported pipeline holds the trained weights."""
    last = flux_fit.version(0) / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    args = ["export", "--config", str(flux_fit.version(0) / "config.yaml"), "--ckpt_path", str(last), "--out", str(out)]
    run = lightning_grpo(args, cwd=tmp_path / "cwd1", log=tmp_path / "export1.log", env={"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    run.check("export on rank 1")
    assert not out.exists(), "rank 1 wrote the export too"
    run = lightning_grpo(args, cwd=tmp_path / "cwd0", log=tmp_path / "export0.log", env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    run.check("export on rank 0")
    from diffusers import FluxTransformer2DModel

    exported = FluxTransformer2DModel.from_pretrained(out / "transformer")
    weights = {k.removeprefix("transformer."): v for k, v in checkpoint_weights(last).items() if k.startswith("transformer.")}
    state = exported.state_dict()
    assert weights and all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in weights.items())


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_ddp_rank_that_drops_every_group_keeps_the_callbacks_in_step(tmp_path):
    """`reward_failure="drop_group"` on 2 processes with the default callbacks (configs/tiny.yaml):
    at step 0 rank 1's reward is NaN on all its samples (`rank_probe.NaNOnRank`), so it drops
    every group while rank 0 trains. Rank 1 then holds an empty step record, so DiversityMonitor
    synchronises its metrics on both ranks; before, rank 1 had none and rank 0 waited for it."""
    config = absolute_paths(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    config["trainer"]["max_steps"] = 4  # 2 rollouts of 2 optimizer steps
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"].append({"class_path": "rank_probe.RankWeights", "init_args": {"out": str(tmp_path / "probe")}})
    config["model"]["rewards"] = [{"class_path": "rank_probe.NaNOnRank", "init_args": {"rank": 1, "calls": 1}}]
    config["model"]["reward_failure"] = "drop_group"
    path = tmp_path / "tiny_drop.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run = lightning_grpo(["fit", "-c", str(path), *DDP], cwd=tmp_path / "cwd", log=tmp_path / "fit.log")
    run.check("2-process fit with a rank dropping every group")
    assert "dropping 2 of 2 groups at step 0, skipping this update" in run.output  # rank 1, at its first rollout
    assert_ranks_equal(probes(tmp_path / "probe", "fit"), 4)
    (version,) = (tmp_path / "runs" / "tiny").iterdir()
    (events,) = version.glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events)).Reload()
    scalars = logged.Scalars("train/diversity/pixel_within_group")
    assert [s.step for s in scalars] == [0, 1]  # logged at both rollouts, the one rank 1 sat out included
    assert list((tmp_path / "cwd").iterdir()) == []
    # `reward` (progress bar, GRPOCheckpoint's best) is the mean over both ranks' trained samples,
    # weighted by their numbers (rank 1 trained none at step 0); it was rank zero's own mean
    ranks = probes(tmp_path / "probe", "fit")
    assert ranks[1]["scores"][0]["brightness"].numel() == 0 and ranks[0]["scores"][0]["brightness"].numel() == 8
    overall = [float(torch.cat([r["scores"][k]["brightness"] for r in ranks]).mean()) for k in (0, 1)]
    assert abs(float(ranks[0]["scores"][1]["brightness"].mean()) - overall[1]) > 1e-4  # rank zero's mean is not the run's
    assert [s.step for s in logged.Scalars("reward")] == [0, 1]
    assert [s.value for s in logged.Scalars("reward")] == [pytest.approx(v, rel=1e-5) for v in overall]
    best = (version / "checkpoints" / "best.txt").read_text().split()
    assert best[0] == "epoch=0-step=4.ckpt" and best[1] == f"reward={overall[1]:.6g}"  # ranked by the run's reward
