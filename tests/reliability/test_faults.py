"""Faults a user meets, each stopped with a message naming the culprit (issue 29; docs/reliability.md
lists every case with its test). Through the real command (`python -m lightning_grpo` in a
subprocess) where the user would see the output, else through `lightning_grpo.cli.run`."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_grpo.cli import run
from lightning_grpo.datamodules.prompts import NoTrainingBatchError
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.validation import ConfigError
from tests.reliability.test_reliability import PROMPTS, ROOT, TOY_FLUX, forbid_building, tiny_args

# Exceptions are matched by their message and a base class that the code before these checks had
# too (ValueError, OSError, RuntimeError), so each test fails there on the behaviour, not on an
# import; the new classes are checked where they matter (printed alone by the command).

HERE = Path(__file__).resolve().parent
DEMO_T2V = str(ROOT / "configs" / "demo_t2v.yaml")


# ------------------------------------------------------------------ running the command
def environment() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_grpo", *args]


def lightning_grpo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `lightning-grpo args...`; stdout and stderr together in `.stdout`."""
    return subprocess.run(command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(), timeout=timeout)


def tiny(save_dir: Path, max_steps: int, *extra: str, subcommand: str = "fit") -> list[str]:
    return tiny_args(save_dir, max_steps, *extra, subcommand=subcommand)


def run_folder(save_dir: Path, version: int = 0) -> Path:
    return save_dir / "tiny" / f"version_{version}"


def assert_input_error(result: subprocess.CompletedProcess, pattern: str, status: int = 2) -> None:
    """Exit `status`, the message matching `pattern`, and no traceback (the message alone)."""
    assert result.returncode == status, result.stdout[-3000:]
    assert re.search(pattern, result.stdout), result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]


# ------------------------------------------------------------------ checkpoint integrity
def largest_record_data(path: Path) -> tuple[int, int]:
    """(offset, length) of the data of the largest storage record of a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length, info.file_size


@pytest.mark.parametrize("where", ["tensor data", "middle of the file"])
def test_a_checkpoint_with_overwritten_bytes_is_refused_by_fit_and_test(tmp_path, where):
    """200 bytes overwritten (was: `Restored all states`, then training and `test` on garbage)."""
    run(tiny(tmp_path / "a", 2))
    last = run_folder(tmp_path / "a") / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    offset, length = largest_record_data(last) if where == "tensor data" else (len(data) // 2, 200)
    start = offset + max(0, length // 2 - 100)
    data[start : start + 200] = bytes(255 - b for b in data[start : start + 200])  # every byte changed
    last.write_bytes(bytes(data))
    for subcommand in ("fit", "test"):
        result = lightning_grpo(*tiny(tmp_path / subcommand, 4, f"--ckpt_path={last}", subcommand=subcommand))
        assert_input_error(result, rf"checkpoint '{re.escape(str(last))}' is (corrupt|truncated)")
        assert "Restored all states" not in result.stdout
    if where == "tensor data":  # the record is named by the tensor it holds
        assert re.search(r"the tensor \['state_dict'\]\['policy\.[\w.]+'\]", result.stdout), result.stdout[-2000:]


def test_a_folder_checkpoint_is_verified_file_by_file(tmp_path):
    """A sharded checkpoint (a folder): zip files by their own CRCs, other files against the
    `checksums.json` written after the save; a flipped byte or a missing file names the file."""
    from lightning_grpo.checkpointing import CheckpointError, record_checksums, verify_checkpoint

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"step": 3}, folder / "meta.pt")
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    record_checksums(folder)
    verify_checkpoint(folder)  # intact
    shard = bytearray((folder / "__0_0.distcp").read_bytes())
    shard[5000] ^= 0xFF
    (folder / "__0_0.distcp").write_bytes(bytes(shard))
    with pytest.raises(CheckpointError, match=r"last\.ckpt' is corrupt: '__0_0\.distcp' does not match the checksum"):
        verify_checkpoint(folder)
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete: '__0_0\.distcp' listed in checksums\.json is missing"):
        verify_checkpoint(folder)


# ------------------------------------------------------------------ non-finite values
def test_a_diverging_run_stops_within_two_steps_and_no_checkpoint_holds_nan(tmp_path):
    """`--model.learning_rate=1e30` (was: NaN loss from step 0, NaN weights in every checkpoint, exit 0)."""
    result = lightning_grpo(*tiny(tmp_path, 8, "--model.learning_rate=1e30", "--trainer.callbacks.every_n_train_steps=1"))
    assert_input_error(result, r"training diverged at optimizer step [12]: the gradient norm is nan", status=1)
    checkpoints = list((run_folder(tmp_path) / "checkpoints").glob("*.ckpt")) if (run_folder(tmp_path) / "checkpoints").exists() else []
    for path in checkpoints:  # with a checkpoint every step, at most step 1's (finite) was written
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["global_step"] <= 1
        for name, value in state["state_dict"].items():
            assert torch.isfinite(value).all(), f"{path.name}: {name}"


def test_nonfinite_skip_drops_the_step_and_stops_after_max_skipped_steps(tmp_path):
    """`nonfinite="skip"`: the NaN steps make no update; when every step is NaN the run stops."""
    with pytest.warns(RuntimeWarning, match=r"the gradient norm is nan.*skipping this optimizer step"):
        with pytest.raises(RuntimeError, match=r"2 training steps in a row were skipped because every optimizer step had a NaN/inf gradient norm"):
            run(tiny(tmp_path, 20, "--model.learning_rate=1e30", "--model.nonfinite=skip", "--model.max_skipped_steps=2"))


def corrupt_weights(source: Path, target: Path, value: float) -> None:
    """A copy of a checkpoint with the policy's first convolution set to `value` (a valid file)."""
    state = torch.load(source, map_location="cpu", weights_only=False)
    state["state_dict"]["policy.conv_in.weight"].fill_(value)
    torch.save(state, target)


