"""Starting every database transaction clean, with the tenant context of the moment.

A listener on the engine's ``begin`` event starts every transaction. It sends, in psycopg's
pipeline mode so that they cost one network round trip as ``BEGIN`` alone would:

1. ``BEGIN`` naming the isolation level and access mode (a session default planted by SQL on the
   connection cannot change them);
2. ``SET LOCAL transaction_timeout = 0`` (PostgreSQL 17 and later), ``SET LOCAL statement_timeout
   = 0`` and ``SET LOCAL jit = off``: the server arms a statement's timeout when it starts the
   statement, with the value in force then, and plans it with the JIT settings in force then, so
   without these a timeout or JIT settings planted at session level by an earlier transaction
   would cancel, end or slow the clean session below (issue 24: 100,000 placeholder settings and
   ``statement_timeout = 1`` made every later start on the backend fail). Utility statements: no
   planner, no JIT, a few microseconds each;
3. ``SELECT rtv.clean_session()``: every setting back to the role's defaults (the timeouts of 2
   included), and no cursor, prepared statement, LISTEN or sequence value left from an earlier
   transaction on the backend; a session whose clean-up is slow is retired (revision 0008, and
   :mod:`rtv_db._session_guard` closes it);
4. the context: in signed mode (the default) ``rtv.set_signed_context(token, user_id,
   correlation_id)`` with a token minted for this one transaction (see :mod:`rtv_db.signing`);
   in unsigned mode (``RTV_DB_CONTEXT_MODE=unsigned``, debugging only)
   ``rtv.set_tenant_context(...)`` with the plain ids.

A start that fails (anything but the caller's own statement or COMMIT: told apart by whether the
start's last statement got its result, never by the error's type) rolls back, records the token as
spent and discards the connection: a session that could not be cleaned is never reused. Before a
start, the parameters the server reports to the driver are compared with those of the connection's
first session (:mod:`rtv_db._session_guard`); a connection used for another transaction without
going back to the pool gets them set back first, in one extra round trip only then.

A scoped call in its own transaction (``scope.scoped_get(...)`` and the like: one statement,
marked with :data:`SINGLE_STATEMENT_OPTION`) goes further: these are held back and sent with
the call's statement and ``COMMIT``, one pipeline, one round trip in all. A tenant ORM session's
own transaction (:data:`DEFERRED_START_OPTION`) holds them back too and sends them with its
first statement; its ``COMMIT`` follows as usual. Nothing runs in the transaction before them:
they are the first thing the server receives for it, in the same pipeline as the statement, and
a refused context aborts the pipeline before the statement runs.

(The driver runs in autocommit so that rtv-db, not psycopg, sends ``BEGIN``; psycopg's
``commit()`` and ``rollback()`` act on the server's transaction state.) None of these goes
through a server-side prepared statement, which SQL on the same connection could redefine.
Everything happens inside the transaction, so it holds behind PgBouncer's transaction pooling
too, where each transaction may run on another backend.

Transaction settings: the ``rtv_db_transaction_settings`` execution option
(:data:`TRANSACTION_SETTINGS_OPTION`), a tuple of ``(name, value)`` pairs, adds
``SELECT set_config(name, value, true)`` for each after the context, in the same pipeline (so
the clean session's ``RESET ALL`` does not undo them, and they end with the transaction). Only
the names in :data:`ALLOWED_TRANSACTION_SETTINGS` are taken; any other is
:class:`~rtv_db.InvalidInputError` before anything is sent.

Which context: the ``rtv_tenant_context`` execution option of the connection when present (a
tenant scope or tenant session sets it), otherwise the contextvar of the running task. With
neither, no context is set, and the database shows no rows and rejects writes.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Final

import psycopg
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.util import await_

from .._session_guard import REPORTED_PARAMETERS, SessionState, install_session_guard, session_state
from ..errors import ConfigurationError, InvalidInputError, TenantContextRefusedError
from .context import TenantContext, current_tenant_context

__all__ = ["CONTEXT_OPTION", "PROBE_OPTION", "SINGLE_STATEMENT_OPTION", "DEFERRED_START_OPTION", "TRANSACTION_SETTINGS_OPTION",
           "ALLOWED_TRANSACTION_SETTINGS", "transaction_settings", "remember_token", "SYSTEM", "install_context_hooks", "context_statement", "context_params", "ContextSetter",
           "NEUTRALISE", "NEUTRALISE_PG17"]

CONTEXT_OPTION: Final = "rtv_tenant_context"
PROBE_OPTION: Final = "rtv_connection_probe"
# Set by the scoped API on the transaction of one call: exactly one statement runs in it, so
# BEGIN, the clean session, the context, that statement and COMMIT can travel together.
SINGLE_STATEMENT_OPTION: Final = "rtv_single_statement"
# Set by tenant ORM sessions on their own transactions: BEGIN, the clean session and the context
# travel with the transaction's first statement (COMMIT comes later, as usual).
DEFERRED_START_OPTION: Final = "rtv_deferred_start"
# ((name, value), ...): transaction-local settings sent with what starts the transaction.
TRANSACTION_SETTINGS_OPTION: Final = "rtv_db_transaction_settings"

# The settings a transaction may ask for: planner and index-scan knobs only. Nothing that changes
# what a statement may see or do (search_path, role, row_security, read-only, timeouts) is here.
ALLOWED_TRANSACTION_SETTINGS: Final = frozenset({
    "hnsw.ef_search",
    "hnsw.iterative_scan",
    "hnsw.max_scan_tuples",
    "enable_seqscan",
    "enable_sort",
    "enable_indexscan",
    "enable_bitmapscan",
})
_SET_CONFIG: Final = "SELECT set_config(%s::text, %s::text, true)"
_MAX_SETTING_VALUE: Final = 256


def _setting_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and len(value) <= _MAX_SETTING_VALUE and "\x00" not in value:
        return value
    raise InvalidInputError(f"transaction setting {name}: {type(value).__name__} value {str(value)[:40]!r} is not a setting value")


@functools.lru_cache(maxsize=256)
def _checked_settings(settings: tuple[Any, ...]) -> tuple[tuple[str, str], ...]:
    checked = []
    for pair in settings:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise InvalidInputError(f"{TRANSACTION_SETTINGS_OPTION} takes (name, value) pairs, not {pair!r:.60}")
        name, value = pair
        if name not in ALLOWED_TRANSACTION_SETTINGS:
            raise InvalidInputError(f"transaction setting {str(name)[:60]!r} is not allowed; allowed: "
                                    + ", ".join(sorted(ALLOWED_TRANSACTION_SETTINGS)))
        checked.append((name, _setting_value(name, value)))
    return tuple(checked)


def transaction_settings(settings: Any) -> tuple[tuple[str, str], ...]:
    """``settings`` (pairs, or a mapping) checked against :data:`ALLOWED_TRANSACTION_SETTINGS`,
    values as text; :class:`~rtv_db.InvalidInputError` otherwise."""
    if isinstance(settings, Mapping):
        settings = tuple(settings.items())
    elif not isinstance(settings, tuple):
        if isinstance(settings, (str, bytes)) or not isinstance(settings, Iterable):
            raise InvalidInputError(f"{TRANSACTION_SETTINGS_OPTION} takes (name, value) pairs, not {type(settings).__name__}")
        settings = tuple(tuple(p) if isinstance(p, list) else p for p in settings)
    try:
        return _checked_settings(settings)
    except TypeError:  # an unhashable value: check it without the cache
        return _checked_settings.__wrapped__(settings)


class _System:
    """Marker for the system scope: no tenant context is set (the system role bypasses RLS)."""

    def __repr__(self) -> str:
        return "SYSTEM"


SYSTEM: Final = _System()

# Bind parameters, never literals: the values do not show in pg_stat_activity or the logs.
_SET_SIGNED = "SELECT rtv.set_signed_context(%s::text, %s::text, %s::text)"
_SET_UNSIGNED = "SELECT rtv.set_tenant_context(%s::uuid, %s::uuid, %s::text, %s::text, %s::text)"


def context_params(ctx: TenantContext) -> tuple[str, str | None, str, str | None, str]:
    """The plain (unsigned-mode) parameters of ``rtv.set_tenant_context``."""
    return (
        str(ctx.tenant_id),
        str(ctx.platform_account_id) if ctx.platform_account_id else None,
        ctx.lane,
        ctx.user_id,
        ctx.correlation_id,
    )


class ContextSetter:
    """How one engine sets the context: the mode and key, resolved once on first use.

    ``context_key`` (a :class:`~rtv_db.signing.ContextKey`, or ``"<id>:<hex>"``) overrides the
    configured keys; otherwise :func:`rtv_db.signing.load_keys` decides, at the first transaction.
    """

    def __init__(self, context_key: Any = None) -> None:
        self._explicit = context_key
        self._resolved: tuple[str, Any, int] | None = None
        self._lock = threading.Lock()

    def _config(self) -> tuple[str, Any, int]:
        if self._resolved is None:
            with self._lock:
                if self._resolved is None:
                    self._resolved = self._resolve()
        return self._resolved

    def _resolve(self) -> tuple[str, Any, int]:
        from .. import signing

        ttl = signing.context_ttl()
        if self._explicit is not None:
            key = self._explicit
            if isinstance(key, str):
                key = signing.parse_keys(key, where="context_key")[-1]
            return "signed", key, ttl
        mode = signing.context_mode()
        if mode == "unsigned":
            return mode, None, ttl
        keys = signing.load_keys()
        if not keys:
            raise ConfigurationError(
                "no tenant context key: set RTV_DB_CONTEXT_KEY or RTV_DB_CONTEXT_KEY_FILE, or run `rtv-db migrate`, "
                f"which generates {signing.key_file_path()} (see docs/signed-context.md)"
            )
        return mode, keys[-1], ttl

    def statement(self, ctx: TenantContext) -> tuple[str, tuple[Any, ...]]:
        """The SQL and bind parameters that set ``ctx`` in one transaction (a new token each call)."""
        mode, key, ttl = self._config()
        if mode == "unsigned":
            return _SET_UNSIGNED, context_params(ctx)
        from ..signing import mint_token

        token = mint_token(
            key,
            tenant_id=ctx.tenant_id,
            platform_account_id=ctx.platform_account_id,
            lane=ctx.lane,
            expires_at=int(time.time()) + ttl,
            user_id=ctx.user_id,
            correlation_id=ctx.correlation_id,
        )
        return _SET_SIGNED, (token, ctx.user_id, ctx.correlation_id)


# Keyed by the root engine: ``engine.execution_options(...)`` makes an OptionEngine that proxies
# the root (and shares its listeners), and must share its setter too.
_SETTERS: "weakref.WeakKeyDictionary[Engine, ContextSetter]" = weakref.WeakKeyDictionary()


def _root(engine: Engine) -> Engine:
    while getattr(engine, "_proxied", None) is not None:
        engine = engine._proxied  # type: ignore[attr-defined]
    return engine


def _setter_for(engine: Engine) -> ContextSetter:
    root = _root(engine)
    setter = _SETTERS.get(root)
    if setter is None:
        # An engine made without rtv-db's hooks (e.g. a test's own): configured defaults.
        setter = _SETTERS.setdefault(root, ContextSetter())
    return setter


def context_statement(conn: Connection, ctx: TenantContext) -> tuple[str, tuple[Any, ...]]:
    """The driver-level SQL and parameters that set ``ctx`` in ``conn``'s transaction."""
    return _setter_for(conn.engine).statement(ctx)


