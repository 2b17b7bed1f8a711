"""A saved position resumes with the next unseen prompt, by hand and through a Trainer checkpoint."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grpo.datamodules import PromptDataModule


def prompts_of(batches: list[dict]) -> list[str]:
    return [p for batch in batches for p in batch["prompts"]]


def take(dm: PromptDataModule, count: int) -> list[dict]:
    """The first ``count`` batches of a training pass (the rest are never requested)."""
    return list(itertools.islice(iter(dm.train_dataloader()), count))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 1, 7, 24])
def test_state_dict_resumes_at_next_unseen_prompt(prompts_file, num_workers, consumed):
    path = prompts_file([f"p{i}" for i in range(100)])
    make = lambda: PromptDataModule(path, batch_size=4, seed=5, num_workers=num_workers,  # noqa: E731
                                    shuffle_buffer_size=16, rank=0, world_size=1)
    full = prompts_of(list(make().train_dataloader()))
    first = make()
    before = prompts_of(take(first, consumed))  # workers have prefetched beyond this
    state = first.state_dict()
    assert state["samples_consumed"] == 4 * consumed
    resumed = make()
    resumed.load_state_dict(state)
    after = prompts_of(list(resumed.train_dataloader()))
    assert before + after == full


def test_resume_with_another_number_of_ranks_and_workers(prompts_file):
    prompts = [f"p{i}" for i in range(96)]
    path = prompts_file(prompts)
    ranks = [PromptDataModule(path, batch_size=4, rank=r, world_size=2, num_workers=2) for r in range(2)]
    before = [p for dm in ranks for p in prompts_of(take(dm, 5))]  # 5 steps on each of 2 ranks
    resumed = PromptDataModule(path, batch_size=2, rank=0, world_size=1, num_workers=2)
    resumed.load_state_dict(ranks[0].state_dict())
    after = prompts_of(list(resumed.train_dataloader()))
    assert Counter(before + after) == Counter(prompts)


def test_a_new_epoch_starts_from_the_beginning(prompts_file):
    path = prompts_file([f"p{i}" for i in range(40)])
    dm = PromptDataModule(path, batch_size=4, rank=0, world_size=1)
    take(dm, 3)
    dm.set_epoch(1)
    epoch_one = prompts_of(list(dm.train_dataloader()))
    assert sorted(epoch_one) == sorted(f"p{i}" for i in range(40))
    assert dm.state_dict()["epoch"] == 1


def test_different_seed_on_resume_warns(prompts_file):
    dm = PromptDataModule(prompts_file(["a", "b"]), seed=1)
    with pytest.warns(UserWarning, match="seed=0"):
        dm.load_state_dict({"epoch": 0, "samples_consumed": 1, "seed": 0, "shuffle": True})


# --------------------------------------------------------------------------- through a Trainer


class PromptRecorder(LightningModule):
    """Records the prompts each training step receives; one scalar weight to optimise."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen += batch["prompts"]
        return (self.weight**2).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        assert batch["prompts"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm: PromptDataModule, ckpt_path: str | None = None, **trainer_kwargs) -> tuple[PromptRecorder, Trainer]:
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=2, **trainer_kwargs)
    model = PromptRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few-workers and mid-epoch-resume notices
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def test_trainer_checkpoint_resumes_with_next_unseen_prompt(prompts_file, tmp_path):
    path = prompts_file([f"p{i}" for i in range(60)])
    make = lambda: PromptDataModule(path, batch_size=3, val_fraction=0.1, seed=2, rank=0, world_size=1)  # noqa: E731
    order = make()
    epoch0 = prompts_of(list(order.train_dataloader()))
    order.set_epoch(1)
    epoch1 = prompts_of(list(order.train_dataloader()))

    # A checkpoint written during training, after step 5; Lightning has fetched a 6th batch by then.
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    first, _ = fit(make(), max_steps=8, callbacks=[saver], enable_checkpointing=True)
    assert first.seen == epoch0[:24]
    ckpt = tmp_path / "step=5.ckpt"
    assert torch.load(ckpt, weights_only=False)["PromptDataModule"]["samples_consumed"] == 15

    second, _ = fit(make(), ckpt_path=str(ckpt), max_epochs=2)
    assert second.seen == epoch0[15:] + epoch1
