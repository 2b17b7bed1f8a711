"""Training against a reward server, through the real CLI (issue 32, acceptance 1 and 2):

- configs/tiny.yaml trained through `RemoteReward` against `lightning-grpo serve-reward` on
  127.0.0.1 ends with the same weights as with the local reward;
- a server killed mid-run: `RewardError` naming the URL after the configured retries; a server
  back on the same port lets the resume finish, with the uninterrupted run's weights;
- under `reward_failure=drop_group` an unreachable server drops the groups (warning naming the
  URL) until `max_skipped_steps` stops the run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_grpo.cli import run
from lightning_grpo.rewards import RemoteReward, RewardError
from tests.serving.conftest import free_port, remote_overlay

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")


def fit_args(save_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """The fit options without the subcommand (`run(["fit", *args])`, or `run(args, subcommand=False)`)."""
    return [
        "-c", TINY, *extra, f"--trainer.max_steps={max_steps}", f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false", f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false",
        "--trainer.callbacks.every_n_train_steps=1",
    ]


def last_weights(save_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(save_dir / "tiny" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor] | None = None) -> None:
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name} differs"
    if start is not None:  # the runs trained at all
        assert any(not torch.equal(a[k], start[k]) for k in a)


class KillServer(Callback):
    """Kills the reward server (its process group) after optimizer step `step`."""

    def __init__(self, server, step: int) -> None:
        self.server, self.step, self.done = server, step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.done and trainer.global_step >= self.step:
            self.done = True
            self.server.kill()


@pytest.mark.timeout(900)
def test_tiny_trained_through_the_server_equals_the_local_reward_and_survives_a_server_restart(tmp_path, start_server):
    """Acceptance 1 and 2 on one server (starting one costs ~10-30 s on this machine)."""
    server = start_server()
    overlay = remote_overlay(tmp_path, server.url, retries=2, backoff=0.05, timeout=30)
    # acceptance 1: same weights, local vs remote, after 4 optimizer steps
    local = run(["fit", *fit_args(tmp_path / "local", 4)])
    remote = run(["fit", *fit_args(tmp_path / "remote", 4, "-c", str(overlay))])
    reward = remote.model.rewards.rewards[0]
    assert isinstance(reward, RemoteReward) and reward.urls == [server.url]
    assert reward.served_name == "jpeg_incompressibility" and reward.served_version.startswith("0.1.0+")
    assert remote.trainer.global_step == local.trainer.global_step == 4
    start = {k: v for k, v in run(fit_args(tmp_path / "init", 1), subcommand=False).model.state_dict().items() if k.startswith("policy.")}
    assert_same_weights(last_weights(tmp_path / "remote"), last_weights(tmp_path / "local"), {f"{k}": v for k, v in start.items()})

    # acceptance 2: the server dies after step 2: the next reward call fails after 1 + 2 tries, naming the URL
    killer = KillServer(server, step=2)
    args = fit_args(tmp_path / "killed", 4, "-c", str(overlay))  # subcommand=False: fit below, with the killer
    with pytest.raises(RewardError) as failure:
        cli = run(args, subcommand=False)
        cli.trainer.callbacks.append(killer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(failure.value)
    assert killer.done and server.url in message and "failed after 3 attempt(s)" in message and "ConnectError" in message
    last = tmp_path / "killed" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    # back on the same port: the resume finishes with the uninterrupted run's weights
    start_server(port=server.port)
    resumed = run(["fit", *fit_args(tmp_path / "resumed", 4, "-c", str(overlay), f"--ckpt_path={last}")])
    assert resumed.trainer.global_step == 4
    assert_same_weights(last_weights(tmp_path / "resumed"), last_weights(tmp_path / "local"))


@pytest.mark.timeout(300)
def test_unreachable_server_under_drop_group_drops_groups_until_the_run_stops(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    overlay = remote_overlay(tmp_path, url, retries=1, backoff=0.01, timeout=5)
    args = ["fit", *fit_args(tmp_path, 4, "-c", str(overlay), "--model.reward_failure=drop_group", "--model.max_skipped_steps=2")]
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match=r"2 training steps in a row were skipped"):
        warnings.simplefilter("always")
        run(args)
    messages = [str(w.message) for w in caught]
    assert any(url in m and "failed after 2 attempt(s)" in m and "NaN" in m for m in messages), messages[:5]
    assert any("dropping 2 of 2 groups" in m for m in messages), messages[:5]