def _context_for(conn: Connection) -> TenantContext | None:
    option = conn.get_execution_options().get(CONTEXT_OPTION)
    if option is SYSTEM:
        return None
    if option is not None:
        return option  # type: ignore[no-any-return]
    return current_tenant_context()


_CLEAN_SESSION: Final = "SELECT rtv.clean_session()"
_READ_ONLY: Final = "SET TRANSACTION READ ONLY"

Statements = list[tuple[str, "tuple[Any, ...] | None"]]

# First after BEGIN: whatever an earlier transaction planted at session level that could cancel,
# end or slow the start before rtv.clean_session() resets it. Each timer is armed when the server
# starts a statement (transaction_timeout at BEGIN), with the value in force then, and a statement
# is planned with the JIT settings in force then. Utility statements: not planned, so not JIT-
# compiled. transaction_timeout first (its timeout ends the session); its assign hook disarms the
# running timer. (lock_timeout needs nothing: no lock is taken before RESET ALL resets it.)
NEUTRALISE: Final[Statements] = [("SET LOCAL statement_timeout = 0", None), ("SET LOCAL jit = off", None)]
NEUTRALISE_PG17: Final[Statements] = [("SET LOCAL transaction_timeout = 0", None), *NEUTRALISE]


def _neutraliser(driver: Any) -> Statements:
    """:data:`NEUTRALISE`, with ``transaction_timeout`` where the server has it (PostgreSQL 17+)."""
    return NEUTRALISE_PG17 if driver.pgconn.server_version >= 170000 else NEUTRALISE


