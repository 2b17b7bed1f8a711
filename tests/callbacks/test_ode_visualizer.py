"""ODEVisualizer: training is identical with it on or off, RNG and train flags untouched, video layout."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grpo.callbacks import EMA, DiversityMonitor, ODEVisualizer, RewardLogger
from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.compressibility import JpegIncompressibility
from lightning_grpo.samplers import FlowSDESampler
from tests.training.fixtures import PROMPTS, ListPrompts, make_module


def fit(tmp_path, callbacks, module=None, batches=3):
    seed_everything(0)
    module = module or make_module()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=batches, limit_val_batches=0, logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=ListPrompts(PROMPTS))
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return module, events


def training_scalars(events) -> dict[str, list[tuple[int, float]]]:
    """Every logged training scalar except wall-clock timings."""
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("train/") and "/time/" not in tag
    }


def test_training_metrics_are_identical_with_the_visualiser_on_and_off(tmp_path):
    _, off = fit(tmp_path / "off", [])
    module, on = fit(tmp_path / "on", [ODEVisualizer(prompts=["a red circle", "a blue square"], every_n_steps=1)])
    assert len(on.Images("visualization/ode_samples")) == 4  # fit start + after each of the 3 rollouts
    reference, observed = training_scalars(off), training_scalars(on)
    assert "train/loss" in reference and "train/reward/redness_mean" in reference
    assert observed == reference  # exact: same steps, same values


def test_all_default_callbacks_leave_training_unchanged(tmp_path):
    off_module, off = fit(tmp_path / "off", [])
    callbacks = [RewardLogger(), DiversityMonitor(), ODEVisualizer(every_n_steps=1), EMA(decay=0.9)]
    on_module, on = fit(tmp_path / "on", callbacks)
    reference, observed = training_scalars(off), training_scalars(on)
    assert {tag: observed[tag] for tag in reference} == reference
    assert "train/diversity/pixel_within_group" in observed
    for (name, a), b in zip(off_module.state_dict().items(), on_module.state_dict().values()):
        assert torch.equal(a, b), name


class Snapshot(Callback):
    """Records the global RNG state and every submodule's train flag at train start and batch end."""

    def __init__(self) -> None:
        self.states: list[tuple[torch.Tensor, list[bool]]] = []

    def _record(self, pl_module) -> None:
        self.states.append((torch.random.get_rng_state(), [m.training for m in pl_module.modules()]))

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(pl_module)


def test_visualiser_restores_rng_and_train_flags(tmp_path):
    """Prompts come from the validation dataloader, whose iteration draws from the global RNG; the
    visualiser must hide that (and its eval-mode switch) from training."""
    before, after = Snapshot(), Snapshot()
    visualiser = ODEVisualizer(num_prompts=3, every_n_steps=1)
    fit(tmp_path, [before, visualiser, after], batches=2)
    assert visualiser.prompts == [PROMPTS[i] for i in (0, 8, 16)]  # spread over the 24 validation prompts
    assert len(before.states) == len(after.states) == 3
    for (rng_before, flags_before), (rng_after, flags_after) in zip(before.states, after.states):
        assert torch.equal(rng_before, rng_after)
        assert flags_before == flags_after


class TinyVideoPolicy(TinyPolicy):
    """TinyPolicy whose decode returns a 2-frame video [B, F, C, H, W] (the second frame mirrored)."""

    @torch.no_grad()
    def decode(self, latents):
        frame = super().decode(latents)
        return torch.stack([frame, frame.flip(-1)], dim=1)


def test_video_samples_are_logged(tmp_path):
    module = GRPOModule(
        policy=TinyVideoPolicy(resolution=8), sampler=FlowSDESampler(num_steps=3, eta=0.7), rewards=[JpegIncompressibility()],
        group_size=2, micro_batch_size=2, samples_per_update=4, show_progress=False,
    )
    visualiser = ODEVisualizer(prompts=["a red circle", "a blue square"], seeds=[3], every_n_steps=1)
    _, events = fit(tmp_path, [visualiser, DiversityMonitor(), RewardLogger()], module=module, batches=1)
    images = events.Tags()["images"]
    assert "visualization/ode_samples" in images
    assert "visualization/ode_video" in images or "visualization/ode_video_frames" in images
    assert visualiser.initial.shape == (2, 2, 3, 8, 8)  # [seeds × prompts, F, C, H, W]
    assert "train/diversity/pixel_within_group" in events.Tags()["scalars"]


def test_prompt_choice_spread_or_first_and_bad_options(tmp_path):
    """Validation files list a scene's phrasings in a row: "spread" takes K prompts evenly spaced
    (indices ⌊i·N/K⌋), "first" the first K; bad options are named."""
    from lightning_grpo.callbacks.ode_visualizer import spread_indices

    assert spread_indices(24, 3) == [0, 8, 16] and spread_indices(80, 8) == list(range(0, 80, 10)) and spread_indices(2, 4) == [0, 1]
    first = ODEVisualizer(num_prompts=3, every_n_steps=1, prompt_choice="first")
    fit(tmp_path, [first], batches=1)
    assert first.prompts == PROMPTS[:3]
    with pytest.raises(ValueError, match="prompt_choice"):
        ODEVisualizer(prompt_choice="random")
    with pytest.raises(ValueError, match="max_scan"):
        ODEVisualizer(num_prompts=8, max_scan=4)
