"""The migrations shipped in sql/migrations (streams/sql in the wheel): which to apply, and their text.
Pure, checksummed, literal placeholders: streams/store/README.md, "Migrations"."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from streams.errors import StoreError

MIGRATIONS = files("streams") / "sql" / "migrations"
MIGRATION_FILE = re.compile(r"(\d{4})_.+\.sql")
PLACEHOLDER = re.compile(r"\{(database|on_cluster)\}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name without .sql, as schema_migrations records it
    text: str

    @property
    def file(self) -> str:
        return f"{self.name}.sql"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_migrations(directory: Traversable = MIGRATIONS) -> list[Migration]:
    """Every `NNNN_verb_object.sql` of the directory, in order; none is an error (a broken install)."""
    found = sorted((
        Migration(int(match.group(1)), entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in (directory.iterdir() if directory.is_dir() else ())
        if (match := MIGRATION_FILE.fullmatch(entry.name))
    ), key=lambda migration: migration.version)
    if not found:
        raise StoreError(f"no migration found in {directory}: the installed package lacks sql/migrations/NNNN_*.sql")
    for before, after in zip(found, found[1:]):
        if before.version == after.version:
            raise StoreError(f"two migrations numbered {after.version:04d}: {before.file} and {after.file}")
    return found


def pending_migrations(migrations: list[Migration], landed: dict[int, str]) -> list[Migration]:
    """The migrations not applied yet, after checking that the applied ones (version -> checksum)
    are the files as they are now."""
    for migration in migrations:
        applied = landed.get(migration.version)
        if applied is not None and applied != migration.checksum:
            raise StoreError(
                f"migration {migration.file} changed after it was applied (checksum {applied[:12]} applied, "
                f"{migration.checksum[:12]} now): restore it and put the change in a new migration"
            )
    return [migration for migration in migrations if migration.version not in landed]


def render(statement: str, *, database: str, on_cluster: str) -> str:
    """The statement with `{database}` and `{on_cluster}` filled in; every other brace stays as it is."""
    values = {"database": database, "on_cluster": on_cluster}
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], statement)


def split_statements(text: str) -> list[str]:
    """The statements of a migration file: each ends with `;` at the end of a line."""
    text = re.sub(r"^\s*--[^\n]*", "", text, flags=re.MULTILINE)
    return [statement.strip() for statement in re.split(r";[ \t]*$", text, flags=re.MULTILINE) if statement.strip()]