def _begin_sql(driver: Any) -> str:
    """``BEGIN`` naming the isolation level and ``READ WRITE``: never the session's defaults.

    A read-only transaction turns read-only after its context is set (spending the token is a
    write); see :func:`_statements_for`.
    """
    level = "READ_COMMITTED" if driver.isolation_level is None else psycopg.IsolationLevel(driver.isolation_level).name
    return f"BEGIN ISOLATION LEVEL {level.replace('_', ' ')} READ WRITE"


def _statements_for(conn: Connection, driver: Any) -> Statements:
    """What starts this transaction: BEGIN (when the driver leaves it to us), the clean session,
    the context, and for a read-only transaction the switch to read-only."""
    statements: Statements = []
    if driver.autocommit:
        # rtv-db's engines run the driver in autocommit and send BEGIN themselves, pipelined with
        # the rest: one round trip. (In psycopg's own transaction mode, its implicit BEGIN is
        # synced before anything pipelined after it: two round trips.)
        statements.append((_begin_sql(driver), None))
    statements.extend(_neutraliser(driver))
    if conn.get_execution_options().get(PROBE_OPTION):
        return statements  # Database.test_connection(): reads server facts only, on any role
    statements.append((_CLEAN_SESSION, None))
    options = conn.get_execution_options()
    ctx = _context_for(conn)
    if ctx is not None:
        statements.append(context_statement(conn, ctx))
    settings = options.get(TRANSACTION_SETTINGS_OPTION)
    if settings:  # after RESET ALL (clean session), local to this transaction
        statements.extend((_SET_CONFIG, pair) for pair in transaction_settings(settings))
    if driver.read_only:
        statements.append((_READ_ONLY, None))
    return statements


