"""`RemoteReward`: a reward scored by a reward server (`lightning-grpo serve-reward`), over HTTP.

    rewards:
      - class_path: lightning_grpo.rewards.RemoteReward
        init_args: {url: http://reward-node:8000, name: hps, weight: 0.7}

To the training loop it is a `Reward` like any other: same call, same validation, logged under
its `name`. Behind the call:

- **Batching**: a reward call is split into requests of at most `batch_size` samples, sent
  concurrently (`max_in_flight` at once); the server merges concurrent requests again.
- **Load balancing**: `url` may list several servers of the same reward; requests go round-robin
  over them, and a retry goes to the next server.
- **Timeouts and retries**: each request waits at most `timeout` s; a refused connection, a
  timeout and HTTP 5xx (not ready, overloaded, crashed) are retried `retries` times with
  exponential back-off (`backoff`·2^k s, at most 30 s). HTTP 4xx is a bad request and is not
  retried.
- **Failures**: after the last retry a `RewardError` names the reward, every URL tried and the
  HTTP status or network error of each. Under `GRPOModule(reward_failure="drop_group")` the
  samples of the failed requests score NaN instead (a warning names the URL and status), so their
  groups are dropped and training goes on; `max_skipped_steps` stops a run whose server stays down.
- **Versions**: every answer carries the served reward's name and version (`serve-reward`
  hashes its reward config). All answers of a run must carry the same version: a server that
  was restarted with another reward, or a pool mixing two rewards, raises `RewardError`;
  `expected_version` pins it from the start.
"""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_grpo.rewards.base import Reward, RewardError, ServiceClientState
from lightning_grpo.rewards.wire import ENCODINGS, Encoding, WireFormatError, decode_scores, encode_request

MAX_BACKOFF_S = 30.0


@dataclass
class _Attempt:
    """What one try of one request got: the URL and its status ("HTTP 503: ...", "timed out")."""

    url: str
    status: str


