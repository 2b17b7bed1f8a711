"""Readable grids: size and layout of `captioned_grid`, the visualiser's and the evaluation's grids."""

from __future__ import annotations

import pytest
import torch

from lightning_grpo.evaluation import EvaluationResult
from lightning_grpo.grids import LINE_HEIGHT, MARGIN, GridLayout, _wrap, captioned_grid


def _cells(rows: int, columns: int, side: int = 8) -> torch.Tensor:
    """Cell (r, c) is a flat colour that encodes r and c, so each cell can be found in the grid."""
    cells = torch.zeros(rows, columns, 3, side, side)
    for r in range(rows):
        for c in range(columns):
            cells[r, c] = torch.tensor([r / max(1, rows - 1), c / max(1, columns - 1), 0.5]).view(3, 1, 1)
    return cells


def test_captioned_grid_size_and_cells() -> None:
    cells = _cells(3, 4)
    grid = captioned_grid(cells, row_captions=["a red circle at the top left"] * 3,
                          column_titles=["step 0 · seed 0", "step 0 · seed 1", "step 9 · seed 0", "step 9 · seed 1"],
                          cell_size=64, gap_after=2)
    layout = GridLayout(cell=64, columns=4, rows_per_block=3, blocks=1, caption_lines=1, cell_caption_lines=0,
                        title_lines=2, gap_after=2)
    # hand-worked: width 6 + (4·66 + 18) + 12 = 300; height 6 + (2·15 + 6) + 3·(64 + 15 + 6) = 297
    assert layout.size == (297, 300)
    assert grid.shape == (3, *layout.size)
    for r in range(3):
        for c in range(4):
            y, x = layout.cell_origin(r, c)
            block = grid[:, y : y + 64, x : x + 64]  # the whole upscaled cell is its flat colour (nearest, ×8)
            expected = (cells[r, c, :, 0, 0] * 255).round() / 255
            assert torch.allclose(block, expected.view(3, 1, 1).expand_as(block), atol=1e-6), (r, c)
    # the prompt is drawn under each row: dark pixels in the caption band, none in the gap between the blocks
    y, x = layout.cell_origin(1, 0)
    caption = grid[:, y + 64 : y + 64 + LINE_HEIGHT, x : x + 200]
    assert (caption.mean(0) < 0.5).sum() > 50
    gap = grid[:, y : y + 64, x + 2 * 66 : x + 2 * 66 + 3 * MARGIN]
    assert (gap == 1).all()
    title = grid[:, MARGIN : MARGIN + 2 * LINE_HEIGHT, x : x + 64]
    assert (title.mean(0) < 0.5).sum() > 20


def test_captions_wrap_at_word_boundaries() -> None:
    """A 96-pixel cell holds 14 characters (96 / 6.6): words are never cut; a reward name longer
    than the line breaks after its underscores (was `movin / g_shapes_produ / ct`)."""
    assert _wrap("rank 1 · moving_shapes_product", 96) == ["rank 1 ·", "moving_shapes_", "product"]
    assert _wrap("a red circle moving to the right", 96) == ["a red circle", "moving to the", "right"]
    assert _wrap("sample 0 · exact_match", 128) == ["sample 0 ·", "exact_match"]  # 19 characters: fits whole
    assert _wrap("antidisestablishment", 40) == ["antidisestablishment"]  # one word wider than the line stays whole
    assert _wrap("", 40) == [""]
    text = "there is a green triangle in the top left of the image, moving_shapes_product"
    for width in (40, 64, 96, 128, 300):
        lines = _wrap(text, width)
        assert " ".join(lines).replace("_ ", "_") == text  # nothing lost, nothing cut but at the boundaries
        words = set(text.split()) | {"moving_", "shapes_", "product", "moving_shapes_", "shapes_product"}
        assert all(word in words for line in lines for word in line.split()), (width, lines)


