"""A scripted HTTP server on 127.0.0.1 for client tests (the judge's chat API, a failing reward
server): a thread of the test process, started and stopped by a fixture, never a real model."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, Any]  # (HTTP status, JSON body or str)


class StubServer:
    """Answers every POST with `reply(path, body, index)` and every GET with `get(path, index)`
    (default: 501, as http.server does); keeps the requests it got (GETs in `gets`)."""

    def __init__(self, reply: Callable[[str, Any, int], Reply], get: Callable[[str, int], Reply] | None = None) -> None:
        self.reply, self.get = reply, get
        self.requests: list[tuple[str, Any]] = []
        self.gets: list[str] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                with stub._lock:
                    index = len(stub.requests)
                    stub.requests.append((self.path, body))
                status, payload = stub.reply(self.path, body, index)
                self._send(status, payload)

            def do_GET(self) -> None:  # noqa: N802
                if stub.get is None:
                    self.send_error(501)
                    return
                with stub._lock:
                    index = len(stub.gets)
                    stub.gets.append(self.path)
                status, payload = stub.get(self.path, index)
                self._send(status, payload)

            def _send(self, status: int, payload: Any) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
