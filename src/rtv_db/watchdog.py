"""``rtv-db watchdog``: ends runtime-role transactions that stall other tenants or hog the server,
and refuses a tenant that keeps doing it (issue 16, item 2; issue 24, items 3 and 5).

Inside its own transaction, SQL on the runtime role can lift its timeouts (``SET LOCAL
statement_timeout = 0``: USERSET, no GRANT forbids it), raise ``work_mem`` (USERSET too),
take thousands of relation locks, and ``LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE``: LOCK
in any mode needs only the DELETE (or UPDATE) grant the application needs anyway, and no event
trigger fires for it. Nothing inside the session can bound that; the watchdog does, from outside:
a loop on the system side, connected as a role that may read every session and signal it (the
admin login, a superuser; or a dedicated role, see docs/watchdog.md). Every ``interval`` it looks
at the runtime role's backends in this database and terminates (``pg_terminate_backend``) each
one that breaks a rule (first match):

* ``lock_mode``: holds or waits for a relation lock stronger than ROW EXCLUSIVE, at once. rtv-db's
  tenant API never takes one (reads take ACCESS SHARE, ``FOR UPDATE`` ROW SHARE, writes ROW
  EXCLUSIVE; foreign-key checks lock rows, not tables), and only those modes conflict with what
  other tenants take. A backend *waiting* for such a mode is ended too, whoever is ahead of it:
  while it waits, every later request on the table queues behind it.
* ``memory``: its private memory (``RssAnon``, with its parallel workers') is above
  ``max_memory_mb``; only when the watchdog runs on the server's host (:mod:`._backend_memory`).
* ``locks``: it holds more than ``max_locks`` locks in the shared lock table (with its workers').
* ``cross_wait``: it has waited longer than ``max_lock_wait`` on a backend of *another* tenant (or
  of no tenant). Tenants cannot see each other's rows and every unique key and foreign key of a
  tenant table leads with ``client_id``, so such a wait means the waiter reached for something
  shared: the waiter goes, never the holder it queued behind.
* ``lock``: it holds a lock that a backend of the *same* tenant, or of another role (migrations,
  the system scope), has waited for longer than ``max_lock_wait``.
* ``statement``: its statement has run longer than ``statement_timeout`` + grace (not while it
  waits for a lock: the holder is judged instead).
* ``idle``: idle in transaction longer than ``idle_in_transaction_session_timeout`` + grace.
* ``transaction``: its transaction has been open longer than ``max_transaction``.

Other roles' backends (migrations, the system scope, the watchdog itself) are never ended. The
tenant a backend serves is read from its transaction's mark (revision 0010: two shared advisory
locks that ``rtv.set_signed_context`` takes, the tenant id XOR a per-transaction pad that only
``rtv.watchdog_tenant`` removes). Each termination by a rule a tenant's API traffic never breaks
(``lock_mode``, ``cross_wait``, ``statement``, ``idle``, ``memory``, ``locks``) is recorded
against the tenant; the ``quarantine_after``-th within ``quarantine_window`` quarantines it:
``rtv.set_signed_context`` refuses its context until an operator releases it (``rtv-db watchdog
release``), and its open transactions are ended (``quarantine``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg

from ._backend_memory import BackendMemory, probe_backend_memory
from .config import Settings, to_libpq_url
from .connection import connect_error
from .errors import ConfigurationError, InvalidInputError

__all__ = [
    "WatchdogLimits",
    "WatchdogProbe",
    "Termination",
    "Quarantined",
    "COUNTED_RULES",
    "STRONG_LOCK_MODES",
    "sweep",
    "probe",
    "run_watchdog",
    "connect_watchdog",
    "quarantined_tenants",
    "release_tenant",
]

_log = logging.getLogger("rtv_db.watchdog")

DEFAULT_GRACE_MS = 1_000
DEFAULT_MAX_LOCK_WAIT_MS = 5_000
DEFAULT_MAX_TRANSACTION_MS = 300_000
DEFAULT_INTERVAL_MS = 500
DEFAULT_MAX_MEMORY_MB = 1_024
DEFAULT_QUARANTINE_AFTER = 3
DEFAULT_QUARANTINE_WINDOW_MS = 3_600_000
# max_locks None: this many times the server's max_locks_per_transaction (the average per backend
# PostgreSQL sizes its shared lock table for), or more than the application's schemas have
# relations (tables, indexes, their TOAST), whichever is larger: a transaction of rtv-db's API
# locks only those, so one that holds more went through the catalogs.
_LOCKS_PER_MAX_LOCKS_PER_TRANSACTION = 4
_LOCKS_OVER_SCHEMA = 64

# Relation lock modes rtv-db's tenant API never takes: each conflicts with ROW EXCLUSIVE (writes)
# or ACCESS SHARE (reads) of every other tenant.
STRONG_LOCK_MODES = ("ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock",
                     "AccessExclusiveLock")
# Rules that a tenant's traffic through rtv-db's API never breaks: each takes SQL of its own
# (LOCK TABLE, lifted timeouts, raised work_mem, a sweep of the catalogs, a shared row reached
# across tenants). `lock` and `transaction` are not counted: a slow transaction of the tenant's own
# application can break them.
COUNTED_RULES = frozenset({"lock_mode", "cross_wait", "memory", "locks", "statement", "idle"})

_ENV = {
    "grace_ms": "RTV_DB_WATCHDOG_GRACE_MS",
    "max_lock_wait_ms": "RTV_DB_WATCHDOG_MAX_LOCK_WAIT_MS",
    "max_transaction_ms": "RTV_DB_WATCHDOG_MAX_TRANSACTION_MS",
    "interval_ms": "RTV_DB_WATCHDOG_INTERVAL_MS",
    "max_memory_mb": "RTV_DB_WATCHDOG_MAX_MEMORY_MB",
    "max_locks": "RTV_DB_WATCHDOG_MAX_LOCKS",
    "quarantine_after": "RTV_DB_WATCHDOG_QUARANTINE_AFTER",
    "quarantine_window_ms": "RTV_DB_WATCHDOG_QUARANTINE_WINDOW_MS",
}


def _whole(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive number" if minimum > 0 else "a number >= 0"
        raise ConfigurationError(f"watchdog {name} must be {what}, not {value!r}")


@dataclass(frozen=True)
class WatchdogLimits:
    """The limits the watchdog enforces on the runtime role's backends."""

    runtime_role: str = "rtv_app"
    statement_ms: int = 30_000  # the configured statement_timeout ...
    idle_in_transaction_ms: int = 60_000  # ... and idle_in_transaction_session_timeout
    grace_ms: int = DEFAULT_GRACE_MS  # added to both: the server's own timeout fires first when in force
    max_lock_wait_ms: int = DEFAULT_MAX_LOCK_WAIT_MS  # a wait this long ends the holder (or the waiter)
    max_transaction_ms: int = DEFAULT_MAX_TRANSACTION_MS  # no runtime-role transaction lives longer
    interval_ms: int = DEFAULT_INTERVAL_MS  # between two sweeps
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB  # private memory of a backend and its workers; 0: no rule
    max_locks: int | None = None  # shared lock table entries; None: see WatchdogProbe.max_locks; 0: no rule
    quarantine_after: int = DEFAULT_QUARANTINE_AFTER  # counted terminations of a tenant; 0: never
    quarantine_window_ms: int = DEFAULT_QUARANTINE_WINDOW_MS  # ... within this window

    def __post_init__(self) -> None:
        for name in ("statement_ms", "idle_in_transaction_ms", "max_lock_wait_ms", "max_transaction_ms",
                     "interval_ms", "quarantine_window_ms"):
            _whole(name, getattr(self, name), minimum=1)
        for name in ("grace_ms", "max_memory_mb", "quarantine_after"):
            _whole(name, getattr(self, name), minimum=0)
        if self.max_locks is not None:
            _whole("max_locks", self.max_locks, minimum=0)

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
                    raise ConfigurationError(f"{env}={raw!r} is not a whole number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class WatchdogProbe:
    """What the watchdog's connection can do besides the rules on pg_stat_activity and pg_locks."""

    marks: bool  # may decrypt transactions' tenant marks (rtv.watchdog_tenant, revision 0010)
    quarantine: bool  # may record terminations and quarantine tenants (rtv.watchdog_record_termination)
    memory: BackendMemory | None  # the backends' memory, when this host's /proc shows them
    memory_note: str  # how memory is read, or why it cannot be
    max_locks_per_transaction: int
    schema_relations: int  # relations of public, rtv and rtv_secret, with their TOAST tables and indexes

    def max_locks(self, limits: WatchdogLimits) -> int:
        """The ``locks`` rule's limit: ``limits.max_locks``, or the default (0: no rule)."""
        if limits.max_locks is not None:
            return limits.max_locks
        return max(_LOCKS_PER_MAX_LOCKS_PER_TRANSACTION * self.max_locks_per_transaction,
                   self.schema_relations + _LOCKS_OVER_SCHEMA)

    def describe(self) -> str:
        """One line for the operator: what this watchdog can see and do."""
        tenants = "tenants from transaction marks" if self.marks else "no tenant marks (before revision 0010, or no EXECUTE)"
        quarantine = "quarantine on" if self.quarantine else "no quarantine"
        memory = f"memory {self.memory_note}" if self.memory else f"no memory rule: {self.memory_note}"
        return f"{tenants}; {quarantine}; {memory}; lock limit by default {self.max_locks(WatchdogLimits())}"


@dataclass(frozen=True)
class Termination:
    """One backend the watchdog ended, and why."""

    pid: int
    reason: str  # a rule (lock_mode, memory, locks, cross_wait, lock, statement, idle, transaction) or quarantine
    detail: str
    transaction_ms: int | None
    client: str | None  # client address:port (or 'local')
    terminated: bool  # pg_terminate_backend's answer (False: it was already gone)
    tenant: uuid.UUID | None = None  # from the transaction's mark; None: no mark (or not readable)
    quarantined: bool = False  # this termination put its tenant in quarantine


@dataclass(frozen=True)
class Quarantined:
    """A tenant whose context is refused until an operator releases it."""

    tenant_id: uuid.UUID
    since: datetime
    reason: str  # the rule of the termination that quarantined it
    terminations: int  # counted within the window at that moment


@dataclass
class _Backend:
    """One runtime-role backend as one sweep saw it."""

    pid: int
    state: str | None
    lock_waiting: bool
    client: str | None
    xact_ms: int | None
    query_ms: int | None
    state_ms: int | None
    strong: str | None  # relation locks stronger than ROW EXCLUSIVE, held or awaited
    locks: int  # shared lock table entries (not fast-path), with its parallel workers'
    workers: list[int]
    mark: tuple[int, int, str] | None  # (k1, k2, xid) of its transaction's mark
    blockers: list[int]  # runtime-role backends it waits for
    wait_ms: int | None  # how long it (or a worker) has waited for a lock
    blocked_other: int | None  # the longest-waiting backend of another role it blocks ...
    blocked_other_ms: int | None  # ... and for how long
    tenant: uuid.UUID | None = None
    rss_kb: int | None = field(default=None)


# One query, one snapshot of pg_locks: the runtime role's backends with what the rules need.
# Every lock row is read once (grouped per backend, then joined): linear in backends and locks.
_FACTS = """
WITH locks AS MATERIALIZED (
    SELECT l.pid, l.locktype, l.mode, l.granted, l.fastpath, l.relation, l.transactionid,
           l.classid, l.objid, l.objsubid, l.waitstart
    FROM pg_catalog.pg_locks l
),
runtime AS MATERIALIZED (
    SELECT a.pid, a.state, a.wait_event_type IS NOT DISTINCT FROM 'Lock' AS lock_waiting,
           COALESCE(host(a.client_addr) || ':' || a.client_port, 'local') AS client,
           (extract(epoch FROM clock_timestamp() - a.xact_start) * 1000)::bigint AS xact_ms,
           (extract(epoch FROM clock_timestamp() - a.query_start) * 1000)::bigint AS query_ms,
           (extract(epoch FROM clock_timestamp() - a.state_change) * 1000)::bigint AS state_ms,
           a.backend_xid
    FROM pg_catalog.pg_stat_activity a
    WHERE a.usename = %(role)s AND a.datname = pg_catalog.current_database()
      AND a.pid <> pg_catalog.pg_backend_pid() AND a.backend_type = 'client backend'
),
member AS MATERIALIZED (  -- each runtime backend and its parallel workers
    SELECT r.pid AS backend, r.pid FROM runtime r
    UNION ALL
    SELECT w.leader_pid, w.pid FROM pg_catalog.pg_stat_activity w
    WHERE w.leader_pid IN (SELECT pid FROM runtime) AND w.pid <> w.leader_pid
),
held AS (  -- per backend (with its workers): strong relation locks, shared lock table entries, workers
    SELECT m.backend,
           string_agg(l.mode || CASE WHEN l.granted THEN ' on ' ELSE ' (waiting) on ' END
                      || COALESCE(l.relation::pg_catalog.regclass::text, '?'), ', ' ORDER BY l.mode, l.relation)
               FILTER (WHERE l.locktype = 'relation' AND l.mode = ANY (%(strong)s)) AS strong,
           count(l.pid) FILTER (WHERE NOT l.fastpath) AS locks,
           array_agg(DISTINCT m.pid) FILTER (WHERE m.pid <> m.backend) AS workers
    FROM member m LEFT JOIN locks l ON l.pid = m.pid
    GROUP BY m.backend
),
marks AS (  -- the transaction's mark: exactly one key of each kind, else none
    SELECT l.pid,
           CASE WHEN count(*) FILTER (WHERE l.objsubid = 1) = 1
                THEN min((l.classid::bigint << 32) | l.objid::bigint) FILTER (WHERE l.objsubid = 1) END AS k1,
           CASE WHEN count(*) FILTER (WHERE l.objsubid = 2) = 1
                THEN min((l.classid::bigint << 32) | l.objid::bigint) FILTER (WHERE l.objsubid = 2) END AS k2
    FROM locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid IN (1, 2)
    GROUP BY l.pid
),
xids AS (SELECT DISTINCT l.pid, l.transactionid FROM locks l WHERE l.locktype = 'transactionid' AND l.granted),
waiting AS MATERIALIZED (  -- every lock wait: the waiter's backend (a worker's leader) and its blockers
    SELECT COALESCE(m.backend, l.pid) AS waiter, m.backend IS NOT NULL AS runtime_waiter, b.pid AS blocker,
           (extract(epoch FROM clock_timestamp() - l.waitstart) * 1000)::bigint AS wait_ms
    FROM locks l
    LEFT JOIN member m ON m.pid = l.pid
    CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(l.pid)) AS b(pid)
    WHERE NOT l.granted AND l.waitstart IS NOT NULL
),
waits AS (
    SELECT w.waiter, array_agg(DISTINCT w.blocker) FILTER (WHERE w.blocker IN (SELECT pid FROM runtime)) AS blockers,
           max(w.wait_ms) AS wait_ms
    FROM waiting w GROUP BY w.waiter
),
other AS (  -- for each runtime holder, the longest-waiting backend of another role it blocks
    SELECT DISTINCT ON (w.blocker) w.blocker, w.waiter, w.wait_ms
    FROM waiting w WHERE NOT w.runtime_waiter
    ORDER BY w.blocker, w.wait_ms DESC
)
SELECT r.pid, r.state, r.lock_waiting, r.client, r.xact_ms, r.query_ms, r.state_ms,
       h.strong, COALESCE(h.locks, 0), COALESCE(h.workers, '{}'), k.k1, k.k2,
       -- The xid only when this snapshot of pg_locks holds it: the mark is then that transaction's.
       x.transactionid::text,
       COALESCE(w.blockers, '{}'), w.wait_ms, o.waiter, o.wait_ms
FROM runtime r
LEFT JOIN held h ON h.backend = r.pid
LEFT JOIN marks k ON k.pid = r.pid
LEFT JOIN xids x ON x.pid = r.pid AND x.transactionid = r.backend_xid
LEFT JOIN waits w ON w.waiter = r.pid
LEFT JOIN other o ON o.blocker = r.pid
ORDER BY r.pid
"""

_DECRYPT = """
SELECT m.pid, rtv.watchdog_tenant(m.k1, m.k2, m.xid::xid)
FROM unnest(%s::integer[], %s::bigint[], %s::bigint[], %s::text[]) AS m(pid, k1, k2, xid)
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


def _may_execute(conn: psycopg.Connection, signature: str) -> bool:
    row = conn.execute("SELECT to_regprocedure(%s) IS NOT NULL AND has_function_privilege(to_regprocedure(%s), 'EXECUTE')",
                       (signature, signature)).fetchone()
    return bool(row and row[0])


def probe(conn: psycopg.Connection) -> WatchdogProbe:
    """What this connection's watchdog can see and do (see :class:`WatchdogProbe`)."""
    pid, started, max_locks, relations = conn.execute(
        "SELECT a.pid, a.backend_start, current_setting('max_locks_per_transaction')::integer, "
        "(SELECT count(*) + 2 * count(*) FILTER (WHERE c.reltoastrelid <> 0) FROM pg_catalog.pg_class c "
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'rtv', 'rtv_secret')) "
        "FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid()").fetchone()  # type: ignore[misc]
    memory, note = probe_backend_memory(pid, started)
    return WatchdogProbe(
        marks=_may_execute(conn, "rtv.watchdog_tenant(bigint,bigint,xid)"),
        quarantine=_may_execute(conn, "rtv.watchdog_record_termination(uuid,text,integer,bigint)"),
        memory=memory, memory_note=note, max_locks_per_transaction=int(max_locks), schema_relations=int(relations))


