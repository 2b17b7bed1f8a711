"""Policy adapters: one base-model family per file."""

from lightning_grpo.policies.base import PolicyAdapter

__all__ = ["PolicyAdapter"]
