"""An export that generates what it trained: the toy FLUX demo, exported by `lightning-grpo export`,
draws its objects in plain diffusers with nothing but the settings the export recorded (with the
diffusers defaults, 512×512 and 28 steps, the toy pipeline draws speckle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_grpo.cli import run
from lightning_grpo.worlds.shapes.verifier import SceneRules, decode_scenes

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [line.strip() for line in (ROOT / "configs" / "prompts" / "shapes_heldout.txt").read_text().splitlines() if line.strip()][:8]


def one_object(pixels: torch.Tensor) -> torch.Tensor:
    """BoolTensor[B]: the strict verifier finds exactly one object (pixels [B, 3, H, W] in [0, 1])."""
    return decode_scenes(pixels).one_object(SceneRules())


@pytest.mark.timeout(1200)
def test_the_exported_demo_generates_objects_with_its_recorded_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo's paths are relative to the repository
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"]["max_steps"] = 1
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GRPOCheckpoint")]
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    run(["fit", "-c", str(tmp_path / "demo.yaml"), "--trainer.enable_progress_bar=false"])
    folder = tmp_path / "runs" / "demo" / "version_0"

    out = tmp_path / "exported"
    export = subprocess.run([sys.executable, "-m", "lightning_grpo", "export", "-c", str(folder / "config.yaml"), "--ckpt_path",
                             str(folder / "checkpoints" / "last.ckpt"), "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "generation settings in" in export.stdout and "Loading weights" not in export.stderr  # quiet, and says what it wrote
    settings = json.loads((out / "generation_settings.json").read_text())
    assert settings["call"] == {"height": 32, "width": 32, "guidance_scale": 3.5, "max_sequence_length": 16, "num_inference_steps": 8}
    assert settings["pipeline"] == "FluxPipeline" and settings["weights"] == "full pipeline"
    assert settings["schedule_matches_run"] is True  # demo.yaml's sampler shift 1.583 is the pipeline's own schedule

    # plain diffusers, as the README shows it: nothing of lightning_grpo
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(PROMPTS, **settings["call"], generator=generator, output_type="pt").images  # [8, 3, 32, 32]
    assert images.shape == (8, 3, 32, 32)
    found = one_object(images)
    assert found.float().mean() >= 0.75, found  # the base toy FLUX draws one object ~95% of the time

    # the same pipeline at its default resolution and sequence length (what `pipe(prompt)` uses): no object
    default = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="pt").images
    assert default.shape[-1] == 512 and not one_object(default).any()
