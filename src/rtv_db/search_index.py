"""Per-tenant HNSW indexes for large tenants' similarity search (revisions 0007, 0011).

A tenant's search is exact over its own chunks until the tenant has an index of its own. Exact
search costs time linear in the tenant's chunk count; past about 10,000 chunks (measured:
docs/search.md) an HNSW index pays. The index is partial,
``WHERE rtv_secret.search_partition(search_key) = <key>``, so it holds that tenant's vectors and
nobody else's; the key is an opaque number from ``rtv_secret.search_indexes``, so the index's
definition in the catalog (which every role reads) does not name the tenant. The runtime role
cannot name ``rtv_secret.search_partition``, so it cannot write the predicate, and no statement
of its walks the index; the tenant walks its own through ``rtv.search_own_index`` (revision 0011).

:func:`index_tenant` gives the tenant a key, waits for each transaction that was open then (one
that began before the key was in the map may write rows without it), gives the tenant's
existing rows the key (the trigger of revision 0007 gives it to every row written from then
on), builds the index ``CONCURRENTLY`` (no writer is blocked), then marks it ready: from then on
``similar_chunks`` for that tenant walks it. The wait is for those transactions only, never for
a moment with none open: transactions that begin later do not count, so other tenants'
overlapping transactions cannot hold it back. Each of the runtime role's is ended by the
watchdog at its ``max_transaction`` at the latest; one that outlives that (no watchdog running)
makes the build give up, and so does another role's transaction still open ``wait_seconds``
after the key was given. :func:`index_large_tenants` does this for every tenant above a size,
once (the command ``rtv-db search index --min-chunks N``, for a scheduled job).

These run as the admin login (the index is created as the owner role) and read and update rows as
the system role; like ``migrate``, they are operator commands, never the application's.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql

from .config import Settings, to_libpq_url
from .errors import ConfigurationError, InvalidInputError, RtvDbError
from .targets import Target, resolve_target
from .tenant.context import parse_uuid
from .watchdog import WatchdogLimits

__all__ = [
    "DEFAULT_MIN_CHUNKS",
    "BuildProgress",
    "SearchIndexError",
    "TenantSearchIndex",
    "drop_tenant_index",
    "index_large_tenants",
    "index_name",
    "index_tenant",
    "tenant_indexes",
]

DEFAULT_MIN_CHUNKS: Final = 10_000
# The HNSW graph's build effort (pgvector's default is 64). On the bench corpus, 100,000 chunks of
# clustered 384-dimension embeddings, 200 at m 16 took recall@10 over 1,000 queries from 0.913
# (ef_construction 64, ef_search 200) to 0.964-0.971 at ef_search 400, for a build of 77-86 s
# instead of 44 s, on the same 195 MB. m 48 with ef_search 600 reached 0.983-0.984, but built in
# 159-206 s into 260 MB and searched at 11-13 ms p50 (docs/benchmarks/search.md, the sweep).
EF_CONSTRUCTION: Final = 200
# Past the watchdog's max_transaction, a runtime-role transaction older than the key is taken to
# be one no watchdog ends: it has a sweep interval and this much more to be gone.
_WATCHDOG_SLACK_SECONDS: Final = 2.0
_POLL_SECONDS: Final = 0.1
_PROGRESS_SECONDS: Final = 0.5
# The key's predicate: the runtime role cannot name rtv_secret's function (revision 0011).
PREDICATE: Final = "rtv_secret.search_partition(search_key) = {}"


class SearchIndexError(RtvDbError):
    """A per-tenant search index could not be built or dropped."""


@dataclass(frozen=True)
class BuildProgress:
    """What :func:`index_tenant` is doing, for a progress display (``rtv-db search index`` on a terminal).

    ``step`` is ``waiting`` (for transactions older than the key), ``keying`` (the tenant's rows
    get the key), ``building`` (``CREATE INDEX CONCURRENTLY``: ``message`` names its phase, and
    ``done``/``total`` count blocks, tuples or the transactions it waits for) or ``ready``.
    """

    step: str
    message: str
    done: int | None = None
    total: int | None = None


Progress = Callable[[BuildProgress], None]


@dataclass(frozen=True)
class TenantSearchIndex:
    """One tenant's search index: its key, name, state, and (when built here) how long it took."""

    tenant_id: uuid.UUID
    search_key: int
    index_name: str
    state: str  # 'building', 'ready' or 'dropped'
    chunks: int
    size_bytes: int | None  # None when the index does not exist
    build_seconds: float | None = None


