"""An `async_scoring` fit of the weight-free TinyPolicy on 1 or 2 CPU processes (gloo), with a
checkpoint (`GRPOCheckpoint`) after every optimizer step, optionally resumed from one.

Run as a script (Lightning's DDP launcher re-runs it once per rank):
    python tests/distributed/async_ddp_run.py --out DIR --devices 2 --steps 4 [--ckpt PATH]
tests/distributed/test_async_ddp.py compares a resumed run with an uninterrupted one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy

from lightning_grpo.checkpointing import GRPOCheckpoint
from lightning_grpo.datamodules.prompts import PromptDataModule
from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards import JpegIncompressibility
from lightning_grpo.samplers import FlowSDESampler

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = GRPOModule(
        TinyPolicy(paradigm="flow", resolution=8), FlowSDESampler(num_steps=4, eta=0.7, shift=3.0), [JpegIncompressibility()],
        group_size=4, timestep_fraction=0.5, micro_batch_size=4, samples_per_update=4, clip_range=0.2, learning_rate=1e-3,
        show_progress=False, seed=1, async_scoring=True,
    )
    data = PromptDataModule(str(ROOT / "configs" / "prompts" / "tiny.txt"), batch_size=2, num_workers=0)
    checkpoints = GRPOCheckpoint(every_n_train_steps=1, keep_last=-1, keep_best=0, dirpath=str(Path(args.out) / "checkpoints"))
    strategy = DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    trainer = Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False, callbacks=[checkpoints],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.ckpt)


if __name__ == "__main__":
    main()
