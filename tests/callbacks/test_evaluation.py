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


def test_indices_key_the_noise_so_a_part_of_the_set_gets_the_samples_of_the_whole():
    """`indices` (the prompts' positions in the held-out split, as a rank's test batch has them):
    the samples of prompts 2 and 0 evaluated alone are those of the whole set's."""
    policy, sampler = make_policy()
    prompts = ["a red circle", "a green square", "a blue circle"]
    whole = evaluate(policy, sampler, prompts, [Redness()], samples_per_prompt=2, seed=5, keep_pixels=True, show_progress=False)
    part = evaluate(policy, sampler, [prompts[2], prompts[0]], [Redness()], samples_per_prompt=2, seed=5, keep_pixels=True,
                    show_progress=False, indices=[2, 0])
    assert part.keys == [(2, 0), (2, 1), (0, 0), (0, 1)]
    torch.testing.assert_close(part.pixels, whole.pixels[[4, 5, 0, 1]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count, world, shares", [
    (5, 2, [([0, 1, 2], 3), ([3, 4, 4], 2)]),  # the short part repeats its last item
    (4, 2, [([0, 1], 2), ([2, 3], 2)]),
    (1, 3, [([0], 1), ([0], 0), ([0], 0)]),  # more ranks than items: the others repeat item 0, all padding
    (0, 2, [([], 0), ([], 0)]),
])
def test_share_of_rank_gives_every_rank_as_many_items(count, world, shares):
    from lightning_grpo.evaluation import share_of_rank

    assert [share_of_rank(list(range(count)), r, world) for r in range(world)] == shares


def test_gather_results_orders_by_key_and_keeps_each_sample_once():
    """Two ranks' test results, as the padded held-out stream gives them (one process here: the
    parts are concatenated as `all_gather` would): rank 0 held prompts 0, 1 and a padding repeat
    of 4, rank 1 prompts 2, 3, 4; the result is prompts 0-4 in order, once each, with their pixels."""
    from lightning_grpo.evaluation import gather_results

    def part(indices):
        return EvaluationResult([f"p{i}" for i in indices], {"r": torch.tensor([float(i) for i in indices])},
                                pixels=torch.tensor([float(i) for i in indices]).reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2),
                                keys=[(i, 0) for i in indices])

    merged = gather_results([part([0, 1, 4]), part([2, 3, 4])], grid_size=3)
    assert merged.prompts == ["p0", "p1", "p2", "p3", "p4"] and merged.keys == [(i, 0) for i in range(5)]
    assert merged.scores["r"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert merged.pixels[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # the first grid_size rows


def test_a_grid_shows_the_first_kept_samples_when_fewer_were_kept(tmp_path):
    """`test` keeps the pixels of `test_grid_size` samples only; writing results with more samples
    stopped with "5 samples, 10 prompts, 1 per prompt do not tile" after the whole evaluation."""
    result = EvaluationResult([f"prompt {i}" for i in range(10)], {"r": torch.arange(10.0)}, pixels=torch.rand(5, 3, 8, 8))
    written = result.write(tmp_path)
    assert written["grid"].is_file() and len((tmp_path / "results.csv").read_text().splitlines()) == 11
