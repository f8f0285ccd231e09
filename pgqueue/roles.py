"""`pgqueue roles`: the three least-privilege roles (migration 0018) and who holds them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from psycopg import sql

from .errors import PermissionDeniedError
from .settings import Settings
from .sql import query

ROLES = {
    "pgqueue_producer": "enqueue, and read jobs' state, result and progress (pgqueue.job_status)",
    "pgqueue_worker": "claim, heartbeat, complete, rescue and keep house",
    "pgqueue_observer": "read only: dashboards, status, health, the exporter",
}


def permission_denied(error: BaseException) -> PermissionDeniedError:
    """A role without a right pgqueue needs (SQLSTATE 42501), with the roles to grant."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PermissionDeniedError(
        f"{first}: this database role lacks a right pgqueue needs; grant it pgqueue_producer "
        "(enqueue, follow its jobs), pgqueue_worker (run jobs) or pgqueue_observer (read), "
        "see `pgqueue roles`"
    )


def add_commands(commands: Any, settings: Callable[[argparse.Namespace], Settings]) -> None:
    """Add `pgqueue roles` to `pgqueue`'s subparsers."""
    command = commands.add_parser(
        "roles",
        help="grant the producer, worker and observer roles in this database, and list who holds them",
    )
    command.add_argument(
        "--create",
        action="store_true",
        help="create the roles (NOLOGIN) where missing: needs CREATEROLE; the migration does it when it may",
    )
    command.set_defaults(handler=lambda arguments: _roles(arguments, settings(arguments)))


def _roles(arguments: argparse.Namespace, settings: Settings) -> int:
    from .app import App
    from .migrate import check_schema

    with App(settings) as app, app.connect() as connection:
        if arguments.create:
            # an administrator with CREATEROLE, who need not own the schema
            for role in ROLES:
                if connection.execute(query("role_exists"), {"role": role}).fetchone() == (False,):
                    connection.execute(sql.SQL("create role {} nologin").format(sql.Identifier(role)))
                    print(f"created role {role}")
        try:
            check_schema(connection)
            with connection.transaction():
                connection.execute(query("grant_roles"), {"create": False})
        except PermissionDeniedError:
            print(
                "only the pgqueue schema's owner grants the roles: "
                "it runs `pgqueue roles` or `pgqueue migrate`"
            )
            return 1
        rows = connection.execute(query("role_members"), {"roles": list(ROLES)}).fetchall()
    members = {str(role): list(held or []) for role, held in rows}
    for role, what in ROLES.items():
        if role not in members:
            print(f"{role:<18} missing: `pgqueue roles --create` as a role with CREATEROLE")
            continue
        held = ", ".join(members[role]) or "nobody yet (GRANT " + role + " TO <login role>)"
        print(f"{role:<18} {what}\n{'':<18} granted to: {held}")
    return 0
