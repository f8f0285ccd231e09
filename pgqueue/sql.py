"""Loads the SQL files shipped inside the package: named queries and numbered migrations."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_COMPATIBLE = re.compile(r"^-- compatible-with: (\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    """One numbered migration file."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def compatible_from(self) -> int:
        """The oldest migration a worker may know and still run on a schema with this one.

        A file says `-- compatible-with: N` when code that knows only up to migration N
        keeps working after it (it adds, never changes what older code uses); without
        that line, code must know this migration itself.
        """
        match = _COMPATIBLE.search(self.text)
        return int(match[1]) if match else self.version


def _sql_folder() -> Traversable:
    # pgqueue/_sql links to the repository's sql/ folder; in a wheel it is a real folder
    return resources.files("pgqueue").joinpath("_sql")


@cache
def queries() -> dict[str, str]:
    """Every named block of queries.sql, keyed by name, without its comment lines."""
    text = _sql_folder().joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        named[name] = "\n".join(lines).strip()
    return named


def query(name: str) -> str:
    """The text of one named query."""
    return queries()[name]


@cache
def migrations() -> tuple[Migration, ...]:
    """All migrations shipped with this code, in version order."""
    found: list[Migration] = []
    for entry in _sql_folder().joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number: {versions}")
    return tuple(found)


def latest_version() -> int:
    """The version of the newest migration this code knows."""
    return migrations()[-1].version
