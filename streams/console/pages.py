"""The console's pages: a person's view of the same reads the API returns (SPEC §10), rendered on
the server (Jinja2, every value escaped), with live updates streamed from what the console
follows on the topics (server-sent events) and charts drawn by uPlot, shipped in `static/`."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any, Iterable

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from streams.console import reads
from streams.console.live import LiveRuns

HERE = Path(__file__).parent
RANGES = (1, 6, 24, 72, 168)  # hours a page can show
STREAM_POLL_S = 0.2  # how often a page's stream looks at the live view (memory, not the store)
STREAM_KEEPALIVE_S = 15.0
# The pipeline page's figures: totals, and rates between two readings of /metrics.
PIPELINE_TOTALS = {
    "events_ingested": "trackside_events_ingested_total", "dead_letters": "trackside_dead_letters_total",
    "sink_inflight_messages": "trackside_sink_inflight_messages", "store_retrying": "trackside_store_retrying",
    "broker_resident_bytes": "trackside_broker_resident_bytes",
}
PIPELINE_RATES = {"events_per_s": "trackside_events_ingested_total", "dead_letters_per_s": "trackside_dead_letters_total"}


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


def heatmap_body(agent: str, version: str, cells: dict, hours: int) -> Markup:
    """The rows of a version's drift heatmap (`reads.drift`'s): a row per feature, a cell per
    column (a window, or a bucket of windows showing one test), linked to its test's page. Built
    here rather than in the template: a day of 5-minute windows is thousands of cells, and a loop
    of Jinja filters took ~20 µs a cell (measured)."""
    out = []
    escaped: dict[str, str] = {}  # a page repeats its statistics, baselines and many numbers

    def esc(text: str) -> str:
        done = escaped.get(text)
        if done is None:
            done = escaped[text] = str(escape(text))
        return done

    link = f"/drift/{escape(agent)}/{escape(version)}?feature="
    times = {w: _time(w) for w in cells["windows"]}
    for f in cells["features"]:
        feature = escape(f)
        out.append(f"<tr><th>{feature}</th>\n")
        for w in cells["windows"]:
            c = cells["cells"].get((f, w))
            if not c:
                out.append('<td class="cell none"></td>\n')
                continue
            p, tested = c["p_value"], c["window_ms"]
            level = min(-1 * math.log10(max(p or 1, 1e-300)) / 6, 1) if p else 0
            when = times.get(tested)
            if when is None:  # a bucket's test: its own window
                when = times[tested] = _time(tested)
            out.append(
                f'<td class="cell {"significant" if c["significant"] else ""}" style="--level: {level:.2f}"\n'
                f'   title="{feature} at {when}: {esc(c["statistic"])} {esc(_fmt(c["value"]))}, '
                f'p={esc(_fmt(p))} (BH threshold {esc(_fmt(c["threshold"]))}) against {esc(c["baseline"])}">\n'
                f'  <a href="{link}{feature}&window={tested}&hours={hours}"></a></td>\n')
        out.append("</tr>\n")
    return Markup("".join(out))


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
    def __init__(self, read: reads.Read, live: LiveRuns | None, policy=None, *,  # noqa: ANN001 (a Policy)
                 metrics_url: str = "", window_s: int = 300) -> None:
        self.read = read
        self.live = live
        self.policy = policy
        self.metrics_url = metrics_url  # the stack's /metrics, which the pipeline page reads
        self.window_s = window_s
        self._pipeline: tuple[float, dict] | None = None  # the last reading, for rates
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.globals["heatmap_body"] = heatmap_body
        self.env.filters.update(fmt=_fmt, time=_time, spark=sparkline, log10=lambda x: math.log10(max(x, 1e-300)),
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
        kinds = reads.alert_kinds(self.read)
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

    def failure_modes(self, request: Request) -> Response:
        hours, agent_id = _filters(request)
        return self.render(request, "failure_modes.html", rows=reads.failure_modes(self.read, hours, agent_id))

    def dead_letters(self, request: Request) -> Response:
        hours, _ = _filters(request)
        return self.render(request, "dead_letters.html", rows=reads.dead_letters(self.read, hours))

    def tools(self, request: Request) -> Response:
        hours, agent_id = _filters(request)
        rows, series = reads.tools(self.read, hours, agent_id)
        return self.render(request, "tools.html", rows=rows, series=series)

    def drift(self, request: Request) -> Response:
        hours, agent_id = _filters(request)
        return self.render(request, "drift.html",
                           versions=reads.drift(self.read, hours, agent_id, window_s=self.window_s))

    def drift_cell(self, request: Request) -> Response:
        agent_id, version = request.path_params["agent_id"], request.path_params["version"]
        feature = request.query_params.get("feature", "")
        try:
            window_ms = int(request.query_params.get("window", ""))
        except ValueError:
            return self.render(request, "missing.html", what="drift window (?window=epoch ms)")
        test = reads.drift_test(self.read, agent_id, version, feature, window_ms)
        sample = reads.drift_sample(self.read, agent_id, version, feature.split("@")[0], window_ms, self.window_s)
        return self.render(request, "drift_cell.html", agent=agent_id, version=version, feature=feature,
                           window_ms=window_ms, test=test, sample=sample)

    def pipeline(self, request: Request) -> Response:
        return self.render(request, "pipeline.html", figures=self.pipeline_figures())

    def pipeline_json(self, request: Request) -> Response:
        from streams.console.app import JSON

        return JSON(self.pipeline_figures())

    def pipeline_figures(self) -> dict:
        """The stack's own figures, from its /metrics: events/s (between two readings), each stage's
        lag and the age of its last message, the store's backlog and retries, dead letters."""
        import urllib.request

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except OSError as error:
            return {"error": f"no /metrics at {self.metrics_url}: {error}"}
        now, values = time.monotonic(), parse_metrics(text)
        previous, self._pipeline = self._pipeline, (now, values)
        figures: dict = {"stages": {}, "totals": {}}
        for (name, labels), value in values.items():
            if name in ("trackside_stage_lag_seconds", "trackside_stage_last_message_age_seconds"):
                stage = labels.get("stage", "") + (f" {labels['partition']}" if "partition" in labels else "")
                figures["stages"].setdefault(stage, {})[name.removeprefix("trackside_stage_")] = value

        def total(name: str, of: dict = values) -> float:
            return sum(value for (n, _), value in of.items() if n == name)

        totals = figures["totals"]
        for key, name in PIPELINE_TOTALS.items():
            totals[key] = total(name)
        if previous is not None and now > previous[0]:
            for key, name in PIPELINE_RATES.items():
                totals[key] = (total(name) - total(name, previous[1])) / (now - previous[0])
        return figures

    # -- live streams (server-sent events from the live view, in memory)

    async def live_stream(self, request: Request) -> Response:
        """The open runs, whole, each time the live view changed."""
        if self.live is None:
            return Response("the live view is off", status_code=503)
        live, agent_id, seen = self.live, request.query_params.get("agent_id", ""), [-1]

        def changed() -> list[bytes]:
            if live.version == seen[0]:
                return []
            seen[0] = live.version
            return [orjson.dumps(live.snapshot(agent_id))]

        return _event_stream(request, changed)

    async def alert_stream(self, request: Request) -> Response:
        """Each alert the live view saw on the topic after the page opened."""
        if self.live is None:
            return Response("the live view is off", status_code=503)
        live = self.live
        seen = [live.recent_alerts(0)[1]]

        def new() -> list[bytes]:
            alerts, seen[0] = live.recent_alerts(seen[0])
            return [orjson.dumps(alert) for alert in alerts]

        return _event_stream(request, new)