def _facts(conn: psycopg.Connection, role: str) -> list[_Backend]:
    rows = conn.execute(_FACTS, {"role": role, "strong": list(STRONG_LOCK_MODES)}).fetchall()
    backends = []
    for (pid, state, lock_waiting, client, xact_ms, query_ms, state_ms, strong, locks, workers, k1, k2, xid,
         blockers, wait_ms, blocked_other, blocked_other_ms) in rows:
        mark = (k1, k2, xid) if k1 is not None and k2 is not None and xid is not None else None
        backends.append(_Backend(pid, state, bool(lock_waiting), client, xact_ms, query_ms, state_ms, strong,
                                 int(locks), list(workers), mark, list(blockers), wait_ms, blocked_other,
                                 blocked_other_ms))
    return backends


def _decrypt_marks(conn: psycopg.Connection, backends: Iterable[_Backend]) -> None:
    marked = [b for b in backends if b.mark is not None]
    if not marked:
        return
    rows = conn.execute(_DECRYPT, ([b.pid for b in marked], [b.mark[0] for b in marked],  # type: ignore[index]
                                   [b.mark[1] for b in marked], [b.mark[2] for b in marked])).fetchall()  # type: ignore[index]
    tenants = dict(rows)
    for b in marked:
        b.tenant = tenants.get(b.pid)


