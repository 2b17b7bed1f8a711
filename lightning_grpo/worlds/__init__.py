"""The embedded default: the shapes world (renderer, prompts and split, verifier reward).

Public API re-exported from `lightning_grpo.toy.shapes`; see that module's `__all__`.
"""

from lightning_grpo.toy.shapes import *  # noqa: F401,F403
from lightning_grpo.toy.shapes import __all__  # noqa: F401
