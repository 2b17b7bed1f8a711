"""`lightning-grpo serve-reward` (LitServe) on 127.0.0.1: endpoints, scores equal to the local
reward's in every encoding, malformed requests refused with 400, and the config checks."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from lightning_grpo.cli import main
from lightning_grpo.rewards import JpegIncompressibility, RemoteReward
from lightning_grpo.rewards.wire import encode_request
from lightning_grpo.serving import RewardAPI, build_reward, reward_version
from tests.serving.conftest import SERVE_TINY

JPEG = {"class_path": "lightning_grpo.rewards.compressibility.JpegIncompressibility", "init_args": {"quality": 95}}


@pytest.mark.timeout(300)
def test_endpoints_scores_and_bad_requests(tiny_server):
    url = tiny_server.url
    assert httpx.get(url + "/health", timeout=10).text == "ok"
    live = httpx.get(url + "/live", timeout=10).json()
    info = httpx.get(url + "/info", timeout=10).json()
    assert live["status"] == "alive" and live["version"] == info["model"]["version"]
    assert info["model"]["reward"]["class_path"] == JPEG["class_path"] and info["model"]["score_path"] == "/score"
    assert info["model"]["version"] == reward_version(info["model"]["reward"])
    # the same scores as the local reward, in each encoding, for images and clips
    torch.manual_seed(0)
    for pixels in (torch.rand(5, 3, 16, 16), torch.rand(2, 3, 3, 8, 8)):
        prompts = [f"p{i}" for i in range(pixels.shape[0])]
        local = JpegIncompressibility()(pixels, prompts)
        for encoding in ("uint8", "png", "float32"):
            remote = RemoteReward(url, encoding=encoding, batch_size=2, name="jpeg_incompressibility")(pixels, prompts)
            assert torch.equal(remote, local), encoding
    # a malformed request: 400 naming the field
    body = encode_request(["a"], torch.rand(1, 3, 4, 4))
    body["pixels"]["shape"] = [1, 3, 4, 5]
    response = httpx.post(url + "/score", json=body, timeout=30)
    assert response.status_code == 400 and "pixels: 48 bytes for shape [1, 3, 4, 5]" in response.json()["detail"]
    answer = httpx.post(url + "/score", json=encode_request(["a"], torch.zeros(1, 3, 4, 4)), timeout=30).json()
    assert answer["name"] == "jpeg_incompressibility" and answer["version"] == live["version"] and len(answer["scores"]) == 1


def test_requests_merged_by_litserve_are_scored_per_shape_and_split_back():
    api = RewardAPI(JPEG, max_batch_size=4)
    api.setup("cpu")
    assert torch.is_grad_enabled()  # setup runs in the caller's process here: no global switch may leak out
    requests = [
        (["a", "b"], torch.rand(2, 3, 8, 8), None),
        (["c"], torch.rand(1, 3, 16, 16), None),  # another shape: scored in its own call
        (["d", "e", "f"], torch.rand(3, 3, 8, 8), None),
    ]
    outputs = api.predict(requests)
    local = JpegIncompressibility()
    assert len(outputs) == 3
    for (prompts, pixels, _), scores in zip(requests, outputs):
        assert torch.equal(scores, local(pixels, prompts))
    assert torch.equal(api.predict(requests[1]), local(requests[1][1], ["c"]))  # max_batch_size 1: one request, unbatched
    encoded = api.encode_response(torch.tensor([1.0, float("nan")]))
    assert encoded["scores"] == [1.0, None] and encoded["name"] == "jpeg_incompressibility" and encoded["version"] == api.version


def test_version_follows_the_reward_config():
    assert reward_version(JPEG) == reward_version({"init_args": {"quality": 95}, "class_path": JPEG["class_path"]})  # key order
    assert reward_version(JPEG) != reward_version({**JPEG, "init_args": {"quality": 90}})


def test_nested_reward_configs_are_built():
    binary = build_reward({"class_path": "lightning_grpo.rewards.Binary", "init_args": {"threshold": 0.5, "reward": JPEG}})
    assert binary.name == "jpeg_incompressibility_binary" and isinstance(binary.reward, JpegIncompressibility)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ("--max_batch_size=0", r"--max_batch_size must be >= 1, got 0"),
        ("--workers_per_device=0", r"--workers_per_device must be >= 1"),
        ("--batch_timeout=400", r"need 0 <= batch_timeout \(400.0\) < timeout \(300.0\)"),
        ("--port=80", r"--port must be in 1024..65535, got 80"),
        ("--host=10.0.0.1", r"host"),
        ("--reward.init_args.quality=high", r"quality"),
    ],
)
def test_bad_server_options_stop_before_serving(option, match, capsys):
    with pytest.raises(SystemExit):
        main(["serve-reward", "-c", str(SERVE_TINY), option])
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.timeout(300)
def test_sigterm_to_the_server_stops_its_workers_too(start_server):
    """`kill <pid>` (a scheduler's SIGTERM) of the main process: LitServe only shuts its workers down
    on KeyboardInterrupt, so without serve-reward's handler they outlived it (checked: the group
    was still alive 30 s later), holding the reward model's memory."""
    import os
    import signal
    import time

    server = start_server()
    group = server.process.pid  # the server leads its own process group (conftest)
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)  # any process left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.25)
    pytest.fail("LitServe workers outlived the server's main process")
