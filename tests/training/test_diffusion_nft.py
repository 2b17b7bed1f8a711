"""DiffusionNFT (lightning_grpo/objectives/nft.py): its loss worked by hand, its properties, the old
policy's soft update, and training through the module and the CLI (the toy FLUX and T2V demos)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grpo.module import GRPOModule
from lightning_grpo.objectives import DiffusionNFT
from lightning_grpo.objectives.nft import nft_loss
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler
from lightning_grpo.validation import ConfigError
from tests.training.fixtures import PROMPTS, Redness
from tests.training.test_module import fit

ROOT = Path(__file__).resolve().parents[2]


def _one(v_theta, v_old=(0.0, 0.0), x0=(1.0, 1.0), x_t=(0.5, 0.5), t=0.5, r=1.0, beta=0.5, adv_clip_max=1.0):
    tensor = lambda values: torch.tensor([list(values)], dtype=torch.float64)  # noqa: E731  [1, 2]
    return nft_loss(tensor(v_theta), tensor(v_old), tensor(x0), tensor(x_t), torch.tensor([t], dtype=torch.float64),
                    torch.tensor([r], dtype=torch.float64), beta, adv_clip_max)


# --------------------------------------------------------------------------------- the loss by hand
@pytest.mark.parametrize("r, expected", [(1.0, 1.5), (0.0, 0.5), (0.25, 0.75)])
def test_the_loss_by_hand(r, expected):
    """x0 = [1, 1], x_t = [0.5, 0.5], t = 1/2, v_old = 0, v_theta = [1, 1], β = 1/2, A_max = 1:
    v+ = [0.5, 0.5] (N1) → x̂0 = x_t − t·v+ = [0.25, 0.25], error [−0.75, −0.75]: mean square 0.5625,
    weight mean|e| = 0.75, ℓ+ = 0.75. v− = [−0.5, −0.5] (N2) → x̂0 = [0.75, 0.75], error −0.25: ℓ− =
    0.0625 / 0.25 = 0.25. L = (r·ℓ+ + (1 − r)·ℓ−) / β · A_max (N4): r = 1 → 1.5, r = 0 → 0.5,
    r = 1/4 → (0.1875 + 0.1875) / 0.5 = 0.75."""
    loss, stats = _one((1.0, 1.0), r=r)
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert float(stats["positive_loss"]) == pytest.approx(0.75) and float(stats["negative_loss"]) == pytest.approx(0.25)


def test_the_adaptive_weight_has_a_floor_and_no_gradient():
    """A perfect positive prediction: error 0, weight clamped to 1e-5, ℓ+ = 0 (not NaN). The weight
    carries no gradient: with the error e = 0.5 everywhere, ℓ = mean(e²)/mean|e| = 0.5 and, w held
    constant, dℓ/dv_k = 2·e_k·(−t)/2 / w = −0.5 at t = 1/2 (with w's gradient it would be −0.25)."""
    loss, stats = _one((1.0, 1.0), v_old=(1.0, 1.0), x_t=(1.5, 1.5), r=1.0)  # x̂0 = 1.5 − 0.5 = 1 = x0
    assert float(stats["positive_loss"]) == 0.0 and torch.isfinite(loss)
    v_theta = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = nft_loss(v_theta, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                       torch.full((1, 2), 1.5, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
                       torch.ones(1, dtype=torch.float64), beta=1.0, adv_clip_max=1.0)
    # v+ = v_theta = 0: x̂0 = 1.5, e = 0.5; ℓ = mean(e²)/mean|e| = 0.5; dℓ/dv_k = (2·e_k·(−t)/2) / 0.5 = −0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(v_theta.grad, torch.full((1, 2), -0.5, dtype=torch.float64))


def test_zero_advantage_at_the_old_policy_gives_no_gradient():
    """r = 1/2 and v_θ = v_old: v+ = v− = v_old, the two parts' gradients (+β and −β) cancel."""
    torch.manual_seed(0)
    v_old, x0, x_t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    v_theta = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v_theta, v_old, x0, x_t, torch.tensor([0.2, 0.5, 0.9]), torch.full((3,), 0.5), beta=0.3, adv_clip_max=5.0)
    loss.backward()
    assert v_theta.grad.abs().max() < 1e-6


@pytest.mark.parametrize("r, toward", [(1.0, True), (0.0, False)])
def test_a_good_sample_pulls_the_velocity_to_its_flow_target_a_bad_one_pushes_it_away(r, toward):
    """With x_t = (1 − t)·x0 + t·ε the flow-matching target is v* = ε − x0; a descent step on the
    loss moves v_θ toward v* for r = 1 and away from it for r = 0."""
    torch.manual_seed(1)
    x0, eps, t = torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0.3, 0.7])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v_old = torch.randn(2, 8)
    v_theta = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v_theta, v_old, x0, x_t, t, torch.full((2,), r), beta=1.0, adv_clip_max=5.0)
    loss.backward()
    direction = (-v_theta.grad * ((eps - x0) - v_old)).sum()  # descent direction · (v* − v_θ)
    assert (direction > 0) == toward


