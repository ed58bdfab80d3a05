"""A real local HTTP server that plays Alertmanager (`/api/v2/alerts`) and a webhook (any other path).

It records every request and answers from a per-path script of statuses (then 200).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AM_PATH = "/api/v2/alerts"


@dataclass
class Request:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.requests: list[Request] = []
        self.script: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?")[0]
                with receiver.lock:
                    receiver.requests.append(Request(time.monotonic(), self.path, dict(self.headers), body))
                    steps = receiver.script.get(path) or []
                    status, headers, answer = steps.pop(0) if steps else (200, {}, b"")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, path: str, *steps: int | tuple[int, dict[str, str], bytes]) -> None:
        """Script the next answers on `path`: a status, or (status, headers, body)."""
        with self.lock:
            self.script.setdefault(path, []).extend(
                step if isinstance(step, tuple) else (step, {}, b"") for step in steps)

    def on(self, path: str) -> list[Request]:
        with self.lock:
            return [request for request in self.requests if request.path.split("?")[0] == path]

    def am_alerts(self) -> list[dict]:
        """Every postable alert Alertmanager was sent, in order."""
        return [alert for request in self.on(AM_PATH) for alert in request.json()]