def _memory_kb(memory: BackendMemory, backend: _Backend) -> int | None:
    sizes = [memory.rss_anon_kb(pid) for pid in [backend.pid, *backend.workers]]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


# Rules in the order they are tried; the first a backend breaks is its reason.
_ORDER = ("lock_mode", "memory", "locks", "cross_wait", "lock", "statement", "idle", "transaction")


def _judge(backends: list[_Backend], limits: WatchdogLimits, max_locks: int,
           decrypt: Callable[[], None]) -> dict[int, tuple[str, str]]:
    """pid -> (rule, detail) for each backend that breaks a rule."""
    found: dict[int, dict[str, str]] = {}
    by_pid = {b.pid: b for b in backends}

    def breaks(pid: int, rule: str, detail: str) -> None:
        found.setdefault(pid, {}).setdefault(rule, detail)

    for b in backends:
        if b.strong:
            breaks(b.pid, "lock_mode", f"lock stronger than ROW EXCLUSIVE: {b.strong}")
        if limits.max_memory_mb and b.rss_kb is not None and b.rss_kb > limits.max_memory_mb * 1024:
            breaks(b.pid, "memory", f"private memory {b.rss_kb // 1024} MB"
                   + (f" with {len(b.workers)} parallel worker(s)" if b.workers else ""))
        if max_locks and b.locks > max_locks:
            breaks(b.pid, "locks", f"holds {b.locks} locks in the shared lock table")
        if b.blocked_other is not None and (b.blocked_other_ms or 0) > limits.max_lock_wait_ms:
            breaks(b.pid, "lock", f"blocks backend {b.blocked_other} of another role, waiting {b.blocked_other_ms} ms")
        if b.state == "active" and not b.lock_waiting and (b.query_ms or 0) > limits.statement_ms + limits.grace_ms:
            breaks(b.pid, "statement", f"statement running {b.query_ms} ms")
        if (b.state or "").startswith("idle in transaction") and (b.state_ms or 0) > limits.idle_in_transaction_ms + limits.grace_ms:
            breaks(b.pid, "idle", f"idle in transaction {b.state_ms} ms")
        if (b.xact_ms or 0) > limits.max_transaction_ms:
            breaks(b.pid, "transaction", f"transaction open {b.xact_ms} ms")
    # Waits between runtime-role backends: who goes depends on whose tenants they serve.
    waits = [b for b in backends if b.blockers and not b.strong and (b.wait_ms or 0) > limits.max_lock_wait_ms]
    if waits or found:
        decrypt()
    for waiter in waits:
        for pid in waiter.blockers:
            holder = by_pid.get(pid)
            if holder is None or holder.strong:
                continue  # gone, or queued ahead with a strong mode: ended by lock_mode, its queue is no one's fault
            if waiter.tenant == holder.tenant:  # the same tenant (or neither marked: no mark to go by)
                breaks(holder.pid, "lock", f"blocks backend {waiter.pid} of the same tenant, waiting {waiter.wait_ms} ms")
            else:
                breaks(waiter.pid, "cross_wait",
                       f"waits {waiter.wait_ms} ms on backend {holder.pid} of "
                       + ("another tenant" if holder.tenant and waiter.tenant else "a transaction without the same tenant mark"))
    return {pid: next((rule, rules[rule]) for rule in _ORDER if rule in rules) for pid, rules in found.items()}


