"""Connection and pooling (S0-B1): SQLAlchemy 2 engines on psycopg 3, sync and async.

:class:`Database` and :class:`AsyncDatabase` wrap the runtime engine the application uses. Each
new physical connection is checked once: a superuser, a BYPASSRLS role, a role that owns a
table, or one that can become such a role, raises :class:`UnsafeRuntimeRoleError` before any
query of the application runs. Every transaction on these engines carries the tenant context
of the moment (see :mod:`rtv_db.tenant`), set in the same round trip as ``BEGIN``.

The role's settings (``pg_db_role_setting``) must be exactly those ``rtv-db migrate`` installs.
The runtime role may change its own (``ALTER ROLE current_user SET work_mem = '1GB'``, by SQL
injected in any tenant's transaction), and every later session of the role starts with them. So
the guard puts back what the runtime role itself may put back (``ALTER ROLE CURRENT_USER [IN
DATABASE ...] RESET name`` or ``SET name = <installed value>``: the settings any role may set),
logs a security WARNING on ``rtv_db.connection``, closes that connection (its session already
started with the planted values) and opens another, which it checks again. Only what the runtime
role cannot change (a superuser-only setting, an extension's custom setting, put there by an
administrator) is refused, with :class:`RuntimeRoleSettingsError`, and nothing is changed then.
Before issue 24 every difference was refused: one ``ALTER ROLE current_user SET ...`` by any
tenant refused every new connection of every instance until someone ran ``rtv-db migrate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from .config import (
    RoleSettingsDiff,
    Settings,
    describe_target,
    diff_role_settings,
    runtime_role_settings_from_env,
    to_sqlalchemy_url,
)
from .errors import DatabaseConnectionError, RuntimeRoleSettingsError, UnsafeRuntimeRoleError
from .tenant._transaction import PROBE_OPTION

__all__ = [
    "Database",
    "AsyncDatabase",
    "PoolStats",
    "ConnectionInfo",
    "EngineOptions",
    "check_runtime_role",
    "repair_runtime_role",
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
         AS database_settings,
       pg_catalog.current_database()
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
"""

_QUERY_CANCELED = "57014"
_log = logging.getLogger("rtv_db.connection")


def _driver_of(dbapi_connection: Any) -> Any:
    """The psycopg connection (SQLAlchemy wraps the async one in an adapter)."""
    return getattr(dbapi_connection, "driver_connection", None) or dbapi_connection


def _timeouts_off(driver: Any) -> list[str]:
    """First in the guard's transactions: what a planted role default could do to them. A 1 ms
    transaction_timeout ends the session (armed at BEGIN: hence one pipeline, no client round trip
    before it is switched off); a 1 ms statement_timeout cancels a catalog query."""
    off = ["SET LOCAL statement_timeout = 10000", "SET LOCAL lock_timeout = 10000"]
    return (["SET LOCAL transaction_timeout = 0"] if driver.info.server_version >= 170000 else []) + off


def _in_one_round_trip(dbapi_connection: Any, statements: list[str]) -> list[Any]:
    """``statements`` pipelined in autocommit (they carry their own BEGIN and end): the rows of each
    (None for a command). Whatever fails, the connection is left idle, in its own autocommit mode."""
    driver = _driver_of(dbapi_connection)
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        if isinstance(driver, psycopg.AsyncConnection):
            return await_(_pipelined_async(driver, statements))  # type: ignore[no-any-return]
        with driver.pipeline():
            cursors = [driver.execute(sql, prepare=False) for sql in statements]
        return [cur.fetchall() if cur.description else None for cur in cursors]
    finally:
        if not driver.closed and driver.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            _rollback_quietly(dbapi_connection)
        if not driver.closed:
            dbapi_connection.autocommit = autocommit


async def _pipelined_async(driver: Any, statements: list[str]) -> list[Any]:
    async with driver.pipeline():
        cursors = [await driver.execute(sql, prepare=False) for sql in statements]
    return [await cur.fetchall() if cur.description else None for cur in cursors]


def _text(value: Any) -> Any:
    """Text as text whatever the session's client_encoding (SQL_ASCII, planted as a role default,
    makes psycopg return bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


def _probe_role(dbapi_connection: Any) -> tuple[Any, ...]:
    """The role's row of :data:`_ROLE_CHECK`, read in one round trip (and rolled back)."""
    statements = ["BEGIN", *_timeouts_off(_driver_of(dbapi_connection)), _ROLE_CHECK, "ROLLBACK"]
    try:
        rows = _in_one_round_trip(dbapi_connection, statements)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != _QUERY_CANCELED:
            raise
        # The role's own statement_timeout (say 1 ms, planted with ALTER ROLE) cancelled the first
        # statements: look again with a sane one for the session (refused or repaired either way).
        _in_one_round_trip(dbapi_connection, ["SET statement_timeout = 10000"])
        rows = _in_one_round_trip(dbapi_connection, statements)
    return tuple(_text(v) for v in rows[-2][0])


def check_runtime_role(dbapi_connection: Any, expected_settings: Mapping[str, str] | None = None) -> None:
    """Raise :class:`UnsafeRuntimeRoleError` unless the connection's role is bound by RLS, and
    :class:`RuntimeRoleSettingsError` unless its settings are exactly what ``rtv-db migrate``
    installs (``expected_settings``; by default the timeouts of the environment, see
    :func:`rtv_db.config.runtime_role_settings_from_env`). The connection must be idle (no
    transaction open); it is left so. Nothing is changed: :func:`repair_runtime_role` repairs.

    One round trip (the query pipelined with its transaction). ``ALTER ROLE current_user PASSWORD ...``
    by the runtime role cannot be seen here (nor prevented by PostgreSQL): new connections then
    fail to authenticate, and ``rtv-db migrate`` sets the configured password again.
    """
    _refuse_unsafe(_probe_role(dbapi_connection), expected_settings)