def _forget_prepared(driver: Any) -> None:
    """rtv.clean_session() deallocates every prepared statement: make psycopg forget its own.

    Only with a ``prepare_threshold`` (rtv-db's default is None: nothing is ever prepared).
    psycopg's cache is internal API, hence the guards; without this the cache would name
    statements the server no longer has.
    """
    prepared = getattr(driver, "_prepared", None)
    if prepared is not None and driver.prepare_threshold is not None:
        prepared.clear()
        getattr(prepared, "_to_flush", []).clear()  # the server side is done by clean_session


# -- queueing rtv-db's own statements on psycopg's pipeline ----------------------------------------
#
# psycopg's ``execute`` in a pipeline makes a cursor, adapts the parameters and polls the socket,
# for every statement: on a local socket that costs more than the round trips it saves. rtv-db's
# own statements (BEGIN, the clean session, the context, settings, COMMIT) have fixed SQL and text
# parameters, and only their errors matter; they are queued on the pipeline as libpq calls
# (``PQsendQueryParams``: extended protocol, the unnamed statement, parameters bound, nothing
# prepared), and psycopg sends them in order with the next statement, or at the pipeline's sync,
# and checks each result for an error as it does for its own commands. The queues are psycopg's
# internal API (pinned below 3.4); without them, rtv-db's statements go through ``execute``.

_WIRE_SQL: dict[str, bytes] = {}


