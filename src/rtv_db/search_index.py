"""Per-tenant HNSW indexes for large tenants' similarity search (revision 0007).

A tenant's search is exact over its own chunks until the tenant has an index of its own. Exact
search costs time linear in the tenant's chunk count; past about 10,000 chunks (measured:
docs/search.md) an HNSW index pays. The index is partial, ``WHERE search_key = <key>``, so it
holds that tenant's vectors and nobody else's; the key is an opaque number from
``rtv_secret.search_indexes``, so the index's definition in the catalog (which every role reads)
does not name the tenant.

:func:`index_tenant` gives the tenant a key, waits until no transaction that could have missed
the key is still open, gives the tenant's existing rows the key (the trigger of revision 0007
gives it to every row written from then on), builds the index ``CONCURRENTLY`` (no writer is
blocked), then marks it ready: from then on ``similar_chunks`` for that tenant walks it.
:func:`index_large_tenants` does this for every tenant above a size, once (the command
``rtv-db search index --min-chunks N``, for a scheduled job).

These run as the admin login (the index is created as the owner role) and read and update rows as
the system role; like ``migrate``, they are operator commands, never the application's.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import sql

from .config import Settings, to_libpq_url
from .errors import ConfigurationError, InvalidInputError, RtvDbError
from .targets import Target, resolve_target
from .tenant.context import parse_uuid

__all__ = [
    "DEFAULT_MIN_CHUNKS",
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
# How long index_tenant waits for transactions that began before the tenant got its key.
_WAIT_SECONDS: Final = 120.0


class SearchIndexError(RtvDbError):
    """A per-tenant search index could not be built or dropped."""


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
    row = conn.execute(
        "SELECT pg_relation_size(c.oid) FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = %s AND c.relnamespace = 'public'::regnamespace AND i.indisvalid", (name,)).fetchone()
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


def _wait_for_older_transactions(admin: psycopg.Connection, since: object) -> None:
    """Wait until no transaction on this database began before ``since``: one that did may have
    read the map before the tenant's key was in it, and write rows without the key."""
    deadline = time.monotonic() + _WAIT_SECONDS
    while True:
        # As the admin login itself: the owner role may not read other sessions (bootstrap.sql).
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start < %s", (since,)).fetchone()
        if not row or row[0] == 0:
            return
        if time.monotonic() > deadline:
            raise SearchIndexError(
                f"{row[0]} transaction(s) older than the key stayed open for {_WAIT_SECONDS:.0f} s; "
                "nothing was built. Run the command again when they have finished.")
        time.sleep(0.05)


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
                 maintenance_work_mem: str = "1GB") -> TenantSearchIndex:
    """Build ``tenant_id``'s own HNSW index (cosine) and switch its searches to it.

    ``target`` is a :class:`~rtv_db.targets.Target` or an admin URL. Idempotent: a ready index is
    left as it is. A tenant with fewer than ``min_chunks`` chunks is refused
    (:class:`~rtv_db.InvalidInputError`): its exact search is fast, and exact (recall 1.0), where
    the index is approximate. So is an unknown tenant. On Citus, or when the build fails,
    :class:`SearchIndexError` (the tenant's searches stay exact).
    """
    tenant = _tenant(tenant_id)
    for name, value, low, high in (("m", m, 2, 100), ("ef_construction", ef_construction, 4, 1000),
                                   ("min_chunks", min_chunks, 1, 2**31)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidInputError(f"{name} must be an integer from {low} to {high}")
    target = _target(target, settings)
    settings = target.settings
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
        _wait_for_older_transactions(admin, claimed_at)
        _as_owner(admin, settings)
        _backfill(system, tenant, key)
        # An index left invalid by an interrupted build is dropped first.
        _drop_index(admin, name)
        admin.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
        try:
            admin.execute(sql.SQL(
                "CREATE INDEX CONCURRENTLY {} ON public.knowledge_chunks USING hnsw (embedding vector_cosine_ops) "
                "WITH (m = {}, ef_construction = {}) WHERE search_key = {}"
            ).format(sql.Identifier(name), sql.Literal(m), sql.Literal(ef_construction), sql.Literal(key)))
        except psycopg.Error as exc:
            _drop_index(admin, name)
            raise SearchIndexError(f"building {name} failed: {exc.diag.message_primary or exc}") from None
        # Rows committed while the index was built by transactions the wait let through already
        # have the key; this second pass is a cheap check that no row was left without it.
        _backfill(system, tenant, key)
        _state(admin, tenant, "ready")
        return TenantSearchIndex(tenant, key, name, "ready", _chunks(system, tenant), _index_size(admin, name),
                                 round(time.perf_counter() - started, 3))


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
                        settings: Settings | None = None) -> list[TenantSearchIndex]:
    """Build an index for every tenant with at least ``min_chunks`` chunks that has none ready."""
    if isinstance(min_chunks, bool) or not isinstance(min_chunks, int) or min_chunks < 1:
        raise InvalidInputError("min_chunks must be a positive integer")
    target = _target(target, settings)
    with _connect(target.system_url, "system") as system:
        large = [t for (t,) in system.execute(
            "SELECT client_id FROM public.knowledge_chunks GROUP BY client_id HAVING count(*) >= %s ORDER BY 1",
            (min_chunks,))]
    ready = {i.tenant_id for i in tenant_indexes(target) if i.state == "ready" and i.size_bytes is not None}
    return [index_tenant(target, t, min_chunks=min_chunks) for t in large if t not in ready]
