"""Statements of the scoped API, built once for the sync and async scopes.

Every statement carries the literal tenant predicate (``client_id = :tenant``), which lets
PostgreSQL use the ``client_id`` indexes and, on Citus, route to one shard. Row-Level Security
is the wall behind it: the predicate is an optimisation and a second check, not the guarantee.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, Column, ColumnElement, Select, Table, and_, bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.sql.dml import ReturningDelete, ReturningInsert, ReturningUpdate
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import AsBoolean, BinaryExpression, BindParameter, BooleanClauseList, Grouping, Null, True_
from sqlalchemy.orm import DeclarativeBase

from ..errors import CrossTenantWriteError, InvalidInputError, UnscopedWriteError
from .context import TenantContext

__all__ = [
    "TableLike",
    "MAX_VALUE_BYTES",
    "MAX_JSON_DEPTH",
    "resolve_table",
    "tenant_column",
    "build_select",
    "build_get",
    "build_insert",
    "build_update",
    "build_delete",
]

# Limits on one value written through the scoped API. PostgreSQL takes up to 1 GB (255 MB for
# jsonb); nothing in rtv-db's schema needs more than a fraction of a megabyte, and a huge value
# is far more likely a bug or an attack (memory, WAL, replication lag) than data.
MAX_VALUE_BYTES = 1024 * 1024  # per text or JSON value, UTF-8 encoded (JSON: as serialised)
MAX_JSON_DEPTH = 64  # nesting of JSON objects and arrays

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


@functools.lru_cache(maxsize=128)
def _point_select(table: Table, with_account: bool) -> Select[Any]:
    """``SELECT ... WHERE <scope predicates> AND id = :id``, built once per table.

    Building SQLAlchemy expressions costs more than compiling them (which SQLAlchemy caches), so
    the hot by-id read is built once with bound parameters and reused.
    """
    predicates: list[ColumnElement[bool]] = [tenant_column(table) == bindparam("rtv_tenant", type_=UUID(as_uuid=True))]
    if "platform_account_id" in table.c and "lane" in table.c:
        if with_account:
            predicates.append(table.c.platform_account_id == bindparam("rtv_account", type_=UUID(as_uuid=True)))
        predicates.append(table.c.lane == bindparam("rtv_lane"))
    return select(table).where(*predicates, table.c.id == bindparam("rtv_id", type_=UUID(as_uuid=True))).limit(1)


def build_get(table: Table, ctx: TenantContext, id: uuid.UUID) -> tuple[Select[Any], dict[str, Any]]:
    """The by-id read of :meth:`TenantScope.scoped_get`: a cached statement and its parameters."""
    stmt = _point_select(table, ctx.platform_account_id is not None)
    params: dict[str, Any] = {"rtv_tenant": ctx.tenant_id, "rtv_id": id}
    if "platform_account_id" in table.c and "lane" in table.c:
        params["rtv_lane"] = ctx.lane
        if ctx.platform_account_id is not None:
            params["rtv_account"] = ctx.platform_account_id
    return stmt, params


def _check_columns(table: Table, values: Mapping[str, Any]) -> None:
    if not isinstance(values, Mapping):
        raise InvalidInputError(f"values for {table.name} must be a mapping of column names, not {type(values).__name__}")
    unknown = [key for key in values if not isinstance(key, str) or key not in table.c]
    if unknown:
        raise InvalidInputError(f"{table.name} has no column(s) {', '.join(map(str, unknown))}")


def _check_text(where: str, value: str) -> None:
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL, nor jsonb the \u0000 escape: refuse it here, typed.
        raise InvalidInputError(f"{where} contains a NUL character (\\x00), which PostgreSQL cannot store")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where} is not valid Unicode (a lone surrogate); it cannot be stored as UTF-8") from None
    if size > MAX_VALUE_BYTES:
        raise InvalidInputError(f"{where} is {size} bytes; the limit is {MAX_VALUE_BYTES} bytes per value")


def _check_json(where: str, value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:  # iterative: a deeply nested value must not exhaust Python's stack either
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(where, item)
        elif isinstance(item, Mapping) or isinstance(item, (list, tuple)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidInputError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if isinstance(key, str):
                        _check_text(where, key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a set, a datetime, NaN: not JSON that PostgreSQL accepts
        raise InvalidInputError(f"{where} is not JSON: {exc}") from None
    size = len(encoded.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        raise InvalidInputError(f"{where} is {size} bytes as JSON; the limit is {MAX_VALUE_BYTES} bytes per value")


def check_values(table: Table, values: Mapping[str, Any]) -> None:
    """:class:`InvalidInputError` for a value PostgreSQL would refuse or that exceeds the limits."""
    for key, value in values.items():
        where = f"{table.name}.{key}"
        if value is None:
            continue
        if isinstance(table.c[key].type, JSON):
            _check_json(where, value)
        elif isinstance(value, str):
            _check_text(where, value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, str):
                    _check_text(where, item)


def _same_id(given: Any, expected: uuid.UUID) -> bool:
    try:
        return uuid.UUID(str(given)) == expected
    except ValueError:
        return False


def stamp(table: Table, ctx: TenantContext, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the context's tenant (and account and lane) filled in; refuse contradictions."""
    _check_columns(table, values)
    check_values(table, values)
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