def _wire_sql(sql: str) -> bytes:
    """``%s`` placeholders as ``$1, $2, ...``, encoded (rtv-db's fixed statements only)."""
    wire = _WIRE_SQL.get(sql)
    if wire is None:
        parts = sql.split("%s")
        wire = _WIRE_SQL[sql] = "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1)).encode()
    return wire


class _StartProbe:
    """Whether a transaction's start succeeded: the result of its last statement arrived.

    Queued where psycopg's pipeline expects the cursor of that statement (psycopg hands a cursor
    its result through ``_check_results`` and ``_set_results``), it checks the result as psycopg
    checks one of its own commands' and notes that it came. The pipeline stops at its first error,
    so if the last statement of the start got its result, every statement of the start did, and a
    failure after it belongs to the caller's statement or COMMIT. Where psycopg has no queues the
    cursor ``execute`` returns for that statement stands in (its ``pgresult`` is set on success).
    """

    __slots__ = ("_arrived", "_encoding", "_cursor")

    def __init__(self, encoding: str) -> None:
        self._arrived = False
        self._encoding = encoding
        self._cursor: Any = None

    @property
    def succeeded(self) -> bool:
        return self._arrived or (self._cursor is not None and self._cursor.pgresult is not None)

    def _check_results(self, results: list[Any]) -> None:
        for result in results:
            if result.status == _FATAL_ERROR:
                raise psycopg.errors.error_from_result(result, encoding=self._encoding)
            if result.status == _PIPELINE_ABORTED:
                raise psycopg.errors.PipelineAborted("pipeline aborted")

    def _set_results(self, _results: list[Any]) -> None:
        self._arrived = True


_FATAL_ERROR: Final = psycopg.pq.ExecStatus.FATAL_ERROR
_PIPELINE_ABORTED: Final = psycopg.pq.ExecStatus.PIPELINE_ABORTED


def _queue(driver: Any, statements: Statements, probe: _StartProbe | None = None) -> bool:
    """Queue ``statements`` on ``driver``'s open pipeline; False where psycopg has no such queues.

    With ``probe``, the result of the last statement goes to it (see :class:`_StartProbe`).
    """
    pipeline = driver._pipeline
    commands, results = getattr(pipeline, "command_queue", None), getattr(pipeline, "result_queue", None)
    if commands is None or results is None:
        return False
    send, encoding = driver.pgconn.send_query_params, driver.pgconn._encoding
    # With nothing of psycopg's waiting to be sent before them, hand them to libpq now: it buffers
    # them (pipeline mode) and they leave in one write with what follows. psycopg's queue would send
    # one per turn of its loop, and a timeout planted at session level runs from BEGIN: no gap
    # before the SET LOCALs that switch it off.
    now = not commands
    for sql, params in statements:
        values = None if params is None else [None if v is None else str(v).encode(encoding) for v in params]
        if now:
            send(_wire_sql(sql), values)
        else:
            commands.append(functools.partial(send, _wire_sql(sql), values))
        results.append(None)  # no cursor: psycopg checks the result for an error only
    if probe is not None and statements:
        results[-1] = (probe, None)  # (cursor, prepare info): the last statement's result goes to the probe
    return True


def _send_sync(driver: psycopg.Connection[Any], statements: Statements) -> None:
    _forget_prepared(driver)
    with driver.pipeline():
        if not _queue(driver, statements):
            for sql, params in statements:
                driver.execute(sql, params, prepare=False)  # type: ignore[arg-type]


async def _send_async(driver: psycopg.AsyncConnection[Any], statements: Statements) -> None:
    _forget_prepared(driver)
    async with driver.pipeline():
        if not _queue(driver, statements):
            for sql, params in statements:
                await driver.execute(sql, params, prepare=False)  # type: ignore[arg-type]


def _on_begin(conn: Connection) -> None:
    driver = conn.connection.driver_connection
    state = session_state(conn.connection.info)
    if state is not None and state.drift(driver.pgconn):
        _restore_reported(conn, driver, state)
    statements = _statements_for(conn, driver)
    if not statements:
        return
    for sql, params in statements:
        remember_token(conn, sql, params)
    if driver.autocommit:
        options = conn.get_execution_options()
        if options.get(SINGLE_STATEMENT_OPTION):
            # Sent with the transaction's one statement and COMMIT (_execute_with_begin): one round trip in all.
            conn.connection.info[_PENDING] = (statements, True)
            return
        if options.get(DEFERRED_START_OPTION):
            conn.connection.info[_PENDING] = (statements, False)  # with the first statement
            return
    _start(conn, driver, statements)


