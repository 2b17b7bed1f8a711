"""Every YAML under configs/ parses and instantiates (real-model recipes on tiny stand-ins of the same
classes), and every registered family's recipe fits two steps on its stand-in through the real CLI.

The stand-ins and the arguments a recipe takes to run on one come from the family registry
(`Family.build_stand_in`, `Family.recipe_arguments`): a new family needs no code here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_grpo.cli import run
from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.registry import FAMILIES, family_of
from tests.rewards.conftest import TINY_OPEN_CLIP, TINY_OPEN_CLIP_CFG, write_tiny_pickscore
from tests.rewards.test_videoalign import write_tiny_videoreward

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FAMILY_RECIPES = sorted({family.config for family in FAMILIES.values() if family.config})
"""Each registered family's recipe (repository-relative paths)."""


class Assets(dict):
    """Model paths for `substitute`: the reward and data stand-ins, and each family's stand-in
    pipeline, built on first use (only the families a test's configs name)."""

    def __init__(self, root: Path, **assets: str) -> None:
        super().__init__(**assets)
        self.root = root

    def __missing__(self, name: str) -> str:
        if name not in FAMILIES:
            raise KeyError(name)
        self[name] = str(FAMILIES[name].build_stand_in(self.root / name))
        return self[name]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """A tiny open_clip checkpoint (HPS layout), a tiny VideoAlign, a tiny PickScore, a prompt file, first frames,
    and (lazily) the registered families' stand-in pipelines."""
    import open_clip

    root = tmp_path_factory.mktemp("stand_ins")
    (root / "open_clip_cfg").mkdir()
    (root / "open_clip_cfg" / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(root / "open_clip_cfg")
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save({"state_dict": clip.state_dict()}, root / "HPS_v2.1_compressed.pt")
    (root / "prompts.txt").write_text("a red circle\na blue square\na cat on a sofa\na photo of a dog\n")
    frames = root / "frames"
    frames.mkdir()
    rows = []
    for i, prompt in enumerate(["a red circle", "a blue square", "a cat on a sofa", "a photo of a dog"]):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(frames / f"{i}.png")
        rows.append(json.dumps({"prompt": prompt, "image": f"frames/{i}.png"}))
    (root / "first_frames.jsonl").write_text("\n".join(rows) + "\n")
    videoreward, qwen, *_ = write_tiny_videoreward(root / "videoalign")
    pickscore_model, pickscore_processor = write_tiny_pickscore(root / "pickscore")
    return Assets(
        root,
        videoalign=str(videoreward),
        qwen=str(qwen),
        first_frames=str(root / "first_frames.jsonl"),
        clip=str(root / "HPS_v2.1_compressed.pt"),
        prompts=str(root / "prompts.txt"),
        pickscore_model=str(pickscore_model),
        pickscore_processor=str(pickscore_processor),
    )


def substitute(node, assets: dict[str, str]):
    """Point every model path of a config at the tiny stand-ins, keeping all other values: a
    registered family's policy gets its stand-in (`Family.recipe_arguments`)."""
    if isinstance(node, list):
        return [substitute(item, assets) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: substitute(value, assets) for key, value in node.items()}
    class_path = str(node.get("class_path", ""))
    name = class_path.rsplit(".", 1)[-1]
    args = node.setdefault("init_args", {}) if "class_path" in node else {}
    family = family_of(class_path) if class_path else None
    if family is not None:
        args.update(family.recipe_arguments(assets[family.name]))
    elif name == "DDIMSDESampler" and "pretrained_model_name_or_path" in args:
        args["pretrained_model_name_or_path"] = assets["sd"]
    elif name in ("HPSReward", "ClipScore"):
        args.update(checkpoint=assets["clip"], architecture=TINY_OPEN_CLIP)
        if name == "ClipScore":  # the tiny stand-in has no open_clip registry entry (DFN5B's: squash)
            args["pretrained_tag"] = None
    elif name == "PickScore":
        args.update(model_dir=assets["pickscore_model"], processor_dir=assets["pickscore_processor"])
    elif name == "VideoAlignReward":
        args.update(checkpoint_dir=assets["videoalign"], base_model_dir=assets["qwen"], dtype="float32")
    elif name == "PromptDataModule":
        args["train_files"] = assets["prompts"]
    elif name == "ImagePromptDataModule":
        args.update(train_files=assets["first_frames"], image_size=16)
    return node


def instantiate(config: Path, assets: dict[str, str], tmp_path: Path):
    raw = yaml.safe_load(config.read_text())
    raw = substitute(raw, assets)
    raw.setdefault("trainer", {}).update(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path))
    raw["trainer"].pop("strategy", None)
    raw["trainer"].pop("precision", None)
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(raw))
    return run(["-c", str(path)], subcommand=False)


