"""Rewards: the contract and the combinators; model-backed rewards import their heavy deps lazily.

`import lightning_grpo.rewards` stays cheap (no open_clip / transformers): the reward classes are
resolved on first attribute access (PEP 562), and each imports its model library only when built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_grpo.rewards.base import Binary, MultiReward, Reward, RewardError

# public name -> submodule defining it
_LAZY = {
    "CheckpointMismatchError": "_common",
    "ClipScore": "clip_score",
    "Delayed": "delayed",
    "HPSReward": "hps",
    "JpegCompressibility": "compressibility",
    "JpegIncompressibility": "compressibility",
    "OpenAIJudgeReward": "judge",
    "PickScore": "pickscore",
    "RemoteReward": "remote",
    "VideoAlignReward": "videoalign",
}

__all__ = ["Binary", "MultiReward", "Reward", "RewardError", *sorted(_LAZY)]

if TYPE_CHECKING:
    from lightning_grpo.rewards._common import CheckpointMismatchError
    from lightning_grpo.rewards.clip_score import ClipScore
    from lightning_grpo.rewards.compressibility import JpegCompressibility, JpegIncompressibility
    from lightning_grpo.rewards.delayed import Delayed
    from lightning_grpo.rewards.hps import HPSReward
    from lightning_grpo.rewards.judge import OpenAIJudgeReward
    from lightning_grpo.rewards.pickscore import PickScore
    from lightning_grpo.rewards.remote import RemoteReward
    from lightning_grpo.rewards.videoalign import VideoAlignReward


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
