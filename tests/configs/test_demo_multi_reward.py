"""configs/demo_multi_reward.yaml: one GRPO iteration with both rewards, the shipped toy CLIP included.

The toy FLUX pipeline is replaced by the tiny stand-in of tests/configs (like every recipe there);
the verifier and the toy CLIP are the real, shipped ones, scored on the real shapes-world prompts.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from lightning_grpo.cli import run
from lightning_grpo.rewards import ClipScore
from lightning_grpo.worlds.shapes.verifier import ShapesVerifier
from tests.configs.test_configs import ROOT, stand_ins, substitute  # noqa: F401 - stand_ins is a fixture

CONFIG = ROOT / "configs" / "demo_multi_reward.yaml"


def test_demo_multi_reward_fits_with_verifier_and_toy_clip(stand_ins, tmp_path):  # noqa: F811
    original = yaml.safe_load(CONFIG.read_text())
    raw = substitute(copy.deepcopy(original), stand_ins)
    clip_args = original["model"]["rewards"][1]["init_args"]
    raw["model"]["rewards"][1]["init_args"].update(  # the shipped toy CLIP, not the random stand-in
        checkpoint=str(ROOT / clip_args["checkpoint"]), architecture=str(ROOT / clip_args["architecture"])
    )
    raw["model"]["policy"]["init_args"].update(height=32, width=32)
    raw["data"]["init_args"].update(train_files=str(ROOT / "configs/prompts/shapes_train.txt"), val_files=None, batch_size=1)
    raw["trainer"] = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False, limit_val_batches=0)
    raw["model"].update(group_size=2, micro_batch_size=2, samples_per_update=2, show_progress=False)
    raw["model"]["sampler"]["init_args"]["num_steps"] = 3
    path = tmp_path / CONFIG.name
    path.write_text(yaml.safe_dump(raw))
    cli = run(["-c", str(path)], subcommand=False)
    verifier, clip = cli.model.rewards.rewards
    assert isinstance(verifier, ShapesVerifier) and isinstance(clip, ClipScore) and clip.name == "toy_clip"
    assert cli.model.rewards.weights == {"shapes_dense": 1.0, "toy_clip": 1.0}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1
    scores = cli.model.last_step.scores  # every rolled-out sample's score, per reward
    for name in ("shapes_dense", "toy_clip"):
        assert torch.isfinite(scores[name]).all() and scores[name].shape == (2,)
        assert metrics[f"train/reward/{name}_mean"].item() == pytest.approx(scores[name].mean().item(), abs=1e-6)
