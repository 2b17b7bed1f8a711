"""FSDP (`DenoiserFSDPStrategy`: FSDP2 of the denoiser's blocks) on CPU processes with gloo.

- Set-up, in this process (a one-rank gloo group): the recipe's strategy builds; its options
  become `fully_shard` arguments (or a clear error); the denoiser's blocks, the denoiser and a
  full-fine-tuning KL reference become FSDP units while the frozen parts stay whole; the optimizer
  step measures and clips the norm over all shards; EMA averages, swaps and checkpoints the
  sharded weights; sharded saves record checksums; incomplete, corrupt or foreign checkpoints
  are named.
- Training, 2 processes through tests/distributed/ddp_run.py: FULL_SHARD (and, slow, HYBRID_SHARD
  over two "nodes" and CPU offload) trains the same weights as one process on the union of the
  ranks' prompts, as DDP does (tests/distributed/test_ddp.py).
- Through the CLI, with checkpoints and resume: tests/distributed/test_fsdp_cli.py.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import instantiate_class
from torch import distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from lightning_grpo.callbacks import EMA
from lightning_grpo.checkpointing import AtomicCheckpointIO, CheckpointError, check_checkpoint_file
from lightning_grpo.distributed import DenoiserFSDPStrategy, denoiser_blocks
from lightning_grpo.module import GRPOModule
from lightning_grpo.objectives import Prepared, Targets
from lightning_grpo.policies import FluxPolicy, StableDiffusionPolicy
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.samplers import FlowSDESampler
from tests.distributed.test_ddp import assert_same_training
from tests.training.fixtures import Redness

sys.path.insert(0, str(Path(__file__).parents[1] / "policies"))
from tiny import build_tiny_flux, build_tiny_sd  # noqa: E402

ROOT = Path(__file__).parents[2]
SCRIPT = Path(__file__).parent / "ddp_run.py"
PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "cat", "dog") for s in ("circle", "square", "sofa", "photo")]


# ------------------------------------------------------------------------------------ set-up
def test_fsdp_config_builds_the_denoiser_strategy():
    raw = yaml.safe_load((ROOT / "configs" / "flux_hps_fsdp.yaml").read_text())
    strategy = instantiate_class((), raw["trainer"]["strategy"])
    assert isinstance(strategy, DenoiserFSDPStrategy)
    assert (strategy.sharding_strategy, strategy.cpu_offload, strategy.param_dtype) == ("FULL_SHARD", False, "bfloat16")
    assert raw["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("options, message", [
    ({"sharding_strategy": "NO_SHARD"}, "sharding_strategy must be one of FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, got 'NO_SHARD'"),
    ({"param_dtype": "bf16"}, "param_dtype must be one of float32, bfloat16, float16 or None, got 'bf16'"),
    ({"reduce_dtype": "fp32"}, "reduce_dtype must be one of float32, bfloat16, float16 or None, got 'fp32'"),
])
def test_bad_strategy_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        DenoiserFSDPStrategy(**options)


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group and a one-rank mesh: FSDP2 and DTensors without a second process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    finally:
        dist.destroy_process_group()


def strategy_on(mesh, **options) -> DenoiserFSDPStrategy:
    strategy = DenoiserFSDPStrategy(**options)
    strategy._shard_mesh = mesh  # what setup_environment builds from the launched processes
    return strategy


def test_options_become_fully_shard_arguments(one_rank):
    plain = strategy_on(one_rank).fully_shard_options()
    assert plain == {"mesh": one_rank, "reshard_after_forward": True}
    grad_op = strategy_on(one_rank, sharding_strategy="SHARD_GRAD_OP").fully_shard_options()
    assert grad_op["reshard_after_forward"] is False
    offload = strategy_on(one_rank, cpu_offload=True).fully_shard_options()["offload_policy"]
    assert isinstance(offload, CPUOffloadPolicy) and offload.pin_memory is torch.cuda.is_available()
    mixed = strategy_on(one_rank, param_dtype="bfloat16", reduce_dtype="float32").fully_shard_options()["mp_policy"]
    assert mixed == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="shards after the processes are set up"):
        DenoiserFSDPStrategy().fully_shard_options()


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux"))


def flux_module(flux_dir: Path, **options) -> GRPOModule:
    policy = FluxPolicy(flux_dir, height=16, width=16, max_sequence_length=16)
    return GRPOModule(policy=policy, sampler=FlowSDESampler(num_steps=2, eta=0.5), rewards=[Redness()], group_size=2, **options)


def test_flux_is_wrapped_by_its_transformer_blocks(flux_dir):
    name, classes = denoiser_blocks(FluxPolicy(flux_dir, height=16, width=16, max_sequence_length=16))
    assert name == "transformer"
    assert {c.__name__ for c in classes} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}


def test_sd_is_wrapped_by_its_unet_blocks(tmp_path):
    policy = StableDiffusionPolicy(build_tiny_sd(tmp_path / "sd"), height=16, width=16)
    name, classes = denoiser_blocks(policy)
    assert name == "unet"
    assert {c.__name__ for c in classes} == set(policy.unet._no_split_modules) & {
        type(m).__name__ for m in policy.unet.modules()
    }
    assert "BasicTransformerBlock" in {c.__name__ for c in classes}
    # the weight-free policy has no denoiser attribute: the policy itself is the unit
    assert denoiser_blocks(TinyPolicy()) == ("", {TinyPolicy})


def test_the_denoiser_blocks_are_the_units_and_the_frozen_parts_stay_whole(flux_dir, one_rank):
    module = flux_module(flux_dir, kl_beta=0.1)  # full fine-tuning: the KL reference is a denoiser copy
    strategy = strategy_on(one_rank)
    strategy.shard_module(module)
    policy = module.policy
    blocks = [m for m in policy.transformer.modules() if type(m).__name__.removeprefix("FSDP") in {"FluxTransformerBlock", "FluxSingleTransformerBlock"}]
    assert len(blocks) == len(policy.transformer.transformer_blocks) + len(policy.transformer.single_transformer_blocks) > 0
    assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(policy.transformer, FSDPModule)
    assert isinstance(module.reference_policy, FSDPModule)  # 12B frozen copy: sharded too
    assert all(isinstance(p, DTensor) for p in policy.transformer.parameters())
    for frozen in (policy.text_encoder, policy.text_encoder_2, policy.vae):
        assert not isinstance(frozen, FSDPModule) and not any(isinstance(p, DTensor) for p in frozen.parameters())
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    strategy.shard_module(module)  # configure_model again (fit, then test): nothing changes
    assert [m for m in module.modules() if isinstance(m, FSDPModule)] == units


@pytest.mark.parametrize(("lora_rank", "denoiser_dtype"), [(0, "float32"), (2, "float32"), (2, "bfloat16")])
def test_a_sharded_denoiser_rolls_out_and_backpropagates_outside_any_wrapper(flux_dir, one_rank, lora_rank, denoiser_dtype):
    """After sharding, the module's own rollout and objective loss run as without FSDP (no
    wrapper around the LightningModule): the same trajectory, loss and gradients as the unsharded
    module, the backward filling the sharded gradients of the trained parameters only (LoRA: the
    adapters, whose base weights share their units; a bf16 base under fp32 adapters: one unit of
    mixed dtypes)."""
    from lightning_grpo.rollout import rollout

    def loss_of(module):
        torch.manual_seed(0)
        trajectories = rollout(module.policy, module.sampler, ["a red circle"], 2, torch.Generator().manual_seed(1))
        targets = Targets(values=torch.tensor([1.0, -1.0]), chosen=None, per_reward={})
        prepared = Prepared(trajectories, targets, torch.zeros(2, 1, dtype=torch.long), {})  # both at step 0
        loss, _ = module.objective.loss(module, prepared, torch.arange(2), 0)
        return trajectories, loss

    plain = flux_module(flux_dir)
    options = dict(height=16, width=16, max_sequence_length=16, lora_rank=lora_rank, denoiser_dtype=denoiser_dtype)
    plain.policy = FluxPolicy(flux_dir, **options)
    sharded = flux_module(flux_dir)
    sharded.policy = FluxPolicy(flux_dir, **options)
    sharded.policy.load_state_dict(plain.policy.state_dict())  # same LoRA initialisation
    strategy_on(one_rank).shard_module(sharded)
    (expected_rollout, expected), (got_rollout, got) = loss_of(plain), loss_of(sharded)
    torch.testing.assert_close(got_rollout.latents, expected_rollout.latents)
    torch.testing.assert_close(got, expected)
    got.backward()
    expected.backward()
    trained = {n for n, p in sharded.policy.named_parameters() if p.requires_grad}
    assert trained and all(("lora_" in n) == (lora_rank > 0) for n in trained)
    plain_grads = dict(plain.policy.transformer.named_parameters())
    for name, p in sharded.policy.transformer.named_parameters():
        assert isinstance(p, DTensor)
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:  # FSDP2 warns that the Flux blocks return views: the gradients are still the plain ones
            torch.testing.assert_close(p.grad.full_tensor(), plain_grads[name].grad, msg=name)


def test_a_trainable_parameter_outside_the_denoiser_is_refused(flux_dir, one_rank):
    module = flux_module(flux_dir)
    module.policy.vae.decoder.conv_out.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"trainable parameters are outside it, e.g. \['policy.vae.decoder.conv_out.weight'\]"):
        strategy_on(one_rank).shard_module(module)


class _Optimizer:
    def __init__(self) -> None:
        self.log: list = []

    def step(self) -> None:
        self.log.append("step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.log.append("zero_grad")


class _Scheduler:
    def step(self) -> None:
        pass


@pytest.mark.parametrize("max_grad_norm, scale", [(1.0, 1 / 5), (None, 1.0), (10.0, 1.0)])
def test_sharded_gradients_are_clipped_by_their_norm_over_all_shards(flux_dir, one_rank, max_grad_norm, scale):
    """Gradients 3 and 4 in two parameters: norm 5 (logged as a plain number), clipped to 1 by
    the factor 1/5 (max_norm / (norm + 1e-6)), untouched without clipping or under the limit."""
    module = flux_module(flux_dir, max_grad_norm=max_grad_norm)
    strategy_on(one_rank).shard_module(module)
    first, second, *rest = module.policy.trainable_parameters()
    for p in (first, second, *rest):
        p.grad = torch.zeros_like(p)
    first.grad.to_local().view(-1)[0] = 3.0
    second.grad.to_local().view(-1)[-1] = 4.0
    seen = []
    optimizer = _Optimizer()
    optimizer.step = lambda: seen.append((float(first.grad.to_local().view(-1)[0]), float(second.grad.to_local().view(-1)[-1])))
    norm = module._optimizer_step(optimizer, _Scheduler())
    assert not isinstance(norm, DTensor) and float(norm) == pytest.approx(5.0)
    expected = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (5.0 + 1e-6))
    assert expected == pytest.approx(scale, rel=1e-5)
    assert seen == [pytest.approx((3.0 * expected, 4.0 * expected), rel=1e-6)]


def test_ema_of_sharded_weights_averages_swaps_and_checkpoints_the_local_shards(flux_dir, one_rank, tmp_path):
    """EMA under FSDP (was refused: "the EMA callback does not support sharded weights"): it keeps
    each rank's shards (`to_local()`), averages them by hand's rule ema ← d·ema + (1 − d)·θ,
    swaps them into the sharded parameters, and a sharded save writes them as DTensors into the
    checkpoint's `callbacks/` shards (meta.pt keeps a placeholder), which a load gives back."""
    from types import SimpleNamespace

    module = flux_module(flux_dir)
    strategy = strategy_on(one_rank)
    ema = EMA(decay=0.75, device="cpu")
    ema.setup(SimpleNamespace(strategy=strategy), module, "fit")
    assert ema.weights == {}  # built once the strategy has sharded the policy
    strategy.shard_module(module)
    strategy.connect(module)
    ema.on_fit_start(None, module)
    tracked = ema.tracked(module)
    assert tracked and all(isinstance(p, DTensor) for p in tracked.values())
    assert all(not isinstance(w, DTensor) and torch.equal(w, tracked[n].to_local()) for n, w in ema.weights.items())
    start = {n: w.clone() for n, w in ema.weights.items()}
    with torch.no_grad():
        for p in tracked.values():
            p.to_local().add_(1.0)  # an optimizer step: θ ← θ + 1
    ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)
    for name, value in ema.weights.items():
        torch.testing.assert_close(value, start[name] + 0.25)  # 0.75·ema + 0.25·(ema + 1)
    average = {n: w.clone() for n, w in ema.weights.items()}
    with ema.applied(module):
        assert all(torch.equal(tracked[n].to_local(), average[n]) for n in tracked)  # the average is in the shards
    assert all(torch.equal(tracked[n].to_local(), start[n] + 1) for n in tracked)  # and back out
    checkpoint = {"state_dict": strategy.lightning_module_state_dict(), "optimizer_states": [], "global_step": 1,
                  "callbacks": {ema.state_key: ema.state_dict()}}
    assert all(isinstance(w, DTensor) for w in checkpoint["callbacks"][ema.state_key]["weights"].values())
    folder = tmp_path / "epoch=0-step=1.ckpt"
    strategy.save_checkpoint(checkpoint, folder)
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert all(set(v) == {"__sharded_in_callbacks_folder__"} for v in meta["callbacks"][ema.state_key]["weights"].values())
    assert (folder / "callbacks" / ".metadata").is_file()
    import json

    assert any(name.startswith("callbacks/") for name in json.loads((folder / "checksums.json").read_text()))
    restored = strategy.load_checkpoint(folder)["callbacks"][ema.state_key]
    fresh = EMA(decay=0.75, device="cpu")
    fresh.setup(SimpleNamespace(strategy=strategy), module, "fit")
    fresh.load_state_dict(restored)
    fresh.on_fit_start(None, module)
    assert fresh.num_updates == 1 and fresh.weights.keys() == ema.weights.keys()
    assert all(torch.equal(fresh.weights[n], ema.weights[n]) for n in ema.weights)


