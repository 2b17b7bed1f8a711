"""Plot TensorBoard scalar curves of a run into a PNG (for docs/results.md).

    python bench/plot_curves.py runs/demo/version_0 train/reward/verifier_mean \\
        train/diversity/pixel_within_group --out docs/img/reward_vs_diversity.png

Each tag gets its own panel (tags differ in scale), x = the logged step. Uses matplotlib when it
is installed; otherwise draws simple line charts with Pillow (a dependency of the project) and
says so. An exponential moving average can smooth noisy curves (`--smooth 0.9`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

Curve = tuple[list[int], list[float]]  # (steps, values)


def read_scalars(log_dir: str | Path, tags: list[str]) -> dict[str, Curve]:
    """Steps and values of each tag from the event files under `log_dir` (raises on a missing tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    missing = [tag for tag in tags if tag not in available]
    if missing:
        raise KeyError(f"tags {missing} not in {log_dir}; available: {sorted(available)}")
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)]) for tag in tags}


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average (weight 0 = unsmoothed)."""
    out, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        out.append(last)
    return out


def plot(curves: dict[str, Curve], out: Path, title: str = "") -> str:
    """Write the PNG; returns the backend used ("matplotlib" or "pillow")."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pillow(curves, out, title)
        return "pillow"
    fig, axes = plt.subplots(len(curves), 1, figsize=(7, 2.6 * len(curves)), sharex=True, squeeze=False)
    for ax, (tag, (steps, values)) in zip(axes[:, 0], curves.items()):
        ax.plot(steps, values)
        ax.set_ylabel(tag.rsplit("/", 1)[-1])
        ax.set_title(tag, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return "matplotlib"


def _plot_pillow(curves: dict[str, Curve], out: Path, title: str, width: int = 720, panel: int = 220) -> None:
    """Minimal line charts: one panel per tag with its name, y range and x range written out."""
    from PIL import Image, ImageDraw

    top = 24 if title else 0
    image = Image.new("RGB", (width, top + panel * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((10, 5), title, fill="black")
    left, right, pad = 70, width - 15, 22
    for k, (tag, (steps, values)) in enumerate(curves.items()):
        y0 = top + k * panel
        box = (left, y0 + pad, right, y0 + panel - pad)
        draw.rectangle(box, outline="gray")
        draw.text((left, y0 + 4), tag, fill="black")
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-12
        first, last = min(steps), max(steps)
        span = last - first or 1
        points = [
            (box[0] + (s - first) / span * (box[2] - box[0]), box[3] - (v - lo) / (hi - lo) * (box[3] - box[1]))
            for s, v in zip(steps, values)
        ]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=(31, 119, 180))
        draw.text((5, box[1]), f"{hi:.4g}", fill="black")
        draw.text((5, box[3] - 10), f"{lo:.4g}", fill="black")
        draw.text((left, box[3] + 3), f"step {first}", fill="black")
        draw.text((right - 70, box[3] + 3), f"step {last}", fill="black")
    image.save(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", help="TensorBoard log dir (e.g. runs/demo/version_0)")
    parser.add_argument("tags", nargs="+", help="scalar tags to plot, one panel each")
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (TensorBoard's smoothing)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error("--smooth must be in [0, 1)")
    curves = {tag: (steps, smooth(values, args.smooth)) for tag, (steps, values) in read_scalars(args.log_dir, args.tags).items()}
    out = Path(args.out)
    backend = plot(curves, out, args.title)
    note = "" if backend == "matplotlib" else " (matplotlib is not installed: simple Pillow charts)"
    print(f"wrote {out} with {backend}{note}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
