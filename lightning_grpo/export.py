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

Beside them, `generation_settings.json` records how the run generated (`generation_settings`):
the pipeline class, the base model, and the keyword arguments of the pipeline call that samples
what the run's deterministic samples show (resolution, frames, steps, guidance, sequence length,
prompt template, negative prompt): `pipe(prompt, **settings["call"])`. A toy pipeline asked for
the diffusers defaults instead (512×512, 28 steps, 512 tokens) draws noise.

Launched on several ranks (torchrun, srun), rank 0 exports and the others do nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_grpo.checkpointing import is_sharded_checkpoint, read_sharded_state, sharded_keys
from lightning_grpo.policies.family import DiffusersPolicy, resolve_class


SETTINGS_FILE = "generation_settings.json"


def read_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A fit config as a dict (from its file, or as given)."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    return yaml.safe_load(path.read_text())


def policy_from_config(config: str | Path | dict[str, Any]) -> DiffusersPolicy:
    """Instantiate `model.policy` ({class_path, init_args}) of a fit config (a file or its dict)."""
    config = read_config(config)
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


def run_sampler(config: dict[str, Any], policy: DiffusersPolicy):
    """The sampler the run used: the config's `model.sampler`, else the policy's own (as GRPOModule)."""
    spec = (config.get("model") or {}).get("sampler")
    if isinstance(spec, dict) and "class_path" in spec:
        return resolve_class(spec["class_path"])(**(spec.get("init_args") or {}))
    return policy.build_sampler()


def _json_value(value: Any) -> Any:
    """`value` as JSON, or None when it has no JSON form (a generator): per-prompt lists of one
    text (the negative prompt for one prompt) become the text, which pipelines broadcast."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    try:
        json.dumps(value)
    except TypeError:
        return None
    return value


def _pipeline_schedule_matches(policy: DiffusersPolicy, sampler) -> bool:
    """Whether the plain pipeline, given `num_inference_steps`, steps through the run's schedule:
    flow families compare sigmas with the pipeline's own (`pipeline_sigmas`), the others
    the timesteps of the family's sampler built from the checkpoint's scheduler."""
    steps = sampler.num_steps
    if hasattr(policy, "pipeline_sigmas") and hasattr(sampler, "sigmas"):
        reference = torch.as_tensor(policy.pipeline_sigmas(steps), dtype=torch.float32)
        return reference.shape == sampler.sigmas.shape and bool(torch.allclose(sampler.sigmas.float(), reference, atol=1e-4))
    reference = policy.build_sampler(num_steps=steps)
    return torch.equal(torch.as_tensor(reference.timesteps), torch.as_tensor(sampler.timesteps))


def generation_settings(policy: DiffusersPolicy, sampler) -> dict[str, Any]:
    """What `generation_settings.json` holds (module doc): `call` are the pipeline-call arguments
    of the run's deterministic samples (`pipeline_call_kwargs` with `num_inference_steps` = the
    sampler's steps; what has no JSON form, such as first-frame generators, is left out);
    `schedule_matches_run` says whether the pipeline's scheduler steps through the run's
    sigmas / timesteps at those steps (else its images differ somewhat from the run's)."""
    call = {k: _json_value(v) for k, v in policy.pipeline_call_kwargs(1).items()}
    call = {k: v for k, v in call.items() if v is not None}
    call["num_inference_steps"] = int(sampler.num_steps)
    return {
        "pipeline": policy.pipeline_class,
        "weights": "full pipeline" if policy.lora_rank == 0 else "LoRA: load into the base model's pipeline",
        "base_model": str(policy.pretrained_model_name_or_path),
        "call": call,
        "schedule_matches_run": _pipeline_schedule_matches(policy, sampler),
    }


def export_checkpoint(config: str | Path | dict[str, Any], checkpoint: str | Path, out: str | Path) -> Path:
    """Rebuild the policy of `config`, load `checkpoint` into it, export it to `out` and write the
    run's generation settings beside it (`generation_settings.json`)."""
    config = read_config(config)
    policy = policy_from_config(config)
    load_trained_weights(policy, checkpoint)
    out = policy.export(out)
    settings = generation_settings(policy, run_sampler(config, policy))
    (Path(out) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return out


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
    settings = json.loads((Path(out) / SETTINGS_FILE).read_text())
    print(f"exported to {out}; generation settings in {Path(out) / SETTINGS_FILE}: {settings['call']}")
    return out


__all__ = ["SETTINGS_FILE", "export_checkpoint", "generation_settings", "load_trained_weights", "main", "policy_from_config", "run_sampler"]