def _terminate(conn: psycopg.Connection, pid: int) -> bool:
    return bool(conn.execute("SELECT pg_catalog.pg_terminate_backend(%s)", (pid,)).fetchone()[0])  # type: ignore[index]


def sweep(conn: psycopg.Connection, limits: WatchdogLimits, *, probed: WatchdogProbe | None = None) -> list[Termination]:
    """One look at the runtime role's backends: terminate those that break a rule, record the
    counted ones against their tenants, quarantine a repeat staller; return what was done.

    ``probed``: :func:`probe` of this connection (done here when not given).
    """
    probed = probed or probe(conn)
    backends = _facts(conn, limits.runtime_role)
    if not backends:
        return []
    if limits.max_memory_mb and probed.memory is not None:
        for b in backends:
            b.rss_kb = _memory_kb(probed.memory, b)
    max_locks = probed.max_locks(limits)
    decrypted: list[bool] = []

    def decrypt() -> None:
        if probed.marks and not decrypted:
            _decrypt_marks(conn, backends)
            decrypted.append(True)

    verdicts = _judge(backends, limits, max_locks, decrypt)
    by_pid = {b.pid: b for b in backends}
    done: list[Termination] = []
    quarantined: set[uuid.UUID] = set()
    for pid, (reason, detail) in sorted(verdicts.items()):
        b = by_pid[pid]
        item = Termination(pid, reason, detail, b.xact_ms, b.client, _terminate(conn, pid), b.tenant)
        if item.terminated and reason in COUNTED_RULES and b.tenant is not None and probed.quarantine \
                and b.tenant not in quarantined and limits.quarantine_after:
            if _record(conn, b.tenant, reason, limits):
                quarantined.add(b.tenant)
                item = replace(item, quarantined=True)
        _log_termination(item, limits)
        done.append(item)
    # A tenant just quarantined: its other open transactions go too (their next ones are refused).
    for b in backends:
        if b.tenant in quarantined and b.pid not in verdicts:
            item = Termination(b.pid, "quarantine", "its tenant was quarantined", b.xact_ms, b.client,
                               _terminate(conn, b.pid), b.tenant)
            _log_termination(item, limits)
            done.append(item)
    return done


