"""bench/memory.py at a tiny size: the tracker's arithmetic by hand, both steps train the transformer,
and only the ReFL step pays for the VAE's activations (the table and the slopes from known rows)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "memory.py"
spec = importlib.util.spec_from_file_location("memory_bench", SCRIPT)
memory = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = memory  # its dataclasses look their module up
spec.loader.exec_module(memory)

MIB = memory.MIB


def test_live_tensor_bytes_counts_storages_once_and_frees_them():
    with memory.LiveTensorBytes(baseline=MIB) as tracker:
        a = torch.empty(256 * 1024)  # 1 MiB of float32
        b = torch.empty(512 * 1024)  # 2 MiB
        view = b[:10].view(2, 5)  # a view: no new storage
        tracker.mark("first")  # peak 1 + 1 + 2
        del a
        c = torch.zeros(128 * 1024)  # 0.5 MiB, while b is alive
        tracker.mark("second")  # a phase's peak counts what it started with: 4, then 3.5
        tracker.mark("third")  # nothing allocated: the 3.5 MiB alive
    assert tracker.phases == {"first": 4 * MIB, "second": 4 * MIB, "third": int(3.5 * MIB)}
    assert tracker.current == int(3.5 * MIB)
    del b, view, c
    assert tracker.current == MIB


def test_the_backward_pass_is_counted():
    layer = torch.nn.Linear(64, 64, bias=False)  # 16 KiB of weights
    x = torch.randn(8, 64)
    with memory.LiveTensorBytes(baseline=memory.model_bytes(layer)) as tracker:
        layer(x).square().sum().backward()
    # at least weights + their gradient + the saved output [8, 64]
    assert tracker.peak >= 2 * 64 * 64 * 4 + 8 * 64 * 4 and layer.weight.grad is not None


def test_both_steps_at_a_tiny_size(tmp_path):
    transformer, vae = memory.build_toy_model()
    transformer.requires_grad_(True)
    args = argparse.Namespace(height=16, width=16, steps=2, device="cpu")
    rows = {frames: memory.measure(transformer, vae, frames, args) for frames in (5, 9)}
    for row in rows.values():
        assert set(row) >= {"grpo", "grpo_sample", "grpo_update", "refl", "refl_step"}
        assert row["grpo"] == max(row["grpo_sample"], row["grpo_update"]) > memory.model_bytes(transformer, vae) / MIB
        assert row["refl"] > row["grpo_update"]  # the VAE's and the reward's activations
    assert rows[9]["refl"] - rows[5]["refl"] > rows[9]["grpo_update"] - rows[5]["grpo_update"]
    assert [rows[f]["latent_frames"] for f in (5, 9)] == [2, 3]  # ×4 causal: 4k + 1 frames -> k + 1
    policy = memory.ToyVideoPolicy(transformer, vae, 5, 16, 16)
    bench = memory.Bench(policy, memory.FlowSDESampler(num_steps=2, eta=0.25, shift=5.0), memory.FrameReward(), train_index=1)
    for step in memory.STEPS.values():
        bench.zero_grad()
        step(bench)
        assert all(p.grad is not None for p in transformer.parameters() if p.requires_grad)
        assert all(p.grad is None for p in vae.parameters())
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        memory.ToyVideoPolicy(transformer, vae, 8, 16, 16)


def test_slope_and_table():
    assert memory.slope([9, 17, 33], [1.0, 3.0, 7.0]) == pytest.approx(0.25)
    rows = {9: {"latent_frames": 3, "grpo_sample": 2.0, "grpo_update": 1.0, "grpo": 2.0, "refl": 5.0}}
    assert memory.format_table(rows).splitlines()[-1] == "| 9 | 3 | 2.0 | 1.0 | 2.0 | 5.0 | 2.50× |"


def test_model_loads_from_a_pipeline_folder(tmp_path):
    transformer, vae = memory.build_toy_model(seed=3)
    transformer.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    loaded_transformer, loaded_vae = memory.load_model(str(tmp_path))
    for built, loaded in ((transformer, loaded_transformer), (vae, loaded_vae)):
        assert type(loaded) is type(built)
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), loaded.state_dict().values()))
