"""Connection and pooling (S0-B1): SQLAlchemy 2 engines on psycopg 3, sync and async.

:class:`Database` and :class:`AsyncDatabase` wrap the runtime engine the application uses. Each
new physical connection is checked once: a superuser, a BYPASSRLS role, a role that owns a
table, or one that can become such a role, raises :class:`UnsafeRuntimeRoleError` before any
query of the application runs. Every transaction on these engines carries the tenant context
of the moment (see :mod:`rtv_db.tenant`), set in the same round trip as ``BEGIN``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .config import Settings, describe_target, diff_role_settings, runtime_role_settings_from_env, to_sqlalchemy_url
from .errors import DatabaseConnectionError, RuntimeRoleSettingsError, UnsafeRuntimeRoleError
from .tenant._transaction import PROBE_OPTION

__all__ = [
    "Database",
    "AsyncDatabase",
    "PoolStats",
    "ConnectionInfo",
    "EngineOptions",
    "check_runtime_role",
    "get_database",
    "test_connection",
    "get_pool_stats",
    "close_connection",
]


@dataclass(frozen=True)
class EngineOptions:
    """Pool, driver and timeout settings of one engine. Every value can be overridden.

    The server-side timeouts come from the runtime role's settings in the database, which
    ``rtv-db migrate`` installs (``statement_timeout`` 30 s, ``idle_in_transaction_session_timeout``
    60 s): they hold behind a pooler, which drops startup options. ``statement_timeout_ms`` and
    ``idle_in_transaction_timeout_ms`` override them for this engine's connections only, as
    startup options, and so only on direct connections (PgBouncer refuses or drops them).

    ``prepare_threshold`` is psycopg's: ``None`` (the default) never prepares a statement on the
    server. A prepared statement is session state that SQL on the same connection can redefine,
    and PgBouncer's transaction mode (before 1.21) cannot carry it; see docs/pooling.md.
    ``connect_args`` are passed to ``psycopg.connect`` on top of rtv-db's own (which they may
    override, except ``autocommit``, which rtv-db needs to send ``BEGIN`` itself).
    """

    pool_size: int = 5
    max_overflow: int = 5
    pool_timeout: float = 10.0  # seconds to wait for a free connection before PoolTimeout
    pool_recycle: int = 1800  # seconds; replace connections before server/proxy idle limits
    pool_pre_ping: bool = True  # a connection idle for pre_ping_after_idle s is checked at checkout
    pre_ping_after_idle: float = 10.0  # seconds; 0: every checkout (SQLAlchemy's pool_pre_ping)
    connect_timeout: int = 5
    statement_timeout_ms: int | None = None
    idle_in_transaction_timeout_ms: int | None = None
    application_name: str = "rtv-db"
    prepare_threshold: int | None = None
    connect_args: Mapping[str, Any] = field(default_factory=dict)

    def engine_kwargs(self) -> dict[str, Any]:
        connect_args: dict[str, Any] = {
            "connect_timeout": self.connect_timeout,
            "application_name": self.application_name,
            "prepare_threshold": self.prepare_threshold,
        }
        options = []
        if self.statement_timeout_ms is not None:
            options.append(f"-c statement_timeout={int(self.statement_timeout_ms)}")
        if self.idle_in_transaction_timeout_ms is not None:
            options.append(f"-c idle_in_transaction_session_timeout={int(self.idle_in_transaction_timeout_ms)}")
        if options:
            connect_args["options"] = " ".join(options)
        connect_args.update(self.connect_args)
        connect_args.pop("autocommit", None)
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout,
            "pool_recycle": self.pool_recycle,
            "pool_pre_ping": self.pool_pre_ping and self.pre_ping_after_idle <= 0,
            "connect_args": connect_args,
        }


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool: ``get_pool_stats()``."""

    size: int
    checked_in: int
    checked_out: int
    overflow: int

    @property
    def total(self) -> int:
        return self.checked_in + self.checked_out


@dataclass(frozen=True)
class ConnectionInfo:
    """What ``test_connection()`` found."""

    server_version: str
    database: str
    user: str
    latency_ms: float


_PROBE = text("SELECT current_setting('server_version'), current_database(), current_user")

# -- the runtime-role guard -------------------------------------------------------------------

_ROLE_CHECK = """
SELECT r.rolname,
       r.rolsuper,
       r.rolbypassrls,
       (SELECT count(*) FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relowner = r.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg_toast%') AS owned,
       (SELECT string_agg(m.rolname, ', ') FROM pg_catalog.pg_roles m
         WHERE m.oid <> r.oid AND pg_catalog.pg_has_role(r.oid, m.oid, 'MEMBER')
           AND (m.rolsuper OR m.rolbypassrls OR EXISTS (
                 SELECT 1 FROM pg_catalog.pg_class c2 WHERE c2.relowner = m.oid
                   AND c2.relnamespace NOT IN (SELECT oid FROM pg_catalog.pg_namespace
                                               WHERE nspname IN ('pg_catalog', 'information_schema'))
                   AND c2.relkind IN ('r', 'p')))) AS escalations,
       (SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s
         WHERE s.setrole = r.oid AND s.setdatabase = 0) AS global_settings,
       (SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s
         WHERE s.setrole = r.oid AND s.setdatabase = (SELECT d.oid FROM pg_catalog.pg_database d
                                                      WHERE d.datname = pg_catalog.current_database()))
         AS database_settings
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
"""

