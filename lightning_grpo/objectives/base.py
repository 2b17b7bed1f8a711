"""The objective contract: what differs between RL objectives, behind one small interface.

`GRPOModule` runs every step the same way: roll out → score → `Objective.targets` → update (the
module's optimizer loop, calling `Objective.loss` per micro-batch × trained column) → log
(`Objective.summarize`). An objective owns:

- what a rollout must record (`needs`: SDE transitions with log-probabilities, or any ODE
  solution; shared initial noise within a group or not);
- how scores become training targets (`targets`: group-normalised advantages, best-of-n);
- what each sample trains on (`prepare`: the timesteps, per sample, and anything precomputed);
- the loss of a micro-batch at one trained column and its statistics (`loss`), and how those
  statistics are logged (`summarize`);
- optional state and hooks: refusals at construction (`attach`), weights to roll out with
  (`sampling_weights`), work after a rollout's optimizer steps (`after_update`).

Objectives are `nn.Module`s so that state they keep (DiffusionNFT's old policy) moves with the
LightningModule and is saved in its checkpoints. docs/architecture.md ("How to add an objective")
walks through a new one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from lightning_grpo.grpo.advantages import effective_advantages
from lightning_grpo.types import Rollout
from lightning_grpo.validation import ConfigError, Range, check_ranges

if TYPE_CHECKING:
    from lightning_grpo.module import GRPOModule


@dataclass(frozen=True)
class RolloutNeeds:
    """What an objective needs from a rollout.

    Attributes:
        log_probs: SDE transitions with their log-densities (the sampler's eta > 0; a step schedule
            picks which steps are SDE steps). False: the rollout integrates the ODE (no noise after
            x_0, no log-probability), e.g. with the sampler's own steps or a `MultistepODETail`.
        shared_noise: the default of `GRPOModule(shared_noise=None)`: the G samples of a prompt
            start from the same x_0 (GRPO's finding) or from their own (an ODE rollout must: from
            a shared x_0 every sample of a group would be the same).
    """

    log_probs: bool
    shared_noise: bool


@dataclass
class Targets:
    """What the objective makes of one step's scores (`Objective.targets`).

    Attributes:
        values: Tensor[B'] or Tensor[B', K] per trained sample, what the loss consumes (GRPO's
            clamped advantages; "per_reward": one column per reward).
        chosen: LongTensor[B'] indices of the trained samples among the scored ones (best-of-n),
            or None when every scored sample is trained.
        per_reward: {name: Tensor[B]} each reward normalised within its group, for every scored
            sample (`StepRecord.reward_advantages`).
        reward_weights: Tensor[K] of the rewards' weights when `values` has a column per reward.
    """

    values: Tensor
    chosen: Tensor | None
    per_reward: dict[str, Tensor]
    reward_weights: Tensor | None = None

    @property
    def advantages(self) -> Tensor:
        """Tensor[B']: the one number each trained sample is pushed by (`values` itself, or
        Σ_k w_k·A_k of per-reward columns; logging and `StepRecord.advantages`)."""
        return effective_advantages(self.values.detach(), self.reward_weights)

    def rows(self, rows: Tensor) -> Targets:
        """The targets of the trained samples at `rows` (groups spanning ranks keep their own)."""
        return replace(self, values=self.values[rows], chosen=None)

    @staticmethod
    def empty() -> Targets:
        """No sample to train (every group dropped on this rank)."""
        return Targets(values=torch.zeros(0), chosen=None, per_reward={})


@dataclass
class Prepared:
    """One rollout made ready for the update (`Objective.prepare`).

    Attributes:
        rollout: the trained samples [B'].
        targets: their `Targets`.
        columns: LongTensor[B', C]: per sample, the C things it trains on (GRPO: sampling-step
            indices; DiffusionNFT: noise levels); the update runs micro-batches × columns.
        extra: whatever the objective precomputed for its loss.
    """

    rollout: Rollout
    targets: Targets
    columns: Tensor
    extra: dict[str, Any]

    @property
    def num_columns(self) -> int:
        return int(self.columns.shape[1])


class Objective(nn.Module, ABC):
    """An RL objective for `GRPOModule(objective=...)` (see the module docstring for the contract).

    Class attributes:
        needs: `RolloutNeeds` of its rollouts.
        ranges: its numeric options and their ranges (checked at construction, and by the CLI
            before anything loads: `validation.validate_config`).
    """

    needs: ClassVar[RolloutNeeds]
    ranges: ClassVar[dict[str, Range]] = {}

    # -- options -------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The constructor's options, in order (what `model.objective.init_args` takes)."""
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")

    def options(self) -> dict[str, Any]:
        """{option: value} as configured (every option of `option_names`)."""
        return {name: getattr(self, name) for name in self.option_names()}

    def with_options(self, changes: Mapping[str, Any]) -> Objective:
        """A new objective of this class with `changes` applied to its options."""
        return type(self)(**{**self.options(), **changes})

    def check_options(self) -> None:
        """Each numeric option in its range (`ranges`), named as a config writes it."""
        check_ranges(self.options(), self.ranges, "model.objective.init_args.")

    # -- the contract --------------------------------------------------------------------------
    def attach(self, module: GRPOModule) -> None:
        """Called once by `GRPOModule.__init__` with the policy, sampler and rewards built: refuse
        what cannot work (a paradigm, a sampler, CFG) and build state that depends on the policy."""

    def trained_group_size(self, group_size: int) -> int:
        """Samples trained per group of `group_size` (fewer with best-of-n)."""
        return group_size

    @property
    def selects(self) -> bool:
        """Whether `targets` may train a subset of the scored samples (best-of-n): ranks holding
        parts of a group may then train different numbers of samples."""
        return False

    @property
    def uses_reference(self) -> bool:
        """Whether the update needs the frozen initial policy (`GRPOModule.reference_policy`)."""
        return False

    @abstractmethod
    def targets(self, scores: dict[str, Tensor], weights: dict[str, float], group_size: int) -> Targets:
        """Step 4 on whole groups: {name: Tensor[B]} scores (groups contiguous) → `Targets`."""

    @abstractmethod
    def prepare(self, module: GRPOModule, rollout: Rollout, targets: Targets, seed: int) -> Prepared:
        """What each trained sample trains on; `seed` keys any random choice (with the samples'
        `Rollout.sample_keys`, so it does not depend on the rank or the batch)."""

    @abstractmethod
    def loss(self, module: GRPOModule, prepared: Prepared, samples: Tensor, column: int) -> tuple[Tensor, Any]:
        """(mean loss of samples `samples` [m] at their column `column`, its statistics). The
        module weights it for accumulation and calls backward."""

    @abstractmethod
    def summarize(self, stats: list[Any]) -> dict[str, Tensor]:
        """{name: value} logged under `train/` from the statistics of one step's `loss` calls."""

    def sampling_weights(self, module: GRPOModule) -> AbstractContextManager:
        """Entered around the rollout: the weights to sample with (default: the current ones)."""
        return nullcontext()

    def after_update(self, module: GRPOModule) -> None:
        """Called after the optimizer steps of every rollout (default: nothing)."""


def resolve_objective(objective: Objective | None, shorthand: Mapping[str, Any]) -> Objective:
    """The module's objective: `objective` (default `GRPO()`) with the flat GRPO options of
    `GRPOModule` (`shorthand`: those not None) written into it.

    A flat option the objective takes overrides its value. One it does not take is refused when it
    asks for something (a value other than GRPO's default), naming both places; one equal to GRPO's
    default (a recipe spelling out `clip_range: 1.0e-4`) asks for nothing and is left out.
    """
    from lightning_grpo.objectives.grpo import GRPO

    objective = GRPO() if objective is None else objective
    given = {name: value for name, value in shorthand.items() if value is not None}
    taken = {name: value for name, value in given.items() if name in objective.option_names()}
    defaults = GRPO().options()
    refused = {name: value for name, value in given.items() if name not in taken and _differs(value, defaults.get(name))}
    if refused:
        listed = ", ".join(f"model.{name}={value!r}" for name, value in refused.items())
        raise ConfigError(
            f"{listed}: GRPO option(s) that {type(objective).__name__} does not take; remove them (its options: "
            f"{', '.join(objective.option_names())}, set as model.objective.init_args.<name>)"
        )
    return objective.with_options(taken) if taken else objective


def _differs(value: Any, default: Any) -> bool:
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return as_list(value) != as_list(default)


def objective_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The objective options a parsed `model` config section sets (before anything is built):
    `model.objective.init_args`, then the flat GRPO options that are set, by name."""
    section = model.get("objective") or {}
    section = section.as_dict() if hasattr(section, "as_dict") else dict(section) if isinstance(section, Mapping) else {}
    options = dict(section.get("init_args") or {})
    from lightning_grpo.objectives.grpo import GRPO

    options.update({name: model[name] for name in GRPO.option_names() if model.get(name) is not None})
    return options


def objective_class(model: Mapping[str, Any]) -> type[Objective] | None:
    """The objective class a parsed `model` config section names (GRPO when none); None when it
    cannot be imported here (the CLI then reports it when it builds the model)."""
    section = model.get("objective")
    class_path = section.get("class_path") if hasattr(section, "get") else section if isinstance(section, str) else None
    from lightning_grpo.objectives.grpo import GRPO

    if not class_path:
        return GRPO
    import importlib

    module_name, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning_grpo.objectives"), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Objective) else None


class SelectingObjective(Objective):
    """An objective with DanceGRPO's best-of-n selection (`best_of_n`: keep_top, keep_bottom of
    each group, or None for all) and an optional KL to the frozen initial policy (`kl_beta`):
    what follows from those two options for the module, in one place (GRPO and DiffusionNFT)."""

    best_of_n: tuple[int, int] | None = None
    kl_beta: float = 0.0

    def trained_group_size(self, group_size: int) -> int:
        return group_size if self.best_of_n is None else sum(self.best_of_n)

    @property
    def selects(self) -> bool:
        return self.best_of_n is not None

    @property
    def uses_reference(self) -> bool:
        return self.kl_beta > 0


__all__ = ["Objective", "Prepared", "RolloutNeeds", "SelectingObjective", "Targets", "objective_class", "objective_options", "resolve_objective"]
