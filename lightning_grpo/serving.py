"""`lightning-grpo serve-reward`: any `Reward` of the project served over HTTP with LitServe.

    lightning-grpo serve-reward -c configs/serve/hps.yaml --port 8000

The config names the reward as a training config does (`reward: {class_path, init_args}`) and
the serving options below. LitServe (Lightning's serving library) runs `workers_per_device`
worker processes per device, each building the reward once, and merges concurrent requests
into one reward call (`max_batch_size` requests, waiting at most `batch_timeout` s for them).

Endpoints (all on `host:port`):
- `POST /score`: a batch in the wire format of `lightning_grpo.rewards.wire`, answered with
  the scores, the reward's name and the served version. A malformed request is refused with
  HTTP 400 naming the bad field; a reward that raises answers 500.
- `GET /health` (readiness): 200 "ok" once every worker has built its reward, 503 before.
- `GET /live` (liveness): 200 as soon as the HTTP server answers, with the served version.
- `GET /info`: the reward config, its version and the server settings.

Stopping: Ctrl+C or SIGTERM to the main process shuts the workers down with it.

The version is `<lightning-grpo version>+<first 12 hex digits of the SHA-256 of the reward
config>`: two servers of the same reward config report the same version, a server restarted
with another reward (or other options) reports another, and `RemoteReward` refuses to mix them.
The reward is built in the workers only: the main process never loads its weights.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

try:
    import litserve as ls
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError("serving rewards needs LitServe: pip install 'lightning-grpo[serve]'") from err

from lightning_grpo import __version__
from lightning_grpo.rewards.base import Reward
from lightning_grpo.rewards.wire import WireFormatError, decode_request, encode_scores

SCORE_PATH = "/score"
LIVE_PATH = "/live"


def reward_version(reward_config: dict[str, Any]) -> str:
    """`<package version>+<sha256(canonical JSON of the config)[:12]>` (see the module doc)."""
    digest = hashlib.sha256(json.dumps(reward_config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{__version__}+{digest[:12]}"


def build_reward(reward_config: dict[str, Any]) -> Reward:
    """The `Reward` of a `{class_path, init_args}` dict, built by jsonargparse as the training CLI
    builds `model.rewards` (nested rewards such as `Binary(reward=...)` included)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward, required=True)
    config = parser.parse_object({"reward": reward_config})
    return parser.instantiate_classes(config).reward


