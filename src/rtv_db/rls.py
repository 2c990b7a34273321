"""Row-Level Security helpers from the spec, on an explicit connection.

``set_tenant_context`` and ``clear_tenant_context`` act on the current transaction only
(``SET LOCAL``); outside a transaction they raise rather than silently doing nothing. Most code
never calls them: tenant scopes and tenant sessions set the context for every transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from .connection import Database
from .errors import InvalidInputError, TenantContextRefusedError
from .tenant._transaction import CONTEXT_OPTION, context_statement, remember_token
from .tenant.context import Lane, TenantContext, use_tenant_context

__all__ = ["set_tenant_context", "clear_tenant_context", "get_current_tenant", "with_rls_context", "is_rls_enabled", "rls_status"]


def _require_transaction(conn: Connection) -> None:
    if not conn.in_transaction():
        raise InvalidInputError("the tenant context is transaction-local: begin a transaction first")


def set_tenant_context(conn: Connection, tenant_id: uuid.UUID | str, platform_account_id: uuid.UUID | str | None = None,
                       lane: Lane = "api", *, user_id: str | None = None, correlation_id: str | None = None) -> TenantContext:
    """Set the tenant context for the rest of ``conn``'s current transaction; return it."""
    extra = {"correlation_id": correlation_id} if correlation_id else {}
    ctx = TenantContext(tenant_id, platform_account_id, lane, user_id, **extra)  # type: ignore[arg-type]
    if not conn.in_transaction():
        conn.begin()
    # Signed (a token for this one transaction) or, in unsigned mode, the plain ids.
    sql, params = context_statement(conn, ctx)
    remember_token(conn, sql, params)  # a rollback records it as spent
    try:
        conn.exec_driver_sql(sql, params)
    except DBAPIError as exc:
        if isinstance(exc.orig, psycopg.errors.InvalidAuthorizationSpecification):
            raise TenantContextRefusedError(str(exc.orig).splitlines()[0]) from exc
        raise
    return ctx


def clear_tenant_context(conn: Connection) -> None:
    """Clear the tenant context for the rest of the current transaction."""
    _require_transaction(conn)
    conn.execute(text("SELECT rtv.clear_tenant_context()"))


def get_current_tenant(conn: Connection) -> uuid.UUID | None:
    """The tenant the database sees in this transaction, or None."""
    return conn.execute(text("SELECT rtv.get_current_tenant()")).scalar_one()


@contextmanager
def with_rls_context(db: Database, tenant_id: uuid.UUID | str, platform_account_id: uuid.UUID | str | None = None,
                     lane: Lane = "api") -> Iterator[Connection]:
    """A connection in a transaction whose tenant context is set; commits on success.

    The context ends with the transaction: nothing is left on the pooled connection.
    """
    ctx = TenantContext(tenant_id, platform_account_id, lane)  # type: ignore[arg-type]
    with use_tenant_context(ctx), db.engine.connect() as conn:
        conn = conn.execution_options(**{CONTEXT_OPTION: ctx})
        with conn.begin():
            yield conn


_RLS_STATUS = text(
    """
    SELECT c.relrowsecurity, c.relforcerowsecurity
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relname = :table AND n.nspname = :schema AND c.relkind IN ('r', 'p')
    """
)


def rls_status(conn: Connection, table_name: str, schema: str = "public") -> tuple[bool, bool] | None:
    """``(enabled, forced)`` for a table, or None when there is no such table."""
    row = conn.execute(_RLS_STATUS, {"table": table_name, "schema": schema}).one_or_none()
    return (bool(row[0]), bool(row[1])) if row else None


def is_rls_enabled(db: Database | Connection, table_name: str, schema: str = "public") -> bool:
    """True only when RLS is both enabled and forced on the table (FORCE binds the owner too)."""
    if isinstance(db, Connection):
        status = rls_status(db, table_name, schema)
    else:
        with db.engine.connect() as conn:
            status = rls_status(conn, table_name, schema)
    return status == (True, True)
