"""RemoteReward's client side against scripted servers on 127.0.0.1 (tests/stub_http.py):
batching, round-robin over servers, retries with back-off and failover, errors naming every URL
and status, NaN under drop_group, and one served version per run."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_grpo.rewards import RemoteReward, RewardError
from lightning_grpo.rewards.wire import decode_request
from tests.stub_http import StubServer


def scoring_reply(version: str = "0.1.0+abc", name: str = "stub"):
    """A reward server whose score is the mean pixel of each sample."""

    def reply(path, body, index):
        _, pixels, _ = decode_request(body)
        return 200, {"name": name, "version": version, "scores": pixels.flatten(1).mean(1).tolist()}

    return reply


def remote(urls, **kwargs) -> RemoteReward:
    return RemoteReward(urls, **{"retries": 2, "backoff": 0.01, "timeout": 10, **kwargs})


def test_batches_are_split_into_requests_and_spread_over_servers():
    pixels = torch.rand(7, 3, 4, 4)
    with StubServer(scoring_reply()) as a, StubServer(scoring_reply()) as b:
        reward = remote([a.url, b.url + "/"], batch_size=3)
        scores = reward(pixels, [f"p{i}" for i in range(7)])
        grid = (pixels.clamp(0, 1) * 255).round() / 255
        assert torch.allclose(scores, grid.flatten(1).mean(1))
        sizes = sorted(len(body["prompts"]) for server in (a, b) for _, body in server.requests)
        assert sizes == [1, 3, 3]  # 7 samples in requests of at most 3
        assert len(a.requests) == 2 and len(b.requests) == 1  # round-robin: a, b, a
        assert {path for server in (a, b) for path, _ in server.requests} == {"/score"}
        reward(pixels[:3], ["x"] * 3)  # the next call starts where the last one stopped: b
        assert len(b.requests) == 2
        assert reward.served_version == "0.1.0+abc" and reward.served_name == "stub"


def test_a_failing_server_is_retried_on_the_next_one():
    with StubServer(lambda p, b, i: (503, "not ready")) as down, StubServer(scoring_reply()) as up:
        scores = remote([down.url, up.url], batch_size=8)(torch.zeros(2, 3, 4, 4), ["a", "b"])
        assert scores.tolist() == [0.0, 0.0] and len(down.requests) == 1 and len(up.requests) == 1


def test_after_the_last_retry_the_error_names_every_url_and_status():
    with StubServer(lambda p, b, i: (503, "not ready")) as a, StubServer(lambda p, b, i: (500, "CUDA error: out of memory")) as b:
        with pytest.raises(RewardError) as err:
            remote([a.url, b.url], retries=3)(torch.zeros(2, 3, 4, 4), ["a", "b"])
    message = str(err.value)
    assert "reward 'remote': request of 2 samples failed after 4 attempt(s)" in message
    assert f"{a.url}: HTTP 503: not ready" in message and f"{b.url}: HTTP 500: CUDA error: out of memory" in message
    assert len(a.requests) == 2 and len(b.requests) == 2


def test_a_bad_request_is_not_retried():
    with StubServer(lambda p, b, i: (400, {"detail": "bad request: pixels.shape must be ..."})) as server:
        with pytest.raises(RewardError, match=r"after 1 attempt\(s\).*HTTP 400.*pixels.shape"):
            remote(server.url)(torch.zeros(1, 3, 4, 4), ["a"])
        assert len(server.requests) == 1


def test_drop_group_turns_a_failed_request_into_nan_for_its_samples_only():
    replies = {0: (200, None), 1: (503, "overloaded"), 2: (503, "overloaded"), 3: (503, "overloaded")}

    def reply(path, body, index):
        status, _ = replies.get(index, (200, None))
        return (status, "overloaded") if status != 200 else scoring_reply()(path, body, index)

    with StubServer(reply) as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = remote(server.url, batch_size=2, max_in_flight=1)(torch.zeros(4, 3, 4, 4), list("abcd"), allow_nonfinite=True)
    assert scores[:2].tolist() == [0.0, 0.0] and scores[2:].isnan().all()  # the second request failed 3 times
    assert any(server.url in str(w.message) and "HTTP 503" in str(w.message) and "NaN" in str(w.message) for w in caught)


def test_servers_of_different_versions_are_refused():
    with StubServer(scoring_reply("0.1.0+aaa")) as a, StubServer(scoring_reply("0.1.0+bbb")) as b:
        reward = remote([a.url, b.url], batch_size=1, max_in_flight=1)
        with pytest.raises(RewardError, match=r"serves version '0.1.0\+bbb'.*expected '0.1.0\+aaa'"):
            reward(torch.zeros(2, 3, 4, 4), ["a", "b"])
        with pytest.raises(RewardError, match=r"expected '0.1.0\+ccc'"):
            remote(a.url, expected_version="0.1.0+ccc")(torch.zeros(1, 3, 4, 4), ["a"])


def test_an_answer_that_is_not_a_score_list_is_named():
    with StubServer(lambda p, b, i: (200, {"name": "x", "version": "v", "scores": [1.0]})) as server:
        with pytest.raises(RewardError, match=r"answered something that is not a score list: scores must be a list of 2 numbers"):
            remote(server.url)(torch.zeros(2, 3, 4, 4), ["a", "b"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "127.0.0.1:8000"}, r"url must be one or more http\(s\):// URLs"),
        ({"url": []}, r"url must be one or more"),
        ({"url": "http://h:1", "batch_size": 0}, r"batch_size must be >= 1"),
        ({"url": "http://h:1", "encoding": "jpeg"}, r"encoding must be one of"),
        ({"url": "http://h:1", "timeout": 0}, r"need timeout > 0"),
        ({"url": "http://h:1", "max_in_flight": 0}, r"max_in_flight must be >= 1"),
        ({"url": "http://h:1", "startup_timeout": -1}, r"startup_timeout must be >= 0"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteReward(**kwargs)


def test_wait_until_ready_names_the_servers_that_are_not():
    with StubServer(lambda p, b, i: (200, {})) as server:  # answers POST only: GET /health is 501
        with pytest.raises(RewardError, match=rf"not ready after 0.5 s: {server.url} \(HTTP 501\)"):
            remote(server.url).wait_until_ready(timeout=0.5, poll=0.05)


def test_remote_reward_survives_deepcopy_and_pickle():
    import copy
    import pickle

    reward = remote("http://127.0.0.1:1")
    reward._http()  # a live client is not copied
    for clone in (copy.deepcopy(reward), pickle.loads(pickle.dumps(reward))):
        assert clone.urls == reward.urls and clone._client is None


def test_startup_timeout_waits_for_health_before_the_first_request():
    loading = lambda path, index: (503, "not ready") if index < 3 else (200, "ok")  # noqa: E731
    with StubServer(scoring_reply(), get=loading) as server:
        reward = remote(server.url, retries=0, startup_timeout=30)
        assert reward(torch.zeros(1, 3, 4, 4), ["a"]).tolist() == [0.0]
        assert server.gets == ["/health"] * 4 and len(server.requests) == 1  # 3 × 503, then ready, then the request
        reward(torch.zeros(1, 3, 4, 4), ["a"])
        assert len(server.gets) == 4  # only before the first request
    with StubServer(scoring_reply(), get=lambda path, index: (503, "not ready")) as server:
        with pytest.raises(RewardError, match=rf"not ready after 0.5 s: {server.url} \(HTTP 503\)"):
            remote(server.url, startup_timeout=0.5)(torch.zeros(1, 3, 4, 4), ["a"])
        assert server.requests == []