def _restore_reported(conn: Connection, driver: Any, state: SessionState) -> None:
    """Put back, at session level, the parameters the driver adapts values by (``client_encoding``,
    ``DateStyle``, ...), as the connection's first session reported them.

    For a connection used for another transaction without going back to the pool (where the
    session guard would have replaced it): psycopg takes the server's new values from its reports
    at the end of this round trip, before anything of the transaction is encoded or decoded. The
    ``RESET ALL`` of the clean session then changes none of them (they are the session's own
    startup values). Anything that fails here fails the start, and the connection is discarded.
    """
    pairs = [(name.decode(), value.decode()) for name, value in zip(REPORTED_PARAMETERS, state.reported)
             if value is not None]
    sql = "SELECT " + ", ".join("pg_catalog.set_config(%s::text, %s::text, false)" for _ in pairs)
    params = tuple(v for pair in pairs for v in pair)
    try:
        if isinstance(driver, psycopg.AsyncConnection):
            await_(driver.execute(sql, params, prepare=False))
        else:
            driver.execute(sql, params, prepare=False)
        if state.drift(driver.pgconn):
            raise psycopg.InterfaceError("the server did not report the session's first parameters back: "
                                         + "; ".join(state.drift(driver.pgconn)))
    except psycopg.Error as exc:
        _raise_start_error(conn, driver, [(sql, params)], _first_error(exc))


def _start(conn: Connection, driver: Any, statements: Statements) -> None:
    """Send what starts the transaction, in one pipeline; errors as rtv-db reports them."""
    try:
        if isinstance(driver, psycopg.AsyncConnection):
            await_(_send_async(driver, statements))
        else:
            _send_sync(driver, statements)  # type: ignore[arg-type]
    except psycopg.Error as exc:
        _raise_start_error(conn, driver, statements, _first_error(exc))


def _first_error(exc: psycopg.Error) -> psycopg.Error:
    """The error that aborted a pipeline, not the ``PipelineAborted`` of a statement after it.

    psycopg raises the first error of a pipeline's results, but at the pipeline's end it may then
    raise ``PipelineAborted`` for a later statement, with the first error as its context.
    """
    first: BaseException = exc
    while isinstance(first, psycopg.errors.PipelineAborted) and first.__context__ is not None:
        first = first.__context__
    return first if isinstance(first, psycopg.Error) else exc


def _discard(conn: Connection, driver: Any, exc: psycopg.Error) -> bool:
    """A transaction that could not start clean: roll it back, record its token as spent (when the
    connection still answers), and take the connection out of the pool. True if it was lost."""
    lost = conn.dialect.is_disconnect(exc, driver, None)
    if not lost:
        _on_rollback(conn)  # ROLLBACK and the spend in one round trip; failures are ignored
    conn.invalidate(exc)
    return bool(lost)


def _raise_start_error(conn: Connection, driver: Any, statements: Statements, exc: psycopg.Error,
                       shown: tuple[str, Any] | None = None) -> None:
    """Raise what rtv-db reports for a start that failed, after discarding the connection.

    ``shown``: the statement (and parameters, hidden) the error names; by default the start's last.
    """
    # Whatever failed, the connection leaves the pool: a session that could not be cleaned (a
    # planted timeout that cancelled the clean-up, a backend that ended) is one nobody should reuse.
    lost = _discard(conn, driver, exc)
    if isinstance(exc, psycopg.errors.InvalidAuthorizationSpecification):
        raise TenantContextRefusedError(str(exc).splitlines()[0]) from exc
    if isinstance(exc, psycopg.errors.UndefinedFunction) and "rtv." in str(exc):
        raise ConfigurationError(
            f"the database is not migrated for this version of rtv-db ({str(exc).splitlines()[0]}): run rtv-db migrate"
        ) from exc
    # Sent on the driver, outside SQLAlchemy's execute: translate the error as SQLAlchemy would
    # (sqlalchemy.exc.OperationalError, ...).
    sql, params = shown or statements[-1]
    raise DBAPIError.instance(  # hide_parameters: the token does not belong in error messages or logs
        sql, params, exc, psycopg.Error, hide_parameters=True, connection_invalidated=lost, dialect=conn.dialect
    ) from exc