def test_incomplete_and_foreign_checkpoints_are_named(tmp_path):
    folder = tmp_path / "step=2.ckpt"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"sharded checkpoint .*step=2.ckpt' is incomplete .* no \.metadata or meta\.pt"):
        check_checkpoint_file(folder)
    (folder / ".metadata").write_bytes(b"")
    (folder / "meta.pt").write_bytes(b"")
    check_checkpoint_file(folder)
    single = tmp_path / "ddp.ckpt"
    torch.save({"state_dict": {}}, single)
    with pytest.raises(CheckpointError, match="is a single file .* resumes from its own sharded checkpoint folders only"):
        DenoiserFSDPStrategy().load_checkpoint(single)
    with pytest.raises(CheckpointError, match="step=2.ckpt' is a folder of shards written by DenoiserFSDPStrategy: resume it with that strategy"):
        AtomicCheckpointIO().load_checkpoint(folder)  # DDP / one device


def test_a_sharded_checkpoint_of_another_model_is_named(flux_dir, one_rank, tmp_path):
    from torch.distributed.checkpoint import save as dcp_save

    module = flux_module(flux_dir)
    strategy = strategy_on(one_rank)
    strategy.shard_module(module)
    strategy.connect(module)
    folder = tmp_path / "other.ckpt"
    dcp_save({"state_dict": {"policy.transformer.other.weight": torch.zeros(2)}}, checkpoint_id=folder)
    torch.save({}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match=r"other.ckpt' does not hold this model's trainable state: "
                       r"missing \['policy.transformer.\S+', .*unexpected \['policy.transformer.other.weight'\]"):
        strategy.load_checkpoint(folder)


