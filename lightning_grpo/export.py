"""`lightning-grpo export`: a trained checkpoint out of the framework, for plain diffusers.

    lightning-grpo export --config runs/grpo/version_0/config.yaml \
        --ckpt_path runs/grpo/version_0/checkpoints/last.ckpt --out exported/

(`last.ckpt` is a file, or a folder of shards for runs sharded by `DenoiserFSDPStrategy`.)

The config is the one the run saved (LightningCLI writes `config.yaml` into the run folder); its
`model.policy` rebuilds the policy (frozen parts from the base model folder), the checkpoint's
`policy.*` entries fill in the trained weights, and `DiffusersPolicy.export` writes:

    full fine-tuning   a diffusers pipeline folder:   FluxPipeline.from_pretrained("exported/")
    LoRA               pytorch_lora_weights.safetensors:
                       FluxPipeline.from_pretrained(base).load_lora_weights("exported/")
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_grpo.checkpointing import is_sharded_checkpoint, read_sharded_state, sharded_keys
from lightning_grpo.policies.family import DiffusersPolicy, resolve_class


def policy_from_config(config: str | Path | dict[str, Any]) -> DiffusersPolicy:
    """Instantiate `model.policy` ({class_path, init_args}) of a fit config (a file or its dict)."""
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        config = yaml.safe_load(path.read_text())
    spec = (config.get("model") or {}).get("policy") if isinstance(config, dict) else None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError("the config has no model.policy with a class_path")
    cls = resolve_class(spec["class_path"])
    if not (isinstance(cls, type) and issubclass(cls, DiffusersPolicy)):
        raise ValueError(f"{spec['class_path']} is not a diffusers-backed policy (DiffusersPolicy): it cannot be exported")
    return cls(**(spec.get("init_args") or {}))


def load_trained_weights(policy: DiffusersPolicy, checkpoint: str | Path) -> None:
    """Copy the checkpoint's `policy.*` weights into `policy`: a checkpoint file, or a sharded
    checkpoint folder (`DenoiserFSDPStrategy`), whose shards are read here in one process.

    Checkpoints hold only the trainable weights (frozen ones are rebuilt from the base model), so
    every trainable parameter must be there and nothing unknown; each mismatch is named.
    """
    path = Path(checkpoint)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    if is_sharded_checkpoint(path):  # DenoiserFSDPStrategy: the shards of every rank, read in this process
        saved = {k.removeprefix("policy.") for k in sharded_keys(path) if k.startswith("policy.")}
        missing, unexpected = sorted(trainable - saved), sorted(saved - {name for name, _ in policy.named_parameters()})
        if not missing and not unexpected:
            params = dict(policy.named_parameters())
            read_sharded_state(path, {f"policy.{name}": params[name].detach() for name in sorted(saved)})  # in place
    else:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        missing = sorted(trainable - set(weights))
        unexpected = policy.load_state_dict(weights, strict=False).unexpected_keys
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the configured policy: missing trainable weights "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )


def export_checkpoint(config: str | Path | dict[str, Any], checkpoint: str | Path, out: str | Path) -> Path:
    """Rebuild the policy of `config`, load `checkpoint` into it and export it to `out`."""
    policy = policy_from_config(config)
    load_trained_weights(policy, checkpoint)
    return policy.export(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="lightning-grpo export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="the run's config.yaml (model.policy is read)")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of that run")
    parser.add_argument("--out", required=True, help="folder to write (pipeline folder, or LoRA weights)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.config, args.ckpt_path, args.out)
    print(f"exported to {out}")
    return out


__all__ = ["export_checkpoint", "load_trained_weights", "main", "policy_from_config"]