def _event_stream(request: Request, poll) -> StreamingResponse:  # noqa: ANN001 (() -> list[bytes])
    """Server-sent events: what `poll()` returns (reading the live view, in memory), a message
    each, looked for every STREAM_POLL_S; a comment now and then keeps quiet connections open."""

    async def events():
        idle = 0.0
        while not await request.is_disconnected():
            messages = poll()
            for message in messages:
                yield b"data: " + message + b"\n\n"
            if messages:
                idle = 0.0
            elif idle >= STREAM_KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_S)
            idle += STREAM_POLL_S

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text exposition -> {(name, labels as a dict's items): value}; a label dict is
    returned by `labels` below. Comments and unparsable lines are skipped."""
    values: dict = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, number = line.rpartition(" ")
        try:
            value = float(number)
        except ValueError:
            continue
        name, _, rest = head.partition("{")
        labels = _Labels(pair.split("=", 1) for pair in _label_pairs(rest.rstrip("}"))) if rest else _Labels()
        values[(name, labels)] = value
    return values


class _Labels(dict):
    def __hash__(self) -> int:  # noqa: D105
        return hash(tuple(sorted(self.items())))


def _label_pairs(text: str) -> list[str]:
    pairs, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
            continue
        if char == "," and not quoted:
            pairs.append(current)
            current = ""
            continue
        current += char
    if current:
        pairs.append(current)
    return [pair for pair in pairs if "=" in pair]


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
