"""Statements of the scoped API, built once for the sync and async scopes.

Every statement carries the literal tenant predicate (``client_id = :tenant``), which lets
PostgreSQL use the ``client_id`` indexes and, on Citus, route to one shard. Row-Level Security
is the wall behind it: the predicate is an optimisation and a second check, not the guarantee.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Delete, Insert, Select, Table, Update, delete, insert, select, update
from sqlalchemy.orm import DeclarativeBase

from ..errors import CrossTenantWriteError, InvalidInputError, UnscopedWriteError
from .context import TenantContext

__all__ = ["TableLike", "resolve_table", "tenant_column", "build_select", "build_insert", "build_update", "build_delete"]

TableLike = Table | type[DeclarativeBase]

# Columns the scoped API fills from the context; a caller may repeat them, never contradict them.
_CONTEXT_COLUMNS = ("client_id", "platform_account_id", "lane")


def resolve_table(table: TableLike) -> Table:
    """The Core table of a model class or table; :class:`InvalidInputError` when it is not a tenant table."""
    resolved = getattr(table, "__table__", table)
    if not isinstance(resolved, Table):
        raise InvalidInputError(f"expected a table or model class, not {type(table).__name__}")
    if tenant_column_name(resolved) is None:
        raise InvalidInputError(f"{resolved.name} is not a tenant table (no client_id column)")
    return resolved


def tenant_column_name(table: Table) -> str | None:
    if "client_id" in table.c:
        return "client_id"
    if table.name == "clients":
        return "id"
    return None


def tenant_column(table: Table) -> ColumnElement[Any]:
    name = tenant_column_name(table)
    assert name is not None
    return table.c[name]


def scope_predicates(table: Table, ctx: TenantContext) -> list[ColumnElement[bool]]:
    """``client_id = :tenant``, plus account and lane on tables that carry them."""
    predicates: list[ColumnElement[bool]] = [tenant_column(table) == ctx.tenant_id]
    if "platform_account_id" in table.c and "lane" in table.c:
        if ctx.platform_account_id is not None:
            predicates.append(table.c.platform_account_id == ctx.platform_account_id)
        predicates.append(table.c.lane == ctx.lane)
    return predicates


def _check_columns(table: Table, values: Mapping[str, Any]) -> None:
    if not isinstance(values, Mapping):
        raise InvalidInputError(f"values for {table.name} must be a mapping of column names, not {type(values).__name__}")
    unknown = [key for key in values if not isinstance(key, str) or key not in table.c]
    if unknown:
        raise InvalidInputError(f"{table.name} has no column(s) {', '.join(map(str, unknown))}")


def _same_id(given: Any, expected: uuid.UUID) -> bool:
    try:
        return uuid.UUID(str(given)) == expected
    except ValueError:
        return False


def stamp(table: Table, ctx: TenantContext, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the context's tenant (and account and lane) filled in; refuse contradictions."""
    _check_columns(table, values)
    row = dict(values)
    tenant_col = tenant_column_name(table)
    assert tenant_col is not None
    if tenant_col in row and not _same_id(row[tenant_col], ctx.tenant_id):
        raise CrossTenantWriteError(f"{table.name}.{tenant_col} names another tenant; the scope writes only its own rows")
    row[tenant_col] = ctx.tenant_id
    if "platform_account_id" in table.c and "lane" in table.c:
        if ctx.platform_account_id is None:
            from ..errors import MissingTenantContextError

            raise MissingTenantContextError(f"{table.name} needs a platform_account_id in the tenant context")
        if "platform_account_id" in row and not _same_id(row["platform_account_id"], ctx.platform_account_id):
            raise CrossTenantWriteError(f"{table.name}.platform_account_id differs from the context's account")
        if "lane" in row and row["lane"] != ctx.lane:
            raise CrossTenantWriteError(f"{table.name}.lane {row['lane']!r} differs from the context's lane {ctx.lane!r}")
        row["platform_account_id"] = ctx.platform_account_id
        row["lane"] = ctx.lane
    return row


def build_select(table: Table, ctx: TenantContext, where: Sequence[ColumnElement[bool]] = (), *,
                 order_by: Sequence[Any] = (), limit: int | None = None) -> Select[Any]:
    stmt = select(table).where(*scope_predicates(table, ctx), *where)
    if order_by:
        stmt = stmt.order_by(*order_by)
    if limit is not None:
        stmt = stmt.limit(limit)
    return stmt


def build_insert(table: Table, ctx: TenantContext, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> tuple[Insert, list[dict[str, Any]]]:
    rows = [values] if isinstance(values, Mapping) else list(values)
    if not rows:
        raise InvalidInputError(f"nothing to insert into {table.name}")
    if table.name == "clients":
        raise InvalidInputError("tenants are created by the system scope, not inside a tenant scope")
    return insert(table).returning(*table.c), [stamp(table, ctx, row) for row in rows]


def build_update(table: Table, ctx: TenantContext, values: Mapping[str, Any], where: Sequence[ColumnElement[bool]]) -> Update:
    if not where:
        raise UnscopedWriteError(f"scoped_update on {table.name} needs a condition; pass one (e.g. table.c.id == ...)")
    _check_columns(table, values)
    if not values:
        raise InvalidInputError(f"nothing to update in {table.name}")
    for col in _CONTEXT_COLUMNS + ("id",):
        if col in values and col in table.c:
            raise CrossTenantWriteError(f"scoped_update may not change {table.name}.{col}")
    return update(table).where(*scope_predicates(table, ctx), *where).values(**values).returning(*table.c)


def build_delete(table: Table, ctx: TenantContext, where: Sequence[ColumnElement[bool]]) -> Delete:
    if not where:
        raise UnscopedWriteError(f"scoped_delete on {table.name} needs a condition; pass one (e.g. table.c.id == ...)")
    if table.name == "clients":
        raise InvalidInputError("tenants are deleted by the system scope, not inside a tenant scope")
    return delete(table).where(*scope_predicates(table, ctx), *where).returning(*table.c)
