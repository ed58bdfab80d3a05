"""The Grafana dashboards (infra/grafana) need no service to check: their shape as the ClickHouse
data source plugin reads them, and the macro expansion the integration test runs them with
(tests/integration/test_queries.py runs every panel's query on a filled store)."""

import re

import pytest

from tests import grafana

START_MS, END_MS = 1_793_491_200_000, 1_793_577_600_123  # 2026-11-01, one day and 123 ms later
BOARDS = grafana.dashboards()


def test_the_macros_expand_as_the_plugin_does():
    # pkg/macros of grafana-clickhouse-datasource: seconds for the plain forms, milliseconds for _ms
    sql = ("SELECT $__timeInterval(ts) AS time, count() / $__interval_s FROM t "
           "WHERE $__timeFilter(ts) AND $__timeFilter_ms( ts2 ) AND a >= $__fromTime AND b <= $__toTime_ms "
           "AND $__dateFilter(d) GROUP BY time")
    assert grafana.expand_macros(sql, START_MS, END_MS, 60_000) == (
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 60 second) AS time, count() / 60 FROM t "
        "WHERE ts >= toDateTime(1793491200) AND ts <= toDateTime(1793577600) "
        "AND ts2 >= fromUnixTimestamp64Milli(1793491200000) AND ts2 <= fromUnixTimestamp64Milli(1793577600123) "
        "AND a >= toDateTime(1793491200) AND b <= fromUnixTimestamp64Milli(1793577600123) "
        "AND d >= toDate('2026-11-01') AND d <= toDate('2026-11-02') GROUP BY time")
    assert grafana.expand_macros("$__timeInterval_ms(ts)", START_MS, END_MS, 250) == (
        "toStartOfInterval(toDateTime64(ts, 3), INTERVAL 250 millisecond)")
    with pytest.raises(ValueError, match="__timeGroup"):
        grafana.expand_macros("$__timeGroup(ts, '1m')", START_MS, END_MS, 1000)
    with pytest.raises(ValueError, match="expected 1 argument"):
        grafana.expand_macros("$__timeFilter(a, b)", START_MS, END_MS, 1000)


def test_conditional_all_and_variables_as_the_frontend_does():
    sql = "WHERE $__conditionalAll(agent_id IN ($agent), $agent) AND x = '${tenant}'"
    assert grafana.query(sql, START_MS, END_MS, {"agent": ["$__all"], "tenant": "acme"}) == "WHERE 1=1 AND x = 'acme'"
    assert grafana.query(sql, START_MS, END_MS, {"agent": ["a", "b"], "tenant": "acme"}) == (
        "WHERE agent_id IN ('a','b') AND x = 'acme'")
    assert grafana.query(sql, START_MS, END_MS, {"agent": ["a"], "tenant": "acme"}) == (
        "WHERE agent_id IN ('a') AND x = 'acme'")
    nested = "WHERE $__conditionalAll((a, b) IN (SELECT a, b FROM t WHERE c IN ($agent)), ${agent})"
    assert grafana.conditional_all(nested, {"agent": ["$__all"]}) == "WHERE 1=1"


def test_grafana_like_intervals():
    assert grafana.interval_ms(0, 3_600_000) == 5_000  # an hour over 1,000 points: 3.6 s, rounded up
    assert grafana.interval_ms(0, 30 * 86_400_000) == 3_600_000


def test_the_dashboards_are_there():
    assert set(BOARDS) == {"trackside-fleet.json", "trackside-alerts.json", "trackside-pipeline.json"}
    assert len({board["uid"] for board in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_reads_the_clickhouse_data_source_in_sql(name):
    board = BOARDS[name]
    names = {variable["name"]: variable for variable in grafana.variables(board)}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == grafana.PLUGIN
    panels = grafana.panels(board)
    assert panels and len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        where = (name, panel["title"])
        assert panel["datasource"] == {"type": grafana.PLUGIN, "uid": "${datasource}"}, where
        assert panel["type"] in ("timeseries", "table", "stat"), where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["editorType"] == "sql", where
            # plugin v4's fields: a query without pluginVersion is migrated as a v3 one
            assert int(target["pluginVersion"].split(".")[0]) >= 4, where
            series = panel["type"] == "timeseries"
            assert (target["format"], target["queryType"]) == ((0, "timeseries") if series else (1, "table")), where
            sql = target["rawSql"]
            if series:
                assert re.match(r"SELECT (\$__timeInterval\(\w+\)|time) AS time\b|SELECT time,", sql), where
                assert "ORDER BY time" in sql, where  # the plugin turns long frames wide: time in order
            used = set(re.findall(r"\$\{?(?!__)(\w+)", sql))
            assert used <= set(names), (where, used)
            # every table Trackside replaces rows in is read with FINAL (as the saved queries are)
            for table, final in re.findall(r"\b(?:FROM|JOIN)\s+([a-z_]+)(\s+FINAL\b)?", sql):
                assert final or table == "agent_versions", (where, table)
            assert "$" not in grafana.query(sql, START_MS, END_MS, {"agent": ["$__all"]}), where
