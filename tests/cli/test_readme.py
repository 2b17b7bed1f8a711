"""The README tells the truth about its main command: it runs quietly (no warning of this
project's own making, none of the third-party noise the CLI filters), and the figure the README
gives for it is the one recorded in docs/results.md beside that exact command and the bench run
with the command's own evaluation settings.

The full-length figure itself takes the 500-step run (minutes to tens of minutes on a CPU): it is
measured by the commands docs/results.md records, not here; `test_bench_with_the_commands_settings_
prints_what_the_command_prints` (slow) checks at a few steps that the bench and the command measure
the same thing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "docs" / "results.md").read_text()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

OWN_CODE = ("lightning_grpo", "callbacks", "datamodules", "bench", "tools")
CAUSED_BY_US = ("LightningCLI's args parameter is intended",)  # raised by Lightning because of how cli.py called it
NOISE = ("LeafSpec", "💡 Tip", "Token indices sequence length", "Loading weights", "<|endoftext|>", "Received SIGTERM")
FIGURE = re.compile(r"new\s+combinations\s+(\d+\.\d)%\s+→\s+(\d+\.\d)%\s+\(([+−-]\d+\.\d)\s+points\)")


def main_command() -> list[str]:
    """The README's main command (the set-up's `lightning-grpo fit -c configs/demo.yaml`), as arguments."""
    match = re.search(r"(?:\.venv/bin/)?lightning-grpo (fit -c configs/demo\.yaml)(?=[\s`]|$)", README)
    assert match, "the README's set-up no longer runs `lightning-grpo fit -c configs/demo.yaml`"
    return match.group(1).split()


def demo_settings() -> dict:
    """configs/demo.yaml's max_steps and its HeldOutEvaluation settings (what the command prints)."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    heldout = next(c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("HeldOutEvaluation"))
    return {"max_steps": config["trainer"]["max_steps"], "samples_per_prompt": heldout["samples_per_prompt"],
            "seed": heldout["seed"], "batch_size": heldout["batch_size"], "prompts_file": heldout["prompts_file"]}


def bench_command() -> str:
    s = demo_settings()
    return f"bench/demo_learning.py --samples-per-prompt {s['samples_per_prompt']} --seed {s['seed']} --batch-size {s['batch_size']}"


def warning_lines(output: str) -> list[str]:
    """Lines that are Python warnings ("path:line: message", Lightning's format and Python's) raised
    in this repository's code, or that Lightning raises because of how this code called it."""
    def ours(line: str) -> bool:
        match = re.match(r"^(\S+\.py):\d+: ", line)
        if match:
            path = Path(match.group(1)).resolve()
            if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in OWN_CODE:
                return True
        return any(message in line for message in CAUSED_BY_US)

    return [line for line in output.splitlines() if ours(line)]


@pytest.mark.timeout(1200)
def test_the_main_command_runs_without_warnings_of_our_making(tmp_path):
    """The README's main command at 2 optimizer steps with its own callbacks (held-out evaluation
    before and after, reward-hacking monitor, visualiser, checkpoints), output to a file."""
    command = [sys.executable, "-m", "lightning_grpo", *main_command(), "--trainer.max_steps=2",
               f"--trainer.logger.init_args.save_dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1100)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not warning_lines(output), "warnings of this project's making:\n" + "\n".join(warning_lines(output))
    noise = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not noise, "third-party noise the CLI filters:\n" + "\n".join(line[:300] for line in noise)
    assert max(len(line) for line in output.splitlines()) < 400  # no 3 KB line
    assert re.search(r"^step 2/2 \(100%\) \| reward \d\.\d{3} \| ", result.stdout, re.M), result.stdout[-2000:]
    assert "exact_match | 16.2% [11.3%, 22.7%] (n=160)" in result.stdout  # the held-out table's "before" (fixed seeds)


def test_readme_figure_is_the_recorded_run_of_the_main_command():
    """README: the main command's figure, with the machine and threads, linked to its run in
    docs/results.md; docs/results.md: that run's section holds the exact command, the config's
    length, the same figure, and the bench command with the command's own evaluation settings."""
    section = RESULTS.split("### The README's main command", 1)
    assert len(section) == 2, "docs/results.md has no section '### The README's main command'"
    section = section[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    readme_figures = FIGURE.findall(README)
    recorded = FIGURE.findall(section)
    assert readme_figures and recorded and readme_figures[0] == recorded[0], (readme_figures, recorded)
    assert "docs/results.md#the-readmes-main-command" in README
    command = " ".join(main_command())
    assert f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/lightning-grpo {command}" in section
    assert f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python {bench_command()}" in section
    settings = demo_settings()
    assert f"{settings['max_steps']} optimizer steps" in section
    before, after, change = recorded[0]
    assert float(change.replace("−", "-")) == pytest.approx(float(after) - float(before), abs=0.11)  # figures rounded to 0.1


def test_the_config_table_lists_every_shipped_config():
    table = {m for m in re.findall(r"^\| `(configs/[\w.]+\.yaml)` \|", README, re.M)}
    shipped = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert table == shipped, f"missing from the README's table: {sorted(shipped - table)}; not shipped: {sorted(table - shipped)}"


def test_readme_commands_run_as_written_after_the_set_up():
    """The set-up never activates the venv, so every command of the README's shell blocks names
    the venv's executable (`.venv/bin/...`): a bare `lightning-grpo` or `tensorboard` is not on the
    PATH after it."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert blocks
    bare = [line for block in blocks for line in block.splitlines()
            if re.search(r"(?<![/\w-])(lightning-grpo|tensorboard|pytest|pip) ", line.split("#")[0])]
    assert not bare, "commands that are not on the PATH after the set-up:\n" + "\n".join(bare)


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_bench_with_the_commands_settings_prints_what_the_command_prints(tmp_path):
    """At a few steps: `bench/demo_learning.py` with the command's evaluation settings reports, on
    new combinations (the held-out prompts of the config), the exact match the command prints."""
    steps = "--trainer.max_steps=2"
    cli = subprocess.run([sys.executable, "-m", "lightning_grpo", *main_command(), steps, f"--trainer.logger.init_args.save_dir={tmp_path / 'cli'}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1400)
    assert cli.returncode == 0, cli.stderr[-3000:]
    row = re.search(r"^\| exact_match \| (\d+\.\d)% .*\| (\d+\.\d)% .*\| ([+-]\d+\.\d) pts \|$", cli.stdout, re.M)
    assert row, cli.stdout[-3000:]
    figures = tmp_path / "bench.json"
    bench = subprocess.run([sys.executable, *bench_command().split(), "--json", str(figures), "--", steps,
                            f"--trainer.logger.init_args.save_dir={tmp_path / 'bench'}"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1400)
    assert bench.returncode == 0, bench.stderr[-3000:]
    measured = json.loads(figures.read_text())["splits"]["new_combinations"]["exact_match"]
    assert (round(100 * measured["before"]["mean"], 1), round(100 * measured["after"]["mean"], 1)) == (float(row.group(1)), float(row.group(2)))
    assert f"{measured['change']:+.1f}" == row.group(3)