@pytest.mark.parametrize("advantage, r", [(-7.0, 0.0), (-5.0, 0.0), (0.0, 0.5), (2.5, 0.75), (5.0, 1.0), (9.0, 1.0)])
def test_optimality_maps_clamped_advantages_to_0_1(advantage, r):
    assert float(DiffusionNFT(adv_clip_max=5.0).optimality(torch.tensor([advantage]))) == pytest.approx(r)


@pytest.mark.parametrize("options, decays", [
    ({}, {0: 0.0, 100: 0.1, 499: 0.499, 1000: 0.5}),
    ({"old_decay_rate": 0.0075, "old_decay_max": 0.999, "old_decay_start": 75}, {74: 0.0, 75: 0.0, 175: 0.75, 300: 0.999}),
])
def test_the_old_policy_decay_schedule_of_the_official_code(options, decays):
    objective = DiffusionNFT(**options)
    assert {step: pytest.approx(objective.old_decay(step)) for step in decays} == decays


# --------------------------------------------------------------------------------- in the module
def nft_module(**options) -> GRPOModule:
    objective = DiffusionNFT(**{"timestep_fraction": 0.5, **options})
    return GRPOModule(policy=TinyPolicy(paradigm="flow", resolution=8), sampler=FlowSDESampler(num_steps=4, eta=0.7),
                      rewards=[Redness()], objective=objective, group_size=4, micro_batch_size=2, samples_per_update=4,
                      learning_rate=1e-3, show_progress=False)


def test_the_old_policy_follows_the_trained_one_softly():
    """after_update: θ_old ← d·θ_old + (1 − d)·θ, by hand for d = 0.25 (step 250, rate 0.001)."""
    module = nft_module()
    old = module.objective.old_weights()
    params = module.policy.trainable_parameters()
    before = [o.clone() for o in old]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    module.objective.old_decay = lambda step: 0.25
    module.objective.after_update(module)
    for o, b, p in zip(old, before, params):
        assert torch.allclose(o, 0.25 * b + 0.75 * p)


def test_the_rollout_samples_with_the_old_weights_and_restores_the_trained_ones():
    module = nft_module()
    params = module.policy.trainable_parameters()
    with torch.no_grad():
        params[0].add_(1.0)
    trained = [p.detach().clone() for p in params]
    with module.objective.sampling_weights(module):
        assert torch.equal(params[0], module.objective.old_weights()[0]) and not torch.equal(params[0], trained[0])
    assert all(torch.equal(p, t) for p, t in zip(params, trained))


def test_a_fit_trains_with_ode_rollouts_and_logs_the_nft_statistics():
    module = nft_module()
    before = [p.detach().clone() for p in module.policy.trainable_parameters()]
    rollouts = []
    original = module._rollout
    module._rollout = lambda work: rollouts.append(original(work)) or rollouts[-1]
    _, record = fit(module, PROMPTS, batches=2)
    assert any(not torch.equal(b, p) for b, p in zip(before, module.policy.trainable_parameters()))
    assert all(not r.sde_steps.any() for r in rollouts)  # ODE: no SDE step, no log-probability needed
    first = rollouts[0]
    assert not torch.equal(first.latents[0, 0], first.latents[1, 0])  # each sample its own x_0 (ODE: shared would be copies)
    for name in ("train/loss", "train/nft/positive_loss", "train/nft/negative_loss", "train/nft/optimality", "train/nft/old_deviation"):
        assert all(torch.isfinite(torch.tensor(m[name])) for m in record.metrics), name


def test_refuses_a_diffusion_sampler_and_a_step_schedule():
    with pytest.raises(ConfigError, match="flow"):
        GRPOModule(policy=TinyPolicy(paradigm="diffusion", resolution=8), sampler=DDIMSDESampler(num_steps=4, eta=1.0),
                   rewards=[Redness()], objective=DiffusionNFT(), group_size=4)
    from lightning_grpo.samplers import RandomBranch

    with pytest.raises(ConfigError, match="step_schedule"):
        GRPOModule(policy=TinyPolicy(paradigm="flow", resolution=8), sampler=FlowSDESampler(num_steps=4, eta=0.7),
                   rewards=[Redness()], objective=DiffusionNFT(), group_size=4, step_schedule=RandomBranch(num_sde_steps=1))


