"""Artifact and drift measures of stored sample sets against their base's band (markdown tables).

Default: the regression sets of today's demos, tests/data/hacking_samples.npz (see
tests/data/make_hacking_samples.py). Any .npz with the same keys works (`<demo>/base`,
`<demo>/<set>`, `<demo>/samples_per_prompt`, optionally `<demo>/conditioning`), e.g. base and
trained samples of a demo, so a trained demo can be checked against its base:

    python bench/artifact_report.py                       # every set of every demo in the file
                                                          # (clean_other against clean, the rest against base)
    python bench/artifact_report.py --demo flux --sets step150,step500 --kid
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lightning_grpo.artifacts import compare_samples, encoder_of, format_comparisons

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "data" / "hacking_samples.npz")
    parser.add_argument("--demo", default=None, help="one demo of the file (default: all)")
    parser.add_argument("--sets", default=None, help="comma-separated sets to compare with <demo>/base (default: all others)")
    parser.add_argument("--z", type=float, default=3.0, help="band half-width in the base's standard errors")
    parser.add_argument("--kid", action="store_true", help="also KID on the toy CLIP's image features")
    args = parser.parse_args(argv)
    with np.load(args.data) as data:
        stored = {key: data[key] for key in data.files}
    encoder = None
    if args.kid:
        from lightning_grpo.rewards import ClipScore

        clip = ROOT / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "clip"
        encoder = encoder_of([ClipScore(checkpoint=str(clip / "open_clip_model.safetensors"), architecture=str(clip))])
    demos = sorted({key.split("/")[0] for key in stored}) if args.demo is None else [args.demo]
    for demo in demos:
        per_prompt = int(stored[f"{demo}/samples_per_prompt"])
        names = args.sets.split(",") if args.sets else sorted(
            k.split("/")[1] for k in stored if k.startswith(f"{demo}/") and stored[k].dtype == np.uint8
            and k.split("/")[1] not in ("base", "conditioning", "clean"))
        conditioning = stored.get(f"{demo}/conditioning")
        for name in names:
            base_name = "clean" if name.startswith("clean_") else "base"  # clean renders against clean renders
            cond = None if conditioning is None or base_name == "clean" else torch.from_numpy(conditioning).float() / 255
            report = compare_samples(torch.from_numpy(stored[f"{demo}/{base_name}"]).float() / 255,
                                     torch.from_numpy(stored[f"{demo}/{name}"]).float() / 255,
                                     cond, encoder, per_prompt, z=args.z)
            flagged = [c.name for c in report.values() if c.outside]
            print(f"\n{demo}: {name} against {base_name} ({len(stored[f'{demo}/{name}'])} samples, "
                  f"{per_prompt} per prompt); outside the band: {', '.join(flagged) or 'none'}")
            print(format_comparisons(report), end="")


if __name__ == "__main__":
    main()