def repair_runtime_role(dbapi_connection: Any, expected_settings: Mapping[str, str] | None = None) -> list[str]:
    """Put the connection's role's settings back to ``expected_settings`` where the role itself may.

    Returns one phrase per setting put back (empty: nothing differed); the caller must not use this
    connection's session after a repair (it started with the planted values). Raises
    :class:`UnsafeRuntimeRoleError` for a role RLS would not bind, and
    :class:`RuntimeRoleSettingsError`, changing nothing, when any difference is one the role may
    not undo itself (then only ``rtv-db migrate`` can). Settings are compared as
    :func:`check_runtime_role` compares them.
    """
    row = _probe_role(dbapi_connection)
    _refuse_unsafe_role(row)
    expected = runtime_role_settings_from_env() if expected_settings is None else expected_settings
    diff = diff_role_settings(row[5], row[6], expected)
    if not diff:
        return []
    # One transaction, as the role itself: all or nothing. READ WRITE whatever default was planted.
    statements = ["BEGIN READ WRITE", *_timeouts_off(_driver_of(dbapi_connection)), *_repairs(diff, row[7]), "COMMIT"]
    try:
        _in_one_round_trip(dbapi_connection, statements)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeRoleSettingsError(
            _settings_message(row[0], diff) + f" (the runtime role cannot put them back itself: {reason})") from exc
    return diff.describe()


def _repairs(diff: RoleSettingsDiff, database: str) -> list[str]:
    """The ALTER ROLE statements that undo ``diff`` (names and values quoted, never interpolated raw)."""
    here = f"IN DATABASE {_ident(database)} "
    statements = [f"ALTER ROLE CURRENT_USER RESET {_ident(key)}" for key in diff.for_every_database]
    statements += [f"ALTER ROLE CURRENT_USER {here}RESET {_ident(key)}" for key in diff.unexpected]
    wanted = {key: want for key, (_, want) in diff.wrong.items()} | dict(diff.missing)
    statements += [f"ALTER ROLE CURRENT_USER {here}SET {_ident(key)} = {_literal(value)}" for key, value in wanted.items()]
    return statements


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _rollback_quietly(dbapi_connection: Any) -> None:
    try:
        dbapi_connection.rollback()
    except Exception:  # a lost connection: nothing to roll back
        pass


def _close_quietly(dbapi_connection: Any) -> None:
    try:
        dbapi_connection.close()
    except Exception:
        pass


def connect_runtime_role(connect: Callable[[], Any], expected_settings: Mapping[str, str] | None = None) -> Any:
    """A DBAPI connection from ``connect()`` whose role passed the guard, repairing its settings
    (:func:`repair_runtime_role`) and connecting again when they had been changed."""
    dbapi_connection = connect()
    try:
        repaired = repair_runtime_role(dbapi_connection, expected_settings)
    except BaseException:
        _close_quietly(dbapi_connection)
        raise
    if not repaired:
        return dbapi_connection
    _log.warning(
        "rtv-db security: the runtime role's settings had been changed, by SQL on the runtime role (ALTER ROLE "
        "current_user ...), or differ from this application's RTV_DB_STATEMENT_TIMEOUT_MS / "
        "RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS; put back: %s. The connection that found them was closed. Find "
        "out who changed them; backends a pooler opened meanwhile keep them until it closes them "
        "(docs/pooling.md).", "; ".join(repaired))
    _close_quietly(dbapi_connection)
    dbapi_connection = connect()
    try:
        check_runtime_role(dbapi_connection, expected_settings)
    except BaseException:
        _close_quietly(dbapi_connection)
        raise
    return dbapi_connection


def _refuse_unsafe(row: tuple[Any, ...], expected_settings: Mapping[str, str] | None) -> None:
    _refuse_unsafe_role(row)
    name, global_settings, database_settings = row[0], row[5], row[6]
    if expected_settings is None:
        expected_settings = runtime_role_settings_from_env()
    diff = diff_role_settings(global_settings, database_settings, expected_settings)
    if diff:
        raise RuntimeRoleSettingsError(_settings_message(name, diff))


def _refuse_unsafe_role(row: tuple[Any, ...]) -> None:
    name, is_super, bypass, owned, escalations = row[:5]
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


def _settings_message(name: str, diff: RoleSettingsDiff) -> str:
    return (
        f"refusing to use role {name!r} for the application: its settings are not the ones "
        f"`rtv-db migrate` installs: {'; '.join(diff.describe())}. Every connection of every tenant "
        "inherits a role's settings, and the runtime role can change its own (ALTER ROLE "
        "current_user SET ...): run `rtv-db migrate` to put them back (with the application's "
        "RTV_DB_STATEMENT_TIMEOUT_MS, RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS and RTV_DB_TEMP_FILE_LIMIT_KB, if set), then "
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
        @event.listens_for(engine, "do_connect")
        def _guard(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
            # Returning the connection makes SQLAlchemy use it (and skip its own connect).
            return connect_runtime_role(lambda: dialect.connect(*cargs, **cparams))

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
