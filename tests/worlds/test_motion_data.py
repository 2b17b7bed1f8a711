"""Moving-shapes data for the trainer: first frames per prompt, the image-to-video datamodule (bad
prompts named by file and line), and the world's rewards, datamodule and held-out splits from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_grpo.cli import run
from lightning_grpo.datamodules.sources import MalformedRecordError
from lightning_grpo.worlds.moving_shapes import describe_motion, render_first_frames, train_motion_scenes
from lightning_grpo.worlds.moving_shapes.data import MotionFirstFrameDataModule, MotionFirstFrames, first_frames_for_prompts
from lightning_grpo.worlds.moving_shapes.verifier import MovingShapesVerifier
from lightning_grpo.worlds.moving_shapes.vocab import MOTION_RADIUS, MotionScene

ROOT = Path(__file__).resolve().parents[2]


def test_first_frames_depend_on_prompt_and_seed_only() -> None:
    prompts = [describe_motion(s) for s in train_motion_scenes()[:6]]
    frames = first_frames_for_prompts(prompts, size=32, seed=1)
    assert frames.shape == (6, 3, 32, 32)
    # one prompt at a time, in another order, in another batch: the same frame
    assert torch.equal(first_frames_for_prompts(prompts[::-1], size=32, seed=1), frames.flip(0))
    assert torch.equal(first_frames_for_prompts(prompts[2:3], size=32, seed=1)[0], frames[2])
    assert not torch.equal(first_frames_for_prompts(prompts, size=32, seed=2), frames)
    # the frame shows the prompt's shape and colour: without jitter it is the world's centred start
    scene = MotionScene("blue", "square", "left")
    centred = first_frames_for_prompts([describe_motion(scene)], size=32, jitter=False)
    assert torch.equal(centred, render_first_frames([scene], size=32, jitter=False))
    lit = centred[0].amax(0) > 0.5  # [H, W] the object
    side = 2 * MOTION_RADIUS * 32  # the square's side in pixels
    assert abs(lit.sum().item() - side**2) <= 4 * side  # within an edge row of anti-aliasing
    assert MotionFirstFrames(seed=1)(prompts, (32, 32)).equal(frames)
    with pytest.raises(ValueError, match="square"):
        MotionFirstFrames()(prompts, (32, 48))


def test_i2v_datamodule_batches_prompts_with_their_first_frames(tmp_path) -> None:
    prompts = [describe_motion(s, i % 5) for i, s in enumerate(train_motion_scenes()[:7])]
    train = tmp_path / "train.txt"
    train.write_text("\n".join(prompts[:3] + ["a red circle standing still"] + prompts[3:]) + "\n")  # line 4: no direction
    data = MotionFirstFrameDataModule(str(train), image_size=16, frame_seed=5, batch_size=3, shuffle=False)
    data.setup("fit")
    with pytest.warns(UserWarning, match=r"train\.txt:4.*no direction"):
        batches = list(data.train_dataloader())
    seen = [p for b in batches for p in b["prompts"]]
    assert seen == prompts[: len(seen)] and "a red circle standing still" not in seen
    for batch in batches:
        assert batch["images"].shape == (len(batch["prompts"]), 3, 16, 16)
        assert torch.equal(batch["images"], first_frames_for_prompts(batch["prompts"], 16, seed=5))
    strict = MotionFirstFrameDataModule(str(train), batch_size=3, shuffle=False, on_bad_line="error")
    strict.setup("fit")
    with pytest.raises(MalformedRecordError, match=r"train\.txt:4"):
        list(strict.train_dataloader())
    with pytest.raises(ValueError, match="image_size"):
        MotionFirstFrameDataModule(str(train), image_size=4)


def test_world_from_yaml(tmp_path, monkeypatch) -> None:
    """The rewards, the image-to-video datamodule and the held-out splits (with first frames) from YAML."""
    monkeypatch.chdir(ROOT)
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(tmp_path), "callbacks": [{
            "class_path": "lightning_grpo.callbacks.HeldOutEvaluation",
            "init_args": {"splits": {"new_combinations": "configs/prompts/motion_heldout.txt",
                                     "new_phrasings": "configs/prompts/motion_heldout_phrasings.txt",
                                     "both": "configs/prompts/motion_heldout_both.txt"},
                          "first_frames": {"class_path": "lightning_grpo.worlds.moving_shapes.data.MotionFirstFrames", "init_args": {"seed": 2}},
                          "extra_rewards": [{"class_path": "lightning_grpo.worlds.moving_shapes.verifier.MovingShapesVerifier",
                                             "init_args": {"aspect": "all", "mode": "exact", "name": "exact_match"}},
                                            {"class_path": "lightning_grpo.worlds.moving_shapes.verifier.FirstFrameFidelity"}]}}]},
        "model": {
            "policy": {"class_path": "lightning_grpo.policies.tiny.TinyPolicy", "init_args": {"resolution": 8}},
            "sampler": {"class_path": "lightning_grpo.samplers.FlowSDESampler", "init_args": {"num_steps": 2}},
            "rewards": [{"class_path": "lightning_grpo.worlds.moving_shapes.verifier.MovingShapesVerifier",
                         "init_args": {"aspect": "motion", "mode": "dense", "max_track_error": 0.06}}],
        },
        "data": {"class_path": "lightning_grpo.worlds.moving_shapes.data.MotionFirstFrameDataModule",
                 "init_args": {"train_files": "configs/prompts/motion_train.txt", "val_files": "configs/prompts/motion_heldout.txt",
                               "image_size": 8, "batch_size": 2}},
    }
    path = tmp_path / "motion.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = run(["-c", str(path)], subcommand=False)
    reward = cli.model.rewards.rewards[0]
    assert isinstance(reward, MovingShapesVerifier) and reward.name == "motion_dense" and reward.rules.max_track_error == 0.06
    heldout = next(c for c in cli.trainer.callbacks if type(c).__name__ == "HeldOutEvaluation")
    assert {k: len(p) for k, p in heldout.sets.items()} == {"new_combinations": 80, "new_phrasings": 96, "both": 48}
    assert isinstance(heldout.first_frames, MotionFirstFrames) and heldout.first_frames.seed == 2
    assert isinstance(cli.datamodule, MotionFirstFrameDataModule)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["images"].shape == (2, 3, 8, 8)


def test_first_frames_source_feeds_the_module_hook() -> None:
    """`GRPOModule(first_frames=MotionFirstFrames())`: a batch of text prompts gets the prompts' first
    frames at the policy's resolution, exactly as `first_frames_for_prompts` draws them."""
    from tests.training.fixtures import make_module

    module = make_module(first_frames=MotionFirstFrames(seed=4))
    prompts = [describe_motion(s) for s in train_motion_scenes()[:3]]
    frames = module.batch_first_frames({"prompts": prompts})
    assert torch.equal(frames, first_frames_for_prompts(prompts, size=8, seed=4))
