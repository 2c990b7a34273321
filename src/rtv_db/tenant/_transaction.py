"""Carrying the tenant context into each database transaction.

A listener on the engine's ``begin`` event calls ``rtv.set_tenant_context(...)`` as the first
statement of every transaction. It is sent in psycopg's pipeline mode together with the
``BEGIN`` psycopg issues implicitly, so the two cost one network round trip, not two. The
function uses ``SET LOCAL``: the context ends with the transaction, and a pooled connection
never carries it to the next checkout.

Which context: the ``rtv_tenant_context`` execution option of the connection when present (a
tenant scope or tenant session sets it), otherwise the contextvar of the running task. With
neither, nothing is set, and the database shows no rows and rejects writes.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy.util import await_

from .context import TenantContext, current_tenant_context

__all__ = ["CONTEXT_OPTION", "SYSTEM", "install_context_hooks", "context_sql", "context_params"]

CONTEXT_OPTION: Final = "rtv_tenant_context"


class _System:
    """Marker for the system scope: no tenant context is set (the system role bypasses RLS)."""

    def __repr__(self) -> str:
        return "SYSTEM"


SYSTEM: Final = _System()

# Bind parameters, never literals: the values do not show in pg_stat_activity or the logs.
_SET_CONTEXT = "SELECT rtv.set_tenant_context(%s::uuid, %s::uuid, %s::text, %s::text, %s::text)"


def context_sql() -> str:
    return _SET_CONTEXT


def context_params(ctx: TenantContext) -> tuple[str, str | None, str, str | None, str]:
    return (
        str(ctx.tenant_id),
        str(ctx.platform_account_id) if ctx.platform_account_id else None,
        ctx.lane,
        ctx.user_id,
        ctx.correlation_id,
    )


def _context_for(conn: Connection) -> TenantContext | None:
    option = conn.get_execution_options().get(CONTEXT_OPTION)
    if option is SYSTEM:
        return None
    if option is not None:
        return option  # type: ignore[no-any-return]
    return current_tenant_context()


def _set_sync(driver: psycopg.Connection[Any], params: tuple[Any, ...]) -> None:
    with driver.pipeline():
        driver.execute(_SET_CONTEXT, params)


async def _set_async(driver: psycopg.AsyncConnection[Any], params: tuple[Any, ...]) -> None:
    async with driver.pipeline():
        await driver.execute(_SET_CONTEXT, params)


def _on_begin(conn: Connection) -> None:
    ctx = _context_for(conn)
    conn.info["rtv_tenant_context"] = ctx
    if ctx is None:
        return
    driver = conn.connection.driver_connection
    params = context_params(ctx)
    if isinstance(driver, psycopg.AsyncConnection):
        await_(_set_async(driver, params))
    else:
        _set_sync(driver, params)  # type: ignore[arg-type]


def _on_end(conn: Connection) -> None:
    conn.info.pop("rtv_tenant_context", None)


def install_context_hooks(engine: Engine) -> None:
    """Make every transaction on ``engine`` start with the current tenant context."""
    event.listen(engine, "begin", _on_begin)
    event.listen(engine, "commit", _on_end)
    event.listen(engine, "rollback", _on_end)
