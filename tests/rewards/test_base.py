"""The reward contract: validation, named errors, Binary thresholding, MultiReward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_grpo.rewards import Binary, MultiReward, Reward, RewardError


class Fixed(Reward):
    """Returns preset scores (or raises), so the wrappers can be checked by hand."""

    def __init__(self, values: list[float] | Exception, name: str = "fixed", weight: float = 1.0) -> None:
        super().__init__(name, weight)
        self.values = values

    def score(self, pixels, prompts, images=None):
        if isinstance(self.values, Exception):
            raise self.values
        return torch.tensor(self.values)


def _pixels(b: int = 4) -> torch.Tensor:
    return torch.rand(b, 3, 8, 8)


def test_binary_thresholds_strictly_by_hand() -> None:
    # paper example: HPS > 0.28 -> 1 else 0; 0.28 itself is not above the threshold
    reward = Binary(Fixed([0.10, 0.50, 0.28, 0.29], name="hps"), threshold=0.28)
    assert reward.name == "hps_binary"
    assert reward(_pixels(), ["p"] * 4).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_exception_becomes_reward_error_naming_the_reward() -> None:
    reward = Fixed(ValueError("model exploded"), name="my_hps")
    with pytest.raises(RewardError, match=r"'my_hps'.*ValueError: model exploded"):
        reward(_pixels(2), ["a", "b"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise_naming_reward_and_sample(bad: float) -> None:
    reward = Fixed([0.3, bad, 0.1], name="clip")
    with pytest.raises(RewardError, match=r"'clip' returned non-finite scores at samples \[1\]"):
        reward(_pixels(3), ["a", "b", "c"])


def test_wrong_shape_and_prompt_count_raise() -> None:
    with pytest.raises(RewardError, match="shape"):
        Fixed([0.1, 0.2])(_pixels(3), ["a", "b", "c"])
    with pytest.raises(RewardError, match="2 prompts for 3 samples"):
        Fixed([0.1, 0.2, 0.3])(_pixels(3), ["a", "b"])


def test_multireward_returns_each_reward_separately_with_weights() -> None:
    multi = MultiReward([Fixed([1.0, 2.0], name="hps", weight=0.7), Fixed([3.0, 4.0], name="clip", weight=1.4)])
    out = multi(_pixels(2), ["a", "b"])
    assert set(out) == {"hps", "clip"}
    assert out["hps"].tolist() == [1.0, 2.0] and out["clip"].tolist() == [3.0, 4.0]
    assert multi.weights == {"hps": 0.7, "clip": 1.4}
    with pytest.raises(ValueError, match="unique"):
        MultiReward([Fixed([1.0]), Fixed([2.0])])


def test_multireward_propagates_named_failure() -> None:
    multi = MultiReward([Fixed([1.0, 2.0], name="ok"), Fixed([float("nan"), 0.0], name="broken")])
    with pytest.raises(RewardError, match="'broken'"):
        multi(_pixels(2), ["a", "b"])


def test_importing_rewards_does_not_import_model_libraries() -> None:
    code = (
        "import sys, lightning_grpo.rewards as r; "
        "bad = [m for m in ('open_clip', 'transformers', 'peft') if m in sys.modules]; "
        "assert not bad, bad; assert 'HPSReward' in r.__all__"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allow_nonfinite_returns_scores_as_they_are_but_exceptions_still_raise() -> None:
    scores = Fixed([0.3, float("nan"), float("inf")], name="clip")(_pixels(3), ["a", "b", "c"], allow_nonfinite=True)
    assert scores[0].item() == pytest.approx(0.3) and scores[1].isnan() and scores[2].isinf()
    with pytest.raises(RewardError, match="'boom'.*ValueError"):
        Fixed(ValueError("x"), name="boom")(_pixels(2), ["a", "b"], allow_nonfinite=True)
    with pytest.raises(RewardError, match="shape"):  # shape checks stay on
        Fixed([0.1, 0.2])(_pixels(3), ["a", "b", "c"], allow_nonfinite=True)


def test_binary_keeps_a_nonfinite_inner_score_nonfinite() -> None:
    # never silently 0: NaN > threshold is False, which would turn a failure into a valid score
    reward = Binary(Fixed([0.5, float("nan"), 0.1], name="hps"), threshold=0.28)
    out = reward(_pixels(3), ["a", "b", "c"], allow_nonfinite=True)
    assert out[0].item() == 1.0 and out[1].isnan() and out[2].item() == 0.0
    with pytest.raises(RewardError, match=r"'hps_binary' returned non-finite scores at samples \[1\]"):
        reward(_pixels(3), ["a", "b", "c"])


def test_multireward_passes_allow_nonfinite_to_every_reward() -> None:
    multi = MultiReward([Fixed([1.0, 2.0], name="ok"), Fixed([float("nan"), 0.0], name="broken")])
    out = multi(_pixels(2), ["a", "b"], allow_nonfinite=True)
    assert out["ok"].tolist() == [1.0, 2.0] and out["broken"][0].isnan()
