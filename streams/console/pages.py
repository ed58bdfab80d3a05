"""The console's pages: a person's view of the same reads the API returns (SPEC §10), rendered on
the server (Jinja2, every value escaped), with live updates streamed from what the console
follows on the topics (server-sent events) and charts drawn by uPlot, shipped in `static/`."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any, Iterable

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from streams.console import reads
from streams.console.live import LiveRuns

HERE = Path(__file__).parent
RANGES = (1, 6, 24, 72, 168)  # hours a page can show
STREAM_POLL_S = 0.2  # how often a page's stream looks at the live view (memory, not the store)
STREAM_KEEPALIVE_S = 15.0


def sparkline(values: Iterable[float | None], width: int = 96, height: int = 22) -> Markup:
    """A small SVG line of `values` (None: a gap), drawn from numbers only."""
    points = list(values)
    known = [v for v in points if v is not None and math.isfinite(v)]
    if len(known) < 2:
        return Markup(f'<svg class="spark" width="{width}" height="{height}"></svg>')
    low, high = min(known), max(known)
    span = (high - low) or 1.0
    step = width / max(len(points) - 1, 1)
    segments, current = [], []
    for i, value in enumerate(points):
        if value is None or not math.isfinite(value):
            if current:
                segments.append(current)
            current = []
            continue
        current.append(f"{i * step:.1f},{height - 2 - (value - low) / span * (height - 4):.1f}")
    if current:
        segments.append(current)
    lines = "".join(f'<polyline points="{" ".join(segment)}"/>' for segment in segments if len(segment) > 1)
    return Markup(f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{lines}</svg>')


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "usd":
        return f"${value:.4f}" if value < 10 else f"${value:,.2f}"
    if kind == "ms":
        return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _time(ms: int | None) -> str:
    from datetime import datetime, timezone

    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class Pages:
    def __init__(self, read: reads.Read, live: LiveRuns | None, policy=None) -> None:  # noqa: ANN001
        self.read = read
        self.live = live
        self.policy = policy
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.filters.update(fmt=_fmt, time=_time, spark=sparkline,
                                json=lambda value: Markup(orjson.dumps(value).decode()
                                                          .replace("<", "\\u003c").replace(">", "\\u003e")
                                                          .replace("&", "\\u0026")))

    def render(self, request: Request, template: str, **context: Any) -> HTMLResponse:
        hours, agent_id = _filters(request)
        page = self.env.get_template(template).render(
            request=request, hours=hours, agent_id=agent_id, ranges=RANGES, path=request.url.path, **context)
        return HTMLResponse(page)

    # -- pages (sync: the store reads block, Starlette runs them in its thread pool)

    def fleet(self, request: Request) -> Response:
        hours, agent_id = _filters(request)
        rows = [row for row in reads.fleet(self.read, hours) if not agent_id or row["agent_id"] == agent_id]
        series = reads.fleet_series(self.read, hours, agent_id)
        return self.render(request, "fleet.html", rows=rows, series=series)

    def live_runs(self, request: Request) -> Response:
        _, agent_id = _filters(request)
        runs = self.live.snapshot(agent_id) if self.live is not None else []
        budgets = {}
        if self.policy is not None:
            budgets = {run["agent_id"]: self.policy.budget(run["agent_id"], "run_usd") for run in runs}
        return self.render(request, "live.html", runs=runs, budgets=budgets, live=self.live is not None)

    def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        row = reads.run(self.read, run_id)
        live = self.live.get(run_id) if self.live is not None else None
        events = row["events"] if row is not None else reads.run_events(self.read, run_id)
        if row is None and live is None and not events:
            return self.render(request, "missing.html", what=f"run {run_id}")
        context = reads.run_context(self.read, run_id, row["failure_cluster_id"] if row else "")
        waterfall = _waterfall(events)
        return self.render(request, "run.html", run_id=run_id, row=row, live=live, events=events,
                           waterfall=waterfall, **context)

    def alerts(self, request: Request) -> Response:
        params = request.query_params
        status, kind, severity = params.get("status", ""), params.get("kind", ""), params.get("severity", "")
        _, agent_id = _filters(request)
        rows = reads.alerts(self.read, status=status if status in ("firing", "resolved") else "", kind=kind,
                            agent_id=agent_id, severity=severity, limit=500)
        kinds = sorted({row["kind"] for row in reads.alerts(self.read, limit=5000)})
        return self.render(request, "alerts.html", rows=rows, status=status, kind=kind, severity=severity,
                           kinds=kinds)

    def canaries(self, request: Request) -> Response:
        _, agent_id = _filters(request)
        rows = [row for row in reads.canaries(self.read) if not agent_id or row["agent_id"] == agent_id]
        rollbacks = {(r["agent_id"], r["from_version"]): r for r in reads.rollbacks(self.read)}
        deployments = reads.deployments(self.read, agent_id)
        return self.render(request, "canaries.html", rows=rows, rollbacks=rollbacks, deployments=deployments)

    def canary(self, request: Request) -> Response:
        agent_id, version = request.path_params["agent_id"], request.path_params["version"]
        row = reads.canary(self.read, agent_id, version)
        if row is None:
            return self.render(request, "missing.html", what=f"canary analysis of {agent_id} {version}")
        trajectory = reads.canary_trajectory(self.read, row, self.policy.canary(agent_id) if self.policy else None)
        rollback = next((r for r in reads.rollbacks(self.read) if r["agent_id"] == agent_id
                         and r["from_version"] == version), None)
        return self.render(request, "canary.html", row=row, trajectory=trajectory, rollback=rollback)

    # -- live streams (server-sent events from the live view, in memory)

    async def live_stream(self, request: Request) -> Response:
        if self.live is None:
            return Response("the live view is off", status_code=503)
        live, agent_id = self.live, request.query_params.get("agent_id", "")

        async def events():
            seen = -1
            idle = 0.0
            while not await request.is_disconnected():
                if live.version != seen:
                    seen = live.version
                    idle = 0.0
                    yield b"data: " + orjson.dumps(live.snapshot(agent_id)) + b"\n\n"
                elif idle >= STREAM_KEEPALIVE_S:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                await asyncio.sleep(STREAM_POLL_S)
                idle += STREAM_POLL_S

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def alert_stream(self, request: Request) -> Response:
        if self.live is None:
            return Response("the live view is off", status_code=503)
        live = self.live

        async def events():
            _, seen = live.recent_alerts(0)
            idle = 0.0
            while not await request.is_disconnected():
                new, seen = live.recent_alerts(seen)
                for alert in new:
                    idle = 0.0
                    yield b"data: " + orjson.dumps(alert) + b"\n\n"
                if idle >= STREAM_KEEPALIVE_S:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                await asyncio.sleep(STREAM_POLL_S)
                idle += STREAM_POLL_S

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _filters(request: Request) -> tuple[int, str]:
    try:
        hours = min(max(int(request.query_params.get("hours", 24)), 1), 24 * 366)
    except ValueError:
        hours = 24
    return hours, request.query_params.get("agent_id", "")


def _waterfall(events: list[dict]) -> list[dict]:
    """Each call of a run as a bar: its start (its event time minus its latency) and length, in
    percent of the run's span."""
    calls = [e for e in events if e["type"] in ("llm_call", "tool_call")]
    if not events:
        return []
    starts = [e["ts"] - (e.get("latency_ms") or 0) for e in calls] + [e["ts"] for e in events]
    begin, end = min(starts), max(e["ts"] for e in events)
    span = max(end - begin, 1)
    bars = []
    for e in calls:
        latency = e.get("latency_ms") or 0
        bars.append({"event": e, "left": (e["ts"] - latency - begin) / span * 100,
                     "width": max(latency / span * 100, 0.4)})
    return bars
