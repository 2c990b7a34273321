"""``rtv-db watchdog``: ends runtime-role transactions that stall other tenants (issue 16, item 2).

The runtime role's timeouts (``statement_timeout``, ``idle_in_transaction_session_timeout``) are
role settings, and any session may lift its own: ``SET LOCAL statement_timeout = 0`` is a
USERSET parameter, which PostgreSQL lets every role change and no GRANT can forbid. And ``LOCK
TABLE brand_kits IN ACCESS EXCLUSIVE MODE`` needs only the UPDATE grant the application needs
anyway (no event trigger fires for LOCK: it is not DDL). So one tenant's session can hold a lock
that makes every other tenant's query on that table wait for as long as it likes.

Nothing inside the session can bound that; something outside it must. The watchdog is a loop on
the system side, connected as a role that may read every session and signal it (the admin
login, a superuser; or a dedicated role, see docs/watchdog.md), that looks at the runtime role's
backends in this database every ``interval`` and terminates (``pg_terminate_backend``) each one
that

* runs a statement longer than the configured ``statement_timeout`` + grace (``statement``; a
  statement waiting for a lock is not the culprit: its holder is, by the ``lock`` rule),
* is idle in a transaction longer than ``idle_in_transaction_session_timeout`` + grace (``idle``),
* holds a lock another backend has waited for longer than ``max_lock_wait`` (``lock``), or
* has a transaction open longer than ``max_transaction`` (``transaction``),

whatever the session set for itself. Other roles' backends (migrations, the system scope, the
watchdog itself) are never touched. Every termination is logged (pid, reason, ages, client
address). The tenant is not named: the transaction's context row is uncommitted, so no other
session can see it (and the runtime role's sessions carry no tenant in pg_stat_activity).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from .config import Settings, to_libpq_url
from .connection import connect_error
from .errors import ConfigurationError

__all__ = ["WatchdogLimits", "Termination", "sweep", "run_watchdog", "connect_watchdog"]

_log = logging.getLogger("rtv_db.watchdog")

DEFAULT_GRACE_MS = 1_000
DEFAULT_MAX_LOCK_WAIT_MS = 5_000
DEFAULT_MAX_TRANSACTION_MS = 300_000
DEFAULT_INTERVAL_MS = 500

_ENV = {
    "grace_ms": "RTV_DB_WATCHDOG_GRACE_MS",
    "max_lock_wait_ms": "RTV_DB_WATCHDOG_MAX_LOCK_WAIT_MS",
    "max_transaction_ms": "RTV_DB_WATCHDOG_MAX_TRANSACTION_MS",
    "interval_ms": "RTV_DB_WATCHDOG_INTERVAL_MS",
}


@dataclass(frozen=True)
class WatchdogLimits:
    """The limits the watchdog enforces on the runtime role's backends (milliseconds)."""

    runtime_role: str = "rtv_app"
    statement_ms: int = 30_000  # the configured statement_timeout ...
    idle_in_transaction_ms: int = 60_000  # ... and idle_in_transaction_session_timeout
    grace_ms: int = DEFAULT_GRACE_MS  # added to both: the server's own timeout fires first when in force
    max_lock_wait_ms: int = DEFAULT_MAX_LOCK_WAIT_MS  # a backend waiting this long ends the lock's holder
    max_transaction_ms: int = DEFAULT_MAX_TRANSACTION_MS  # no runtime-role transaction lives longer
    interval_ms: int = DEFAULT_INTERVAL_MS  # between two sweeps

    def __post_init__(self) -> None:
        for name in ("statement_ms", "idle_in_transaction_ms", "max_lock_wait_ms", "max_transaction_ms", "interval_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"watchdog {name} must be a positive number of milliseconds, not {value!r}")
        if not isinstance(self.grace_ms, int) or self.grace_ms < 0:
            raise ConfigurationError(f"watchdog grace_ms must be >= 0, not {self.grace_ms!r}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: int | None) -> "WatchdogLimits":
        """The timeouts `rtv-db migrate` installs, and the watchdog's own limits from RTV_DB_WATCHDOG_*."""
        values: dict[str, Any] = {
            "runtime_role": settings.runtime_role,
            "statement_ms": settings.statement_timeout_ms,
            "idle_in_transaction_ms": settings.idle_in_transaction_timeout_ms,
        }
        for attr, env in _ENV.items():
            raw = os.environ.get(env)
            if raw:
                try:
                    values[attr] = int(raw)
                except ValueError:
                    raise ConfigurationError(f"{env}={raw!r} is not a whole number of milliseconds") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class Termination:
    """One backend the watchdog ended, and why."""

    pid: int
    reason: str  # statement, idle, lock, transaction
    detail: str
    transaction_ms: int | None
    client: str | None  # client address:port (or 'local')
    terminated: bool  # pg_terminate_backend's answer (False: it was already gone)


# One query: the candidates with the first rule each breaks. Ages are in milliseconds.
_SWEEP = """
WITH runtime AS (
    SELECT a.pid, a.state, a.wait_event_type IS NOT DISTINCT FROM 'Lock' AS lock_waiting,
           COALESCE(host(a.client_addr) || ':' || a.client_port, 'local') AS client,
           (extract(epoch FROM clock_timestamp() - a.xact_start) * 1000)::bigint AS xact_ms,
           (extract(epoch FROM clock_timestamp() - a.query_start) * 1000)::bigint AS query_ms,
           (extract(epoch FROM clock_timestamp() - a.state_change) * 1000)::bigint AS state_ms
    FROM pg_catalog.pg_stat_activity a
    WHERE a.usename = %(role)s AND a.datname = pg_catalog.current_database()
      AND a.pid <> pg_catalog.pg_backend_pid() AND a.backend_type = 'client backend'
),
waited AS (  -- for each runtime-role backend, the longest wait of a backend it blocks
    SELECT holder.pid, max((extract(epoch FROM clock_timestamp() - l.waitstart) * 1000)::bigint) AS wait_ms,
           min(l.pid) AS waiter
    FROM pg_catalog.pg_locks l
    CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(l.pid)) AS holder(pid)
    WHERE NOT l.granted AND l.waitstart IS NOT NULL
      AND holder.pid IN (SELECT pid FROM runtime)
    GROUP BY holder.pid
)
SELECT r.pid, r.xact_ms,
       CASE
           WHEN w.wait_ms > %(lock)s THEN 'lock'
           WHEN r.state = 'active' AND NOT r.lock_waiting AND r.query_ms > %(statement)s THEN 'statement'
           WHEN r.state LIKE 'idle in transaction%%' AND r.state_ms > %(idle)s THEN 'idle'
           WHEN r.xact_ms > %(transaction)s THEN 'transaction'
       END AS reason,
       CASE
           WHEN w.wait_ms > %(lock)s THEN 'blocks backend ' || w.waiter || ', waiting ' || w.wait_ms || ' ms'
           WHEN r.state = 'active' AND NOT r.lock_waiting AND r.query_ms > %(statement)s THEN 'statement running ' || r.query_ms || ' ms'
           WHEN r.state LIKE 'idle in transaction%%' AND r.state_ms > %(idle)s
               THEN 'idle in transaction ' || r.state_ms || ' ms'
           ELSE 'transaction open ' || r.xact_ms || ' ms'
       END AS detail,
       r.client
FROM runtime r LEFT JOIN waited w ON w.pid = r.pid
WHERE w.wait_ms > %(lock)s
   OR (r.state = 'active' AND NOT r.lock_waiting AND r.query_ms > %(statement)s)
   OR (r.state LIKE 'idle in transaction%%' AND r.state_ms > %(idle)s)
   OR r.xact_ms > %(transaction)s
ORDER BY r.pid
"""

def connect_watchdog(url: str) -> psycopg.Connection:
    """The watchdog's own connection: autocommit, short timeouts of its own, named in pg_stat_activity."""
    try:
        conn = psycopg.connect(to_libpq_url(url), autocommit=True, application_name="rtv-db watchdog",
                               connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise connect_error(url, exc) from exc
    conn.execute("SET statement_timeout = 5000")
    conn.execute("SET lock_timeout = 1000")
    row = conn.execute(
        "SELECT rolsuper OR (pg_has_role(current_user, 'pg_signal_backend', 'USAGE') "
        "AND pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') "
        "AND has_function_privilege('pg_catalog.pg_stat_get_activity(integer)', 'EXECUTE') "
        "AND has_table_privilege('pg_catalog.pg_stat_activity', 'SELECT')) "
        "FROM pg_roles WHERE rolname = current_user").fetchone()
    if not row or not row[0]:
        conn.close()
        raise ConfigurationError(
            "the watchdog's role may not see or end other sessions: use the admin URL (a superuser), or a role "
            "granted pg_signal_backend and pg_read_all_stats with EXECUTE on pg_stat_get_activity(integer) "
            "(see docs/watchdog.md)")
    return conn


def sweep(conn: psycopg.Connection, limits: WatchdogLimits) -> list[Termination]:
    """One look at the runtime role's backends: terminate those past a limit; return what was done."""
    params = {
        "role": limits.runtime_role,
        "statement": limits.statement_ms + limits.grace_ms,
        "idle": limits.idle_in_transaction_ms + limits.grace_ms,
        "lock": limits.max_lock_wait_ms,
        "transaction": limits.max_transaction_ms,
    }
    rows = conn.execute(_SWEEP, params).fetchall()
    if not rows:
        return []
    done: list[Termination] = []
    for pid, xact_ms, reason, detail, client in rows:
        terminated = bool(conn.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (pid,)).fetchone()[0])
        item = Termination(pid, reason, detail, xact_ms, client, terminated)
        _log.warning("rtv-db watchdog: terminated backend %s of %s from %s (%s: %s; transaction %s ms)",
                     pid, limits.runtime_role, client, reason, detail, xact_ms)
        done.append(item)
    return done


def run_watchdog(url: str, limits: WatchdogLimits, *, stop: threading.Event | None = None,
                 iterations: int | None = None,
                 on_termination: Callable[[Termination], None] | None = None) -> Iterator[list[Termination]]:
    """Sweep every ``limits.interval_ms`` until ``stop`` is set or ``iterations`` sweeps are done.

    A generator: yields each sweep's terminations. A lost connection is logged and reopened on
    the next sweep (the watchdog must outlive a server restart).
    """
    stop = stop or threading.Event()
    conn: psycopg.Connection | None = None
    count = 0
    try:
        while not stop.is_set() and (iterations is None or count < iterations):
            count += 1
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = connect_watchdog(url)
                done = sweep(conn, limits)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                _log.error("rtv-db watchdog: sweep failed (%s); retrying", exc)
                if conn is not None:
                    conn.close()
                conn = None
                done = []
            for item in done:
                if on_termination:
                    on_termination(item)
            yield done
            remaining = limits.interval_ms / 1000 - (time.monotonic() - started)
            if remaining > 0 and (iterations is None or count < iterations):
                stop.wait(remaining)
    finally:
        if conn is not None:
            conn.close()