def index_name(search_key: int) -> str:
    """The name of the index of ``search_key``: it names the key, never the tenant."""
    return f"knowledge_chunks_search_{search_key}_idx"


def _target(target: Target | str, settings: Settings | None) -> Target:
    if isinstance(target, Target):
        return target
    return resolve_target(settings or Settings.from_env(), database_url=target)


@contextmanager
def _connect(url: str | None, what: str) -> Iterator[psycopg.Connection]:
    if url is None:
        raise ConfigurationError(f"managing search indexes needs the {what} URL (pass the admin URL)")
    with psycopg.connect(to_libpq_url(url), autocommit=True) as conn:
        yield conn


def _tenant(tenant_id: uuid.UUID | str) -> uuid.UUID:
    try:
        return parse_uuid(tenant_id, "tenant_id")
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def _refuse_citus(conn: psycopg.Connection) -> None:
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone():
        raise SearchIndexError(
            "per-tenant search indexes are not supported on Citus: searches there are exact within "
            "the tenant's shard (docs/search.md)")


def _as_owner(conn: psycopg.Connection, settings: Settings) -> None:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(settings.owner_role)))


def _index_size(conn: psycopg.Connection, name: str) -> int | None:
    """The size of index ``name`` when it is valid and of the current form (an index of revisions
    0007-0010, ``WHERE search_key = <key>``, is walkable by any tenant: it counts as none)."""
    row = conn.execute(
        "SELECT pg_relation_size(c.oid) FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = %s AND c.relnamespace = 'public'::regnamespace AND i.indisvalid "
        "AND pg_get_expr(i.indpred, i.indrelid) LIKE '%%search_partition(search_key) = %%'", (name,)).fetchone()
    return None if row is None else int(row[0])


def _drop_index(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))


def _chunks(system: psycopg.Connection, tenant: uuid.UUID) -> int:
    row = system.execute("SELECT count(*) FROM public.knowledge_chunks WHERE client_id = %s", (tenant,)).fetchone()
    return int(row[0]) if row else 0


def _claim_key(owner: psycopg.Connection, tenant: uuid.UUID) -> int:
    """The tenant's key, given now if it has none, and the state set to 'building'."""
    for _ in range(10):
        try:
            row = owner.execute(
                """
                INSERT INTO rtv_secret.search_indexes AS s (tenant_id, search_key, state)
                VALUES (%s, %s, 'building')
                ON CONFLICT (tenant_id) DO UPDATE SET state = 'building', changed_at = now()
                RETURNING s.search_key
                """,
                (tenant, secrets.randbelow(2**31 - 2) + 1),
            ).fetchone()
        except psycopg.errors.UniqueViolation:  # the random key is another tenant's: draw again
            continue
        assert row is not None
        return int(row[0])
    raise SearchIndexError("could not draw an unused search key")  # pragma: no cover - 2**31 keys


# Transactions of this database open since before ``since`` (the moment the key was given): only
# those can have read the map without the key. Later ones never match, whatever they overlap.
# Autovacuum writes no rows. As the admin login: the owner role may not read other sessions.
_OLDER_TRANSACTIONS = """
SELECT a.pid, a.usename, a.xact_start, clock_timestamp()
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> ALL (%(mine)s) AND a.xact_start < %(since)s
  AND a.backend_type <> 'autovacuum worker'
ORDER BY a.xact_start
"""


