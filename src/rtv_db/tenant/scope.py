"""The tenant-scoped API: ``with_tenant_scope(db, tenant_id)`` and its async twin.

A scope is a :class:`TenantContext` bound to a database. Each ``scoped_*`` call runs in its own
transaction unless it is made on the handle ``scoped_transaction()`` yields, where all calls
share one. Either way the context is set in the database (``SET LOCAL``) for that transaction
only, and every statement carries the literal ``client_id`` predicate as well.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Connection, Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from ..connection import AsyncDatabase, Database
from .context import Lane, TenantContext, use_tenant_context
from ._statements import TableLike, build_delete, build_get, build_insert, build_select, build_update, resolve_table
from ._transaction import (_SET_CONFIG, CONTEXT_OPTION, SINGLE_STATEMENT_OPTION, TRANSACTION_SETTINGS_OPTION,
                           transaction_settings)
from .pagination import page_from_rows
from .search import SEARCH_KEY_STATEMENT, SearchPlan, SimilarChunk, to_results

__all__ = ["TenantScope", "AsyncTenantScope", "with_tenant_scope", "TenantScopedDb"]

_DB = TypeVar("_DB", Database, AsyncDatabase)


class _ScopeBase(Generic[_DB]):
    def __init__(self, db: _DB, context: TenantContext) -> None:
        if not isinstance(context, TenantContext):
            raise TypeError("context must be a TenantContext")
        self.db = db
        self.context = context

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.context.tenant_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tenant_id={self.context.tenant_id}, lane={self.context.lane!r})"


class TenantScope(_ScopeBase[Database]):
    """Scoped reads and writes for one tenant, on a :class:`~rtv_db.Database`.

    ``_conn`` is set on the handle that ``scoped_transaction`` yields; then every call uses it.
    """

    def __init__(self, db: Database, context: TenantContext, _conn: Connection | None = None) -> None:
        super().__init__(db, context)
        self._conn = _conn

    @contextmanager
    def _connection(self, settings: Any = ()) -> Iterator[Connection]:
        """The connection of one call. ``settings``: ``(name, value)`` pairs from
        ``ALLOWED_TRANSACTION_SETTINGS``, local to the call's transaction."""
        if self._conn is not None:
            for name, value in transaction_settings(settings):  # the transaction has begun: set them now
                self._conn.exec_driver_sql(_SET_CONFIG, (name, value))
            yield self._conn
            return
        with use_tenant_context(self.context), self.db.engine.connect() as conn:
            # One call, one statement: its transaction costs one round trip (tenant/_transaction.py).
            options: dict[str, Any] = {CONTEXT_OPTION: self.context, SINGLE_STATEMENT_OPTION: True}
            if settings:
                options[TRANSACTION_SETTINGS_OPTION] = transaction_settings(settings)
            conn = conn.execution_options(**options)
            with conn.begin():
                yield conn

    def scoped_query(self, table: TableLike, *where: ColumnElement[bool], order_by: Sequence[Any] = (),
                     limit: int | None = None, page_size: int | None = None, after: str | None = None) -> Any:
        """Rows of ``table`` that belong to this tenant and match ``where``.

        With ``page_size``: one :class:`~rtv_db.tenant.pagination.Page` (``rows``, ``next_cursor``)
        in keyset order (``order_by`` columns, then ``id``); pass ``after=page.next_cursor`` for
        the next. A changed or foreign cursor raises :class:`~rtv_db.InvalidCursorError`.
        """
        if page_size is not None or after is not None:
            stmt, spec, key = _paged(table, self.context, where, order_by, limit, page_size, after)
            with self._connection() as conn:
                return page_from_rows(list(conn.execute(stmt)), spec, key, page_size)  # type: ignore[arg-type]
        stmt = build_select(resolve_table(table), self.context, where, order_by=order_by, limit=limit)
        with self._connection() as conn:
            return list(conn.execute(stmt))

    def scoped_get(self, table: TableLike, id: uuid.UUID | str) -> Row[Any] | None:
        """One row by id, or None (also when the id belongs to another tenant)."""
        stmt, params = build_get(resolve_table(table), self.context, _as_uuid(id))
        with self._connection() as conn:
            return conn.execute(stmt, params).first()

    def scoped_insert(self, table: TableLike, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Row[Any]]:
        """Insert one row (a mapping) or many; ``client_id`` is set from the scope."""
        stmt, rows = build_insert(resolve_table(table), self.context, values)
        with self._connection() as conn:
            return list(conn.execute(stmt, rows)) if len(rows) > 1 else list(conn.execute(stmt.values(rows[0])))

    def scoped_update(self, table: TableLike, values: Mapping[str, Any], *where: ColumnElement[bool],
                      all_rows: bool = False) -> list[Row[Any]]:
        """Update this tenant's rows matching ``where``; return the updated rows.

        ``where`` must restrict rows (a condition always true for the tenant is refused with
        :class:`~rtv_db.UnscopedWriteError`); every row of the tenant only with ``all_rows=True``.
        """
        stmt = build_update(resolve_table(table), self.context, values, where, all_rows)
        with self._connection() as conn:
            return list(conn.execute(stmt))

    def scoped_delete(self, table: TableLike, *where: ColumnElement[bool], all_rows: bool = False) -> list[Row[Any]]:
        """Delete this tenant's rows matching ``where``; return the deleted rows.

        Like :meth:`scoped_update`: a restricting condition, or ``all_rows=True``.
        """
        stmt = build_delete(resolve_table(table), self.context, where, all_rows)
        with self._connection() as conn:
            return list(conn.execute(stmt))

    def similar_chunks(self, embedding: Sequence[float], k: int = 10, *, knowledge_base_id: uuid.UUID | str | None = None,
                       metric: str = "cosine", max_distance: float | None = None,
                       with_embedding: bool = False) -> list[SimilarChunk]:
        """This tenant's ``k`` knowledge chunks nearest to ``embedding``, nearest first, with their
        distance: exact within the tenant, or on the tenant's own HNSW index once it has one
        (rtv_db.tenant.search). Another tenant's knowledge base reads like a missing one: no results."""
        plan = SearchPlan(self.context, embedding, k, knowledge_base_id=knowledge_base_id, metric=metric,
                          max_distance=max_distance, with_embedding=with_embedding)
        if plan.needs_key(self.db.engine):
            with self._connection() as conn:
                plan.use_key(self.db.engine, conn.execute(SEARCH_KEY_STATEMENT).scalar())
        with self._connection(plan.settings) as conn:
            rows = list(conn.execute(plan.statement, plan.params))
        if plan.fell_short(rows):
            with self._connection() as conn:
                rows = list(conn.execute(plan.statement, plan.params))
        return to_results(plan.rows(rows), with_embedding)

    @contextmanager
    def scoped_transaction(self) -> Iterator["TenantScope"]:
        """One transaction for several calls: commits on success, rolls back on any exception.

        The handle it yields has the same methods, plus ``connection`` for raw SQL (still bound
        by RLS to this tenant) and ``session()`` for the ORM.
        """
        if self._conn is not None:  # already inside one: a savepoint
            with self._conn.begin_nested():
                yield self
            return
        with use_tenant_context(self.context), self.db.engine.connect() as conn:
            conn = conn.execution_options(**{CONTEXT_OPTION: self.context})
            with conn.begin():
                yield TenantScope(self.db, self.context, conn)

    @property
    def connection(self) -> Connection:
        """The transaction's connection (only inside ``scoped_transaction``)."""
        if self._conn is None:
            raise RuntimeError("connection is only available inside scoped_transaction()")
        return self._conn

    def session(self, **kwargs: Any) -> Session:
        """An ORM session for this tenant.

        Inside ``scoped_transaction`` it joins that transaction: its ``commit()`` only flushes,
        and the scope's transaction decides; its ``rollback()`` rolls the whole transaction back.
        """
        from .orm import tenant_session

        if self._conn is not None:
            return tenant_session(self._conn, self.context, join_transaction_mode="rollback_only", **kwargs)
        return tenant_session(self.db, self.context, **kwargs)