_QUERY_CANCELED = "57014"


def _probe_role(dbapi_connection: Any) -> tuple[Any, ...]:
    # A DBAPI connection (SQLAlchemy's adapter for async drivers): plain cursor calls, no `with`.
    cur = dbapi_connection.cursor()
    try:
        cur.execute(_ROLE_CHECK)
        row = cur.fetchone()
    finally:
        cur.close()
    dbapi_connection.rollback()
    return tuple(row)


def check_runtime_role(dbapi_connection: Any, expected_settings: Mapping[str, str] | None = None) -> None:
    """Raise :class:`UnsafeRuntimeRoleError` unless the connection's role is bound by RLS, and
    :class:`RuntimeRoleSettingsError` unless its settings are exactly what ``rtv-db migrate``
    installs (``expected_settings``; by default the timeouts of the environment, see
    :func:`rtv_db.config.runtime_role_settings_from_env`).

    One query, no extra round trip. ``ALTER ROLE current_user PASSWORD ...`` by the runtime role
    cannot be seen here (nor prevented by PostgreSQL): new connections then fail to
    authenticate, and ``rtv-db migrate`` sets the configured password again.
    """
    try:
        row = _probe_role(dbapi_connection)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != _QUERY_CANCELED:
            raise
        # The role's own statement_timeout (say 1 ms, planted with ALTER ROLE) cancelled the probe:
        # look again with a sane one to say why. The connection is refused either way.
        dbapi_connection.rollback()
        cur = dbapi_connection.cursor()
        try:
            cur.execute("SET statement_timeout = 10000")
        finally:
            cur.close()
        _refuse_unsafe(_probe_role(dbapi_connection), expected_settings)
        raise
    _refuse_unsafe(row, expected_settings)


def _refuse_unsafe(row: tuple[Any, ...], expected_settings: Mapping[str, str] | None) -> None:
    name, is_super, bypass, owned, escalations, global_settings, database_settings = row
    problems = []
    if is_super:
        problems.append("is a superuser")
    if bypass:
        problems.append("has BYPASSRLS")
    if owned:
        problems.append(f"owns {owned} table(s) or view(s)")
    if escalations:
        problems.append(f"is a member of {escalations}, which can bypass RLS")
    if problems:
        raise UnsafeRuntimeRoleError(
            f"refusing to use role {name!r} for the application: it {', '.join(problems)}. "
            "Row-Level Security would not bind it. Connect as the runtime role (rtv_app) instead."
        )
    if expected_settings is None:
        expected_settings = runtime_role_settings_from_env()
    diff = diff_role_settings(global_settings, database_settings, expected_settings)
    if diff:
        raise RuntimeRoleSettingsError(
            f"refusing to use role {name!r} for the application: its settings are not the ones "
            f"`rtv-db migrate` installs: {'; '.join(diff.describe())}. Every connection of every tenant "
            "inherits a role's settings, and the runtime role can change its own (ALTER ROLE "
            "current_user SET ...): run `rtv-db migrate` to put them back (with the application's "
            "RTV_DB_STATEMENT_TIMEOUT_MS and RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS, if set), then "
            "find out who changed them (`rtv-db verify` reports them too)."
        )


def connect_error(url: str, exc: BaseException) -> DatabaseConnectionError:
    """A :class:`DatabaseConnectionError` naming host and database; the password never appears."""
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    password = make_url(url).password
    if password:
        reason = reason.replace(str(password), "***")
    return DatabaseConnectionError(f"cannot connect to {describe_target(url)}: {reason}")


def _install(engine: Engine, url: str, *, check_role: bool, context_key: Any = None) -> None:
    from ._constraints import install_constraint_errors
    from .citus import install_error_mapping
    from .tenant._transaction import install_context_hooks

    if check_role:
        @event.listens_for(engine, "connect")
        def _guard(dbapi_connection: Any, _record: Any) -> None:
            check_runtime_role(dbapi_connection)

    @event.listens_for(engine, "handle_error")
    def _connect_failed(context: Any) -> None:
        # Only failures to *open* a connection are translated; query errors pass through.
        if context.connection is None and not context.is_pre_ping and isinstance(
            context.original_exception, Exception
        ) and context.sqlalchemy_exception is not None and isinstance(context.sqlalchemy_exception, DBAPIError):
            if type(context.original_exception).__name__ == "OperationalError":
                raise connect_error(url, context.original_exception) from context.original_exception

    install_context_hooks(engine, context_key)
    # On Citus, error messages name shards (brand_kits_102033): map them back to table names.
    install_error_mapping(engine)
    # Unique and foreign-key violations as DuplicateError / ReferenceNotFoundError, without key values.
    install_constraint_errors(engine)


