"""`lightning-grpo list`: every shipped class a config can name, by the option that takes it.

    lightning-grpo list              # each class path with the first line of its docstring
    lightning-grpo list rewards      # one kind

`CATALOG` is also what the CLI imports before building its parser, so `lightning-grpo fit --help`
lists every shipped reward, policy, sampler, callback, ... under "known subclasses" (jsonargparse
lists the subclasses imported at that time; the model-backed rewards import their model libraries
only when built, so this stays cheap). `tests/cli/test_help.py` checks that the catalog holds every
concrete public class of the package.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

def shipped_policies() -> list[str]:
    """Every concrete policy class of `lightning_grpo.policies`: the registered families first
    (registry order), then the others (the weight-free tiny policy), so a new family is listed
    by its registry entry alone."""
    import pkgutil

    import lightning_grpo.policies as package
    from lightning_grpo.policies.base import PolicyAdapter
    from lightning_grpo.policies.registry import FAMILIES

    paths = [family.policy_class for family in FAMILIES.values()]
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        for obj in vars(importlib.import_module(info.name)).values():
            if (inspect.isclass(obj) and issubclass(obj, PolicyAdapter) and obj.__module__ == info.name
                    and not obj.__name__.startswith("_") and not inspect.isabstract(obj)):
                paths.append(f"{obj.__module__}.{obj.__qualname__}")
    return list(dict.fromkeys(paths))


CATALOG: dict[str, tuple[str, list[str]]] = {
    "policies": ("model.policy", shipped_policies()),
    "samplers": ("model.sampler", [
        "lightning_grpo.samplers.FlowSDESampler",
        "lightning_grpo.samplers.DDIMSDESampler",
    ]),
    "step schedules": ("model.step_schedule", [
        "lightning_grpo.samplers.AllSteps",
        "lightning_grpo.samplers.SlidingWindow",
        "lightning_grpo.samplers.RandomBranch",
    ]),
    "ODE tails": ("model.ode_tail", [
        "lightning_grpo.samplers.MultistepODETail",
    ]),
    "objectives": ("model.objective", [
        "lightning_grpo.objectives.GRPO",
        "lightning_grpo.objectives.DiffusionNFT",
    ]),
    "rewards": ("model.rewards", [
        "lightning_grpo.rewards.HPSReward",
        "lightning_grpo.rewards.ClipScore",
        "lightning_grpo.rewards.PickScore",
        "lightning_grpo.rewards.VideoAlignReward",
        "lightning_grpo.rewards.Binary",
        "lightning_grpo.rewards.JpegCompressibility",
        "lightning_grpo.rewards.JpegIncompressibility",
        "lightning_grpo.rewards.RemoteReward",
        "lightning_grpo.rewards.OpenAIJudgeReward",
        "lightning_grpo.rewards.Delayed",
        "lightning_grpo.worlds.shapes.verifier.ShapesVerifier",
        "lightning_grpo.worlds.moving_shapes.verifier.MovingShapesVerifier",
        "lightning_grpo.worlds.moving_shapes.verifier.FirstFrameFidelity",
        "lightning_grpo.worlds.moving_shapes.verifier.FirstFrameAdherence",
    ]),
    "first frames": ("model.first_frames", [
        "lightning_grpo.first_frames.GeneratedFirstFrames",
        "lightning_grpo.worlds.moving_shapes.data.MotionFirstFrames",
    ]),
    "callbacks": ("trainer.callbacks", [
        "lightning_grpo.checkpointing.GRPOCheckpoint",
        "lightning_grpo.progress.GRPOProgressBar",
        "lightning_grpo.callbacks.RewardLogger",
        "lightning_grpo.callbacks.DiversityMonitor",
        "lightning_grpo.callbacks.ODEVisualizer",
        "lightning_grpo.callbacks.EMA",
        "lightning_grpo.callbacks.HeldOutEvaluation",
        "lightning_grpo.callbacks.RewardHackingMonitor",
        "lightning_grpo.callbacks.TestReport",
        "lightning_grpo.checkpointing.RunLock",  # added to every fit by the CLI; listed for Python users
    ]),
    "data modules": ("data", [
        "lightning_grpo.datamodules.prompts.PromptDataModule",
        "lightning_grpo.datamodules.image_prompts.ImagePromptDataModule",
        "lightning_grpo.worlds.moving_shapes.data.MotionFirstFrameDataModule",
    ]),
}
"""kind -> (the config option that takes it, class paths as a config writes them)."""


def resolve(path: str) -> type:
    """The class at a dotted `path` (the module imported)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def import_shipped() -> list[type]:
    """Import every catalogued class (so jsonargparse's help lists them); returns them."""
    return [resolve(path) for _, paths in CATALOG.values() for path in paths]


def purpose(cls: type) -> str:
    """The first sentence-line of a class's docstring (its one-line purpose)."""
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def listing(kinds: list[str] | None = None) -> str:
    """The text `lightning-grpo list` prints."""
    blocks = []
    for kind in kinds or list(CATALOG):
        option, paths = CATALOG[kind]
        lines = [f"{kind} ({option}):"]
        lines += [f"  {path}\n      {purpose(resolve(path))}" for path in paths]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\nOptions of one class: lightning-grpo fit --<option>.help <class>, e.g. --model.rewards.help ShapesVerifier"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-grpo list", description="List the shipped classes a config can name, by option.")
    parser.add_argument("kinds", nargs="*", metavar="KIND", help=f"only these kinds, of: {', '.join(repr(k) for k in CATALOG)}")
    args = parser.parse_args(argv)
    unknown = [k for k in args.kinds if k not in CATALOG]
    if unknown:
        parser.error(f"unknown kind {unknown[0]!r}: choose from {', '.join(repr(k) for k in CATALOG)}")
    print(listing(args.kinds or None))


__all__ = ["CATALOG", "import_shipped", "listing", "main", "purpose", "resolve"]