class RemoteReward(ServiceClientState, Reward):
    """Scores from one or more reward servers (see the module doc).

    Args:
        url: base URL of a server (`http://host:port`), or a list of servers of the same reward.
        name: the name the reward is logged under (default "remote"; set it, e.g. "hps").
        weight: weight in the multi-reward advantage.
        batch_size: samples per request (>= 1).
        encoding: wire encoding of the pixels: "uint8" (default), "png" or "float32" (exact
            floats; see `lightning_grpo.rewards.wire`).
        timeout: seconds one request may take, connection included (> 0).
        retries: extra tries of a failed request (>= 0); each goes to the next server.
        backoff: seconds before the first retry, doubled at each further one (>= 0).
        max_in_flight: requests sent at once (default: the number of servers).
        expected_version: the served version to accept (see `lightning-grpo serve-reward`'s
            /info); None accepts the first one seen and then only that one.
        startup_timeout: before its first request, wait up to this many seconds for every server
            to answer /health (a reward model may take minutes to load: training and server can
            then be started together); 0 (default) sends at once, and a server not yet up costs
            the retries.
        score_path: the scoring endpoint of the servers.
    """

    default_name = "remote"

    def __init__(
        self,
        url: str | list[str],
        name: str | None = None,
        weight: float = 1.0,
        batch_size: int = 16,
        encoding: Encoding = "uint8",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_in_flight: int | None = None,
        expected_version: str | None = None,
        startup_timeout: float = 0.0,
        score_path: str = "/score",
    ) -> None:
        super().__init__(name, weight)
        urls = [url] if isinstance(url, str) else list(url)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"reward {self.name!r}: url must be one or more http(s):// URLs, got {url!r}")
        if batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        if encoding not in ENCODINGS:
            raise ValueError(f"reward {self.name!r}: encoding must be one of {ENCODINGS}, got {encoding!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"reward {self.name!r}: need timeout > 0, retries >= 0, backoff >= 0 (got {timeout}, {retries}, {backoff})")
        if startup_timeout < 0:
            raise ValueError(f"reward {self.name!r}: startup_timeout must be >= 0, got {startup_timeout}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"reward {self.name!r}: max_in_flight must be >= 1, got {max_in_flight}")
        self.urls = [u.rstrip("/") for u in urls]
        self.batch_size, self.encoding = int(batch_size), encoding
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_in_flight = max_in_flight or len(self.urls)
        self.score_path = score_path if score_path.startswith("/") else f"/{score_path}"
        self.startup_timeout = float(startup_timeout)
        self._waited = startup_timeout == 0
        self.served_version = expected_version  # the version every answer must carry (None: the first one seen)
        self.served_name: str | None = None
        self._allow_nonfinite = False
        self._next_server = 0
        self._lock = threading.Lock()
        self._client = None

    # -- the Reward contract
    @torch.no_grad()
    def forward(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None, allow_nonfinite: bool = False) -> Tensor:
        """`Reward.forward`; with `allow_nonfinite` (drop_group) a failed request scores NaN."""
        self._allow_nonfinite = allow_nonfinite
        return super().forward(pixels, prompts, images, allow_nonfinite=allow_nonfinite)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        if not self._waited:  # once per process: the servers may still be loading their models
            self.wait_until_ready(self.startup_timeout)
            self._waited = True
        chunks = list(torch.arange(pixels.shape[0]).split(self.batch_size))
        with self._lock:
            first, self._next_server = self._next_server, (self._next_server + len(chunks)) % len(self.urls)
        jobs = [(chunk, (first + k) % len(self.urls)) for k, chunk in enumerate(chunks)]

        def send(job: tuple[Tensor, int]) -> Tensor:
            chunk, server = job
            idx = chunk.tolist()
            images_chunk = None if images is None else images[chunk.to(images.device)]
            body = encode_request([prompts[i] for i in idx], pixels[chunk.to(pixels.device)], images_chunk, self.encoding)
            return self._post_with_retries(body, len(idx), server)

        if len(jobs) == 1 or self.max_in_flight == 1:
            parts = [send(job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(jobs))) as pool:
                parts = list(pool.map(send, jobs))
        return torch.cat(parts).to(pixels.device)

    # -- HTTP
    def _http(self):
        """One shared httpx client (thread-safe; keeps connections alive between requests)."""
        with self._lock:
            if self._client is None:
                try:
                    import httpx
                except ImportError as err:
                    raise ImportError("RemoteReward needs httpx: pip install 'lightning-grpo[serve]'") from err
                self._client = httpx.Client(timeout=httpx.Timeout(self.timeout))
            return self._client

    def _post_with_retries(self, body: dict, count: int, server: int) -> Tensor:
        """Scores [count] of one request, trying servers server, server+1, ... with back-off;
        NaN (drop_group) or `RewardError` naming every attempt when all tries fail."""
        import httpx

        attempts: list[_Attempt] = []
        for attempt in range(self.retries + 1):
            url = self.urls[(server + attempt) % len(self.urls)]
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self._http().post(url + self.score_path, json=body)
            except httpx.TimeoutException as err:
                attempts.append(_Attempt(url, f"timed out after {self.timeout:g} s ({type(err).__name__})"))
                continue
            except httpx.HTTPError as err:  # refused, reset, DNS...: the server is down or unreachable
                attempts.append(_Attempt(url, f"{type(err).__name__}: {err}"))
                continue
            if response.status_code >= 500:
                attempts.append(_Attempt(url, f"HTTP {response.status_code}: {response.text[:200]}"))
                continue
            if response.status_code != 200:  # a bad request: retrying sends the same bytes again
                attempts.append(_Attempt(url, f"HTTP {response.status_code}: {response.text[:300]}"))
                break
            return self._read_answer(response, url, count)
        return self._failed(attempts, count)

    def _read_answer(self, response, url: str, count: int) -> Tensor:
        try:
            answer = response.json()
            scores = decode_scores(answer.get("scores") if isinstance(answer, dict) else None, count)
        except (ValueError, WireFormatError) as err:
            raise RewardError(f"reward {self.name!r}: {url} answered something that is not a score list: {err}") from err
        name, version = answer.get("name"), answer.get("version")
        with self._lock:
            if self.served_version is None:
                self.served_version, self.served_name = version, name
            elif version != self.served_version:
                raise RewardError(
                    f"reward {self.name!r}: {url} serves version {version!r} ({name!r}), expected {self.served_version!r}: "
                    "a server was restarted with another reward config, or the URLs serve different rewards"
                )
            self.served_name = name
        return scores

    def _failed(self, attempts: list[_Attempt], count: int) -> Tensor:
        tried = "; ".join(f"{a.url}: {a.status}" for a in attempts)
        message = f"reward {self.name!r}: request of {count} samples failed after {len(attempts)} attempt(s) ({tried})"
        if not self._allow_nonfinite:
            raise RewardError(message)
        warnings.warn(f"{message}; scoring them NaN (reward_failure='drop_group' drops their groups)", RuntimeWarning, stacklevel=2)
        return torch.full((count,), float("nan"))

    # -- readiness, pickling
    def wait_until_ready(self, timeout: float = 60.0, poll: float = 0.25) -> None:
        """Block until every server answers /health with 200, or `RewardError` naming those that
        did not within `timeout` seconds."""
        import httpx

        deadline, pending = time.monotonic() + timeout, list(self.urls)
        last: dict[str, str] = {}
        while pending and time.monotonic() < deadline:
            for url in list(pending):
                try:
                    response = self._http().get(url + "/health", timeout=min(5.0, self.timeout))
                    if response.status_code == 200:
                        pending.remove(url)
                    else:
                        last[url] = f"HTTP {response.status_code}"
                except httpx.HTTPError as err:
                    last[url] = type(err).__name__
            if pending:
                time.sleep(poll)
        if pending:
            raise RewardError(f"reward {self.name!r}: not ready after {timeout:g} s: " + ", ".join(f"{u} ({last.get(u, '?')})" for u in pending))

    def extra_repr(self) -> str:
        return f"urls={self.urls}, batch_size={self.batch_size}, encoding={self.encoding!r}, retries={self.retries}"

