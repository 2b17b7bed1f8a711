"""Video where people look at it: film strips and GIFs, playable clips in TensorBoard (read back from
the event files), clip files in the run folder, held-out splits and first frames for video, video
diversity per frame and over time."""

from __future__ import annotations

import io

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grpo.callbacks import DiversityMonitor, HeldOutEvaluation, ODEVisualizer, RewardHackingMonitor, RewardLogger
from lightning_grpo.callbacks._logging import can_add_video
from lightning_grpo.callbacks.diversity import temporal_change
from lightning_grpo.evaluation import EvaluationResult
from lightning_grpo.grids import GridLayout, captioned_grid, filmstrip, save_gif
from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.base import Reward
from lightning_grpo.samplers import FlowSDESampler
from lightning_grpo.worlds.moving_shapes.data import MotionFirstFrames
from lightning_grpo.worlds.moving_shapes.verifier import FirstFrameFidelity
from tests.training.fixtures import ListPrompts, Redness

FRAMES = 3
MOTION_PROMPTS = ["a red circle moving up", "a blue square moving to the left", "a green triangle moving down",
                  "a yellow circle moving to the right"]


class MovingTinyPolicy(TinyPolicy):
    """TinyPolicy whose decode returns a 3-frame clip [B, F, C, H, W]: the image rolled 0, 1, 2 pixels right."""

    @torch.no_grad()
    def decode(self, latents):
        frame = super().decode(latents)
        return torch.stack([frame.roll(f, dims=-1) for f in range(FRAMES)], dim=1)


class FirstFrameRecorder(Reward):
    """Records the first frames it is given (image-to-video) and scores 0."""

    default_name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def score(self, pixels, prompts, images=None):
        self.seen.append(images.detach().cpu())
        return torch.zeros(len(prompts))