def _wait_for_older_transactions(admin: psycopg.Connection, since: datetime, mine: list[int], runtime_role: str,
                                 limits: WatchdogLimits, wait_seconds: float, progress: Progress | None) -> None:
    """Wait for each transaction open since before ``since`` to end (one may have read the map
    before the tenant's key was in it, and write rows without it); transactions that began
    later are not waited for.

    A runtime-role transaction is ended by the watchdog at ``limits.max_transaction_ms`` after
    its start; one still open past that (and the slack of a sweep) means no watchdog ends it,
    and the build gives up. Another role's (the system scope, an operator's session) gets
    ``wait_seconds`` from ``since``."""
    watchdog_bound = (limits.max_transaction_ms + limits.grace_ms + 2 * limits.interval_ms) / 1000 + _WATCHDOG_SLACK_SECONDS
    reported = 0.0
    while True:
        rows = admin.execute(_OLDER_TRANSACTIONS, {"mine": mine, "since": since}).fetchall()
        if not rows:
            return
        now = rows[0][3]
        for pid, role, started, _ in rows:
            if role == runtime_role and (now - started).total_seconds() > watchdog_bound:
                raise SearchIndexError(
                    f"a transaction of the runtime role older than the key (pid {pid}) has been open for "
                    f"{(now - started).total_seconds():.0f} s, past the watchdog's max transaction "
                    f"({limits.max_transaction_ms / 1000:.0f} s): is `rtv-db watchdog` running? Nothing was built.")
            if role != runtime_role and (now - since).total_seconds() > wait_seconds:
                raise SearchIndexError(
                    f"a transaction of {role} older than the key (pid {pid}) is still open after {wait_seconds:.0f} s; "
                    "nothing was built. Run the command again when it has finished.")
        if progress is not None and time.monotonic() - reported >= _PROGRESS_SECONDS:
            reported = time.monotonic()
            oldest = (now - rows[0][2]).total_seconds()
            progress(BuildProgress("waiting", f"waiting for {len(rows)} transaction(s) older than the key "
                                              f"(the oldest open for {oldest:.0f} s)", None, len(rows)))
        time.sleep(_POLL_SECONDS)


_BUILD_PROGRESS = """
SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total, lockers_done, lockers_total, current_locker_pid
FROM pg_catalog.pg_stat_progress_create_index WHERE pid = %s
"""


def _build_message(name: str, row: tuple[Any, ...]) -> BuildProgress:
    """One row of pg_stat_progress_create_index, said in words."""
    phase, blocks_done, blocks_total, tuples_done, tuples_total, lockers_done, lockers_total, locker = row
    if phase.startswith("waiting") and lockers_total:
        return BuildProgress("building", f"building {name}: {phase}, {lockers_done} of {lockers_total} ended"
                                         + (f" (waiting for pid {locker})" if locker else ""), lockers_done, lockers_total)
    if tuples_total:
        return BuildProgress("building", f"building {name}: {phase}, {tuples_done} of {tuples_total} tuples",
                             tuples_done, tuples_total)
    if blocks_total:
        return BuildProgress("building", f"building {name}: {phase}, {blocks_done} of {blocks_total} blocks",
                             blocks_done, blocks_total)
    return BuildProgress("building", f"building {name}: {phase}")


