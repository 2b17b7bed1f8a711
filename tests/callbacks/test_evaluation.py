"""lightning_grpo.evaluation: intervals with known values, batch-size-free sampling, untouched RNG, files."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo.evaluation import EvaluationResult, evaluate, format_before_after, mean_ci, sample_seed, student_t_quantile
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.base import Reward
from lightning_grpo.samplers import FlowSDESampler


class Redness(Reward):
    default_name = "redness"

    def score(self, pixels, prompts, images=None):
        return (pixels[:, 0] - pixels[:, 1]).flatten(1).mean(1)


class RedWins(Reward):
    """1 when red beats green on average: a {0, 1} verifier-like reward."""

    default_name = "red_wins"

    def score(self, pixels, prompts, images=None):
        return ((pixels[:, 0] - pixels[:, 1]).flatten(1).mean(1) > 0).float()


@pytest.mark.parametrize(("q", "df", "expected"), [(0.975, 1, 12.7062), (0.975, 10, 2.2281), (0.975, 30, 2.0423), (0.995, 5, 4.0321)])
def test_student_t_quantile_matches_tables(q, df, expected):
    assert student_t_quantile(q, df) == pytest.approx(expected, abs=1e-3)


def test_mean_ci_wilson_for_proportions():
    mean, low, high = mean_ci(torch.tensor([1.0] * 5 + [0.0] * 5))
    assert (mean, low, high) == pytest.approx((0.5, 0.2366, 0.7634), abs=1e-4)
    mean, low, high = mean_ci(torch.zeros(10))  # Wilson stays informative at 0 %
    assert mean == 0.0 and low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)
    assert mean_ci(torch.ones(1))[1] > 0  # defined at n = 1


def test_mean_ci_student_t_and_edge_cases():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, s = 1.29099
    mean, low, high = mean_ci(values)
    half = 3.1824 * 1.290994 / 2
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), abs=1e-3)
    mean, low, high = mean_ci(torch.tensor([0.7]))
    assert mean == pytest.approx(0.7) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in mean_ci(torch.zeros(0)))


def make_policy() -> tuple[TinyPolicy, FlowSDESampler]:
    return TinyPolicy(paradigm="flow", resolution=8), FlowSDESampler(num_steps=3, eta=0.7)


def test_evaluate_is_independent_of_batch_size_and_leaves_rng_alone():
    policy, sampler = make_policy()
    prompts = ["a red circle", "a green square", "a blue circle"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    one = evaluate(policy, sampler, prompts, [Redness(), RedWins()], samples_per_prompt=2, seed=5, batch_size=1, keep_pixels=True, show_progress=False)
    assert torch.equal(torch.rand(3), expected_next)  # the global random stream did not move
    many = evaluate(policy, sampler, prompts, [Redness(), RedWins()], samples_per_prompt=2, seed=5, batch_size=4, keep_pixels=True, show_progress=False)
    assert one.prompts == [p for p in prompts for _ in range(2)]
    assert set(one.scores) == {"redness", "red_wins"} and one.scores["redness"].shape == (6,)
    torch.testing.assert_close(one.scores["redness"], many.scores["redness"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.pixels, many.pixels, rtol=1e-5, atol=1e-6)
    assert not torch.equal(one.pixels[0], one.pixels[1])  # samples of a prompt have their own noise
    other_seed = evaluate(policy, sampler, prompts, [Redness()], samples_per_prompt=2, seed=6, show_progress=False)
    assert not torch.equal(other_seed.scores["redness"], one.scores["redness"])
    assert policy.training  # train flag restored (TinyPolicy is built in train mode)


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, i, j) for s in range(3) for i in range(20) for j in range(20)}
    assert len(seeds) == 3 * 20 * 20


def test_result_files_and_before_after_table(tmp_path):
    before = EvaluationResult(["a", "b", "c", "d"], {"acc": torch.tensor([0.0, 1.0, 0.0, 0.0]), "score": torch.tensor([1.0, 2.0, 3.0, 4.0])},
                              pixels=torch.rand(4, 3, 8, 8))
    after = EvaluationResult(["a", "b", "c", "d"], {"acc": torch.tensor([1.0, 1.0, 0.0, 1.0]), "score": torch.tensor([2.0, 3.0, 4.0, 5.0])})
    summary = before.summary()
    assert summary["acc"][0] == 0.25 and summary["acc"][3] == 4
    written = before.write(tmp_path / "out")
    assert set(written) == {"csv", "markdown", "grid"} and all(p.exists() for p in written.values())
    rows = written["csv"].read_text().splitlines()
    assert rows[0] == "index,prompt,sample,acc,score" and rows[2] == "1,b,0,1,2"
    assert "| acc | 25.0% |" in written["markdown"].read_text()
    assert "grid" not in after.write(tmp_path / "after")  # no pixels kept, no grid
    table = format_before_after(before, after)
    assert "+50.0 pts" in table  # 25 % -> 75 %
    assert "| score | 2.5 [" in table and "+1 |" in table
