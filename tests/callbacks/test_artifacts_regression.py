"""The artifact measures fire on today's failures and stay silent on the base and on clean renders
(issue 28, acceptance 3), on stored sample sets of the shipped demos
(tests/data/hacking_samples.npz, made by tests/data/make_hacking_samples.py, OMP_NUM_THREADS=1, at
commit 1dec9fd: the demo configs named below are as they were then, before issue 28 fixed them):

- flux: configs/demo.yaml. Base samples (`base`; `base_other`: the same prompts on other seeds),
  step 150 (a faint lattice of dots over the background, strongest there) and step 500 (the
  demo's end: lumpy shapes, stray blobs); 16 held-out scenes × 3 samples, 32×32.
- i2v: configs/demo_i2v.yaml. Base clips and step 150 (the demo's end: red drifts towards
  orange and yellow, shapes swell, frame 0 leaves its conditioning frame), with the
  conditioning frames; 16 scenes × 2 clips of 9 frames.
- `clean` / `clean_other`: the toy renderer's scenes of the same prompts on two jitter seeds.

Each check runs twice: as the plain function (`compare_samples`) and through
`RewardHackingMonitor` in a real fit whose evaluations replay the stored sets (so removing the
measures from the monitor fails these tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

import lightning_grpo.callbacks.reward_hacking as reward_hacking
from lightning_grpo.artifacts import compare_samples
from lightning_grpo.callbacks.reward_hacking import RewardHackingMonitor
from lightning_grpo.evaluation import EvaluationResult
from tests.training.fixtures import PROMPTS, ListPrompts, make_module

DATA = Path(__file__).resolve().parents[1] / "data" / "hacking_samples.npz"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    with np.load(DATA) as data:
        return {key: data[key] for key in data.files}


def pixels(stored: dict[str, np.ndarray], demo: str, name: str) -> torch.Tensor:
    return torch.from_numpy(stored[f"{demo}/{name}"]).float() / 255


def per_prompt(stored: dict[str, np.ndarray], demo: str) -> int:
    return int(stored[f"{demo}/samples_per_prompt"])


def outside(report) -> list[str]:
    return [c.describe() for c in report.values() if c.outside]


def test_stored_sets_are_small_and_shaped_as_documented(stored) -> None:
    assert DATA.stat().st_size < 1_100_000  # about 1 MB
    assert stored["flux/base"].shape == (48, 3, 32, 32) and stored["flux/base"].dtype == np.uint8
    assert stored["i2v/base"].shape == (32, 9, 3, 32, 32) and stored["i2v/conditioning"].shape == (16, 3, 32, 32)
    assert (per_prompt(stored, "flux"), per_prompt(stored, "i2v")) == (3, 2)


# ---------------------------------------------------------------------------- the plain function
def test_flux_grid_leaves_the_band_and_a_base_redraw_does_not(stored) -> None:
    base = pixels(stored, "flux", "base")
    grid = compare_samples(base, pixels(stored, "flux", "step150"), samples_per_prompt=3)
    assert grid["periodic_energy"].outside and grid["background_energy"].outside, outside(grid)
    end = compare_samples(base, pixels(stored, "flux", "step500"), samples_per_prompt=3)
    assert end["background_energy"].outside, outside(end)
    assert outside(compare_samples(base, pixels(stored, "flux", "base_other"), samples_per_prompt=3)) == []


def test_i2v_colour_drift_and_first_frame_leave_the_band(stored) -> None:
    base, conditioning = pixels(stored, "i2v", "base"), pixels(stored, "i2v", "conditioning")
    drift = compare_samples(base, pixels(stored, "i2v", "step150"), conditioning, samples_per_prompt=2)
    for name in ("hue_shift", "chroma", "luminance", "first_frame_adherence"):
        assert drift[name].outside, outside(drift)
    assert drift["luminance"].value > drift["luminance"].band.base  # red -> yellow: brighter
    assert drift["first_frame_adherence"].value < drift["first_frame_adherence"].band.base
    redraw = compare_samples(base, pixels(stored, "i2v", "base_other"), conditioning, samples_per_prompt=2)
    assert outside(redraw) == []


@pytest.mark.parametrize("demo", ["flux", "i2v"])
def test_clean_renders_stay_silent(stored, demo) -> None:
    report = compare_samples(pixels(stored, demo, "clean"), pixels(stored, demo, "clean_other"),
                             samples_per_prompt=per_prompt(stored, demo))
    assert outside(report) == []


# ---------------------------------------------------------------------------- through the monitor
class StoredFrames(nn.Module):
    """The stored conditioning frames, as a first-frame source for the stored prompts."""

    def __init__(self, prompts: list[str], frames: torch.Tensor) -> None:
        super().__init__()
        self.prompts, self.frames = prompts, frames

    def forward(self, prompts: list[str], size) -> torch.Tensor:
        assert list(prompts) == self.prompts
        return self.frames


def replay_fit(tmp_path, monkeypatch, stored, demo: str, sets: list[str], conditioning: bool = True,
               **monitor_options) -> RewardHackingMonitor:
    """A real fit (tiny policy, one evaluation per step) whose monitor evaluations return the
    stored sets in order: evaluation k (step k) sees `sets[k]`; I2V clips get the stored
    conditioning frames unless `conditioning` is False."""
    prompts = [str(p) for p in stored[f"{demo}/prompts"]]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    calls, count = iter(sets), per_prompt(stored, demo)

    def replay(policy, sampler, prompts_, rewards, samples_per_prompt=1, keep_pixels=False, **kwargs):
        assert keep_pixels and samples_per_prompt == count and list(prompts_) == prompts
        batch = pixels(stored, demo, next(calls))
        names = [r.name for r in rewards.rewards]
        return EvaluationResult([p for p in prompts for _ in range(count)], {n: torch.zeros(len(batch)) for n in names},
                                batch, samples_per_prompt)

    monkeypatch.setattr(reward_hacking, "evaluate", replay)
    first_frames = StoredFrames(prompts, pixels(stored, demo, "conditioning")) if demo == "i2v" and conditioning else None
    monitor = RewardHackingMonitor(str(prompts_file), samples_per_prompt=count, every_n_steps=1, first_frames=first_frames,
                                   **monitor_options)
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", max_steps=len(sets) - 1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[monitor])
    trainer.fit(make_module(learning_rate=1e-12, samples_per_update=8), datamodule=ListPrompts(PROMPTS))  # 1 step per rollout
    return monitor


def warned_measures(monitor: RewardHackingMonitor, step: int) -> set[str]:
    return {m.split("artifact measure '")[1].split("'")[0] for m in monitor.warnings
            if m.startswith(f"possible reward hacking at step {step}:") and "artifact measure" in m}


def test_monitor_fires_on_the_flux_grid_and_is_silent_on_the_base(tmp_path, monkeypatch, stored) -> None:
    from lightning_grpo.rewards import ClipScore

    clip = ClipScore(checkpoint=str(ROOT / "lightning_grpo/worlds/shapes/pretrained/clip/open_clip_model.safetensors"),
                     architecture=str(ROOT / "lightning_grpo/worlds/shapes/pretrained/clip"), name="toy_clip")
    with pytest.warns(UserWarning, match="artifact measure 'periodic_energy' left the base samples' band at step 2"):
        monitor = replay_fit(tmp_path, monkeypatch, stored, "flux", ["base", "base_other", "step150"], kid_encoder=clip)
    assert monitor.verdicts == {0: True, 1: True, 2: False}
    assert {"periodic_energy", "background_energy"} <= warned_measures(monitor, 2)
    assert "kid" in monitor.artifact_history[-1][1]  # KID on the toy CLIP's features was measured


def test_monitor_fires_on_the_i2v_drift_and_is_silent_on_the_base(tmp_path, monkeypatch, stored) -> None:
    with pytest.warns(UserWarning, match="artifact measure 'first_frame_adherence' left the base samples' band at step 2"):
        monitor = replay_fit(tmp_path, monkeypatch, stored, "i2v", ["base", "base_other", "step150"])
    assert monitor.verdicts == {0: True, 1: True, 2: False}
    assert {"hue_shift", "chroma", "luminance", "first_frame_adherence"} <= warned_measures(monitor, 2)


@pytest.mark.parametrize("demo", ["flux", "i2v"])
def test_monitor_is_silent_on_clean_renders(tmp_path, monkeypatch, stored, demo) -> None:
    monitor = replay_fit(tmp_path, monkeypatch, stored, demo, ["clean", "clean_other"], conditioning=False)
    assert monitor.warnings == [] and monitor.verdicts == {0: True, 1: True}
