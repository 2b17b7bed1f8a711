"""Bad input and faults, tried as a new user would (docs/reliability.md lists each with its test):
every run either stops with a message naming the culprit or behaves as if nothing happened."""

from __future__ import annotations

import errno
import functools
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_grpo.checkpointing import AtomicCheckpointIO, CheckpointError, GRPOCheckpoint
from lightning_grpo.cli import run
from lightning_grpo.datamodules import NoTrainingBatchError, PromptDataModule
from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.samplers import FlowSDESampler
from lightning_grpo.validation import ConfigError
from tests.training.fixtures import ListPrompts, Redness

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
DEMO = str(ROOT / "configs" / "demo.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")
TOY_FLUX = ROOT / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "flux"


def tiny_args(tmp_path: Path, max_steps: int, *extra: str, subcommand: str = "fit") -> list[str]:
    return [
        subcommand, "-c", TINY, f"--trainer.max_steps={max_steps}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false", *extra,
    ]


def policy_weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}


# ------------------------------------------------------------------ no hang: data
def test_empty_prompt_file_is_named_before_the_model_loads(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(NoTrainingBatchError, match=rf"no prompt in \['{empty}'\]: the files are empty"):
        run(tiny_args(tmp_path, 3, f"--data.init_args.train_files={empty}"))


def test_fewer_prompts_than_one_batch_is_named(tmp_path):
    with pytest.raises(NoTrainingBatchError, match=r"only 42 training prompts .* batch_size=100 × 1 rank\(s\) × 1 worker\(s\) = 100"):
        run(tiny_args(tmp_path, 3, "--data.init_args.batch_size=100"))


def test_val_fraction_that_leaves_no_training_batch_is_named(tmp_path):
    with pytest.raises(NoTrainingBatchError, match=r"only 1 training prompts .* \(47 held out for validation\)"):
        run(tiny_args(tmp_path, 3, "--data.init_args.val_fraction=0.99"))


def test_an_epoch_without_a_batch_raises_instead_of_looping(tmp_path):
    """The runtime guard (e.g. ranks or workers found only once the trainer runs): the loader
    itself raises at the end of an empty pass rather than letting the Trainer start epochs forever."""
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    datamodule = PromptDataModule(str(tmp_path / "three.txt"), batch_size=2, num_workers=0, world_size=2, rank=0)
    with pytest.raises(NoTrainingBatchError, match=r"batch_size=2 × 2 rank\(s\)"):
        list(datamodule.train_dataloader())


# ------------------------------------------------------------------ no hang: every step skipped
class AlwaysNaN(Redness):
    default_name = "always_nan"

    def score(self, pixels, prompts, images=None):
        return torch.full((pixels.shape[0],), float("nan"), device=pixels.device)


def nan_module(**kwargs) -> GRPOModule:
    options = dict(group_size=4, timestep_fraction=0.5, micro_batch_size=2, samples_per_update=4, clip_range=0.2, show_progress=False)
    return GRPOModule(TinyPolicy(resolution=8), FlowSDESampler(4, eta=0.7), [AlwaysNaN()], reward_failure="drop_group", **{**options, **kwargs})


def test_a_reward_that_is_always_nan_under_drop_group_stops_the_run(tmp_path):
    trainer = Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"3 training steps in a row were skipped .*drop_group"):
            trainer.fit(nan_module(max_skipped_steps=3), datamodule=ListPrompts(["a", "b"] * 50, batch_size=2))
    assert trainer.global_step == 0 and trainer.fit_loop.epoch_loop.batch_progress.total.completed < 3


def test_drop_group_validation_reports_nan_instead_of_dying():
    grpo = nan_module()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(grpo, datamodule=ListPrompts(["a", "b", "c", "d"], batch_size=2))
    assert torch.isnan(trainer.callback_metrics["val/reward/always_nan"])
    assert trainer.callback_metrics["val/reward/always_nan_nonfinite"] == 4  # 2 batches × 2 samples


