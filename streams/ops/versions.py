"""`trackside versions AGENT [--diff A B]`: an agent's versions (the `versions` table, SPEC §8) with
their roles, verdicts and rollbacks, and what changed between two in configuration and behaviour."""

from __future__ import annotations

from typing import Any

import orjson

VERSIONS_SQL = (
    "SELECT version, first_seen, last_seen, roles, canary_verdict, gate_verdict, config_changed, config, configs "
    "FROM versions FINAL WHERE agent_id = {agent:String} ORDER BY first_seen DESC NULLS LAST, version")
ROLLBACKS_SQL = ("SELECT from_version AS version, count() AS rollbacks, max(ts) AS last FROM rollbacks FINAL "
                 "WHERE agent_id = {agent:String} GROUP BY from_version")
# the role of each version's latest analysis: a shadow's verdict is told apart (never acted on)
ANALYSED_AS_SQL = ("SELECT version, argMax(role, updated_at) AS role FROM canaries FINAL "
                   "WHERE agent_id = {agent:String} GROUP BY version")
BEHAVIOUR_SQL = (
    "SELECT agent_version AS version, count() AS runs, countIf(outcome = 'success') AS successes, "
    "toFloat64(sum(cost_usd)) AS cost, quantileExact(0.95)(duration_ms) AS p95_duration_ms, "
    "countIf(loop_detected) AS loops, sum(tool_calls) AS tool_calls FROM runs FINAL "
    "WHERE agent_id = {agent:String} AND agent_version IN ({a:String}, {b:String}) GROUP BY agent_version")
TOOLS_SQL = (
    "SELECT agent_version AS version, tool, count() AS calls FROM runs FINAL ARRAY JOIN tool_path AS tool "
    "WHERE agent_id = {agent:String} AND agent_version IN ({a:String}, {b:String}) GROUP BY agent_version, tool")
CONFIG_KEYS = ("model", "provider", "prompt_sha", "tools", "guardrails", "params")


def _rows(store: Any, sql: str, parameters: dict) -> list[dict]:
    from streams.store.clickhouse import Store

    if isinstance(store, Store):
        return store.query_json(sql, parameters, person=False)
    return store.query_json(sql, parameters)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def list_versions(store: Any, agent: str) -> str:
    versions = _rows(store, VERSIONS_SQL, {"agent": agent})
    if not versions:
        return f"no version of {agent} is known"
    rollbacks = {row["version"]: row for row in _rows(store, ROLLBACKS_SQL, {"agent": agent})}
    shadows = {row["version"] for row in _rows(store, ANALYSED_AS_SQL, {"agent": agent}) if row["role"] == "shadow"}
    rows = []
    for v in versions:
        config = orjson.loads(v["config"]) if v["config"] else {}
        said = ", ".join(f"{k}={config[k]}" for k in ("model", "provider") if k in config) or "-"
        if v["config_changed"]:
            said += f"  CHANGED under the same name ({len(v['configs'])} configs)"
        back = rollbacks.get(v["version"])
        rows.append([v["version"], (v["first_seen"] or "-")[:19], (v["last_seen"] or "-")[:19],
                     ",".join(sorted(v["roles"])) or "-", v["gate_verdict"] or "-",
                     (v["canary_verdict"] or "-") + (" (shadow)" if v["version"] in shadows else ""),
                     str(int(back["rollbacks"])) if back else "0", said])
    return _table(["version", "first_seen", "last_seen", "roles", "gate", "canary", "rollbacks", "config"], rows)


