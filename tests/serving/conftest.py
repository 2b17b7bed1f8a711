"""Reward servers for the tests: `lightning-grpo serve-reward` started on the loopback interface
in its own process group (so its LitServe workers go with it), waited for, and torn down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE_TINY = ROOT / "configs" / "serve" / "jpeg_incompressibility.yaml"
STARTUP_TIMEOUT_S = 180.0  # a 2-core machine shared with other jobs: spawning LitServe's worker imports torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RewardServer:
    """`python -m lightning_grpo serve-reward -c <config> --port <port>` as a child process group."""

    def __init__(self, config: Path, port: int, log: Path, *extra: str) -> None:
        self.config, self.port, self.log, self.extra = config, port, log, extra
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> RewardServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # the package comes from the install
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lightning_grpo", "serve-reward", "-c", str(self.config), "--port", str(self.port),
                 "--host", "127.0.0.1", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"reward server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.kill()
        raise TimeoutError(f"reward server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's whole process group (the server and its LitServe workers) and reap it."""
        if self.process is None or self.process.poll() is not None and sig != signal.SIGKILL:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(config=..., port=None, *extra) -> a ready RewardServer; every server
    started is killed at teardown."""
    servers: list[RewardServer] = []

    def start(config: Path = SERVE_TINY, port: int | None = None, *extra: str) -> RewardServer:
        server = RewardServer(config, port or free_port(), tmp_path / f"server{len(servers)}.log", *extra)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """One server of configs/tiny.yaml's reward shared by a test module."""
    server = RewardServer(SERVE_TINY, free_port(), tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield server.start()
    finally:
        server.kill()


def remote_overlay(tmp_path: Path, urls: str | list[str], **init_args) -> Path:
    """configs/remote/tiny.yaml with its URL (and any init_args) replaced, written to tmp_path."""
    overlay = yaml.safe_load((ROOT / "configs" / "remote" / "tiny.yaml").read_text())
    args = overlay["model"]["rewards"][0]["init_args"]
    args.update(url=urls, **init_args)
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path