# ------------------------------------------------------------------ start-up validation
def forbid_building(monkeypatch, cls) -> None:
    """Make building `cls` fail loudly (its signature kept, so the CLI still parses its options)."""
    original = cls.__init__

    @functools.wraps(original)
    def refuse(*args, **kwargs):
        raise AssertionError(f"{cls.__name__} was built: the validation came too late")

    monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.samples_per_update=3", r"8 samples per rollout .* samples_per_update=3"),
        ("--model.policy.init_args.resolution=0", r"resolution must be a positive integer, got 0"),
        ("--model.rewards.init_args.weight=0", r"every reward weight is 0"),
        ("--trainer.accumulate_grad_batches=2", r"accumulate_grad_batches=2 is not supported .*samples_per_update"),
        ("--trainer.gradient_clip_val=1.0", r"gradient_clip_val=1.0 is not supported .*max_grad_norm"),
    ],
)
def test_bad_settings_fail_before_the_model_is_built(tmp_path, monkeypatch, override, message):
    forbid_building(monkeypatch, TinyPolicy)
    with pytest.raises(ConfigError, match=message):
        run(tiny_args(tmp_path, 3, override))


def test_flux_resolution_off_the_vae_grid_fails_before_loading(tmp_path, monkeypatch):
    from lightning_grpo.policies import FluxPolicy

    forbid_building(monkeypatch, FluxPolicy)
    with pytest.raises(ConfigError, match=r"height=36 must be a multiple of 8 \(VAE factor 4 of 'lightning_grpo/worlds/shapes/pretrained/flux' × 2\)"):
        run(["-c", DEMO, "--model.policy.init_args.height=36", f"--trainer.logger.init_args.save_dir={tmp_path}"], subcommand=False)


def test_missing_relative_model_folder_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    from lightning_grpo.policies import FluxPolicy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    forbid_building(monkeypatch, FluxPolicy)
    with pytest.raises(FileNotFoundError, match=r"'models/flux' does not exist \(a local path: the hub is not asked\)"):
        run(["-c", DEMO, "--model.policy.init_args.pretrained_model_name_or_path=models/flux",
             f"--data.init_args.train_files={ROOT / 'configs/prompts/shapes_train.txt'}",
             f"--data.init_args.val_files={ROOT / 'configs/prompts/shapes_heldout.txt'}"], subcommand=False)


def test_seed_everything_other_than_zero_trains(tmp_path):
    cli = run(tiny_args(tmp_path, 2, "--seed_everything=1"))
    assert cli.model.hparams.seed == 1 and cli.trainer.global_step == 2
    assert cli.datamodule.hparams["data_seed"] == 0  # the data order has its own seed, logged under its own name


# ------------------------------------------------------------------ weights and checkpoints
def test_truncated_weights_file_names_the_file_and_component(tmp_path):
    from lightning_grpo.policies import FluxPolicy

    broken = tmp_path / "flux"
    shutil.copytree(TOY_FLUX, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"component 'transformer' .*diffusion_pytorch_model.safetensors.*truncated or corrupt"):
        FluxPolicy(str(broken), height=32, width=32, max_sequence_length=16)


def test_truncated_checkpoint_names_the_file(tmp_path):
    run(tiny_args(tmp_path / "a", 2))
    last = tmp_path / "a" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=rf"checkpoint '{last}' is truncated or corrupt"):
        run(tiny_args(tmp_path / "b", 4, f"--ckpt_path={last}"))


def test_checkpoint_of_another_model_config_names_the_difference(tmp_path):
    run(tiny_args(tmp_path / "a", 2))
    last = tmp_path / "a" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"different model configuration:\n  - policy.resolution: 8 in the checkpoint, 16 in the config"):
        run(tiny_args(tmp_path / "b", 4, f"--ckpt_path={last}", "--model.policy.init_args.resolution=16"))
    with pytest.raises(ValueError, match=r"paradigm: 'flow' in the checkpoint, 'diffusion' in the config"):
        run(tiny_args(tmp_path / "c", 4, f"--ckpt_path={last}", "--model.policy.init_args.paradigm=diffusion",
                      "--model.sampler=lightning_grpo.samplers.DDIMSDESampler", "--model.sampler.init_args.num_steps=4"))