def _record(conn: psycopg.Connection, tenant: uuid.UUID, reason: str, limits: WatchdogLimits) -> bool:
    row = conn.execute("SELECT rtv.watchdog_record_termination(%s, %s, %s, %s)",
                       (tenant, reason, limits.quarantine_after, limits.quarantine_window_ms)).fetchone()
    return bool(row and row[0])


def _log_termination(item: Termination, limits: WatchdogLimits) -> None:
    tenant = f"tenant {item.tenant}" if item.tenant else "no tenant mark"
    _log.warning("rtv-db watchdog: terminated backend %s of %s from %s (%s: %s; transaction %s ms; %s)",
                 item.pid, limits.runtime_role, item.client, item.reason, item.detail, item.transaction_ms, tenant)
    if item.quarantined:
        _log.error("rtv-db watchdog: tenant %s quarantined after %s counted terminations within %s ms (last: %s); "
                   "its context is refused until `rtv-db watchdog release %s`", item.tenant, limits.quarantine_after,
                   limits.quarantine_window_ms, item.reason, item.tenant)


def run_watchdog(url: str, limits: WatchdogLimits, *, stop: threading.Event | None = None,
                 iterations: int | None = None,
                 on_termination: Callable[[Termination], None] | None = None,
                 on_probe: Callable[[WatchdogProbe], None] | None = None) -> Iterator[list[Termination]]:
    """Sweep every ``limits.interval_ms`` until ``stop`` is set or ``iterations`` sweeps are done.

    A generator: yields each sweep's terminations. A lost connection is logged and reopened on
    the next sweep (the watchdog must outlive a server restart); ``on_probe`` hears what each new
    connection can see and do.
    """
    stop = stop or threading.Event()
    conn: psycopg.Connection | None = None
    probed: WatchdogProbe | None = None
    count = 0
    try:
        while not stop.is_set() and (iterations is None or count < iterations):
            count += 1
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = connect_watchdog(url)
                    probed = probe(conn)
                    _log.info("rtv-db watchdog: %s", probed.describe())
                    if on_probe:
                        on_probe(probed)
                done = sweep(conn, limits, probed=probed)
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