def gif_frames(data: bytes) -> int:
    """Number of frames of an animated GIF given as bytes."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "GIF"
    return image.n_frames


# ----------------------------------------------------------------------------- pieces
def test_filmstrip_picks_evenly_spaced_frames_with_white_gaps() -> None:
    clips = torch.arange(9, dtype=torch.float32).view(1, 9, 1, 1, 1).expand(1, 9, 3, 2, 2) / 10  # frame f has value f/10
    strip = filmstrip(clips, max_frames=5)
    assert strip.shape == (1, 3, 2, 5 * 2 + 4)  # 5 frames of width 2, 4 one-pixel gaps
    columns = strip[0, 0, 0]  # [14]
    assert torch.allclose(columns[[0, 3, 6, 9, 12]], torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8]))  # frames 0, 2, 4, 6, 8
    assert (columns[[2, 5, 8, 11]] == 1).all()  # white gaps
    assert filmstrip(clips[:, :3], max_frames=5).shape[-1] == 3 * 2 + 2  # fewer frames than max: all of them
    with pytest.raises(ValueError, match=r"\[N, F, C, H, W\]"):
        filmstrip(torch.zeros(2, 3, 4, 4))


def test_wide_cells_get_wide_boxes() -> None:
    strip = torch.rand(2, 1, 3, 8, 26)  # [R, K, C, H, W]: W/H = 3.25
    grid = captioned_grid(strip, row_captions=["a", "b"], cell_size=32)
    layout = GridLayout(cell=32, columns=1, rows_per_block=2, blocks=1, caption_lines=1, cell_caption_lines=0,
                        title_lines=0, gap_after=None, cell_width=104)  # ⌈32 · 26 / 8⌉
    assert grid.shape == (3, *layout.size)
    y, x = layout.cell_origin(1, 0)
    expected = (strip[1, 0].repeat_interleave(4, -1).repeat_interleave(4, -2) * 255).round() / 255  # ×4 nearest
    assert torch.allclose(grid[:, y:y + 32, x:x + 104], expected, atol=1e-6)


def test_save_gif_round_trip(tmp_path) -> None:
    frames = torch.zeros(4, 3, 6, 6)
    for f in range(4):
        frames[f, f % 3] = 1.0  # red, green, blue, red
    path = save_gif(frames, tmp_path / "sub" / "clip.gif", fps=5)
    image = Image.open(path)
    assert image.n_frames == 4 and image.info["duration"] == 200 and image.info["loop"] == 0
    image.seek(1)
    assert image.convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(ValueError, match="fps"):
        save_gif(frames, tmp_path / "x.gif", fps=0)


def test_temporal_change_by_hand() -> None:
    clips = torch.zeros(2, 3, 1, 1, 2)
    clips[0, 1:] = 0.2  # frames 0, 0.2, 0.2: sqrt((0.2² + 0²) / 2) = 0.1414
    clips[1] = 0.7  # still
    assert torch.allclose(temporal_change(clips), torch.tensor([0.2 / 2**0.5, 0.0]))


def test_video_evaluation_result_writes_strips_and_gif(tmp_path) -> None:
    pixels = torch.rand(4, FRAMES, 3, 8, 8)
    result = EvaluationResult(prompts=["p0", "p0", "p1", "p1"], scores={"exact": torch.tensor([1.0, 0, 1, 1])},
                              pixels=pixels, samples_per_prompt=2)
    written = result.write(tmp_path)
    assert Image.open(written["gif"]).n_frames == FRAMES
    still = Image.open(written["grid"])
    assert still.size[0] > 2 * still.size[1] // 2  # strips make the cells wide
    assert result.video().shape[0] == FRAMES and result.video().shape[1:] != result.grid().shape  # per-frame grids are not strips


# ----------------------------------------------------------------------------- a whole run
def test_video_run_logs_playable_clips_files_splits_and_diversity(tmp_path) -> None:
    seed_everything(0)
    module = GRPOModule(policy=MovingTinyPolicy(resolution=8), sampler=FlowSDESampler(num_steps=3, eta=0.7),
                        rewards=[Redness()], group_size=3, micro_batch_size=3, samples_per_update=6, show_progress=False)
    splits = {}
    for name, prompts in (("new_combinations", MOTION_PROMPTS[:2]), ("both", MOTION_PROMPTS[2:])):
        splits[name] = str(tmp_path / f"{name}.txt")
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    recorder = FirstFrameRecorder()
    heldout = HeldOutEvaluation(splits=splits, samples_per_prompt=2, batch_size=3, first_frames=MotionFirstFrames(seed=3),
                                extra_rewards=[FirstFrameFidelity(), recorder])
    hacking = RewardHackingMonitor(splits["both"], gold_rewards=[FirstFrameFidelity()], samples_per_prompt=1, every_n_steps=1,
                                   first_frames=MotionFirstFrames(seed=3))  # the gold measure needs the first frames
    callbacks = [ODEVisualizer(prompts=MOTION_PROMPTS[:2], seeds=[0], every_n_steps=1), RewardLogger(media_every_n_steps=1),
                 DiversityMonitor(), heldout, hacking]
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=logger, log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=ListPrompts(MOTION_PROMPTS))
    run = tmp_path / "run" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()

    # playable clips in TensorBoard: GIF-encoded image summaries with one frame per video frame
    assert can_add_video()  # moviepy < 2 is a dependency
    for tag in ("visualization/ode_video", "train/samples_video", "heldout/new_combinations/video_before",
                "heldout/both/video_after"):
        clips = events.Images(tag)
        assert clips and all(gif_frames(c.encoded_image_string) == FRAMES for c in clips), tag
    assert len(events.Images("train/samples_video")) == 2  # one per rollout
    for tag in ("visualization/ode_samples", "train/samples", "heldout/both/grid_before"):
        assert events.Images(tag), tag
    # the same clips as files in the run folder
    gifs = {p.relative_to(run).as_posix() for p in run.rglob("*.gif")}
    assert {"rollouts/step000000.gif", "heldout_before/new_combinations/grid.gif", "heldout_after/both/grid.gif"} <= gifs
    assert any(g.startswith("visualization/ode_samples_step") for g in gifs)
    assert all(Image.open(run / g).n_frames == FRAMES for g in gifs)

    # every split reported on its own, with the first frames the source makes, before and after
    scalars = set(events.Tags()["scalars"])
    for split in splits:
        assert {f"heldout/{split}/first_frame_fidelity", f"heldout/{split}/redness_ci_low"} <= scalars
    table = (run / "heldout_before_after.md").read_text()
    assert "(new_combinations)" in table and "(both)" in table
    expected = MotionFirstFrames(seed=3)(MOTION_PROMPTS[:2], (8, 8))
    assert torch.equal(recorder.seen[0][[0, 2]], expected)  # samples_per_prompt = 2: rows repeat per prompt
    assert set(heldout.split_results["after"]) == set(splits)
    assert len(events.Scalars("hacking/gold/first_frame_fidelity")) == 3  # fit start, step 1, step 2

    # video diversity: per frame and over time
    for name in ("pixel_per_frame_within_group", "pixel_motion_across_prompts", "pixel_temporal_change"):
        values = [e.value for e in events.Scalars(f"train/diversity/{name}")]
        assert values and all(v == v and v >= 0 for v in values), name
    assert events.Scalars("train/diversity/pixel_temporal_change")[0].value > 0  # the clips move


def test_video_diversity_values_by_hand() -> None:
    """Two clips of one prompt, two frames each: frame 0 equal, frame 1 differs by 0.4 everywhere.
    per-frame within = (0 + 0.4)/2 = 0.2; motion within: differences 0 vs 0.4 → 0.4."""
    monitor = DiversityMonitor()
    monitor.setup(None, None, "fit")  # type: ignore[arg-type]
    clips = torch.zeros(2, 2, 3, 2, 2)
    clips[1, 1] = 0.4
    values = monitor.video_values(clips, torch.tensor([0, 0]))
    assert torch.allclose(values["train/diversity/pixel_per_frame_within_group"], torch.tensor(0.2))
    assert torch.allclose(values["train/diversity/pixel_motion_within_group"], torch.tensor(0.4))
    assert values["train/diversity/pixel_per_frame_across_prompts"].isnan()  # no pair of different prompts
    assert torch.allclose(values["train/diversity/pixel_temporal_change"], torch.tensor(0.2))  # (0 + 0.4)/2
