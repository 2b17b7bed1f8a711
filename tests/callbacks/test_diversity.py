"""Diversity metrics: zero for identical samples, hand-computed distances, and DDP-safe (gloo, 2 ranks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, Trainer

from lightning_grpo.callbacks.diversity import (
    AcrossPromptDiversity,
    DiversityMonitor,
    WithinGroupDiversity,
    clip_image_embeddings,
    pairwise_distances,
)
from lightning_grpo.rewards.base import MultiReward
from tests.training.fixtures import PROMPTS, ListPrompts, Redness, make_module


def test_identical_samples_have_zero_diversity():
    sample = torch.rand(3, 8, 8)
    features = sample.expand(6, 3, 8, 8)  # 3 groups of 2, all the same image
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    for metric in (WithinGroupDiversity(), AcrossPromptDiversity(), WithinGroupDiversity("l2")):
        metric.update(features, groups)
        assert metric.compute().item() == 0.0


def test_known_distances_on_points_of_a_line():
    # group 0 at 0 and 2, group 1 at 5 and 5: within pairs |0-2| = 2, |5-5| = 0 -> mean 1;
    # across pairs |0-5|, |0-5|, |2-5|, |2-5| -> mean 4
    features = torch.tensor([[0.0], [2.0], [5.0], [5.0]])
    groups = torch.tensor([0, 0, 1, 1])
    within, across = WithinGroupDiversity("l2"), AcrossPromptDiversity("l2")
    within.update(features, groups)
    across.update(features, groups)
    assert within.compute().item() == pytest.approx(1.0)
    assert across.compute().item() == pytest.approx(4.0)


def test_rms_and_cosine_distances():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])  # l2 = 5, D = 2
    rms = WithinGroupDiversity("rms")
    rms.update(torch.stack([a, b]), torch.tensor([7, 7]))  # group ids need only be equal
    assert rms.compute().item() == pytest.approx(5 / math.sqrt(2))
    cosine = AcrossPromptDiversity("cosine")
    cosine.update(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]), torch.tensor([0, 1, 2]))
    assert cosine.compute().item() == pytest.approx((1 + 2 + 1) / 3)  # orthogonal, opposite, orthogonal
    assert pairwise_distances(torch.ones(2, 4), "cosine").max().item() == pytest.approx(0.0, abs=1e-6)


def test_pairs_are_averaged_over_updates_and_reset():
    within = WithinGroupDiversity("l2")
    within.update(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 0]))  # one pair, 1
    within.update(torch.tensor([[0.0], [3.0], [6.0]]), torch.tensor([0, 0, 0]))  # pairs 3, 6, 3
    assert within.compute().item() == pytest.approx((1 + 3 + 6 + 3) / 4)
    within.reset()
    assert math.isnan(within.compute().item())  # no pairs yet


def test_clip_embeddings_average_video_frames():
    class FakeClip:  # embeds an image as its mean colour
        device, dtype = torch.device("cpu"), torch.float32

        def preprocess(self, images):
            return images

        class model:
            @staticmethod
            def encode_image(images):
                return images.mean(dim=(2, 3))

    video = torch.rand(2, 3, 3, 4, 4)  # [B, F, C, H, W]
    expected = torch.nn.functional.normalize(
        torch.nn.functional.normalize(video.mean(dim=(3, 4)), dim=-1).mean(1), dim=-1
    )
    torch.testing.assert_close(clip_image_embeddings(FakeClip(), video), expected)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(12, 3, 4, 4, generator=generator)
    groups = torch.arange(12) // 3  # 4 prompts × 3 samples; rank r gets prompts 2r, 2r+1
    return features, groups


def _rank_worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        features, groups = data()
        half = slice(6 * rank, 6 * rank + 6)
        synced, local = [], []
        for cls in (WithinGroupDiversity, AcrossPromptDiversity):
            metric, alone = cls(), cls(sync_on_compute=False)
            for m in (metric, alone):
                m.update(features[half], groups[half])
            synced.append(metric.compute().item())  # sums over both ranks
            local.append(alone.compute().item())  # this rank's pairs only
        torch.save((synced, local), f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path: Path):
    features, groups = data()
    expected = []
    for metric in (WithinGroupDiversity(), AcrossPromptDiversity()):
        metric.update(features[:6], groups[:6])  # one process, each rank's half in turn
        metric.update(features[6:], groups[6:])
        expected.append(metric.compute().item())
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "values")), nprocs=2, join=True)
    locals_ = []
    for rank in (0, 1):
        synced, local = torch.load(tmp_path / f"values.{rank}")
        assert synced == pytest.approx(expected, rel=1e-6)
        locals_.append(local)
    assert locals_[0] != pytest.approx(expected, rel=1e-3)  # a rank alone sees other pairs: the sync matters


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """A registered tiny open_clip architecture and a seeded checkpoint of it (HPS layout)."""
    import json

    import open_clip

    from tests.rewards.conftest import TINY_OPEN_CLIP, TINY_OPEN_CLIP_CFG

    root = tmp_path_factory.mktemp("clip")
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).state_dict()}, root / "clip.pt")
    return str(root / "clip.pt"), TINY_OPEN_CLIP


class Collect(Callback):
    def __init__(self):
        self.metrics = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if "diversity" in k})


@pytest.mark.parametrize("reuse_reward", [False, True])
def test_clip_space_from_a_checkpoint_or_a_module_reward(tiny_clip_checkpoint, reuse_reward):
    from lightning_grpo.rewards import HPSReward

    checkpoint, architecture = tiny_clip_checkpoint
    if reuse_reward:
        module = make_module()
        module.rewards = MultiReward([Redness(), HPSReward(checkpoint, architecture)])
        monitor = DiversityMonitor(spaces=["latent"], clip_reward="hps")
    else:
        module = make_module()
        monitor = DiversityMonitor(spaces=["latent"], clip_checkpoint=checkpoint, clip_architecture=architecture)
    collect = Collect()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, collect])
    trainer.fit(module, datamodule=ListPrompts(PROMPTS))
    metrics = collect.metrics[0]
    assert set(metrics) == {f"train/diversity/{s}_{k}" for s in ("latent", "clip") for k in ("within_group", "across_prompts")}
    assert 0 < metrics["train/diversity/clip_across_prompts"] <= 2  # cosine distance of distinct prompts' samples
    if reuse_reward:
        assert monitor.clip is module.rewards.rewards[1]  # no second model in memory


def test_clip_reward_must_name_an_open_clip_reward():
    monitor = DiversityMonitor(clip_reward="redness")
    with pytest.raises(ValueError, match="open_clip reward"):
        monitor.setup(None, make_module(), "fit")