def test_test_refuses_nan_weights_and_reports_non_finite_outputs_as_an_error(tmp_path):
    """Was: `test` reported a reward (0.631) for a NaN model, because NaN pixels became black images."""
    run(tiny(tmp_path / "a", 2))
    last = run_folder(tmp_path / "a") / "checkpoints" / "last.ckpt"
    corrupt_weights(last, tmp_path / "nan.ckpt", float("nan"))
    corrupt_weights(last, tmp_path / "huge.ckpt", 3e38)
    result = lightning_grpo(*tiny(tmp_path / "b", 2, f"--ckpt_path={tmp_path / 'nan.ckpt'}", subcommand="test"))
    assert_input_error(result, r"nan\.ckpt' cannot be resumed from: \['state_dict'\]\['policy\.conv_in\.weight'\] holds NaN/inf", status=1)
    result = lightning_grpo(*tiny(tmp_path / "c", 2, f"--ckpt_path={tmp_path / 'huge.ckpt'}", subcommand="test"))
    assert_input_error(result, r"the model's outputs are not finite \(NaN/inf pixels\)", status=1)
    assert not (run_folder(tmp_path / "c") / "test" / "results.csv").exists()


# ------------------------------------------------------------------ resume: last, run folder, lock, max_steps
def test_ckpt_path_last_resumes_the_newest_run_into_its_folder_and_max_steps_rounds_up(tmp_path):
    """Was: `last` started again from step 0 in a new version folder; max_steps=3 ran 4 steps
    silently and then refused to be extended to 4."""
    first = lightning_grpo(*tiny(tmp_path, 3, "--ckpt_path=last"))
    assert first.returncode == 0, first.stdout[-3000:]
    assert "no last.ckpt in any version folder" in first.stdout
    assert "trainer.max_steps=3 ends inside a rollout: each rollout makes 2 optimizer steps" in first.stdout
    assert torch.load(run_folder(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    second = lightning_grpo(*tiny(tmp_path, 5, "--ckpt_path=last"))
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"resuming from {run_folder(tmp_path) / 'checkpoints' / 'last.ckpt'}" in second.stdout
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["version_0"]  # appended, no version_1
    assert torch.load(run_folder(tmp_path) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert len(list(run_folder(tmp_path).glob("events.out.tfevents.*"))) == 2  # both runs' curves in one folder


def test_a_second_live_run_in_the_same_run_folder_is_refused(tmp_path):
    """Was: two runs with the same version mixed their config, checkpoints and event files."""
    marker = tmp_path / "paused"
    first = subprocess.Popen(
        command(*tiny(tmp_path, 8, "--trainer.callbacks+=stop_helpers.PauseAtStep", f"--trainer.callbacks.marker={marker}",
                      "--trainer.callbacks.step=2")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(),
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never reached its pause"
            time.sleep(0.1)
        second = lightning_grpo(*tiny(tmp_path, 4, "--trainer.logger.init_args.version=0"))
        assert_input_error(second, rf"the run folder '{re.escape(str(run_folder(tmp_path)))}' is in use by another run that is still alive \(pid {first.pid} ")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)


def test_the_lock_dies_with_its_process(tmp_path):
    """A killed run's lock is released by the kernel: its requeued run is not refused."""
    from lightning_grpo.checkpointing import RunLockedError, acquire_run_lock

    holder = subprocess.Popen([sys.executable, "-c", f"from lightning_grpo.checkpointing import acquire_run_lock; "
                               f"from pathlib import Path; import time; acquire_run_lock(Path({str(tmp_path)!r})); "
                               f"print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True, env=environment())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match="in use by another run"):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    os.close(acquire_run_lock(tmp_path))


def test_a_save_killed_half_way_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    """SIGKILL while a checkpoint is written (was: a hidden `.…ckpt.….tmp` left for ever)."""
    killed = lightning_grpo(*tiny(tmp_path, 8, "--trainer.callbacks.every_n_train_steps=2",
                                  "--trainer.callbacks+=stop_helpers.KillDuringSave", "--trainer.callbacks.at=3"))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    folder = run_folder(tmp_path) / "checkpoints"
    temporaries = [p.name for p in folder.glob(".*.tmp")]
    assert temporaries and temporaries[0].startswith(".epoch=0-step=4.ckpt."), sorted(p.name for p in folder.iterdir())
    resumed = lightning_grpo(*tiny(tmp_path, 6, "--ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Removed 1 temporary file(s) of a save interrupted by a kill" in resumed.stdout
    assert not list(folder.glob(".*.tmp"))


# ------------------------------------------------------------------ signals
def wait_for(path: Path, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, "the run ended before the marker"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_evaluation_before_training_stops_it_at_its_next_batch(tmp_path, signum):
    """Ctrl+C or SIGTERM during the held-out evaluation at the start of a fit (was: the whole
    evaluation, then one training step, ran before stopping: 23 s on the toy). The evaluation is
    40 batches of 1 s (a slow reward); after the signal at most the batch in progress finishes.
    (`test` and `validate` stopped between batches already: Lightning's evaluation loop does.)"""
    marker = tmp_path / "evaluating"
    extra = ["--trainer.callbacks+=lightning_grpo.callbacks.HeldOutEvaluation", f"--trainer.callbacks.prompts_file={PROMPTS}",
             "--trainer.callbacks.batch_size=1", "--trainer.callbacks.max_prompts=40", "--trainer.callbacks.grid=false",
             "--trainer.callbacks.extra_rewards+=stop_helpers.SlowReward", f"--trainer.callbacks.extra_rewards.marker={marker}"]
    process = subprocess.Popen(command(*tiny(tmp_path, 4, *extra)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=environment())
    try:
        wait_for(marker, process)
        sent = time.monotonic()
        process.send_signal(signum)
        evaluated = len(marker.read_text().splitlines())
        output, _ = process.communicate(timeout=120)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, output[-3000:]
    assert len(marker.read_text().splitlines()) <= evaluated + 1, "batches were evaluated after the signal"
    assert elapsed < 20, f"{elapsed:.1f} s to stop (the uninterrupted evaluation takes about 40 s)"
    folder = run_folder(tmp_path)
    assert not list(folder.rglob("results.csv")), "partial results were written"
    assert not list(folder.rglob("*.ckpt")), "a training step ran after the signal"


def test_a_hung_run_stops_at_the_second_sigterm(tmp_path):
    """A step blocked in C (a collective that never returns): the first SIGTERM cannot end it, the
    second stops the process within seconds, printing where it hung (was: only SIGKILL worked)."""
    marker = tmp_path / "hung"
    process = subprocess.Popen(
        command(*tiny(tmp_path, 8, "--trainer.callbacks+=stop_helpers.HangInStep", f"--trainer.callbacks.marker={marker}",
                      "--trainer.callbacks.step=2")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
    )
    try:
        wait_for(marker, process)
        process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=2)  # graceful: waits for the step, which never ends
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert elapsed < 15, f"{elapsed:.1f} s after the second SIGTERM"
    assert "did not stop within 5 s of the second signal" in output and "on_train_batch_start" in output  # the stack


# ------------------------------------------------------------------ options checked before the model loads
@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.adv_clip_max=0", r"model\.adv_clip_max must be > 0, got 0.0 \(advantages are clamped"),
        ("--model.adv_clip_max=-1", r"model\.adv_clip_max must be > 0, got -1.0"),
        ("--model.learning_rate=-0.001", r"model\.learning_rate must be >= 0, got -0.001 \(a negative rate climbs the loss\)"),
        ("--model.max_grad_norm=0", r"model\.max_grad_norm must be > 0, got 0.0 \(null disables clipping"),
        ("--model.kl_beta=-0.1", r"model\.kl_beta must be >= 0, got -0.1"),
        ("--model.decode_batch_size=0", r"model\.decode_batch_size must be >= 1, got 0"),
        ("--model.rollout_batch_size=0", r"model\.rollout_batch_size must be >= 1, got 0"),
        ("--model.sampler.init_args.num_steps=0", r"model\.sampler\.num_steps must be >= 1, got 0"),
        ("--model.sampler.init_args.eta=0", r"model\.sampler\.eta must be > 0, got 0.0 \(the training sampler needs noise"),
        ("--trainer.callbacks.keep_last=0", r"GRPOCheckpoint: keep_last must be >= 1"),
    ],
)
def test_numeric_options_out_of_range_fail_before_the_model_is_built(tmp_path, monkeypatch, override, message):
    """Was: adv_clip_max 0 or -1 trained on zero or flipped advantages, exit 0; a negative learning
    rate failed in torch after loading; max_grad_norm 0 and a negative kl_beta were accepted."""
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(ConfigError, match=message):
        run(tiny(tmp_path, 3, override))


@pytest.mark.parametrize(
    "allowed, value, problem",
    [
        (dict(low=0, low_open=True), 0, "must be > 0"),  # open end: the bound itself is refused
        (dict(low=0, low_open=True), 1e-12, None),
        (dict(low=0), 0, None),  # closed end: the bound itself is accepted
        (dict(low=0), -1e-12, "must be >= 0"),
        (dict(low=0, high=1, high_open=True), 1, "must be < 1 and >= 0"),
        (dict(low=1, integer=True), 2.5, "must be an integer"),
        (dict(low=1, integer=True), True, "must be an integer"),  # a bool is not a count
        (dict(low=0), float("inf"), "must be finite"),
        (dict(low=0), None, "must be set"),
        (dict(low=0, optional=True), None, None),
    ],
)
def test_range_bounds(allowed, value, problem):
    from lightning_grpo.validation import Range

    assert Range(**allowed).problem(value) == problem


def test_a_configuration_error_prints_the_message_alone_with_status_2(tmp_path):
    result = lightning_grpo(*tiny(tmp_path, 3, "--model.adv_clip_max=-1"))
    assert_input_error(result, r"error: model\.adv_clip_max must be > 0, got -1.0", status=2)
    assert re.search(r"(?m)^error: model\.adv_clip_max", result.stdout)


def test_optimizer_options_are_refused_before_anything_loads(tmp_path):
    """Was: `--optimizer=SGD` parsed, then `'NoneType' object has no attribute 'step'` after the
    model loaded and the held-out evaluation ran."""
    result = lightning_grpo(*tiny(tmp_path, 3, "--optimizer=SGD"))
    assert_input_error(result, r"--optimizer is not an option: GRPOModule trains with its own AdamW; set it with --model\.learning_rate")
    result = lightning_grpo(*tiny(tmp_path, 3, "--lr_scheduler=StepLR"))
    assert_input_error(result, r"--lr_scheduler is not an option")
    assert not (tmp_path / "tiny").exists()


def test_a_zero_learning_rate_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"model\.learning_rate=0: the weights never change, this run learns nothing"):
        run(tiny(tmp_path, 2, "--model.learning_rate=0"), subcommand=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.policy.init_args.num_frames=10", r"num_frames=10 must be 4k \+ 1 \(the VAE of '.*hunyuan_video' compresses time 4×, keeping the first frame\), e\.g\. 9 or 13"),
        ("--model.policy.init_args.height=36", r"height=36 must be a multiple of 8 \(VAE factor 4 of '.*hunyuan_video' × 2\): the patch_size of transformer/config\.json"),
    ],
)
def test_video_frames_and_size_are_checked_against_the_model_folder_before_loading(tmp_path, monkeypatch, override, message):
    """Was: found only once the pipeline had loaded (minutes on a real model)."""
    from lightning_grpo.policies import HunyuanVideoPolicy

    forbid_building(monkeypatch, HunyuanVideoPolicy)
    with pytest.raises(ConfigError, match=message):
        run(["-c", DEMO_T2V, override, f"--trainer.logger.init_args.save_dir={tmp_path}"], subcommand=False)


def test_a_log_folder_that_cannot_be_written_fails_before_the_model_loads(tmp_path, monkeypatch):
    """Was: found after the model loaded. /proc takes no new files, even for root."""
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(ConfigError, match=r"the log folder '/proc/lightning-grpo-runs' cannot be written"):
        run(tiny(Path("/proc/lightning-grpo-runs"), 3))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot be created: '.*a-file' is not a folder"):
        run(tiny(tmp_path / "a-file" / "runs", 3))


# ------------------------------------------------------------------ runs that cannot learn
def test_a_reward_constant_within_every_group_warns(tmp_path):
    """Was: all advantages 0 at every step, no warning."""
    with pytest.warns(RuntimeWarning, match=r"the reward was constant within every group for 5 training steps in a row .* nothing is learned"):
        run(tiny(tmp_path, 10, "--model.rewards=[tests.reliability.stop_helpers.ConstantReward]"))  # 5 rollouts: the default constant_reward_steps


# ------------------------------------------------------------------ data: the reason, or no prompt at all
@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_without_held_out_prompts_are_refused(tmp_path, monkeypatch, subcommand):
    """Was: exit 0 having evaluated nothing."""
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(ValueError, match=rf"`{subcommand}` evaluates the held-out prompts and there are none: set data\.init_args\.val_files"):
        run(tiny(tmp_path, 3, "--data.init_args.val_fraction=0", subcommand=subcommand))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"`{subcommand}` has no held-out prompt to evaluate \(val_files '{empty}'\): the files are empty"):
        run(tiny(tmp_path, 3, "--data.init_args.val_fraction=0", f"--data.init_args.val_files={empty}", subcommand=subcommand))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b'{"text": "a cat"}\n{"text": "a dog"}\n', r"every record is malformed: .*bad\.jsonl:1: missing prompt key \('prompt' or 'caption'\)"),
        (b'{"prompt": 3}\n', r"bad\.jsonl:1: prompt 'prompt' is int, expected a string"),
        (b'{"prompt": "caf\xe9"}\n', r"bad\.jsonl:1: not valid UTF-8"),
    ],
)
def test_a_file_without_one_good_record_names_the_reason(tmp_path, monkeypatch, content, reason):
    """Was: "the files are empty or every record is malformed", without the reason."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(NoTrainingBatchError, match=reason):
        run(tiny(tmp_path, 3, f"--data.init_args.train_files={bad}"))


def test_every_first_frame_missing_is_named_before_the_model_loads(tmp_path, monkeypatch):
    """Image-to-video data whose images are all missing (was: every step skipped, then "fix the reward")."""
    records = tmp_path / "i2v.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"prompt {i}", "image": f"missing_{i}.png"}) + "\n" for i in range(8)))
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(NoTrainingBatchError, match=r"not one image of the first 2 training records can be read .*i2v\.jsonl:1: cannot read image 'missing_0\.png'"):
        run(tiny(tmp_path, 3, "--data=lightning_grpo.datamodules.ImagePromptDataModule", f"--data.init_args.train_files={records}",
                 "--data.init_args.image_size=8", "--data.init_args.val_fraction=0"))


def test_truncated_compressed_and_parquet_files_are_named(tmp_path, monkeypatch):
    """Was: "Compressed file ended before the end-of-stream marker was reached" / pyarrow's
    "Parquet magic bytes not found", without the file. A gzip file is read as a stream: its end is
    met when training reaches it (the start-up check reads only one step's prompts); a Parquet
    footer is read at start-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightning_grpo.datamodules import PromptDataModule

    compressed = tmp_path / "prompts.txt.gz"
    compressed.write_bytes(gzip.compress(("".join(f"prompt {i}\n" for i in range(2000))).encode())[:300])
    datamodule = PromptDataModule(str(compressed), batch_size=2, shuffle=False)
    datamodule.check_training_prompts(world_size=1)  # its first lines are intact
    with pytest.raises(OSError, match=rf"'{compressed}' is truncated or corrupt \(a compressed file that ends early\?\)"):
        list(datamodule.train_dataloader())
    forbid_building(monkeypatch, TinyPolicy)
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(100)]}), table)
    table.write_bytes(table.read_bytes()[:-40])
    with pytest.raises(OSError, match=rf"'{table}' is not a readable Parquet file"):
        run(tiny(tmp_path, 3, f"--data.init_args.train_files={table}"))