def test_a_crash_while_saving_leaves_no_file_resume_would_accept(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def crash(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target) == {"step": 1}  # the previous checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    def full(obj, file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"disk full while writing checkpoint .*step=4.ckpt.*earlier checkpoints are intact"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "step=4.ckpt")
    assert not list(tmp_path.iterdir())


def test_retention_keeps_the_last_k_plus_the_best(tmp_path):
    """Every 2 optimizer steps for 12 steps (6 saves); keep the last 2 and the best by a metric
    that peaks at step 4: the survivors are steps 4, 10, 12 and last.ckpt."""
    callback = GRPOCheckpoint(keep_last=2, keep_best=1, best_monitor="score", every_n_train_steps=2, dirpath=str(tmp_path), filename="{step}")

    class Fake:
        is_global_zero, global_step, callback_metrics = True, 0, {}

    trainer = Fake()
    removed: list[str] = []
    callback._remove_checkpoint = lambda trainer, path: removed.append(Path(path).name)
    for step, score in zip(range(2, 13, 2), [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]):
        trainer.global_step, trainer.callback_metrics = step, {"score": torch.tensor(score)}
        _retention_step(callback, trainer, str(tmp_path / f"step={step}.ckpt"))
    assert sorted(s["step"] for s in callback.saved) == [4, 10, 12]
    assert removed == ["step=2.ckpt", "step=6.ckpt", "step=8.ckpt"]


def test_the_best_kept_checkpoint_is_named_in_best_txt(tmp_path):
    """After every save, `best.txt` names the best checkpoint kept so far by the monitored metric
    (the same saves as above: the score peaks at step 4 and the step-4 file stays the best)."""
    callback = GRPOCheckpoint(keep_last=2, keep_best=1, best_monitor="score", every_n_train_steps=2, dirpath=str(tmp_path), filename="{step}")

    class Fake:
        is_global_zero, global_step, callback_metrics = True, 0, {}

    trainer = Fake()
    callback._remove_checkpoint = lambda trainer, path: None
    named = []
    for step, score in zip(range(2, 13, 2), [0.1, 0.9, 0.2, 0.3, 0.4, 0.5]):
        trainer.global_step, trainer.callback_metrics = step, {"score": torch.tensor(score)}
        _retention_step(callback, trainer, str(tmp_path / f"step={step}.ckpt"))
        named.append((tmp_path / "best.txt").read_text())
    assert [line.split()[0] for line in named] == ["step=2.ckpt"] + ["step=4.ckpt"] * 5
    assert named[-1] == "step=4.ckpt  score=0.9 (max)  step=4\n"
    assert callback.best()["path"] == str(tmp_path / "step=4.ckpt")


def _retention_step(callback: GRPOCheckpoint, trainer, path: str) -> None:
    """GRPOCheckpoint._save_checkpoint without writing a file (ModelCheckpoint's part is a no-op here)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    original = ModelCheckpoint._save_checkpoint
    ModelCheckpoint._save_checkpoint = lambda self, trainer, filepath: None
    try:
        callback._save_checkpoint(trainer, path)
    finally:
        ModelCheckpoint._save_checkpoint = original


def test_retention_in_a_real_run(tmp_path):
    # tiny.yaml's retention entry is its last callback, which these options modify
    cli = run(tiny_args(tmp_path, 12, "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.keep_last=2"))
    assert [c.keep_last for c in cli.trainer.callbacks if isinstance(c, GRPOCheckpoint)] == [2]
    folder = tmp_path / "tiny" / "version_0" / "checkpoints"
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert "last.ckpt" in names and len(names) <= 4  # last 2 + best (+ last.ckpt), not 6 step files
    assert "epoch=0-step=12.ckpt" in names and "epoch=0-step=10.ckpt" in names
    assert (folder / "best.txt").read_text().split()[0] in names  # the best kept one is named


# ------------------------------------------------------------------ resume: exact, overrides
def test_extending_a_finished_run_with_a_nonzero_seed_equals_an_uninterrupted_run(tmp_path):
    """Run to step 4 (the fit ends), extend it to step 8 from its last.ckpt: the same weights as one
    run to step 8 (seed 3), so the extension continued the data epoch it stopped in."""
    run(tiny_args(tmp_path / "short", 4, "--seed_everything=3"))
    last = tmp_path / "short" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["PromptDataModule"]["epoch"] == 0
    cli = run(tiny_args(tmp_path / "extended", 8, "--seed_everything=3", f"--ckpt_path={last}"))
    assert cli.trainer.global_step == 8
    run(tiny_args(tmp_path / "straight", 8, "--seed_everything=3"))
    extended = policy_weights(tmp_path / "extended" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    straight = policy_weights(tmp_path / "straight" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    assert not torch.equal(extended["policy.conv_out.weight"], policy_weights(last)["policy.conv_out.weight"])
    for name, value in straight.items():
        assert torch.equal(extended[name], value), f"{name} differs after extending the finished run"


def test_extension_with_ema_and_held_out_callbacks_is_exact(tmp_path):
    extra = ["--seed_everything=2", "--trainer.callbacks+=lightning_grpo.callbacks.EMA", "--trainer.callbacks.decay=0.9",
             "--trainer.callbacks+=lightning_grpo.callbacks.HeldOutEvaluation", f"--trainer.callbacks.prompts_file={PROMPTS}",
             "--trainer.callbacks.batch_size=8", "--trainer.callbacks.max_prompts=8"]
    run(tiny_args(tmp_path / "short", 2, *extra))
    last = tmp_path / "short" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    run(tiny_args(tmp_path / "extended", 4, *extra, f"--ckpt_path={last}"))
    run(tiny_args(tmp_path / "straight", 4, *extra))
    ends = [torch.load(tmp_path / name / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False) for name in ("extended", "straight")]
    for name, value in ends[1]["state_dict"].items():
        assert torch.equal(ends[0]["state_dict"][name], value), name
    ema = [next(v for k, v in end["callbacks"].items() if k.startswith("EMA")) for end in ends]
    assert ema[0]["num_updates"] == ema[1]["num_updates"] == 2  # one EMA update per rollout
    for name, value in ema[1]["weights"].items():
        assert torch.equal(ema[0]["weights"][name], value), f"EMA {name}"


def test_learning_rate_given_on_resume_is_applied(tmp_path):
    run(tiny_args(tmp_path / "a", 2))
    last = tmp_path / "a" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    cli = run(tiny_args(tmp_path / "b", 4, f"--ckpt_path={last}", "--model.learning_rate=0.0002"))
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(2e-4)]


def test_resume_that_would_train_nothing_is_refused(tmp_path):
    run(tiny_args(tmp_path / "a", 4))
    last = tmp_path / "a" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"is at optimizer step 4 and trainer.max_steps=4: nothing left to train"):
        run(tiny_args(tmp_path / "b", 4, f"--ckpt_path={last}"))


# ------------------------------------------------------------------ event-file size
def test_histogram_interval_writes_every_nth_rollout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_args(tmp_path, 8, "--trainer.callbacks+=lightning_grpo.callbacks.RewardLogger", "--trainer.callbacks.histogram_every_n_steps=2"))
    events = EventAccumulator(str(tmp_path / "tiny" / "version_0"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("train/advantage")] == [0, 2]  # 4 rollouts, every 2nd
    assert [e.step for e in events.Scalars("train/reward_normalized/jpeg_incompressibility_mean")] == [0, 1, 2, 3]