# -- one round trip for a single-statement transaction ----------------------------------------------

_PENDING: Final = "rtv_pending_begin"
_COMMIT: Final = "COMMIT"
_COMMIT_ONLY: Final[Statements] = [(_COMMIT, None)]


def _take_pending(context: Any) -> tuple[Statements, bool] | None:
    """What the transaction's start held back, and whether COMMIT goes with the statement."""
    options = context.execution_options
    if not (options.get(SINGLE_STATEMENT_OPTION) or options.get(DEFERRED_START_OPTION)):
        return None  # every statement outside the transactions that hold their start back
    conn = context.root_connection
    if conn.invalidated:
        return None
    return conn.connection.info.pop(_PENDING, None)  # type: ignore[no-any-return]


def _execute_with_begin(cursor: Any, statement: str, parameters: Any, context: Any) -> bool | None:
    """``do_execute``: the deferred start, the statement (and COMMIT) in one pipeline.

    Only for the first statement of a transaction whose start was held back
    (:data:`SINGLE_STATEMENT_OPTION`: with COMMIT; :data:`DEFERRED_START_OPTION`: without);
    everything else executes as usual. A server-side cursor cannot run in a pipeline: then the
    start is sent alone first, and COMMIT comes from SQLAlchemy as always.
    """
    held = _take_pending(context)
    if held is None:
        return None
    pending, commit = held
    conn = context.root_connection
    driver = conn.connection.driver_connection
    if getattr(cursor, "name", None) or getattr(cursor, "server_side", False):
        _start(conn, driver, pending)
        return None
    probe = _StartProbe(driver.pgconn._encoding)
    try:
        if isinstance(driver, psycopg.AsyncConnection):
            await_(_pipeline_async(driver, pending, cursor, statement, parameters, commit, probe))
        else:
            _pipeline_sync(driver, pending, cursor, statement, parameters, commit, probe)
    except psycopg.Error as exc:
        first = _first_error(exc)
        if not probe.succeeded:  # the start failed (the statement never ran): not the caller's error
            _raise_start_error(conn, driver, pending, first, shown=(statement, parameters))
        if first is not exc:
            raise first from None  # the statement's own error, not the COMMIT it aborted
        raise  # the statement's (or COMMIT's) own error: SQLAlchemy reports it as usual
    return True


def _execute_no_params_with_begin(cursor: Any, statement: str, context: Any) -> bool | None:
    """``do_execute_no_params``: as :func:`_execute_with_begin`."""
    return _execute_with_begin(cursor, statement, None, context)