def test_a_sharded_save_records_checksums_and_a_corrupt_shard_is_refused_naming_it(flux_dir, one_rank, tmp_path):
    """Every sharded save writes `checksums.json` (CRC-32 and size of every file, the `.distcp`
    shards included, which carry no checksum of their own), and loading refuses a folder whose
    shard bytes changed, naming the file. Before (issue 27), nothing recorded the shards' CRCs:
    the flipped byte was loaded into the weights without a word."""
    import json

    module = flux_module(flux_dir)
    strategy = strategy_on(one_rank)
    strategy.shard_module(module)
    strategy.connect(module)
    folder = tmp_path / "epoch=0-step=1.ckpt"
    strategy.save_checkpoint({"state_dict": strategy.lightning_module_state_dict(), "optimizer_states": [], "global_step": 1}, folder)
    manifest = json.loads((folder / "checksums.json").read_text())
    assert set(manifest) == {"__0_0.distcp", ".metadata", "meta.pt"}
    assert all(size == (folder / name).stat().st_size for name, (size, _) in manifest.items())
    assert not list(tmp_path.glob(".*partial*"))  # renamed into place with its manifest
    assert strategy.load_checkpoint(folder)["global_step"] == 1  # intact: loads
    shard = bytearray((folder / "__0_0.distcp").read_bytes())
    shard[len(shard) // 2] ^= 0xFF  # inside the tensor data: still a loadable file
    (folder / "__0_0.distcp").write_bytes(bytes(shard))
    with pytest.raises(CheckpointError, match=r"step=1\.ckpt' is corrupt: '__0_0\.distcp' does not match the checksum"):
        strategy.load_checkpoint(folder)


def test_a_learning_rate_given_on_resume_reaches_the_optimizer_the_strategy_loaded(flux_dir):
    """A sharded checkpoint's optimizer state is loaded by the strategy before `on_load_checkpoint`
    (it is not under "optimizer_states"): the new rate is written into the live optimizer and the
    scheduler state, keeping the schedule's position (here 1e-4 -> 3e-4 at factor 0.5)."""
    from types import SimpleNamespace

    from lightning_grpo.checkpointing import SIGNATURE_KEY, model_signature

    module = flux_module(flux_dir, learning_rate=3e-4)
    optimizer = torch.optim.AdamW(module.policy.trainable_parameters(), lr=0.5e-4)  # as restored: lr 1e-4 × 0.5
    optimizer.param_groups[0]["initial_lr"] = 1e-4
    module._trainer = SimpleNamespace(
        ckpt_path="step=2.ckpt", state=SimpleNamespace(fn="fit"), max_steps=4, strategy=SimpleNamespace(optimizers=[optimizer]),
    )
    hparams = {**dict(module.hparams), "learning_rate": 1e-4}
    checkpoint = {"global_step": 2, "hyper_parameters": hparams, SIGNATURE_KEY: model_signature(module),
                  "lr_schedulers": [{"base_lrs": [1e-4], "_last_lr": [0.5e-4]}]}
    module.on_load_checkpoint(checkpoint)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4) and optimizer.param_groups[0]["initial_lr"] == 3e-4
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [3e-4] and checkpoint["lr_schedulers"][0]["_last_lr"] == [pytest.approx(1.5e-4)]


