"""Every YAML under configs/serve/ (reward servers) and configs/remote/ (recipes pointed at them)
parses; each server's reward builds on tiny stand-ins of the same classes; each overlay turns its
recipes' rewards into RemoteRewards with the local reward's name and weight."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lightning_grpo.cli import run
from lightning_grpo.rewards import Binary, ClipScore, HPSReward, RemoteReward, VideoAlignReward
from lightning_grpo.serving import build_reward, parser
from tests.configs.test_configs import substitute
from tests.rewards.conftest import TINY_OPEN_CLIP, TINY_OPEN_CLIP_CFG
from tests.rewards.test_videoalign import write_tiny_videoreward

ROOT = Path(__file__).resolve().parents[2]
SERVERS = sorted((ROOT / "configs" / "serve").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "remote").glob("*.yaml"))
REAL_RECIPES = {"flux_hps.yaml", "flux_hps_binary.yaml", "flux_hps_clip.yaml", "flux_hps_fsdp.yaml", "sd14_hps.yaml",
                "hunyuan_t2v_videoalign.yaml", "skyreels_i2v_mq.yaml"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """A tiny open_clip checkpoint (HPS / CLIP layout) and a tiny VideoReward folder."""
    import json

    import open_clip
    import torch

    root = tmp_path_factory.mktemp("serve_assets")
    (root / "cfg").mkdir()
    (root / "cfg" / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(root / "cfg")
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).state_dict()}, root / "hps.pt")
    videoreward, qwen, *_ = write_tiny_videoreward(root / "videoalign")
    return {"clip": str(root / "hps.pt"), "videoalign": str(videoreward), "qwen": str(qwen)}


def test_there_are_servers_and_overlays():
    assert {"hps.yaml", "hps_binary.yaml", "clip_score.yaml", "videoalign_vq.yaml", "videoalign_mq.yaml", "jpeg_incompressibility.yaml"} <= {p.name for p in SERVERS}
    assert {"hps.yaml", "hps_binary.yaml", "hps_clip.yaml", "videoalign_vq.yaml", "videoalign_mq.yaml", "tiny.yaml"} <= {p.name for p in OVERLAYS}


@pytest.mark.parametrize("config", SERVERS, ids=[p.name for p in SERVERS])
def test_server_config_parses_and_its_reward_builds_on_stand_ins(config, assets):
    text = config.read_text()
    assert text.startswith("#") and "Launch:" in text and "serve-reward -c configs/serve/" + config.name in text
    parsed = parser().parse_args(["-c", str(config)])
    assert 1024 <= parsed.port <= 65535 and parsed.max_batch_size >= 1
    raw = substitute(yaml.safe_load(text), assets)["reward"]
    reward = build_reward(raw)
    expected = {"hps": HPSReward, "hps_binary": Binary, "clip_score": ClipScore, "videoalign_vq": VideoAlignReward,
                "videoalign_mq": VideoAlignReward}.get(config.stem)
    if expected is not None:
        assert isinstance(reward, expected)
    if config.stem.startswith("videoalign"):
        assert reward.output == config.stem.split("_")[1].upper()


@pytest.fixture(scope="module")
def tiny_with_overlay(tmp_path_factory):
    """(overlay name -> the module's rewards) for configs/tiny.yaml + each overlay."""
    out = {}
    for overlay in OVERLAYS:
        save = tmp_path_factory.mktemp(overlay.stem)
        cli = run(["-c", str(ROOT / "configs" / "tiny.yaml"), "-c", str(overlay), f"--trainer.default_root_dir={save}", "--trainer.logger=false"], subcommand=False)
        out[overlay.name] = list(cli.model.rewards.rewards)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_overlay_points_its_recipes_rewards_at_servers(overlay, tiny_with_overlay):
    text = overlay.read_text()
    recipes = re.search(r"^# Recipes: (.+)$", text, re.M)
    assert text.startswith("#") and "Launch:" in text
    rewards = tiny_with_overlay[overlay.name]
    assert rewards and all(isinstance(r, RemoteReward) for r in rewards)
    if overlay.name == "tiny.yaml":
        assert [r.name for r in rewards] == ["jpeg_incompressibility"]
        return
    names = recipes.group(1).split()
    assert names and set(names) <= REAL_RECIPES
    for recipe in names:  # the remote rewards keep the local ones' names and weights (logs, best-checkpoint metric)
        local = yaml.safe_load((ROOT / "configs" / recipe).read_text())["model"]["rewards"]
        local_names = [_local_name(r) for r in local]
        assert [r.name for r in rewards] == local_names, recipe
        assert [r.weight for r in rewards] == [float((r.get("init_args") or {}).get("weight", 1.0)) for r in local], recipe


def test_every_real_recipe_has_an_overlay():
    covered = {name for overlay in OVERLAYS for name in (re.search(r"^# Recipes: (.+)$", overlay.read_text(), re.M) or [None, ""])[1].split()}
    assert REAL_RECIPES <= covered


def test_the_launch_line_override_reaches_the_url(tmp_path):
    cli = run(["-c", str(ROOT / "configs" / "tiny.yaml"), "-c", str(ROOT / "configs" / "remote" / "hps.yaml"),
               "--model.rewards.init_args.url=http://10.1.2.3:9000", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], subcommand=False)
    assert cli.model.rewards.rewards[0].urls == ["http://10.1.2.3:9000"]


def _local_name(node: dict) -> str:
    """The name a recipe's reward logs under (its `name`, the Binary rule, or the class default)."""
    args = node.get("init_args") or {}
    if args.get("name"):
        return args["name"]
    short = node["class_path"].rsplit(".", 1)[-1]
    if short == "Binary":
        return _local_name(args["reward"]) + "_binary"
    return {"HPSReward": "hps", "ClipScore": "clip_score", "VideoAlignReward": "videoalign"}[short]