def test_there_are_configs():
    assert {"tiny.yaml", "flux_hps.yaml", "sd14_hps.yaml", "hunyuan_t2v_videoalign.yaml", "skyreels_i2v_mq.yaml"} <= {c.name for c in CONFIGS}
    assert {str(c.relative_to(ROOT)) for c in CONFIGS} >= set(FAMILY_RECIPES)  # every family's recipe is shipped
    for family in FAMILIES.values():  # ... and it is a recipe of that family
        policy = yaml.safe_load((ROOT / family.config).read_text())["model"]["policy"]
        assert family_of(policy["class_path"]) is not None and family.serves(policy["class_path"]), family.name


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_opens_with_a_comment_and_instantiates(config, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo configs name repository-relative paths, as the README runs them
    text = config.read_text()
    assert text.startswith("#") and "Launch:" in text, f"{config.name} must open with purpose / launch comment"
    cli = instantiate(config, stand_ins, tmp_path)
    assert isinstance(cli.model, GRPOModule)
    raw = yaml.safe_load(text)
    # the recipe's values arrive in the module unchanged
    for key in ("group_size", "timestep_fraction", "clip_range"):
        if key in raw["model"]:
            assert cli.model.hparams[key] == raw["model"][key]
    policy_class = raw["model"]["policy"]["class_path"].rsplit(".", 1)[-1]
    assert type(cli.model.policy).__name__ == policy_class
    assert cli.model.sampler.paradigm == cli.model.policy.paradigm
    if "sampler" not in raw["model"]:  # the family's own sampler, with the policy's settings
        args = raw["model"]["policy"]["init_args"]
        assert type(cli.model.sampler) is type(cli.model.policy.build_sampler())
        assert cli.model.sampler.num_steps == args.get("num_sampling_steps", cli.model.policy.default_num_steps)
        assert cli.model.sampler.eta == args.get("sampling_eta", cli.model.policy.default_eta)
        if args.get("sampling_shift") is not None:
            assert cli.model.sampler.shift == args["sampling_shift"]
        if args.get("sampling_noise_form") is not None:
            assert cli.model.sampler.noise_form == args["sampling_noise_form"]


@pytest.mark.parametrize("config_name", FAMILY_RECIPES + ["configs/flux_hps_clip.yaml"])
def test_two_step_cpu_fit_of_each_family(config_name, stand_ins, tmp_path, monkeypatch):
    """Two GRPO optimizer steps of each registered family's recipe on its stand-in, through
    `lightning-grpo fit -c` (the real CLI, with its default callbacks and logger), the recipe
    shrunk to CPU size: CPU, one device, no strategy or precision, G = 2, 3 sampling steps."""
    monkeypatch.chdir(ROOT)  # any repository-relative path in the recipe resolves as in the README
    raw = substitute(yaml.safe_load((ROOT / config_name).read_text()), stand_ins)
    trainer = {k: v for k, v in raw.get("trainer", {}).items() if k not in ("strategy", "precision", "num_nodes", "logger")}
    trainer.update(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, default_root_dir=str(tmp_path),
                   logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path), "name": "fit"}})
    raw["trainer"] = trainer
    raw["model"].update(group_size=2, micro_batch_size=2, samples_per_update=None, rollout_batch_size=None, show_progress=False)
    if raw["model"].get("best_of_n"):  # keep top 1 + bottom 1 of the shrunk group
        raw["model"]["best_of_n"] = [1, 1]
    if "sampler" in raw["model"]:
        raw["model"]["sampler"]["init_args"]["num_steps"] = 3
    else:
        raw["model"]["policy"]["init_args"]["num_sampling_steps"] = 3
    raw["data"]["init_args"]["batch_size"] = 1
    path = tmp_path / Path(config_name).name
    path.write_text(yaml.safe_dump(raw))
    cli = run(["fit", "-c", str(path)])
    assert cli.trainer.global_step == 2
    assert cli.trainer.callback_metrics["train/ratio/first_update_max_dev"] <= 1e-6
    assert any((tmp_path / "fit").rglob("events.out.tfevents*"))  # the logger wrote the run
    # GRPO moved the trained weights: LoRA B matrices start at zero, full fine-tuning at the stand-in's weights
    policy_args = raw["model"]["policy"]
    fresh = dict(family_of(policy_args["class_path"]).policy_type()(**policy_args["init_args"]).named_parameters())
    trained = {n: p.detach() for n, p in cli.model.policy.named_parameters() if p.requires_grad}
    assert trained
    moved = [n for n, p in trained.items() if ("lora_B" in n and p.abs().max() > 0) or ("lora_" not in n and not torch.equal(p, fresh[n]))]
    assert moved