@contextmanager
def _watch_build(url: str, builder_pid: int, name: str, progress: Progress | None) -> Iterator[None]:
    """While the block runs, report ``pg_stat_progress_create_index`` of ``builder_pid`` to ``progress``
    (from a thread with its own connection: the builder's is busy with the statement)."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        try:
            with psycopg.connect(to_libpq_url(url), autocommit=True) as conn:
                while not stop.wait(_PROGRESS_SECONDS):
                    row = conn.execute(_BUILD_PROGRESS, (builder_pid,)).fetchone()
                    if row is not None:
                        progress(_build_message(name, row))
        except psycopg.Error:  # progress is a display: a lost connection must not fail the build
            return

    thread = threading.Thread(target=watch, name=f"rtv-db {name} progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _backfill(system: psycopg.Connection, tenant: uuid.UUID, key: int) -> None:
    # As the system role with the audit trail's bulk switch: the key is plumbing, not a change of
    # the tenant's content, and one audit event per chunk would bury the tenant's own.
    with system.transaction():
        system.execute("SELECT set_config('rtv.audit_bulk_load', 'on', true)")
        system.execute(
            "UPDATE public.knowledge_chunks SET search_key = %s "
            "WHERE client_id = %s AND search_key IS DISTINCT FROM %s", (key, tenant, key))
        # Rows of other tenants that carry the key (planted while the trigger was missing:
        # verify's SEARCH_INDEX_MIXED) get their own tenant's key back from the trigger.
        system.execute("UPDATE public.knowledge_chunks SET search_key = NULL WHERE search_key = %s AND client_id <> %s",
                       (key, tenant))


def _state(owner: psycopg.Connection, tenant: uuid.UUID, state: str) -> None:
    owner.execute("UPDATE rtv_secret.search_indexes SET state = %s, changed_at = now() WHERE tenant_id = %s",
                  (state, tenant))


def index_tenant(target: Target | str, tenant_id: uuid.UUID | str, *, settings: Settings | None = None,
                 min_chunks: int = DEFAULT_MIN_CHUNKS, m: int = 16, ef_construction: int = EF_CONSTRUCTION,
                 maintenance_work_mem: str = "1GB", wait_seconds: float | None = None,
                 progress: Progress | None = None) -> TenantSearchIndex:
    """Build ``tenant_id``'s own HNSW index (cosine) and switch its searches to it.

    ``target`` is a :class:`~rtv_db.targets.Target` or an admin URL. Idempotent: a ready index is
    left as it is. A tenant with fewer than ``min_chunks`` chunks is refused
    (:class:`~rtv_db.InvalidInputError`): its exact search is fast, and exact (recall 1.0), where
    the index is approximate. So is an unknown tenant. On Citus, or when the build fails,
    :class:`SearchIndexError` (the tenant's searches stay exact).

    The build waits for each transaction open when the key was given (module docstring): the
    runtime role's until the watchdog's max transaction (``RTV_DB_WATCHDOG_MAX_TRANSACTION_MS``)
    has passed for them, other roles' for ``wait_seconds`` (default: as long as that).
    ``progress`` is called with a :class:`BuildProgress` while it waits and builds.
    """
    tenant = _tenant(tenant_id)
    for name, value, low, high in (("m", m, 2, 100), ("ef_construction", ef_construction, 4, 1000),
                                   ("min_chunks", min_chunks, 1, 2**31)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidInputError(f"{name} must be an integer from {low} to {high}")
    if wait_seconds is not None and (isinstance(wait_seconds, bool) or not isinstance(wait_seconds, (int, float))
                                     or not 0 < wait_seconds < float("inf")):
        raise InvalidInputError("wait_seconds must be a positive number of seconds")
    target = _target(target, settings)
    settings = target.settings
    limits = WatchdogLimits.from_settings(settings)
    if wait_seconds is None:
        wait_seconds = limits.max_transaction_ms / 1000
    report = progress or (lambda _: None)
    with _connect(target.require_admin(), "admin") as admin, _connect(target.system_url, "system") as system:
        _refuse_citus(admin)
        if system.execute("SELECT 1 FROM public.clients WHERE id = %s", (tenant,)).fetchone() is None:
            raise InvalidInputError(f"no tenant {tenant}")
        if (chunks := _chunks(system, tenant)) < min_chunks:
            raise InvalidInputError(
                f"tenant {tenant} has {chunks} chunks, fewer than {min_chunks}: its searches are exact and "
                "need no index (pass a lower min_chunks, --min-chunks, to index it anyway)")
        _as_owner(admin, settings)
        existing = admin.execute("SELECT search_key, state FROM rtv_secret.search_indexes WHERE tenant_id = %s",
                                 (tenant,)).fetchone()
        if existing and existing[1] == "ready":
            key = int(existing[0])
            if (size := _index_size(admin, index_name(key))) is not None:
                return TenantSearchIndex(tenant, key, index_name(key), "ready", chunks, size)
        started = time.perf_counter()
        key = _claim_key(admin, tenant)
        name = index_name(key)
        claimed_at = admin.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        admin.execute("RESET ROLE")
        mine = [admin.info.backend_pid, system.info.backend_pid]
        _wait_for_older_transactions(admin, claimed_at, mine, settings.runtime_role, limits, wait_seconds, progress)
        _as_owner(admin, settings)
        report(BuildProgress("keying", f"giving tenant {tenant}'s {chunks} chunks their key"))
        _backfill(system, tenant, key)
        # An index left invalid by an interrupted build is dropped first.
        _drop_index(admin, name)
        admin.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
        # CREATE INDEX CONCURRENTLY waits, in its phases, for the transactions that hold the
        # table then: each ends (the watchdog bounds the runtime role's), and later ones do not
        # count. An operator's statement_timeout would cut a large build short: not for this one.
        admin.execute("SELECT set_config('statement_timeout', '0', false)")
        try:
            with _watch_build(target.require_admin(), admin.info.backend_pid, name, progress):
                admin.execute(sql.SQL(
                    "CREATE INDEX CONCURRENTLY {} ON public.knowledge_chunks USING hnsw (embedding vector_cosine_ops) "
                    "WITH (m = {}, ef_construction = {}) WHERE {}"
                ).format(sql.Identifier(name), sql.Literal(m), sql.Literal(ef_construction),
                         sql.SQL(PREDICATE).format(sql.Literal(key))))
        except psycopg.Error as exc:
            _drop_index(admin, name)
            raise SearchIndexError(f"building {name} failed: {exc.diag.message_primary or exc}") from None
        # Rows committed while the index was built by transactions the wait let through already
        # have the key; this second pass is a cheap check that no row was left without it.
        _backfill(system, tenant, key)
        _state(admin, tenant, "ready")
        index = TenantSearchIndex(tenant, key, name, "ready", _chunks(system, tenant), _index_size(admin, name),
                                  round(time.perf_counter() - started, 3))
        report(BuildProgress("ready", f"{name} ready"))
        return index


def drop_tenant_index(target: Target | str, tenant_id: uuid.UUID | str, *,
                      settings: Settings | None = None) -> TenantSearchIndex:
    """Drop ``tenant_id``'s index; its searches are exact again. The tenant keeps its key."""
    tenant = _tenant(tenant_id)
    target = _target(target, settings)
    with _connect(target.require_admin(), "admin") as admin, _connect(target.system_url, "system") as system:
        _as_owner(admin, target.settings)
        row = admin.execute("SELECT search_key FROM rtv_secret.search_indexes WHERE tenant_id = %s",
                            (tenant,)).fetchone()
        if row is None:
            raise InvalidInputError(f"tenant {tenant} has no search index")
        key = int(row[0])
        # Searches stop using it first, then it goes (a search planned before may still walk it).
        _state(admin, tenant, "dropped")
        _drop_index(admin, index_name(key))
        return TenantSearchIndex(tenant, key, index_name(key), "dropped", _chunks(system, tenant), None)


def tenant_indexes(target: Target | str, *, settings: Settings | None = None) -> list[TenantSearchIndex]:
    """Every tenant that has a search key, with its index's state and size."""
    target = _target(target, settings)
    with _connect(target.require_admin(), "admin") as admin, _connect(target.system_url, "system") as system:
        _as_owner(admin, target.settings)
        rows = admin.execute("SELECT tenant_id, search_key, state FROM rtv_secret.search_indexes ORDER BY changed_at")
        return [TenantSearchIndex(t, k, index_name(k), s, _chunks(system, t), _index_size(admin, index_name(k)))
                for t, k, s in rows.fetchall()]


def index_large_tenants(target: Target | str, *, min_chunks: int = DEFAULT_MIN_CHUNKS,
                        settings: Settings | None = None, progress: Progress | None = None) -> list[TenantSearchIndex]:
    """Build an index for every tenant with at least ``min_chunks`` chunks that has none ready."""
    if isinstance(min_chunks, bool) or not isinstance(min_chunks, int) or min_chunks < 1:
        raise InvalidInputError("min_chunks must be a positive integer")
    target = _target(target, settings)
    with _connect(target.system_url, "system") as system:
        large = [t for (t,) in system.execute(
            "SELECT client_id FROM public.knowledge_chunks GROUP BY client_id HAVING count(*) >= %s ORDER BY 1",
            (min_chunks,))]
    ready = {i.tenant_id for i in tenant_indexes(target) if i.state == "ready" and i.size_bytes is not None}
    return [index_tenant(target, t, min_chunks=min_chunks, progress=progress) for t in large if t not in ready]
