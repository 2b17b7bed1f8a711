"""Error classes shared across the package, by what the user has to do about them.

- `InputError`: the run cannot work with what it was given (an option, a file, a checkpoint, the
  data, a folder another run holds). The message names the culprit and says what to change, so
  `lightning-grpo` prints it alone, without a traceback, and exits with status 2
  (`lightning_grpo.cli.main`); `ConfigError`, `CheckpointError`, `NoTrainingBatchError`,
  `MalformedRecordError` and `RunLockedError` derive from it.
- `NonFiniteError`: training produced NaN/inf (loss, gradient norm, weights, model outputs); the
  message names the step and the quantity. Printed alone as well, exit status 1.
"""

from __future__ import annotations


class InputError(Exception):
    """A bad option, file, checkpoint or folder: the message alone tells the user what to fix."""


class NonFiniteError(RuntimeError):
    """NaN or inf in the loss, the gradient norm, the weights or the model's outputs."""


__all__ = ["InputError", "NonFiniteError"]
