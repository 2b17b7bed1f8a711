"""Asynchronous scoring (`GRPOModule(async_scoring=True)`, lightning_grpo/scoring.py): each step
trains on the previous rollout while the current one is scored, and resume is exact."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_grpo.cli import run
from lightning_grpo.module import ASYNC_SCORING_KEY
from lightning_grpo.rewards import RewardError
from lightning_grpo.scoring import AsyncScoring
from lightning_grpo.types import Rollout

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")


def tiny_args(save_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit", "-c", TINY, f"--trainer.max_steps={max_steps}", f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false", f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false",
        "--seed_everything=1", *extra,
    ]


def last_checkpoint(save_dir: Path) -> dict:
    return torch.load(save_dir / "tiny" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def small_rollout(batch: int = 2) -> Rollout:
    return Rollout(
        latents=torch.zeros(batch, 3, 1), log_probs=torch.zeros(batch, 2), condition={}, prompts=[f"p{i}" for i in range(batch)],
        group_index=torch.zeros(batch, dtype=torch.long),
    )


# ------------------------------------------------------------------ the helper
def test_exchange_returns_the_previous_rollout_while_the_new_one_is_scored_on_another_thread():
    release, seen = threading.Event(), []

    def score(trajectories: Rollout, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append((trajectories.prompts[0], threading.current_thread().name))
        if trajectories.prompts[0] == "second":
            assert release.wait(timeout=30), "exchange waited for the rollout it had just submitted"
        return {"r": pixels.sum(dim=(1, 2, 3))}

    scoring = AsyncScoring(score)
    first, second = small_rollout(), small_rollout()
    first.prompts, second.prompts = ["first", "first"], ["second", "second"]
    assert scoring.exchange(first, torch.ones(2, 1, 2, 2)) is None  # nothing scored before the first rollout
    previous = scoring.exchange(second, torch.zeros(2, 1, 2, 2))  # returns while "second" is still being scored
    assert previous.trajectories is first and previous.scores["r"].tolist() == [4.0, 4.0]
    release.set()
    assert scoring.state_dict()["scores"]["r"].tolist() == [0.0, 0.0]  # the pending one, once scored
    assert {name for _, name in seen} != {threading.current_thread().name}
    scoring.close()


def test_an_error_while_scoring_is_raised_by_the_next_exchange():
    def score(trajectories, pixels):
        raise RewardError("reward 'remote': http://127.0.0.1:9: ConnectError")

    scoring = AsyncScoring(score)
    assert scoring.exchange(small_rollout(), torch.zeros(2, 1, 2, 2)) is None
    with pytest.raises(RewardError, match=r"http://127.0.0.1:9"):
        scoring.exchange(small_rollout(), torch.zeros(2, 1, 2, 2))
    scoring.close()


def test_state_dict_round_trip_restores_the_pending_rollout_with_its_scores():
    scoring = AsyncScoring(lambda t, p: {"r": torch.arange(2.0)})
    rollout = small_rollout()
    rollout.sample_keys = torch.tensor([[0, 0], [0, 1]])
    scoring.exchange(rollout, torch.full((2, 1, 2, 2), 0.5))
    state = scoring.state_dict()
    restored = AsyncScoring(lambda t, p: pytest.fail("a restored rollout must not be scored again"))
    restored.load_state_dict(state)
    assert restored.pending
    previous = restored.exchange(small_rollout(), torch.zeros(2, 1, 2, 2))
    assert previous.trajectories.prompts == rollout.prompts and torch.equal(previous.trajectories.sample_keys, rollout.sample_keys)
    assert torch.equal(previous.pixels, torch.full((2, 1, 2, 2), 0.5)) and previous.scores["r"].tolist() == [0.0, 1.0]
    scoring.close()


# ------------------------------------------------------------------ in training
class RecordSteps(Callback):
    """Per training batch: its prompts, the prompts the step trained on, the global step after it,
    and the logged deviation of the first-update ratio from 1."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.trained: list[list[str] | None] = []
        self.steps: list[int] = []
        self.ratio_dev: list[float | None] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(list(batch["prompts"]))
        record = pl_module.last_step
        self.trained.append(None if record is None else list(dict.fromkeys(record.prompts)))
        self.steps.append(trainer.global_step)
        dev = trainer.callback_metrics.get("train/ratio/first_update_max_dev")
        self.ratio_dev.append(None if dev is None or record is None else float(dev))