class AsyncTenantScope(_ScopeBase[AsyncDatabase]):
    """The asyncio twin of :class:`TenantScope`, on an :class:`~rtv_db.AsyncDatabase`."""

    def __init__(self, db: AsyncDatabase, context: TenantContext, _conn: AsyncConnection | None = None) -> None:
        super().__init__(db, context)
        self._conn = _conn

    @asynccontextmanager
    async def _connection(self, settings: Any = ()) -> AsyncIterator[AsyncConnection]:
        if self._conn is not None:
            for name, value in transaction_settings(settings):
                await self._conn.exec_driver_sql(_SET_CONFIG, (name, value))
            yield self._conn
            return
        with use_tenant_context(self.context):
            async with self.db.engine.connect() as conn:
                options: dict[str, Any] = {CONTEXT_OPTION: self.context, SINGLE_STATEMENT_OPTION: True}
                if settings:
                    options[TRANSACTION_SETTINGS_OPTION] = transaction_settings(settings)
                conn = await conn.execution_options(**options)
                async with conn.begin():
                    yield conn

    async def scoped_query(self, table: TableLike, *where: ColumnElement[bool], order_by: Sequence[Any] = (),
                           limit: int | None = None, page_size: int | None = None, after: str | None = None) -> Any:
        if page_size is not None or after is not None:
            stmt, spec, key = _paged(table, self.context, where, order_by, limit, page_size, after)
            async with self._connection() as conn:
                return page_from_rows(list(await conn.execute(stmt)), spec, key, page_size)  # type: ignore[arg-type]
        stmt = build_select(resolve_table(table), self.context, where, order_by=order_by, limit=limit)
        async with self._connection() as conn:
            return list(await conn.execute(stmt))

    async def scoped_get(self, table: TableLike, id: uuid.UUID | str) -> Row[Any] | None:
        stmt, params = build_get(resolve_table(table), self.context, _as_uuid(id))
        async with self._connection() as conn:
            return (await conn.execute(stmt, params)).first()

    async def scoped_insert(self, table: TableLike, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Row[Any]]:
        stmt, rows = build_insert(resolve_table(table), self.context, values)
        async with self._connection() as conn:
            result = await conn.execute(stmt, rows) if len(rows) > 1 else await conn.execute(stmt.values(rows[0]))
            return list(result)

    async def scoped_update(self, table: TableLike, values: Mapping[str, Any], *where: ColumnElement[bool],
                            all_rows: bool = False) -> list[Row[Any]]:
        stmt = build_update(resolve_table(table), self.context, values, where, all_rows)
        async with self._connection() as conn:
            return list(await conn.execute(stmt))

    async def scoped_delete(self, table: TableLike, *where: ColumnElement[bool], all_rows: bool = False) -> list[Row[Any]]:
        stmt = build_delete(resolve_table(table), self.context, where, all_rows)
        async with self._connection() as conn:
            return list(await conn.execute(stmt))

    async def similar_chunks(self, embedding: Sequence[float], k: int = 10, *,
                             knowledge_base_id: uuid.UUID | str | None = None, metric: str = "cosine",
                             max_distance: float | None = None, with_embedding: bool = False) -> list[SimilarChunk]:
        """The asyncio twin of :meth:`TenantScope.similar_chunks`."""
        plan = SearchPlan(self.context, embedding, k, knowledge_base_id=knowledge_base_id, metric=metric,
                          max_distance=max_distance, with_embedding=with_embedding)
        if plan.needs_key(self.db.engine):
            async with self._connection() as conn:
                plan.use_key(self.db.engine, (await conn.execute(SEARCH_KEY_STATEMENT)).scalar())
        async with self._connection(plan.settings) as conn:
            rows = list(await conn.execute(plan.statement, plan.params))
        if plan.fell_short(rows):
            async with self._connection() as conn:
                rows = list(await conn.execute(plan.statement, plan.params))
        return to_results(plan.rows(rows), with_embedding)

    @asynccontextmanager
    async def scoped_transaction(self) -> AsyncIterator["AsyncTenantScope"]:
        if self._conn is not None:
            async with self._conn.begin_nested():
                yield self
            return
        with use_tenant_context(self.context):
            async with self.db.engine.connect() as conn:
                conn = await conn.execution_options(**{CONTEXT_OPTION: self.context})
                async with conn.begin():
                    yield AsyncTenantScope(self.db, self.context, conn)

    @property
    def connection(self) -> AsyncConnection:
        if self._conn is None:
            raise RuntimeError("connection is only available inside scoped_transaction()")
        return self._conn

    def session(self, **kwargs: Any) -> AsyncSession:
        from .orm import async_tenant_session

        if self._conn is not None:
            return async_tenant_session(self._conn, self.context, join_transaction_mode="rollback_only", **kwargs)
        return async_tenant_session(self.db, self.context, **kwargs)


