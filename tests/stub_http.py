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
    """Answers every POST with `reply(path, body, index)`; keeps the requests it got."""

    def __init__(self, reply: Callable[[str, Any, int], Reply]) -> None:
        self.reply = reply
        self.requests: list[tuple[str, Any]] = []
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
