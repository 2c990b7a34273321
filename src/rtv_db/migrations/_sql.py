"""Run a migration's plain SQL with the configured role names filled in.

Revisions write role names as ``@owner@``, ``@runtime@`` and ``@system@`` (``{}`` would clash
with JSON literals and ``$`` with function bodies). The names are validated role names, quoted
here as identifiers. The SQL goes to the driver untouched: no bind-parameter parsing, so ``:``
and ``%`` mean what PostgreSQL says they mean.
"""

from __future__ import annotations

from alembic import op

from rtv_db.config import ROLE_NAME


def _roles() -> dict[str, str]:
    roles = op.get_context().config.attributes.get("rtv_roles")
    if not roles:
        # Alembic run by hand (`alembic upgrade`) rather than by `rtv-db migrate`: the defaults.
        roles = {"owner": "rtv_owner", "runtime": "rtv_app", "system": "rtv_system"}
    for name in roles.values():
        if not ROLE_NAME.match(name):
            raise ValueError(f"refusing role name {name!r}")
    return roles


def render(sql: str) -> str:
    for key, name in _roles().items():
        sql = sql.replace(f"@{key}@", f'"{name}"')
    return sql


def run(sql: str) -> None:
    """Execute ``sql`` (one or many statements) as written."""
    op.get_bind().exec_driver_sql(render(sql), execution_options={"no_parameters": True})