@pytest.mark.timeout(300)
def test_each_step_trains_on_the_previous_rollout_one_step_stale(tmp_path):
    recorder = RecordSteps()
    cli = run(tiny_args(tmp_path, 4, "--model.async_scoring=true")[1:], subcommand=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # tiny.yaml: 8 samples per rollout, 4 per optimizer step; the first batch only rolls out
    assert recorder.steps == [0, 2, 4]
    assert recorder.trained[0] is None
    for k in range(1, 3):
        assert recorder.trained[k] == recorder.batches[k - 1], f"step {k} did not train on rollout {k - 1}"
    # the first update of step 1 sees the weights that drew rollout 0 (ratio 1); later ones are one update stale
    assert recorder.ratio_dev[1] == pytest.approx(0.0, abs=1e-6)
    assert all(dev > 1e-6 for dev in recorder.ratio_dev[2:])


@pytest.mark.timeout(300)
def test_synchronous_first_update_ratio_is_one_at_every_step(tmp_path):
    """The contrast to the test above: without async scoring the samples are always fresh."""
    recorder = RecordSteps()
    cli = run(tiny_args(tmp_path, 3)[1:], subcommand=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.trained == recorder.batches
    assert all(dev == pytest.approx(0.0, abs=1e-6) for dev in recorder.ratio_dev)


@pytest.mark.timeout(300)
def test_async_resume_is_exact(tmp_path):
    """2 steps, then resumed to 4, equals 4 straight: the pending rollout (with its scores) is in
    the checkpoint, so the resumed run trains on it instead of rolling out anew."""
    run(tiny_args(tmp_path / "short", 2, "--model.async_scoring=true"))
    short = last_checkpoint(tmp_path / "short")
    assert short[ASYNC_SCORING_KEY]["world_size"] == 1
    pending = short[ASYNC_SCORING_KEY]["ranks"][0]
    assert short["global_step"] == 2 and len(pending["trajectories"]["prompts"]) == 8  # 2 prompts × G = 4
    assert pending["scores"]["jpeg_incompressibility"].shape == (8,)
    last = tmp_path / "short" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    run(tiny_args(tmp_path / "resumed", 4, "--model.async_scoring=true", f"--ckpt_path={last}"))
    run(tiny_args(tmp_path / "straight", 4, "--model.async_scoring=true"))
    resumed, straight = last_checkpoint(tmp_path / "resumed"), last_checkpoint(tmp_path / "straight")
    assert resumed["global_step"] == straight["global_step"] == 4
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), f"{name} differs after the async resume"
    assert not torch.equal(straight["state_dict"]["policy.conv_out.weight"], short["state_dict"]["policy.conv_out.weight"])
    pending = [c[ASYNC_SCORING_KEY]["ranks"][0]["trajectories"]["prompts"] for c in (resumed, straight)]
    assert pending[0] == pending[1]



def test_a_checkpoint_of_another_world_size_drops_the_pending_rollout_with_a_warning():
    from lightning_grpo.scoring import checkpoint_entry, rank_state

    entry = checkpoint_entry({"pixels": torch.zeros(1)})  # one process
    assert entry["world_size"] == 1 and rank_state(entry, 0, 1)["pixels"].shape == (1,)
    with pytest.warns(RuntimeWarning, match=r"written by 1 process\(es\), this run has 2: its pending rollouts are dropped"):
        assert rank_state(entry, 1, 2) == {}
    assert rank_state(None, 0, 1) == {}
    two = {"world_size": 2, "ranks": [{"a": 0}, {}]}
    assert rank_state(two, 0, 2) == {"a": 0} and rank_state(two, 1, 2) == {}