# -- the operator's side of the quarantine -----------------------------------------------------


def _require_quarantine(conn: psycopg.Connection, signature: str) -> None:
    if not _may_execute(conn, signature):
        raise ConfigurationError(
            f"{signature} is missing or not executable here: run `rtv-db migrate` (revision 0010), and use the "
            "admin URL or a role granted EXECUTE on it (docs/watchdog.md)")


def _tenant_id(tenant: object) -> uuid.UUID:
    try:
        return tenant if isinstance(tenant, uuid.UUID) else uuid.UUID(str(tenant))
    except ValueError:
        raise InvalidInputError(f"not a tenant id (a UUID): {str(tenant)[:60]!r}") from None


def quarantined_tenants(conn: psycopg.Connection) -> list[Quarantined]:
    """The tenants in quarantine, oldest first."""
    _require_quarantine(conn, "rtv.watchdog_quarantined()")
    rows = conn.execute("SELECT tenant_id, since, reason, terminations FROM rtv.watchdog_quarantined()").fetchall()
    return [Quarantined(*row) for row in rows]


def release_tenant(conn: psycopg.Connection, tenant: object) -> bool:
    """Release ``tenant`` (and forget its counted terminations). False when it was not quarantined."""
    tenant_id = _tenant_id(tenant)
    _require_quarantine(conn, "rtv.watchdog_release(uuid)")
    row = conn.execute("SELECT rtv.watchdog_release(%s)", (tenant_id,)).fetchone()
    released = bool(row and row[0])
    if released:
        _log.warning("rtv-db watchdog: tenant %s released from quarantine", tenant_id)
    return released