class RewardAPI(ls.LitAPI):
    """Scores batches with one reward per worker; requests merged by LitServe are scored in
    one call when their sample shapes agree (one call per shape otherwise)."""

    def __init__(self, reward_config: dict[str, Any], max_batch_size: int = 8, batch_timeout: float = 0.01) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=SCORE_PATH)
        self.reward_config = reward_config
        self.version = reward_version(reward_config)
        self.reward: Reward | None = None

    def setup(self, device: str) -> None:
        self.device = torch.device(device)
        self.reward = build_reward(self.reward_config).to(self.device).eval()

    def health(self) -> bool:
        return True  # LitServe's /health adds: every worker has finished `setup`

    def decode_request(self, request):  # untyped: LitServe reads this annotation to build the endpoint (JSON body when absent)
        try:
            return decode_request(request)
        except WireFormatError as err:
            raise HTTPException(status_code=400, detail=f"bad request: {err}") from err

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def unbatch(self, output: list) -> list:
        return list(output)

    def predict(self, inputs: Any) -> Any:
        batched = isinstance(inputs, list)
        requests = inputs if batched else [inputs]
        scores = self._score_all(requests)
        return scores if batched else scores[0]

    def _score_all(self, requests: Sequence[tuple[list[str], Tensor, Tensor | None]]) -> list[Tensor]:
        """One reward call per group of requests with the same sample shape (and the same
        presence and shape of first frames); the scores in request order."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, pixels, images) in enumerate(requests):
            key = (tuple(pixels.shape[1:]), None if images is None else tuple(images.shape[1:]))
            groups.setdefault(key, []).append(i)
        results: list[Tensor | None] = [None] * len(requests)
        for members in groups.values():
            prompts = [p for i in members for p in requests[i][0]]
            pixels = torch.cat([requests[i][1] for i in members]).to(self.device)
            firsts = [requests[i][2] for i in members]
            images = None if firsts[0] is None else torch.cat(firsts).to(self.device)
            # allow_nonfinite: a NaN goes back as null and the client decides (raise or drop the group)
            scores = self.reward(pixels, prompts, images, allow_nonfinite=True).cpu()
            for i, part in zip(members, scores.split([requests[i][1].shape[0] for i in members])):
                results[i] = part
        return results  # type: ignore[return-value]

    def encode_response(self, output: Tensor) -> dict[str, Any]:
        return {"name": self.reward.name, "version": self.version, "scores": encode_scores(output)}



def build_server(
    reward_config: dict[str, Any],
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    timeout: float = 300.0,
):
    """A `litserve.LitServer` serving the reward of `reward_config` (not started; `.run()` starts it)."""
    api = RewardAPI(reward_config, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    version = reward_version(reward_config)
    server = ls.LitServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device, timeout=timeout,
        model_metadata={"reward": reward_config, "version": version, "score_path": SCORE_PATH},
    )

    @server.app.get(LIVE_PATH)
    async def live() -> JSONResponse:
        return JSONResponse({"status": "alive", "version": version})

    return server


def serve_reward(
    reward: Reward,
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: int = 8000,
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    devices: int | Literal["auto"] = "auto",
    workers_per_device: int = 1,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    timeout: float = 300.0,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning",
) -> None:
    """Serve `reward` over HTTP until stopped (Ctrl+C / SIGTERM).

    This signature is what `lightning-grpo serve-reward` parses (`parser`); `main` serves, passing
    the reward's config to the workers rather than an instance, so the main process never loads
    the reward's weights.

    Args:
        reward: the reward, as in a training config (`class_path`, `init_args`).
        host: interface to listen on: 127.0.0.1 (this machine only, the default) or 0.0.0.0 / ::
            (every interface: a reward node that training nodes reach over the network).
        port: TCP port (1024-65535).
        accelerator: where the workers run (LitServe's; "auto": CUDA when available).
        devices: how many devices ("cuda" with devices=2 starts workers on cuda:0 and cuda:1;
            "auto": all; with "cpu" one).
        workers_per_device: reward copies per device (each a process holding the model).
        max_batch_size: requests merged into one reward call (>= 1).
        batch_timeout: seconds a worker waits to fill a batch of requests.
        timeout: seconds a request may wait in the queue before it is answered 504.
        log_level: the server's log level.
    """
    raise NotImplementedError("called through `main`, which passes the reward's config, not an instance")


def parser():
    """The jsonargparse parser of `serve-reward` (`serve_reward`'s arguments and `-c/--config`)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="lightning-grpo serve-reward", description="Serve a lightning-grpo reward over HTTP (LitServe).")
    p.add_argument("-c", "--config", action=ActionConfigFile, help="YAML with `reward:` and the options below")
    p.add_function_arguments(serve_reward)
    return p


def main(args: list[str] | None = None) -> None:
    """`lightning-grpo serve-reward ...`: parse, check the options, then serve until stopped."""
    p = parser()
    config = p.parse_args(sys.argv[1:] if args is None else args)
    if config.max_batch_size < 1:
        p.error(f"--max_batch_size must be >= 1, got {config.max_batch_size}")
    if config.workers_per_device < 1:
        p.error(f"--workers_per_device must be >= 1, got {config.workers_per_device}")
    if config.batch_timeout < 0 or config.timeout <= 0 or config.batch_timeout >= config.timeout:
        p.error(f"need 0 <= batch_timeout ({config.batch_timeout}) < timeout ({config.timeout})")
    if not 1024 <= config.port <= 65535:
        p.error(f"--port must be in 1024..65535, got {config.port}")
    reward_config = _plain(config.reward)
    server = build_server(
        reward_config, accelerator=config.accelerator, devices=config.devices, workers_per_device=config.workers_per_device,
        max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout, timeout=config.timeout,
    )
    print(f"serving reward {reward_config.get('class_path')} version {reward_version(reward_config)} on http://{config.host}:{config.port}{SCORE_PATH}", flush=True)
    # LitServe shuts its workers down on KeyboardInterrupt only; SIGTERM (`kill`, a scheduler) would
    # kill this process alone and leave the workers, and the GPU memory they hold, behind
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host=config.host, port=config.port, log_level=config.log_level, generate_client_file=False, num_api_servers=1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts and lists (picklable, JSON-able)."""
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
