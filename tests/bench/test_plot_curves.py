"""bench/plot_curves.py: reads TensorBoard scalars back and draws one panel per tag into a PNG."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "plot_curves.py"
spec = importlib.util.spec_from_file_location("plot_curves", SCRIPT)
plot_curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_curves)


def test_reads_tags_and_writes_png(tmp_path):
    writer = SummaryWriter(tmp_path / "run")
    for step in range(5):
        writer.add_scalar("train/reward/a_mean", step * 0.5, step)
        writer.add_scalar("train/diversity/pixel_within_group", 1.0 / (step + 1), step)
    writer.close()
    curves = plot_curves.read_scalars(tmp_path / "run", ["train/reward/a_mean"])
    assert curves["train/reward/a_mean"] == ([0, 1, 2, 3, 4], [0.0, 0.5, 1.0, 1.5, 2.0])
    out = plot_curves.main([str(tmp_path / "run"), "train/reward/a_mean", "train/diversity/pixel_within_group", "--out", str(tmp_path / "c.png")])
    with Image.open(out) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # two stacked panels
    with pytest.raises(KeyError, match="not in"):
        plot_curves.read_scalars(tmp_path / "run", ["train/missing"])


def test_smoothing_is_an_exponential_moving_average():
    assert plot_curves.smooth([0.0, 1.0, 1.0], 0.5) == [0.0, 0.5, 0.75]
    assert plot_curves.smooth([3.0, 1.0], 0.0) == [3.0, 1.0]