def _paged(table: TableLike, ctx: TenantContext, where: Sequence[ColumnElement[bool]], order_by: Sequence[Any],
           limit: int | None, page_size: int | None, after: str | None) -> Any:
    """The keyset-paged select of ``scoped_query(..., page_size=, after=)``."""
    from ..errors import InvalidInputError
    from .pagination import keyset_select

    if limit is not None:
        raise InvalidInputError("scoped_query takes limit or page_size, not both")
    if page_size is None:
        raise InvalidInputError("after= needs page_size=")
    resolved = resolve_table(table)
    return keyset_select(build_select(resolved, ctx, where), resolved, ctx, order_by, page_size, after)


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    """A row id: malformed is bad input (InvalidInputError), not a malformed tenant context."""
    from ..errors import InvalidInputError, InvalidTenantContextError
    from .context import parse_uuid

    try:
        parsed = parse_uuid(value, "id")
    except InvalidTenantContextError as exc:
        raise InvalidInputError(str(exc)) from None
    assert parsed is not None
    return parsed


def with_tenant_scope(
    db: Database | AsyncDatabase,
    tenant_id: uuid.UUID | str | TenantContext,
    *,
    platform_account_id: uuid.UUID | str | None = None,
    lane: Lane = "api",
    user_id: str | None = None,
    correlation_id: str | None = None,
) -> Any:
    """A scoped handle for one tenant: :class:`TenantScope`, or :class:`AsyncTenantScope` for an AsyncDatabase.

    ``tenant_id`` may also be a ready :class:`TenantContext`. A malformed id or lane raises
    :class:`~rtv_db.InvalidTenantContextError` here, before anything reaches the database.
    """
    if isinstance(tenant_id, TenantContext):
        context = tenant_id
    else:
        extra = {"correlation_id": correlation_id} if correlation_id else {}
        context = TenantContext(tenant_id, platform_account_id, lane, user_id, **extra)  # type: ignore[arg-type]
    if isinstance(db, AsyncDatabase):
        return AsyncTenantScope(db, context)
    if isinstance(db, Database):
        return TenantScope(db, context)
    raise TypeError(f"with_tenant_scope needs a Database or AsyncDatabase, not {type(db).__name__}")


TenantScopedDb = TenantScope