def _execute_many_with_begin(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
    """``do_executemany``: the deferred start goes first (psycopg pipelines the rows itself)."""
    held = _take_pending(context)
    if held is not None:
        _start(context.root_connection, context.root_connection.connection.driver_connection, held[0])


def _pipeline_sync(driver: psycopg.Connection[Any], pending: Statements, cursor: Any, statement: str, parameters: Any,
                   commit: bool, probe: _StartProbe) -> None:
    _forget_prepared(driver)
    with driver.pipeline():
        queued = _queue(driver, pending, probe)
        if not queued:
            for sql, params in pending:
                probe._cursor = driver.execute(sql, params, prepare=False)  # type: ignore[arg-type]
        if parameters is None:
            cursor.execute(statement)
        else:
            cursor.execute(statement, parameters)
        if commit and not (queued and _queue(driver, _COMMIT_ONLY)):
            driver.execute(_COMMIT, prepare=False)


async def _pipeline_async(driver: psycopg.AsyncConnection[Any], pending: Statements, cursor: Any, statement: str,
                          parameters: Any, commit: bool, probe: _StartProbe) -> None:
    # ``cursor`` is SQLAlchemy's adapter around a psycopg AsyncCursor: it keeps the rows itself,
    # fetched at once (its own execute does the same after the statement).
    _forget_prepared(driver)
    raw = cursor._cursor
    async with driver.pipeline():
        queued = _queue(driver, pending, probe)
        if not queued:
            for sql, params in pending:
                probe._cursor = await driver.execute(sql, params, prepare=False)  # type: ignore[arg-type]
        await (raw.execute(statement) if parameters is None else raw.execute(statement, parameters))
        if commit and not (queued and _queue(driver, _COMMIT_ONLY)):
            await driver.execute(_COMMIT, prepare=False)
    result = raw.pgresult
    if result is not None and result.status == psycopg.pq.ExecStatus.TUPLES_OK:
        import collections

        cursor._rows = collections.deque(await raw.fetchall())


# The setter parameters of the tokens the open transaction on a pooled connection has used.
_OPEN_TOKENS: Final = "rtv_open_tokens"
_SPEND_ROLLED_BACK: Final = "SELECT rtv.spend_rolled_back_token(%s::text, %s::text, %s::text)"


def remember_token(conn: Connection, sql: str, params: tuple[Any, ...] | None) -> None:
    """Note a token ``conn``'s transaction is about to spend (nothing for other statements)."""
    if sql == _SET_SIGNED:
        conn.connection.info.setdefault(_OPEN_TOKENS, []).append(params)


def _on_commit(conn: Connection) -> None:
    if not conn.invalidated:
        info = conn.connection.info
        info.pop(_OPEN_TOKENS, None)  # their rows are committed: the tokens are spent
        info.pop(_PENDING, None)  # a held-back start whose transaction ran no statement: nothing was sent


def _on_rollback(conn: Connection) -> None:
    """Roll back and record the token as spent, in one round trip.

    The rollback takes the spent row with it, which would make the token good for one more
    transaction until it expires. Sent before SQLAlchemy's own rollback, which then finds the
    connection idle and sends nothing. Any failure here is left to that rollback, which handles
    a lost connection as it always does.
    """
    if conn.invalidated:
        return
    pooled = conn.connection
    if pooled.info.pop(_PENDING, None) is not None:  # nothing was sent: nothing to roll back or spend
        pooled.info.pop(_OPEN_TOKENS, None)
        return
    tokens = pooled.info.pop(_OPEN_TOKENS, None)
    driver = pooled.driver_connection
    if not tokens or driver is None or driver.closed:
        return
    statements: Statements = [("ROLLBACK", None), *((_SPEND_ROLLED_BACK, params) for params in tokens)]
    try:
        if isinstance(driver, psycopg.AsyncConnection):
            await_(_send_async(driver, statements))
        else:
            _send_sync(driver, statements)  # type: ignore[arg-type]
    except psycopg.Error:
        pass


def _check_settings_option(_conn: Any, opts: Mapping[str, Any]) -> None:
    """Refuse a setting outside the allowlist where the option is set, before anything is sent."""
    settings = opts.get(TRANSACTION_SETTINGS_OPTION)
    if settings:
        transaction_settings(settings)


def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
    """Leave transaction starts to :func:`_on_begin` (psycopg's commit and rollback still act on
    the server's transaction state, so COMMIT and ROLLBACK are sent as before)."""
    dbapi_connection.autocommit = True


def install_context_hooks(engine: Engine, context_key: Any = None) -> None:
    """Make every transaction on ``engine`` start with the current tenant context."""
    _SETTERS[_root(engine)] = ContextSetter(context_key)
    event.listen(engine, "connect", _driver_autocommit)
    install_session_guard(engine)  # no pooled connection whose session a transaction left unfit
    event.listen(engine, "set_connection_execution_options", _check_settings_option)
    event.listen(engine, "set_engine_execution_options", _check_settings_option)
    event.listen(engine, "begin", _on_begin)
    event.listen(engine, "commit", _on_commit)
    event.listen(engine, "do_execute", _execute_with_begin)
    event.listen(engine, "do_executemany", _execute_many_with_begin)
    event.listen(engine, "do_execute_no_params", _execute_no_params_with_begin)
    event.listen(engine, "rollback", _on_rollback)