@pytest.mark.parametrize("options, message", [({"shared_noise": True}, "shared_noise"), ({"ode_tail": "tail"}, "ode_tail")])
def test_refuses_shared_noise_and_an_ode_tail(options, message):
    """Both would silently do nothing good with ODE rollouts: identical samples per group, a tail that never runs."""
    from lightning_grpo.samplers.ode_tail import MultistepODETail

    options = {k: MultistepODETail() if v == "tail" else v for k, v in options.items()}
    with pytest.raises(ConfigError, match=message):
        GRPOModule(policy=TinyPolicy(paradigm="flow", resolution=8), sampler=FlowSDESampler(num_steps=4, eta=0.7),
                   rewards=[Redness()], objective=DiffusionNFT(), group_size=4, **options)


def test_a_grpo_only_flat_option_is_refused_with_both_names():
    with pytest.raises(ConfigError, match="model.clip_range=0.2.*DiffusionNFT"):
        GRPOModule(policy=TinyPolicy(paradigm="flow", resolution=8), rewards=[Redness()], objective=DiffusionNFT(), group_size=4, clip_range=0.2)


def test_the_old_policy_is_saved_and_restored_with_the_module():
    module = nft_module()
    with torch.no_grad():
        module.objective.old_weights()[0].add_(3.0)
    state = module.state_dict()
    assert "objective.old_0" in state
    other = nft_module()
    other.load_state_dict(state)
    assert torch.equal(other.objective.old_weights()[0], module.objective.old_weights()[0])


# --------------------------------------------------------------------------------- through the CLI
def _scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow  # two short CLI fits (about a minute on 2 busy cores): -m slow, run in CI
@pytest.mark.timeout(600)
@pytest.mark.parametrize("config, model, extra", [
    # both demos pick SDE steps with a step schedule (branching), which NFT's ODE rollouts refuse;
    # demo_t2v's per-reward advantages (`multi_reward: per_reward`, a GRPO option) too: NFT
    # combines its rewards as Σ_k w_k·A_k (the sum form) itself
    ("demo.yaml", {"group_size": 4, "samples_per_update": 8, "micro_batch_size": 8}, ["--model.step_schedule=null"]),
    ("demo_t2v.yaml", {"group_size": 8, "samples_per_update": 4, "micro_batch_size": 4, "best_of_n": [2, 2], "timestep_fraction": 0.25},
     ["--model.step_schedule=null", "--model.multi_reward=null"]),
])
def test_the_cli_trains_the_demos_with_diffusion_nft(tmp_path, config, model, extra):
    """`lightning-grpo fit -c configs/<demo> --model.objective=DiffusionNFT`, the demo trimmed to
    two optimizer steps on a smaller batch (without its held-out evaluation and visualiser, as the
    stored GRPO runs), the CLI's default callbacks and the demo's logger and checkpoints on: NFT's
    statistics are logged and the last checkpoint holds the old policy beside the trained weights."""
    raw = yaml.safe_load((ROOT / "configs" / config).read_text())
    raw["trainer"]["callbacks"] = [c for c in raw["trainer"]["callbacks"] if c["class_path"].endswith("GRPOCheckpoint")]
    raw["trainer"].update(max_steps=2, enable_progress_bar=False)
    raw["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    raw["model"].update(model, show_progress=False)
    raw["data"]["init_args"]["batch_size"] = 1 if "t2v" in config else 2
    (tmp_path / config).write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "lightning_grpo", "fit", "-c", str(tmp_path / config), "--model.objective=DiffusionNFT", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = tmp_path / raw["trainer"]["logger"]["init_args"]["name"] / "version_0"
    tags = _scalars(log_dir)
    for tag in ("train/loss", "train/nft/positive_loss", "train/nft/negative_loss", "train/nft/old_deviation", "train/grad_norm"):
        assert tag in tags and all(torch.isfinite(torch.tensor(tags[tag]))), (tag, sorted(tags))
    assert "train/ratio/mean" not in tags  # no GRPO statistic: the objective is NFT's
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and "objective.old_0" in checkpoint["state_dict"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("objective, option, message", [
    ("DiffusionNFT", "beta=0", "model.objective.init_args.beta must be > 0, got 0.0"),
    ("GRPO", "clip_range=0", "model.objective.init_args.clip_range must be > 0, got 0.0"),
])
def test_an_objective_option_out_of_range_is_one_error_line_before_anything_loads(objective, option, message, capsys, monkeypatch):
    """Checked with the config (`validation._check_objective`): exit status 2 and one line, not a
    parser traceback (the CLI's entry point in this process; it fails before any model loads)."""
    from lightning_grpo.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", str(ROOT / "configs" / "demo.yaml"), f"--model.objective={objective}", f"--model.objective.init_args.{option}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: {message}" in err and "Traceback" not in err, err[-2000:]
