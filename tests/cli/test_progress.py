"""Progress that is useful in a terminal and in a log file (`lightning_grpo.progress`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_grpo.cli import run
from lightning_grpo.progress import GRPOProgressBar, format_duration, progress_line

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")


def tiny(tmp_path: Path, max_steps: int, *extra: str) -> list[str]:
    return ["fit", "-c", CONFIG, f"--trainer.max_steps={max_steps}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false", *extra]


def test_progress_line_hand_worked():
    # 50 of 500 steps; 171 s so far (2:51) -> 171 / 50 s per step x 450 steps left = 1539 s (25:39)
    line = progress_line(50, 500, 3.4149, 171.0, 171.0 / 50 * 450, {"reward": 0.6123})
    assert line == "step 50/500 (10%) | reward 0.612 | 3.41 s/step | elapsed 2:51 | ETA 25:39"
    assert progress_line(7, -1, None, 3725.0, None, {}) == "step 7 | elapsed 1:02:05"
    assert format_duration(59.6) == "1:00" and format_duration(3600) == "1:00:00"
    with pytest.raises(ValueError, match="log_every_n_steps must be >= 1, got 0"):
        GRPOProgressBar(log_every_n_steps=0)


def test_a_log_file_gets_a_line_every_ten_steps_with_reward_time_and_eta(tmp_path, capsys):
    """Output not a terminal (captured here, as a redirect to a file): no bars, one line per 10
    optimizer steps and at the end (tiny.yaml makes 2 steps per rollout), then a summary."""
    run(tiny(tmp_path, 20))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    pattern = r"step (\d+)/20 \((\d+)%\) \| reward -?\d+\.\d{3} \| \d+\.\d{2} s/step \| elapsed \d+:\d\d \| ETA \d+:\d\d"
    assert [re.fullmatch(pattern, line).group(1, 2) for line in lines] == [("10", "50"), ("20", "100")], out
    assert re.search(r"^fit done: 20 optimizer steps in \d+:\d\d$", out, re.M), out
    assert "\r" not in out and "Epoch" not in out and "v_num" not in out


def test_a_terminal_gets_one_bar_over_the_run_in_optimizer_steps(tmp_path, capsys):
    """One bar for the whole run, counted in optimizer steps towards max_steps (not "Epoch 12/-2"
    restarting every pass over the prompts), with the reward and the data epoch, without v_num."""
    cli = run(tiny(tmp_path, 12, "--trainer.callbacks+=lightning_grpo.progress.GRPOProgressBar", "--trainer.callbacks.terminal=true"))
    bars = [c for c in cli.trainer.callbacks if isinstance(c, GRPOProgressBar)]
    assert len(bars) == 1 and bars[0].terminal is True  # the configured one replaced the default
    bar = bars[0].train_progress_bar
    assert (bar.n, bar.total, bar.desc) == (12, 12, "fit")
    assert re.fullmatch(r"reward=-?[\d.]+, epoch=\d+", bar.postfix), bar.postfix
    out = capsys.readouterr().out
    assert "fit: 100%" in out and "12/12" in out and re.search(r"\dstep/s|\ds/step", out)
    assert "Epoch" not in out and "v_num" not in out and not re.search(r"^step \d", out, re.M)
