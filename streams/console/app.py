"""The console's HTTP side (SPEC §10): the JSON API over `reads.py` and `live.py`, `/healthz`, the
token rules, and the server `up` and `trackside console` run in a thread."""

from __future__ import annotations

import getpass
import hmac
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from streams.console import reads
from streams.console.live import LiveRuns
from streams.contracts.controls import STOP_RUN, InvalidControl, make_control
from streams.errors import ConfigError, TracksideError
from streams.settings import Settings

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_LIMIT = 5_000


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def _error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Console:
    """What the endpoints share: the store reader, the live runs, the settings (token, issuing)."""

    def __init__(self, settings: Settings, read: reads.Read, live: LiveRuns | None, issue=None) -> None:  # noqa: ANN001
        self.settings = settings
        self.read = read
        self.live = live
        self.token = settings.console_token.get_secret_value()
        self.open_reads = is_loopback(settings.console_host)  # beyond loopback every request needs the token
        if not self.open_reads and not self.token:
            raise ConfigError(f"the console listens on {settings.console_host}, beyond 127.0.0.1: "
                              "set TRACKSIDE_CONSOLE_TOKEN (every request must send it as a bearer token)")
        if issue is None:
            from streams.ops.controls import issue
        self.issue = issue

    def app(self) -> Starlette:
        from starlette.routing import Mount
        from starlette.staticfiles import StaticFiles

        from streams.console.pages import HERE, Pages

        settings = self.settings
        pages = Pages(self.read, self.live, settings.policy(), window_s=settings.window_seconds,
                      metrics_url=f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
                      if settings.metrics_port else "")
        routes = [
            Route("/", pages.fleet),
            Route("/live", pages.live_runs),
            Route("/runs/{run_id:path}", pages.run),
            Route("/alerts", pages.alerts),
            Route("/canaries", pages.canaries),
            Route("/canaries/{agent_id}/{version:path}", pages.canary),
            Route("/drift", pages.drift),
            Route("/drift/{agent_id}/{version:path}", pages.drift_cell),
            Route("/tools", pages.tools),
            Route("/failure-modes", pages.failure_modes),
            Route("/dead-letters", pages.dead_letters),
            Route("/pipeline", pages.pipeline),
            Route("/api/v1/pipeline", pages.pipeline_json),
            Route("/api/v1/runs/live/stream", pages.live_stream),
            Route("/api/v1/alerts/stream", pages.alert_stream),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            Route("/healthz", self.healthz),
            Route("/api/v1/fleet", self.fleet),
            Route("/api/v1/runs/live", self.live_runs),
            Route("/api/v1/runs/{run_id:path}/stop", self.stop_run, methods=["POST"]),
            Route("/api/v1/runs/{run_id:path}", self.run),
            Route("/api/v1/alerts", self.alerts),
            Route("/api/v1/canaries", self.canaries),
            Route("/api/v1/canaries/{agent_id}/{version:path}/gate", self.canary_gate),
            Route("/api/v1/canaries/{agent_id}/{version:path}", self.canary),
        ]
        return Starlette(routes=routes, middleware=[Middleware(_Guard, console=self)])

    # -- endpoints (sync: Starlette runs them in its thread pool, store reads block)

    def healthz(self, request: Request) -> Response:
        try:
            ok = reads.healthy(self.read)
        except Exception as error:  # noqa: BLE001 (any failure to read is "not healthy")
            return _error(503, f"the store cannot be read: {str(error)[:500]}")
        # `live`: the live view follows the topics (it joins them a few seconds after start)
        live = self.live is not None and self.live.listening.is_set()
        return JSON({"ok": ok, "live": live}, status_code=200 if ok else 503)

    def fleet(self, request: Request) -> Response:
        hours = _int(request, "hours", 24, 1, 24 * 366)
        return JSON(reads.fleet(self.read, hours))

    def live_runs(self, request: Request) -> Response:
        if self.live is None:
            return _error(503, "the live view is off (no broker)")
        return JSON(self.live.snapshot(request.query_params.get("agent_id", "")))

    def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        found = reads.run(self.read, run_id)
        if found is not None:
            return JSON({**found, "open": False})
        live = self.live.get(run_id) if self.live is not None else None
        events = reads.run_events(self.read, run_id)
        if live is None and not events:
            return _error(404, f"no run {run_id!r}")
        # still going: as assembled so far (the live view's numbers, the events landed so far)
        head = live or {"run_id": run_id, "agent_id": events[0]["agent_id"], "agent_version": events[0]["agent_version"],
                        "started_at": events[0]["ts"]}
        return JSON({**head, "open": True, "events": events})

    def alerts(self, request: Request) -> Response:
        params = request.query_params
        status = params.get("status", "")
        if status not in ("", "firing", "resolved"):
            return _error(400, "status is firing or resolved")
        return JSON(reads.alerts(self.read, status=status, kind=params.get("kind", ""),
                                 agent_id=params.get("agent_id", ""), severity=params.get("severity", ""),
                                 limit=_int(request, "limit", 500, 1, MAX_LIMIT)))

    def canaries(self, request: Request) -> Response:
        return JSON(reads.canaries(self.read))

    def canary(self, request: Request) -> Response:
        found = reads.canary(self.read, request.path_params["agent_id"], request.path_params["version"])
        if found is None:
            return _error(404, "no canary analysis of this agent version")
        return JSON(found)

    def canary_gate(self, request: Request) -> Response:
        """The canary verdict as a status code, for deploy tooling that reads only that (a Flagger
        webhook: 2xx passes): 200 pending or promote, 409 rollback, 404 never analysed; the body
        is the analysis, as GET /api/v1/canaries/{agent_id}/{version} returns it."""
        found = reads.canary(self.read, request.path_params["agent_id"], request.path_params["version"])
        if found is None:
            return _error(404, "no canary analysis of this agent version")
        return JSON(found, status_code=409 if found["verdict"] == "rollback" else 200)

    async def stop_run(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, "the body is too large")
        try:
            payload = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError:
            return _error(400, 'the body is JSON: {"reason": "..."}')
        if not isinstance(payload, dict) or not isinstance(payload.get("reason"), str):
            return _error(400, 'a reason is required: {"reason": "..."}')
        by = payload.get("by") if isinstance(payload.get("by"), str) and payload.get("by") else f"console:{getpass.getuser()}"
        try:
            control = make_control(action=STOP_RUN, run_id=request.path_params["run_id"], reason=payload["reason"],
                                   issued_by=by, ts=time.time_ns() // 1_000_000)
        except InvalidControl as error:
            return _error(400, str(error))
        from starlette.concurrency import run_in_threadpool

        try:
            await run_in_threadpool(self.issue, self.settings, control)
        except TracksideError as error:
            return _error(503, str(error))
        return JSON(control, status_code=201)


class _Guard:
    """The token rules of SPEC §10, and a POST safe against cross-site requests: it must send
    JSON (a cross-site form cannot without a preflight) and, when the browser names its origin,
    come from the console's own."""

    def __init__(self, app, console: Console) -> None:  # noqa: ANN001
        self.app = app
        self.console = console

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> Response | None:
        console = self.console
        post = request.method not in ("GET", "HEAD", "OPTIONS")
        if console.token and (post or not console.open_reads):
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {console.token}".encode()):
                return _error(401, "a bearer token is required (TRACKSIDE_CONSOLE_TOKEN)")
        if post:
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return _error(415, "send JSON (Content-Type: application/json)")
            origin = request.headers.get("origin")
            if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
                return _error(403, "a request from another site")
        return None


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        return min(max(int(text), low), high)
    except ValueError:
        return default


class ConsoleServer:
    """The console in a thread of its own (uvicorn), with its live view; `stop` ends both."""

    def __init__(self, settings: Settings, read: reads.Read, *, live: bool | str = True) -> None:
        """`live`: True follows the topics, "fed" is fed by a sink in this process (`trackside
        up`), False has no live view."""
        self.settings = settings
        self.live = LiveRuns(settings.kafka_config, settings.run_idle_timeout_seconds * 1000, read,
                             session_timeout_ms=settings.session_timeout_ms, fed=live == "fed") if live else None
        self.console = Console(settings, read, self.live)
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.console_host}:{self.settings.console_port}/"

    def start(self) -> bool:
        """Serve; False (a warning in the log) when the port is taken, as for /metrics."""
        import uvicorn

        host, port = self.settings.console_host, self.settings.console_port
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as error:
            log.warning("no console: cannot listen on %s:%d (%s); set TRACKSIDE_CONSOLE_PORT", host, port, error)
            return False
        if self.live is not None:
            self.live.start()
        config = uvicorn.Config(self.console.app(), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1)  # open live streams end at stop
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(self._server.started)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self.live is not None:
            self.live.stop()
