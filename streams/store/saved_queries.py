"""Saved queries (`sql/queries/*.sql`, shipped as streams/sql/queries): their text and the defaults
their headers declare (`-- @param name Type default  meaning`; streams/store/README.md, "Saved queries")."""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from streams.errors import TracksideError

QUERIES = files("streams") / "sql" / "queries"
PARAM = re.compile(r"^--\s*@param\s+(\w+)\s+(\S+)\s+(\S+)", re.MULTILINE)


def load_query(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(SQL, {parameter: default}) of a saved query: a file, or the NAME of sql/queries/NAME.sql."""
    source: Path | Traversable = Path(path)
    shipped = QUERIES / f"{source.name.removesuffix('.sql')}.sql"
    if not source.exists() and shipped.is_file():
        source = shipped
    try:
        sql = source.read_text(encoding="utf-8")
    except OSError as error:
        raise TracksideError(f"cannot read the query {path}: {error.strerror}") from None
    return sql, {name: _literal(type_, text) for name, type_, text in PARAM.findall(sql)}


def parse_params(pairs: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """`name=value` pairs over the defaults; a value keeps the type of its default."""
    params = dict(defaults)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise TracksideError(f"--param wants name=value, not {pair!r}")
        default = defaults.get(name)
        try:
            params[name] = type(default)(value) if isinstance(default, (int, float)) else value
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise TracksideError(f"--param {name}: {value!r} is not {kind}") from None
    return params


def _literal(type_: str, text: str) -> Any:
    if text.startswith("'"):
        return text[1:-1]
    return float(text) if type_.startswith(("Float", "Decimal")) else int(text)