# ------------------------------------------------------------------------------------ training
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp: Path, tag: str, *args: str, node_ranks: tuple[int, ...] = ()) -> list[list[dict]]:
    """ddp_run.py once (Lightning launches the ranks), or once per node rank (HYBRID_SHARD over
    "nodes"); the recorded steps of every rank, rank order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--flux", str(tmp / "flux"), "--out", str(tmp), "--tag", tag, *args]
    if not node_ranks:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        port = str(free_port())
        nodes = [subprocess.Popen(command, cwd=ROOT, env={**env, "NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in node_ranks]
        try:
            outputs = [node.communicate(timeout=600)[0] for node in nodes]
        finally:
            for node in nodes:
                node.kill()
        for node, output in zip(nodes, outputs):
            assert node.returncode == 0, output[-3000:]
    return [torch.load(f, weights_only=False)["steps"] for f in sorted(tmp.glob(f"{tag}_rank_*.pt"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp_train")
    build_tiny_flux(tmp / "flux")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp


def single_process(workdir: Path, rank_files: list[Path]) -> list[dict]:
    """One process trained on the union of the recorded ranks' batches (2 steps); run once, by
    the first variant (every variant's ranks draw the same prompts, which the test checks)."""
    done = sorted(workdir.glob("single_rank_*.pt"))
    if done:
        return torch.load(done[0], weights_only=False)["steps"]
    (single,) = run(workdir, "single", "--devices", "1", "--steps", "2", "--union", *map(str, rank_files))
    return single


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("tag, args, node_ranks, placements", [
    pytest.param("full", ("--devices", "2", "--fsdp", "FULL_SHARD"), (), "(Shard(dim=0),)", id="full_shard"),
    pytest.param("hybrid", ("--devices", "1", "--num-nodes", "2", "--fsdp", "HYBRID_SHARD"), (0, 1), "(Replicate(), Shard(dim=0))",
                 id="hybrid_shard_two_nodes", marks=pytest.mark.slow),
    pytest.param("offload", ("--devices", "2", "--fsdp", "FULL_SHARD", "--cpu-offload"), (), "(Shard(dim=0),)",
                 id="cpu_offload", marks=pytest.mark.slow),
])
def test_fsdp_trains_the_weights_of_one_process_on_the_union(workdir, tag, args, node_ranks, placements):
    """Each rank rolls out its own prompts and updates its shards; the weights gathered after each
    step are those of one process trained on both ranks' prompts with the same noise (DDP's
    tolerance, `assert_same_training`), and the first update's ratio is 1. HYBRID_SHARD runs as
    two one-device "nodes": sharded over 1, replicated over 2 (gradients all-reduced)."""
    ranks = run(workdir, tag, *args, "--steps", "2", "--prompts", str(workdir / "prompts.txt"), node_ranks=node_ranks)
    assert len(ranks) == 2 and all(len(r) == 2 for r in ranks)
    single = single_process(workdir, sorted(workdir.glob(f"{tag}_rank_*.pt")))
    for k in range(2):
        assert single[k]["prompts"] == ranks[0][k]["prompts"] + ranks[1][k]["prompts"]
        assert torch.equal(ranks[0][k]["weights"], ranks[1][k]["weights"])
        assert_same_training(ranks[0][k]["weights"], single[k]["weights"])
        for rank in ranks:
            assert rank[k]["placements"] == [placements] and rank[k]["devices"] == ["cpu"]
            assert rank[k]["metrics"]["train/ratio/first_update_max_dev"] <= 1e-6
            assert rank[k]["optimizer_steps"] == k + 1
            assert math.isfinite(rank[k]["metrics"]["train/grad_norm"])
    assert (ranks[0][1]["weights"] - ranks[0][0]["weights"]).abs().max() > 1e-5  # it trained
