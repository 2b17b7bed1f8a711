"""lightning-grpo: GRPO fine-tuning of visual generators (DanceGRPO) on PyTorch Lightning."""

__version__ = "0.1.0"
