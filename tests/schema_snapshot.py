"""A normalised, version-independent listing of the pgqueue schema, compared with sql/schema.txt.

Regenerate after adding a migration: PGQUEUE_TEST_DSN=... python -m tests.schema_snapshot
(it migrates a throwaway database on that server and writes the listing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg

SNAPSHOT = Path(__file__).resolve().parent.parent / "sql" / "schema.txt"

QUERIES = {
    "type": """
        select t.typname || ' enum(' || string_agg(e.enumlabel, ', ' order by e.enumsortorder) || ')'
        from pg_type t join pg_enum e on e.enumtypid = t.oid
        join pg_namespace n on n.oid = t.typnamespace where n.nspname = 'pgqueue'
        group by t.typname""",
    "column": """
        select table_name || '.' || column_name || ' ' || data_type
            || case when is_nullable = 'NO' then ' not null' else '' end
            || coalesce(' default ' || column_default, '')
            || case when is_identity = 'YES' then ' identity ' || identity_generation else '' end
        from information_schema.columns where table_schema = 'pgqueue'""",
    "constraint": """
        select c.conrelid::regclass::text || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid)
        from pg_constraint c join pg_namespace n on n.oid = c.connamespace
        -- PostgreSQL 18 lists NOT NULL as constraints too; the columns already say it
        where n.nspname = 'pgqueue' and c.contype <> 'n'""",
    "index": "select indexdef from pg_indexes where schemaname = 'pgqueue'",
    "function": """
        select p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') -> '
            || pg_get_function_result(p.oid) || ' ' || l.lanname || ' ' || p.provolatile::text
            || ' md5:' || md5(p.prosrc)
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        join pg_language l on l.oid = p.prolang where n.nspname = 'pgqueue'""",
    "trigger": """
        select pg_get_triggerdef(t.oid) from pg_trigger t
        join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'pgqueue' and not t.tgisinternal""",
}


def snapshot(connection: psycopg.Connection[Any]) -> str:
    lines = []
    for kind, statement in QUERIES.items():
        rows = connection.execute(statement).fetchall()
        lines += sorted(f"{kind} {row[0]}" for row in rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    from pgqueue.testing import create_migrated_database, database_dsn, drop_database

    server = os.environ.get("PGQUEUE_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = create_migrated_database(server, "pgqueue_snapshot")
    try:
        with psycopg.connect(database_dsn(server, name)) as conn:
            SNAPSHOT.write_text(snapshot(conn))
    finally:
        drop_database(server, name)
    print(f"wrote {SNAPSHOT}")


if __name__ == "__main__":
    main()
