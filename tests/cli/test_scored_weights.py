"""`fit`, `validate` and `test` say where they write and which weights they score: `validate`
without --ckpt_path used to score the untrained base model without a word."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning_grpo.cli import run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")


def args(subcommand: str, save_dir: Path, *extra: str) -> list[str]:
    return [subcommand, "-c", CONFIG, f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false",
            f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false", *extra]


def messages(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return lines


def test_each_subcommand_names_its_folder_and_its_weights(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run(args("fit", tmp_path / "fit", "--trainer.max_steps=2"))
    assert f"fit: config, logs, checkpoints and samples in {tmp_path / 'fit' / 'tiny' / 'version_0'}" in messages(caplog)
    checkpoint = tmp_path / "fit" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"

    run(args("validate", tmp_path / "base"))
    assert ("validate: no --ckpt_path given, so scoring the base model (TinyPolicy), not a trained run; to score a run "
            "add --ckpt_path=runs/<name>/version_<N>/checkpoints/last.ckpt") in messages(caplog)

    run(args("validate", tmp_path / "trained", f"--ckpt_path={checkpoint}"))
    assert f"validate: scoring the trained weights in {checkpoint}" in messages(caplog)

    run(args("test", tmp_path / "test", f"--ckpt_path={checkpoint}", "--trainer.callbacks+=lightning_grpo.callbacks.EMA"))
    folder = tmp_path / "test" / "tiny" / "version_0"
    assert (f"test: scoring the trained weights in {checkpoint} (the EMA callback's averaged weights, where the checkpoint holds them); "
            f"results in {folder}/test") in messages(caplog)