def build_insert(table: Table, ctx: TenantContext, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> tuple[ReturningInsert[Any], list[dict[str, Any]]]:
    if isinstance(values, Mapping):
        rows = [values]
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes, bytearray)):
        rows = list(values)
    else:
        raise InvalidInputError(
            f"values for {table.name} must be a mapping or a list of mappings, not {type(values).__name__}"
        )
    if not rows:
        raise InvalidInputError(f"nothing to insert into {table.name}")
    if table.name == "clients":
        raise InvalidInputError("tenants are created by the system scope, not inside a tenant scope")
    return insert(table).returning(*table.c), [stamp(table, ctx, row) for row in rows]


_ALL_ROWS_HINT = ("pass a condition that selects rows by a column of the table (e.g. table.c.id == ...), "
                  "or all_rows=True to change every row of this tenant")


def _table_columns(expr: Any, table: Table, ignore: frozenset[str]) -> set[str]:
    """Names of ``table``'s columns that ``expr`` mentions, other than those in ``ignore``."""
    found: set[str] = set()
    for element in visitors.iterate(expr):
        if isinstance(element, Column) and element.table is table and element.key not in ignore:
            found.add(element.key)
    return found


def _unrestricted(expr: Any, table: Table, ignore: frozenset[str]) -> str | None:
    """Why ``expr`` does not restrict ``table``'s rows for the tenant, or None when it may.

    Pragmatic, not a prover: a condition is refused when SQLAlchemy folds it to TRUE, when it is a
    literal TRUE, when it mentions no column of the table other than those the scope fixes
    (client_id, and platform_account_id and lane on tables scoped by account), when it is
    ``col IS NOT NULL`` on a NOT NULL or primary-key column, or ``col = col``; an AND is refused
    when every part is, an OR when any branch is. Anything else passes (``name <> 'x' OR name =
    'x'`` does: it is an explicit choice, and still limited to the tenant's rows).
    """
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, True_):
        return "it is TRUE"
    if isinstance(expr, AsBoolean) and expr.operator is operators.is_true:
        return _unrestricted(expr.element, table, ignore)
    if isinstance(expr, BindParameter) and expr.value is True:
        return "it is a literal TRUE"
    if isinstance(expr, BooleanClauseList):
        parts = list(expr.clauses)
        if expr.operator is operators.and_:
            reasons = [_unrestricted(p, table, ignore) for p in parts]
            return None if any(r is None for r in reasons) else ("every part of its AND is unrestricted: "
                                                                  + "; ".join(r for r in reasons if r))
        if expr.operator is operators.or_:
            for part in parts:
                reason = _unrestricted(part, table, ignore)
                if reason is not None:
                    return f"a branch of its OR is unrestricted ({reason})"
            return None
    if not _table_columns(expr, table, ignore):
        fixed = f" other than {', '.join(sorted(ignore))}" if ignore else ""
        return f"it mentions no column of {table.name}{fixed}"
    if isinstance(expr, BinaryExpression):
        left, right, op = expr.left, expr.right, expr.operator
        if (op is operators.is_not and isinstance(right, Null) and isinstance(left, Column)
                and left.table is table and (not left.nullable or left.primary_key)):
            return f"{table.name}.{left.key} is never NULL"
        if (op in (operators.eq, operators.ge, operators.le, operators.is_not_distinct_from)
                and isinstance(left, Column) and isinstance(right, Column) and left.compare(right)):
            return f"it compares {table.name}.{left.key} with itself"
    return None


def _require_condition(verb: str, table: Table, where: Sequence[Any], all_rows: bool = False) -> None:
    """An update or delete needs a condition that restricts rows, unless ``all_rows=True``.

    None, a literal TRUE, or a condition that is always true for the tenant by the rule of
    :func:`_unrestricted` is refused with :class:`UnscopedWriteError`.
    """
    if all_rows is not False and all_rows is not True:
        raise InvalidInputError(f"all_rows must be True or False, not {all_rows!r}")
    if all_rows:
        return
    real = [w for w in where if not (w is True or isinstance(w, True_))]
    if not real:
        raise UnscopedWriteError(f"{verb} on {table.name} needs a condition; {_ALL_ROWS_HINT}")
    ignore = frozenset(c for c in _CONTEXT_COLUMNS if c in table.c and (c == "client_id" or "lane" in table.c))
    if table.name == "clients":
        ignore = frozenset({"id"})
    reason = _unrestricted(and_(*where), table, ignore)
    if reason is not None:
        raise UnscopedWriteError(f"{verb} on {table.name}: the condition is always true for the tenant ({reason}); "
                                 + _ALL_ROWS_HINT)


def build_update(table: Table, ctx: TenantContext, values: Mapping[str, Any], where: Sequence[ColumnElement[bool]],
                 all_rows: bool = False) -> ReturningUpdate[Any]:
    _require_condition("scoped_update", table, where, all_rows)
    _check_columns(table, values)
    if not values:
        raise InvalidInputError(f"nothing to update in {table.name}")
    check_values(table, values)
    for col in _CONTEXT_COLUMNS + ("id",):
        if col in values and col in table.c:
            raise CrossTenantWriteError(f"scoped_update may not change {table.name}.{col}")
    return update(table).where(*scope_predicates(table, ctx), *where).values(**values).returning(*table.c)


def build_delete(table: Table, ctx: TenantContext, where: Sequence[ColumnElement[bool]],
                 all_rows: bool = False) -> ReturningDelete[Any]:
    _require_condition("scoped_delete", table, where, all_rows)
    if table.name == "clients":
        raise InvalidInputError("tenants are deleted by the system scope, not inside a tenant scope")
    return delete(table).where(*scope_predicates(table, ctx), *where).returning(*table.c)
