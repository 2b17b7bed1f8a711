"""`lightning-grpo export`: a trained checkpoint out of the framework, for plain diffusers.

    lightning-grpo export --config runs/grpo/version_0/config.yaml \
        --ckpt_path runs/grpo/version_0/checkpoints/last.ckpt --out exported/

The config is the one the run saved (LightningCLI writes `config.yaml` into the run folder); its
`model.policy` rebuilds the policy (frozen parts from the base model folder), the checkpoint's
`policy.*` entries fill in the trained weights, and `DiffusersPolicy.export` writes:

    full fine-tuning   a diffusers pipeline folder:   FluxPipeline.from_pretrained("exported/")
    LoRA               pytorch_lora_weights.safetensors:
                       FluxPipeline.from_pretrained(base).load_lora_weights("exported/")

Launched on several ranks (torchrun, srun), rank 0 exports and the others do nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only

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
    """Copy the checkpoint's `policy.*` weights into `policy`.

    Checkpoints hold only the trainable weights (frozen ones are rebuilt from the base model), so
    every trainable parameter must be there and nothing unknown; each mismatch is named.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(weights))
    result = policy.load_state_dict(weights, strict=False)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the configured policy: missing trainable weights "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )


def export_checkpoint(config: str | Path | dict[str, Any], checkpoint: str | Path, out: str | Path) -> Path:
    """Rebuild the policy of `config`, load `checkpoint` into it and export it to `out`."""
    policy = policy_from_config(config)
    load_trained_weights(policy, checkpoint)
    return policy.export(out)


def main(argv: list[str] | None = None) -> Path | None:
    """`lightning-grpo export`. Under a multi-process launcher (torchrun, srun, a job script that
    runs every command on N ranks: RANK / LOCAL_RANK / SLURM_PROCID set) only rank zero exports;
    the others return None at once, so the folder is written once and never by two processes.
    Exporting needs no collective: no process group is started."""
    parser = argparse.ArgumentParser(prog="lightning-grpo export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="the run's config.yaml (model.policy is read)")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of that run")
    parser.add_argument("--out", required=True, help="folder to write (pipeline folder, or LoRA weights)")
    args = parser.parse_args(argv)
    if rank_zero_only.rank != 0:  # Lightning reads the launcher's rank variables at import
        print(f"export: rank {rank_zero_only.rank} leaves the export to rank 0")
        return None
    out = export_checkpoint(args.config, args.ckpt_path, args.out)
    print(f"exported to {out}")
    return out


__all__ = ["export_checkpoint", "load_trained_weights", "main", "policy_from_config"]
