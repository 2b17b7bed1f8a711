"""`lightning-grpo` with `Trainer.log_dir` resolved without a collective (test shim, issue 27).

Lightning's `Trainer.log_dir` broadcasts rank zero's folder: a collective. The callbacks that
write files on rank zero only (ODEVisualizer, RewardLogger, HeldOutEvaluation,
RewardHackingMonitor, GRPOModule.on_test_epoch_end) call it there, so every multi-process run
with them hangs; fixing those callbacks is another part of issue 27 (the DDP work, branch wip/ddp:
`callbacks/_logging.RunFolder`, resolved in every rank's `setup`). Until that is merged, the FSDP
CLI tests run the real CLI through this file, where `log_dir` returns the calling rank's own
logger folder (rank zero's is the one files go to) without communicating. Once it is merged,
delete this file and run `lightning_grpo` in tests/distributed/test_fsdp_cli.py instead.
Usage: python tests/distributed/cli_rank_zero_log_dir.py fit -c ... (Lightning's launcher re-runs
this same file for the other ranks, so they are patched too).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402


def _local_log_dir(self: Trainer) -> str | None:
    if not self.loggers:
        return self.default_root_dir
    logger = self.loggers[0]
    return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir


Trainer.log_dir = property(_local_log_dir)

if __name__ == "__main__":
    from lightning_grpo.cli import main

    main()