REAL_RECIPES = [c for c in CONFIGS if (yaml.safe_load(c.read_text())["trainer"] or {}).get("accelerator") == "gpu"]


@pytest.mark.parametrize("config", REAL_RECIPES, ids=[c.name for c in REAL_RECIPES])
def test_real_recipe_strategy_and_callbacks_are_accepted(config):
    """Each real recipe's strategy and callbacks, as written, build (the instantiation test above
    leaves the strategy out: a CPU run cannot start it). Before (issue 27), flux_hps.yaml,
    flux_hps_binary.yaml and flux_hps_clip.yaml gave DenoiserFSDPStrategy a `replicate_frozen`
    option it does not have: `lightning-grpo fit -c configs/flux_hps.yaml` stopped at parsing."""
    from lightning.pytorch.cli import instantiate_class

    trainer = yaml.safe_load(config.read_text())["trainer"]
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        instantiate_class((), strategy)
    for callback in trainer.get("callbacks", []):
        instantiate_class((), callback)


def test_fsdp_recipe_trains_a_step_with_its_strategy_and_callbacks(stand_ins, tmp_path, monkeypatch):
    """configs/flux_hps_fsdp.yaml (the official 8-GPU FLUX variant) with its own strategy
    (DenoiserFSDPStrategy, bf16 all-gathers) and callbacks (GRPOCheckpoint, EMA on the CPU), on one
    CPU process: a step, a sharded checkpoint holding the EMA of the sharded weights. Before,
    the EMA callback refused sharded weights at fit start, so the recipe could not start."""
    monkeypatch.chdir(ROOT)
    raw = substitute(yaml.safe_load((ROOT / "configs" / "flux_hps_fsdp.yaml").read_text()), stand_ins)
    trainer = raw["trainer"]
    trainer.update(accelerator="cpu", devices=1, max_steps=1, logger=False, default_root_dir=str(tmp_path),
                   enable_progress_bar=False, limit_val_batches=0)
    trainer.pop("precision")  # bf16 autocast of a CPU test adds nothing here
    trainer["callbacks"][0]["init_args"].update(every_n_train_steps=1)
    raw["model"].update(group_size=2, micro_batch_size=2, samples_per_update=None, show_progress=False, rollout_batch_size=2)
    raw["model"]["sampler"]["init_args"]["num_steps"] = 3
    path = tmp_path / "flux_hps_fsdp.yaml"
    path.write_text(yaml.safe_dump(raw))
    cli = run(["-c", str(path)], subcommand=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    saved = tmp_path / "checkpoints" / "epoch=0-step=1.ckpt"
    assert saved.is_dir() and (saved / "checksums.json").is_file() and (saved / "callbacks" / ".metadata").is_file()