def _install_ping(engine: Engine, options: EngineOptions, engine_kwargs: dict[str, Any]) -> None:
    # An explicit pool_pre_ping engine argument is SQLAlchemy's own (every checkout, or never).
    if options.pool_pre_ping and options.pre_ping_after_idle > 0 and "pool_pre_ping" not in engine_kwargs:
        from ._idle_ping import install_idle_ping

        install_idle_ping(engine, options.pre_ping_after_idle)


class Database:
    """The application's handle on PostgreSQL: a pooled engine on the runtime role.

    ``check_role=False`` is for the system scope and for tests of the guard itself.
    ``context_key`` (a :class:`rtv_db.signing.ContextKey` or ``"<id>:<hex>"``) signs the tenant
    context; by default the configured key is used (see :mod:`rtv_db.signing`).
    """

    def __init__(self, url: str, *, options: EngineOptions | None = None, check_role: bool = True,
                 context_key: Any = None, **engine_kwargs: Any) -> None:
        self.url = to_sqlalchemy_url(url)
        self.options = options or EngineOptions()
        kwargs = self.options.engine_kwargs() | engine_kwargs
        self.engine: Engine = create_engine(self.url, **kwargs)
        _install(self.engine, self.url, check_role=check_role, context_key=context_key)
        _install_ping(self.engine, self.options, engine_kwargs)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> "Database":
        """The runtime database of ``DATABASE_URL`` (or the embedded server)."""
        from .targets import resolve_target

        return cls(resolve_target(settings).runtime_url, **kwargs)

    def test_connection(self) -> ConnectionInfo:
        """Open a connection and run one query; raise :class:`DatabaseConnectionError` on failure."""
        started = time.perf_counter()
        try:
            with self.engine.connect() as conn:
                version, database, user = conn.execution_options(**{PROBE_OPTION: True}).execute(_PROBE).one()
        except SQLAlchemyError as exc:
            raise connect_error(self.url, exc) from exc
        return ConnectionInfo(version, database, user, latency_ms=(time.perf_counter() - started) * 1000)

    def get_pool_stats(self) -> PoolStats:
        return _pool_stats(self.engine)

    def close(self) -> None:
        """Close every pooled connection. The object can be used again; it reconnects."""
        self.engine.dispose()

    close_connection = close

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDatabase:
    """The asyncio twin of :class:`Database`."""

    def __init__(self, url: str, *, options: EngineOptions | None = None, check_role: bool = True,
                 context_key: Any = None, **engine_kwargs: Any) -> None:
        self.url = to_sqlalchemy_url(url)
        self.options = options or EngineOptions()
        kwargs = self.options.engine_kwargs() | engine_kwargs
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        _install(self.engine.sync_engine, self.url, check_role=check_role, context_key=context_key)
        _install_ping(self.engine.sync_engine, self.options, engine_kwargs)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> "AsyncDatabase":
        from .targets import resolve_target

        return cls(resolve_target(settings).runtime_url, **kwargs)

    async def test_connection(self) -> ConnectionInfo:
        started = time.perf_counter()
        try:
            async with self.engine.connect() as conn:
                await conn.execution_options(**{PROBE_OPTION: True})
                version, database, user = (await conn.execute(_PROBE)).one()
        except SQLAlchemyError as exc:
            raise connect_error(self.url, exc) from exc
        return ConnectionInfo(version, database, user, latency_ms=(time.perf_counter() - started) * 1000)

    def get_pool_stats(self) -> PoolStats:
        return _pool_stats(self.engine.sync_engine)

    async def close(self) -> None:
        await self.engine.dispose()

    close_connection = close

    async def __aenter__(self) -> "AsyncDatabase":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _pool_stats(engine: Engine) -> PoolStats:
    pool: Any = engine.pool
    return PoolStats(
        size=pool.size(),
        checked_in=pool.checkedin(),
        checked_out=pool.checkedout(),
        overflow=max(pool.overflow(), 0),
    )


# -- the spec's module-level helpers, on a default database -------------------------------------

_default: Database | None = None


def get_database() -> Database:
    """The process-wide default :class:`Database` (``DATABASE_URL``, else the embedded server)."""
    global _default
    if _default is None:
        _default = Database.from_settings()
    return _default


def test_connection() -> ConnectionInfo:
    """``get_database().test_connection()``."""
    return get_database().test_connection()


def get_pool_stats() -> PoolStats:
    """``get_database().get_pool_stats()``."""
    return get_database().get_pool_stats()


def close_connection() -> None:
    """Close the default database's pool (it reconnects on next use)."""
    if _default is not None:
        _default.close()


test_connection.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