def config_changes(before: dict, after: dict) -> list[tuple[str, str, str]]:
    """(what, before, after) for every difference of two configs: model, provider, prompt_sha, tools
    added and removed, each parameter, and any other key."""
    changes = []
    for key in ("model", "provider", "prompt_sha"):
        if before.get(key) != after.get(key):
            changes.append((key, str(before.get(key, "-")), str(after.get(key, "-"))))
    for key in ("tools", "guardrails"):
        old, new = set(map(str, before.get(key) or ())), set(map(str, after.get(key) or ()))
        if new - old:
            changes.append((f"{key} added", "", ", ".join(sorted(new - old))))
        if old - new:
            changes.append((f"{key} removed", ", ".join(sorted(old - new)), ""))
    old_params, new_params = before.get("params") or {}, after.get("params") or {}
    for name in sorted(set(old_params) | set(new_params)):
        if old_params.get(name) != new_params.get(name):
            changes.append((f"params.{name}", _text(old_params.get(name, "-")), _text(new_params.get(name, "-"))))
    for key in sorted((set(before) | set(after)) - set(CONFIG_KEYS)):
        if before.get(key) != after.get(key):
            changes.append((key, _text(before.get(key, "-")), _text(after.get(key, "-"))))
    return changes


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def behaviour(store: Any, agent: str, a: str, b: str) -> dict[str, dict]:
    """Per version: runs, success_rate, cost_per_success, p95_duration_ms, loop_rate, tool_mix (share of tool calls)."""
    found: dict[str, dict] = {}
    for row in _rows(store, BEHAVIOUR_SQL, {"agent": agent, "a": a, "b": b}):
        runs, successes = int(row["runs"]), int(row["successes"])
        found[row["version"]] = {
            "runs": runs, "success_rate": successes / runs if runs else None,
            "cost_per_success": float(row["cost"]) / successes if successes else None,
            "p95_duration_ms": float(row["p95_duration_ms"]), "loop_rate": int(row["loops"]) / runs if runs else None,
            "tool_mix": {}}
    calls: dict[str, dict[str, int]] = {}
    for row in _rows(store, TOOLS_SQL, {"agent": agent, "a": a, "b": b}):
        calls.setdefault(row["version"], {})[row["tool"]] = int(row["calls"])
    for version, mix in calls.items():
        total = sum(mix.values())
        if version in found and total:
            found[version]["tool_mix"] = {tool: n / total for tool, n in mix.items()}
    return found


def diff_versions(store: Any, agent: str, a: str, b: str) -> str:
    known = {v["version"]: v for v in _rows(store, VERSIONS_SQL, {"agent": agent})}
    missing = [v for v in (a, b) if v not in known]
    if missing:
        from streams.errors import TracksideError

        raise TracksideError(f"{agent} has no version {', '.join(missing)} (known: {', '.join(sorted(known)) or 'none'})")
    out = [f"{agent}: {a} -> {b}", "", "configuration"]
    configs = {v: orjson.loads(known[v]["config"]) if known[v]["config"] else None for v in (a, b)}
    for v in (a, b):
        if known[v]["config_changed"]:
            out.append(f"  warning: {v}'s config changed under the same name ({len(known[v]['configs'])} configs "
                       "received; versions are meant to be immutable): the first one is compared")
    if configs[a] is None or configs[b] is None:
        out.append("  no config for " + ", ".join(v for v in (a, b) if configs[v] is None)
                   + " (deployment events without `config`)")
    else:
        changes = config_changes(configs[a], configs[b])
        out.append(_indent(_table(["what", a, b], [list(c) for c in changes])) if changes else "  none")
    out += ["", "behaviour (all runs of each version)"]
    seen = behaviour(store, agent, a, b)
    rows = []
    for name, fmt in (("runs", "{:d}"), ("success_rate", "{:.1%}"), ("cost_per_success", "${:.4g}"),
                      ("p95_duration_ms", "{:.0f} ms"), ("loop_rate", "{:.1%}")):
        rows.append([name] + [_fmt(fmt, seen.get(v, {}).get(name)) for v in (a, b)])
    tools = sorted({t for v in (a, b) for t in seen.get(v, {}).get("tool_mix", {})},
                   key=lambda t: -max(seen.get(v, {}).get("tool_mix", {}).get(t, 0) for v in (a, b)))
    for tool in tools:
        rows.append([f"tool {tool}"] + [_fmt("{:.1%}", seen.get(v, {}).get("tool_mix", {}).get(tool, 0.0)) for v in (a, b)])
    out.append(_indent(_table(["metric", a, b], rows)))
    return "\n".join(out)


def _fmt(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