# ------------------------------------------------------------------ model folders
@pytest.mark.parametrize(
    "edit, message",
    [
        (('"attention_head_dim": 32', '"attention_head_dim": 16'),
         r"component 'transformer' of '.*': transformer/config\.json does not match its weights: first differing shape context_embedder\.bias: \[32\] by transformer/config\.json, \[64\] in the weights"),
        (('"num_layers": 2', '"num_layers": 3'),
         r"component 'transformer' of '.*': transformer/config\.json describes 32 parameters its weights do not hold, e\.g\. \['transformer_blocks\.2\."),
    ],
)
def test_a_config_that_does_not_match_its_weights_names_the_component_and_shape(tmp_path, edit, message):
    """Was: "Cannot copy out of meta tensor; no data!" (twice) for a layer count, or a guess that
    the file was truncated for a shape."""
    import shutil

    from lightning_grpo.policies import FluxPolicy

    folder = tmp_path / "flux"
    shutil.copytree(TOY_FLUX, folder)
    config = folder / "transformer" / "config.json"
    config.write_text(config.read_text().replace(*edit))
    with pytest.raises(OSError, match=message) as error:
        FluxPolicy(str(folder), height=32, width=32, max_sequence_length=16)
    from lightning_grpo.errors import InputError

    assert isinstance(error.value, InputError)  # the command prints it alone