def test_rows_wrap_into_blocks_and_bad_input() -> None:
    grid = captioned_grid(_cells(5, 2), row_captions=[f"prompt {i}" for i in range(5)], cell_size=32, rows_per_block=2)
    layout = GridLayout(cell=32, columns=2, rows_per_block=2, blocks=3, caption_lines=1, cell_caption_lines=0,
                        title_lines=0, gap_after=None)
    assert grid.shape == (3, *layout.size) and layout.size[1] > layout.size[0]
    with pytest.raises(ValueError, match="row_captions: 2 texts for 5 rows"):
        captioned_grid(_cells(5, 2), row_captions=["a", "b"])
    with pytest.raises(ValueError, match="cells must be"):
        captioned_grid(torch.zeros(2, 3, 8, 8))


def test_heldout_grid_is_prompts_by_samples(tmp_path) -> None:
    """80 prompts × 2 samples of 32²: 4 blocks of 20 rows, samples as columns, each cell ≥ 96 px."""
    prompts = [f"prompt number {i}" for i in range(80) for _ in range(2)]
    result = EvaluationResult(prompts=prompts, scores={"exact_match": torch.ones(160)},
                              pixels=torch.rand(160, 3, 32, 32), samples_per_prompt=2)
    written = result.write(tmp_path)
    from PIL import Image

    image = Image.open(written["grid"])
    layout = GridLayout(cell=96, columns=2, rows_per_block=20, blocks=4, caption_lines=1, cell_caption_lines=1,
                        title_lines=2, gap_after=None)
    assert image.size == (layout.size[1], layout.size[0])
    assert tuple(result.grid().shape) == (3, *layout.size)
    assert layout.size[0] < 3000  # not a 2,641-pixel-tall single column any more


def _red_pixels(grid: torch.Tensor) -> int:
    """Pixels of pure red (the conditioning frames below; samples are green, text black)."""
    return int(((grid[0] > 0.99) & (grid[1] < 0.01) & (grid[2] < 0.01)).sum())


def test_i2v_grids_show_the_conditioning_frame_first() -> None:
    """Conditioning frames pure red, clips pure green: the red pixels of each grid are exactly one
    upscaled frame per prompt row (cell 32 = 4 × 8 px), in the first column ("condition")."""
    from lightning_grpo.callbacks.ode_visualizer import ODEVisualizer
    from lightning_grpo.evaluation import evaluation_grid, evaluation_video
    from lightning_grpo.grids import with_condition

    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    clips = torch.zeros(4, 3, 3, 8, 8)  # 2 prompts × 2 samples, 3 frames
    clips[:, :, 1] = 1.0
    grid = evaluation_grid(clips, ["p0", "p0", "p1", "p1"], 2, cell_size=32, conditioning=red)
    assert _red_pixels(grid) == 2 * 32 * 32
    assert _red_pixels(evaluation_grid(clips, ["p0", "p0", "p1", "p1"], 2, cell_size=32)) == 0
    frames = evaluation_video(clips, ["p0", "p0", "p1", "p1"], 2, cell_size=32, conditioning=red)
    assert frames.shape[0] == 3 and all(_red_pixels(f) == 2 * 32 * 32 for f in frames)
    result = EvaluationResult(["p0", "p0", "p1", "p1"], {"r": torch.zeros(4)}, clips, 2, images=red)
    assert _red_pixels(result.grid(cell_size=32)) == 2 * 32 * 32

    visualiser = ODEVisualizer(prompts=["p0", "p1"], seeds=[0], cell_size=32)
    visualiser.images, visualiser.initial = red, clips[:2]
    assert _red_pixels(visualiser.grid(clips[2:])) == 2 * 32 * 32  # strips: one condition cell per row
    assert _red_pixels(visualiser.grid(clips[2:], frame=1)) == 2 * 32 * 32  # the per-frame grid of the GIF

    cells = with_condition(torch.zeros(2, 3, 3, 8, 20), red)  # a frame beside 20-px-wide strips: padded white
    assert cells.shape == (2, 4, 3, 8, 20) and torch.equal(cells[:, 0, :, :, :8], red) and (cells[:, 0, :, :, 8:] == 1).all()
    with pytest.raises(ValueError, match="conditioning must be"):
        with_condition(torch.zeros(3, 3, 3, 8, 20), red)
    with pytest.raises(ValueError, match="wider than the cells"):
        with_condition(torch.zeros(2, 3, 3, 8, 4), red)
