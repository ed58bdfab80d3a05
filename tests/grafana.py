"""The Grafana dashboards of infra/grafana as the official ClickHouse data source
(grafana-clickhouse-datasource, v4) runs them: its frontend first ($__conditionalAll, then the
dashboard's variables, a multi-value variable as 'a','b'), then its backend's macros (sqlds: each
`$__name\\b(args)`, the arguments cut at commas; the ClickHouse plugin's pkg/macros). A test can then
run every panel's query on a store."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parents[1] / "infra" / "grafana"
PLUGIN = "grafana-clickhouse-datasource"
ALL = "$__all"  # a variable's value when "All" is picked


def dashboards() -> dict[str, dict]:
    """file name -> dashboard."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside rows too."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panel.get("panels", [])
    return [panel for panel in out if panel.get("type") != "row"]


def variables(dashboard: dict) -> list[dict]:
    return dashboard.get("templating", {}).get("list", [])


# -- the frontend: src/data/CHDatasource.ts applyTemplateVariables -----------------------------------


def _macro_args(sql: str, start: int) -> tuple[list[str], int] | None:
    """The arguments of a macro whose "(" is at `start`, split at top-level commas, and the index
    after its ")" (as getMacroArgs does: brackets counted, nothing else)."""
    depth, args, last = 0, [], start + 1
    for i in range(start, len(sql)):
        char = sql[i]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 1:
            args.append(sql[last:i])
            last = i + 1
        if depth == 0:
            args.append(sql[last:i])
            return args, i + 1
    return None


def conditional_all(sql: str, values: dict[str, str | list[str]]) -> str:
    """$__conditionalAll(condition, $var): `1=1` when the variable is All or empty, else the condition."""
    macro = "$__conditionalAll("
    index = sql.rfind(macro)
    while index != -1:
        found = _macro_args(sql, index + len(macro) - 1)
        if found is None or len(found[0]) != 2:
            return sql
        (condition, variable), end = found
        name = re.search(r"(?<=\$\{)\w+(?=\})|(?<=\$)\w+", variable.strip())
        value = values.get(name.group(0)) if name else None
        text = ",".join(value) if isinstance(value, list) else value
        sql = sql[:index] + ("1=1" if name and text in ("", ALL) else condition) + sql[end:]
        index = sql.rfind(macro)
    return sql


def _format(value: str | list[str]) -> str:
    # the data source's format(): a list (a multi-value variable) as 'a','b'; one value as it is
    return "'" + "','".join(value) + "'" if isinstance(value, list) else value


def replace_variables(sql: str, values: dict[str, str | list[str]]) -> str:
    """Grafana's templateSrv.replace for $var and ${var} (no other syntax is used here); unknown
    names, the macros among them, stay."""
    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return _format(values[name]) if name in values else match.group(0)

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, sql)


# -- the backend: sqlds interpolate + the ClickHouse plugin's pkg/macros --------------------------------


def _date_time(ms: int) -> str:
    return f"toDateTime({ms // 1000})"


def _date_time64(ms: int) -> str:
    return f"fromUnixTimestamp64Milli({ms})"


def _date(ms: int) -> str:
    from datetime import datetime, timezone

    return f"toDate('{datetime.fromtimestamp(ms / 1000, timezone.utc):%Y-%m-%d}')"


def _one(args: list[str], name: str) -> str:
    if len(args) != 1 or not args[0]:
        raise ValueError(f"$__{name}: expected 1 argument, received {args}")
    return args[0]


def macros(start_ms: int, end_ms: int, interval_ms: int) -> dict:
    seconds, millis = max(interval_ms // 1000, 1), max(interval_ms, 1)
    return {
        "fromTime": lambda a: _date_time(start_ms),
        "toTime": lambda a: _date_time(end_ms),
        "fromTime_ms": lambda a: _date_time64(start_ms),
        "toTime_ms": lambda a: _date_time64(end_ms),
        "timeFilter": lambda a: f"{_one(a, 'timeFilter')} >= {_date_time(start_ms)} AND {a[0]} <= {_date_time(end_ms)}",
        "timeFilter_ms": lambda a: (f"{_one(a, 'timeFilter_ms')} >= {_date_time64(start_ms)} "
                                    f"AND {a[0]} <= {_date_time64(end_ms)}"),
        "dateFilter": lambda a: f"{_one(a, 'dateFilter')} >= {_date(start_ms)} AND {a[0]} <= {_date(end_ms)}",
        "timeInterval": lambda a: f"toStartOfInterval(toDateTime({_one(a, 'timeInterval')}), INTERVAL {seconds} second)",
        "timeInterval_ms": lambda a: (f"toStartOfInterval(toDateTime64({_one(a, 'timeInterval_ms')}, 3), "
                                      f"INTERVAL {millis} millisecond)"),
        "interval_s": lambda a: str(seconds),
    }


def expand_macros(sql: str, start_ms: int, end_ms: int, interval_ms: int) -> str:
    for name, expand in macros(start_ms, end_ms, interval_ms).items():
        pattern = re.compile(r"\$__" + re.escape(name) + r"\b(?:\((.*?)\))?", re.ASCII)
        for match in list(pattern.finditer(sql)):
            args = [arg.strip() for arg in (match.group(1) or "").split(",")]
            sql = sql.replace(match.group(0), expand(args))
    unknown = re.findall(r"[$]__\w+", sql)
    if unknown:
        raise ValueError(f"macros the plugin does not know: {unknown}")
    return sql


def interval_ms(start_ms: int, end_ms: int, max_data_points: int = 1000) -> int:
    """About Grafana's: the range over the panel's points, rounded to a usual step."""
    steps = [1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400]
    raw = (end_ms - start_ms) / max_data_points / 1000
    return next((s for s in steps if s >= raw), steps[-1]) * 1000


def query(sql: str, start_ms: int, end_ms: int, values: dict[str, str | list[str]],
          step_ms: int | None = None) -> str:
    """A panel's rawSql as the plugin sends it to ClickHouse for this range and these variables."""
    step_ms = step_ms or interval_ms(start_ms, end_ms)
    return expand_macros(replace_variables(conditional_all(sql, values), values), start_ms, end_ms, step_ms)
