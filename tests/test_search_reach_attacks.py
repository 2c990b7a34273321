"""Issue 24, items 8 and 9: one tenant's reach into another's per-tenant search index, as the runtime role.

**Item 8, the count oracle.** Until revision 0011 a large tenant's HNSW index was partial on
``WHERE search_key = <key>``, which the catalog shows to every role. SQL injected in tenant B's
transaction wrote the same condition; the planner walked A's index, the policy dropped every
row of A's, and ``EXPLAIN ANALYZE``'s ``Rows Removed by Filter`` was A's live row count, in real
time (66, then 69 after A added 3). Shown first on revision 0010 with the index the code of
0007-0010 built, then blocked on head: the predicate calls ``rtv_secret.search_partition``,
which the runtime role cannot name, so no statement of B's walks A's index, whatever planner
switches it sets. ``test_what_stays_visible`` shows, with counts, what PostgreSQL still lets any
role read (docs/search.md, "What it still reveals").

**Item 9, the stalled build.** ``index_tenant`` waited for the transactions older than the key
and gave up after 120 s, while a runtime-role transaction may live up to the watchdog's
``max_transaction`` (300 s): one long transaction of A inside every limit made the build of B's
index give up, and overlapping ones made every retry give up (the old wait, verbatim, with its
120 s and the 300 s scaled alike). Now it waits for those transactions only, each bounded by the
watchdog, and later ones never count: overlapping transactions of A cannot starve it, and B's
searches switch to the index. It gives up only on a runtime transaction past the watchdog's
bound (no watchdog running), and with the watchdog running that one is ended and the build
goes on.

The limits are made small here (``RTV_DB_WATCHDOG_MAX_TRANSACTION_MS`` and friends); every
transaction of A is held open by the test itself, so what overlaps what is fixed by the test,
not by timing.
"""

from __future__ import annotations

import dataclasses
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from rtv_db import Database, EngineOptions, similar_chunk_models, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.migrate import migrate
from rtv_db.schema import knowledge_chunks
from rtv_db.schema.models import EMBEDDING_DIM
from rtv_db.search_index import BuildProgress, SearchIndexError, index_tenant, tenant_indexes
from rtv_db.targets import Target
from rtv_db.tenant.search import search_keys
from rtv_db.watchdog import WatchdogLimits, run_watchdog
from tests.vectors import near, unit

from conftest import Cluster, Tenants, database_at, make_tenants

RNG = random.Random(2408)


def _vector(values: list[float]) -> str:
    return "[" + ",".join(repr(float(x)) for x in values) + "]"


def _chunks(n: int, center: list[float]) -> list[list[float]]:
    return [near(RNG, center, 0.3) for _ in range(n)]


def _seed(admin_url: str, tenant: uuid.UUID, n: int, center: list[float]) -> uuid.UUID:
    """``n`` chunks of ``tenant`` in a knowledge base of its own (as the admin: setup only)."""
    kb = uuid.uuid4()
    with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT set_config('rtv.audit_bulk_load', 'on', true)")
        conn.execute("INSERT INTO knowledge_bases (client_id, id, name) VALUES (%s, %s, 'kb')", (tenant, kb))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO knowledge_chunks (client_id, knowledge_base_id, content, embedding) "
                            "VALUES (%s, %s, 'c', %s::vector)",
                            [(tenant, kb, _vector(v)) for v in _chunks(n, center)])
    return kb


def _add(db: Database, tenant: uuid.UUID, kb: uuid.UUID, n: int, center: list[float]) -> None:
    """The owner adds ``n`` chunks through its own API."""
    with_tenant_scope(db, tenant).scoped_insert(
        knowledge_chunks, [{"knowledge_base_id": kb, "content": "new", "embedding": v} for v in _chunks(n, center)])


# -- item 8: A's live row count through A's own index ------------------------------------------------

_SWITCHES: dict[str, tuple[tuple[str, str], ...]] = {
    # The walk of the review: sorting off, iterative scan on, so the walk visits every row of the index.
    "walk": (("enable_sort", "off"), ("hnsw.iterative_scan", "relaxed_order")),
    "no seqscan": (("enable_sort", "off"), ("hnsw.iterative_scan", "relaxed_order"), ("enable_seqscan", "off")),
    "no bitmap": (("enable_sort", "off"), ("hnsw.iterative_scan", "relaxed_order"), ("enable_seqscan", "off"),
                  ("enable_bitmapscan", "off")),
    "seqscan": (("enable_sort", "off"), ("enable_indexscan", "off"), ("enable_bitmapscan", "off")),
}


def _oracle(db: Database, attacker: uuid.UUID, key: int, query: list[float], switches: str = "walk") -> str:
    """B's injected statement: A's index's predicate, EXPLAIN ANALYZE, the planner pushed towards a walk."""
    with with_tenant_scope(db, attacker).scoped_transaction() as tx:
        for name, value in _SWITCHES[switches]:
            tx.connection.execute(text("SELECT set_config(:n, :v, true)"), {"n": name, "v": value})
        return "\n".join(r[0] for r in tx.connection.execute(text(
            "EXPLAIN (ANALYZE, BUFFERS OFF, COSTS OFF, TIMING OFF, SUMMARY OFF) "
            f"SELECT id FROM knowledge_chunks WHERE search_key = {int(key)} "
            "ORDER BY embedding <=> CAST(:q AS vector) LIMIT 10"), {"q": _vector(query)}))


def _removed(plan: str) -> int:
    return sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan))


def _index_name_of(db: Database, tenant: uuid.UUID) -> tuple[int, str]:
    """The only per-tenant index's key and name, as the runtime role reads them in the catalog."""
    with with_tenant_scope(db, tenant).scoped_transaction() as tx:
        name, definition = tx.connection.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'knowledge_chunks_search_%'")).one()
    return int(re.search(r"= (\d+)\)$", definition).group(1)), name  # type: ignore[union-attr]


@pytest.fixture()
def old_world(cluster: Cluster, template: str) -> Iterator[tuple[Target, Tenants, dict[str, Any]]]:
    """Revision 0010 (the code before this change): A with 66 chunks and its own index as the code
    of revisions 0007-0010 built it (``WHERE search_key = <key>``), B with 50 chunks."""
    with database_at(cluster, template, "0010") as (t, tenants):
        a, b = tenants.a, tenants.b
        center = unit([RNG.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
        kbs = {a: _seed(t.require_admin(), a, 66, center), b: _seed(t.require_admin(), b, 50, center)}
        key = 123_456_789
        with psycopg.connect(to_libpq_url(t.require_admin()), autocommit=True) as admin:
            # What index_tenant of 0007-0010 did: the key, the rows keyed, the index on search_key.
            admin.execute("INSERT INTO rtv_secret.search_indexes (tenant_id, search_key, state) VALUES (%s, %s, 'building')",
                          (a, key))
            admin.execute("UPDATE knowledge_chunks SET search_key = %s WHERE client_id = %s", (key, a))
            admin.execute(f"CREATE INDEX CONCURRENTLY knowledge_chunks_search_{key}_idx ON public.knowledge_chunks "
                          f"USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 200) "
                          f"WHERE search_key = {key}")
            admin.execute("UPDATE rtv_secret.search_indexes SET state = 'ready' WHERE tenant_id = %s", (a,))
        yield t, Tenants(a, b), {"kbs": kbs, "center": center, "key": key}


def test_control_on_0010_another_tenant_counts_the_owners_rows_through_its_index(old_world):
    target, t, world = old_world
    db = Database(target.runtime_url)
    try:
        key, name = _index_name_of(db, t.b)                    # B reads A's key in the catalog
        assert key == world["key"]
        query = world["center"]
        plan = _oracle(db, t.b, key, query)
        assert f"Index Scan using {name}" in plan and _removed(plan) == 66, plan  # A's rows, all of them
        _add(db, t.a, world["kbs"][t.a], 3, query)                                 # A adds three
        assert _removed(_oracle(db, t.b, key, query)) == 69                       # B sees it at once
    finally:
        db.close()


def test_on_head_no_other_tenant_walks_the_index(old_world, cluster):
    target, t, world = old_world
    # Upgrading drops the walkable index (the tenant's searches are exact until it is rebuilt).
    migrate(target.require_admin(), cluster.settings)
    assert [(i.state, i.size_bytes) for i in tenant_indexes(target)] == [("dropped", None)]
    index = index_tenant(target, t.a, min_chunks=1)
    assert index.search_key == world["key"] and index.state == "ready"  # a tenant keeps its key
    db = Database(target.runtime_url)
    try:
        key, name = _index_name_of(db, t.b)
        assert (key, name) == (index.search_key, index.index_name)
        query = world["center"]
        before = {s: _oracle(db, t.b, key, query, s) for s in _SWITCHES}
        _add(db, t.a, world["kbs"][t.a], 3, query)
        after = {s: _oracle(db, t.b, key, query, s) for s in _SWITCHES}
        for switches in _SWITCHES:
            for plan in (before[switches], after[switches]):
                assert name not in plan, plan                    # never a walk of A's index
        # Planned on B's rows (the client_id index): what is counted is B's 50, before and after.
        for switches in ("no seqscan", "no bitmap"):
            assert _removed(before[switches]) == _removed(after[switches]) == 50, before[switches]
        # B cannot write the predicate: it may not name the function.
        with pytest.raises(Exception, match="permission denied for schema rtv_secret"):
            with with_tenant_scope(db, t.b).scoped_transaction() as tx:
                tx.connection.execute(text(f"SELECT count(*) FROM knowledge_chunks "
                                           f"WHERE rtv_secret.search_partition(search_key) = {key}"))
        # B's own call of the search function: B's rows only (B has no index: none), and its plan
        # is the call, not the walk.
        with with_tenant_scope(db, t.b).scoped_transaction() as tx:
            q = {"q": _vector(query)}
            assert tx.connection.execute(text(
                "SELECT count(*) FROM rtv.search_own_index(:q, 10, NULL, false)"), q).scalar() == 0
            plan = "\n".join(r[0] for r in tx.connection.execute(text(
                "EXPLAIN (ANALYZE, BUFFERS OFF, COSTS OFF, TIMING OFF, SUMMARY OFF) "
                "SELECT * FROM rtv.search_own_index(:q, 10, NULL, false)"), q))
            assert plan.splitlines() == ["Function Scan on search_own_index (actual rows=0.00 loops=1)"], plan
        # A's own search walks A's index (its transaction's own counters say so) and finds A's rows.
        scope = with_tenant_scope(db, t.a)
        with scope.session() as session:
            assert len(similar_chunk_models(session, query, k=10)) == 10
            assert session.execute(text("SELECT pg_stat_get_xact_numscans(CAST(:n AS regclass))"),
                                   {"n": name}).scalar() == 1
    finally:
        db.close()


def test_an_sql_identity_as_the_predicate_would_be_walkable_again(target, tenants):
    """Why search_partition is PL/pgSQL: the planner inlines an SQL function's body into the
    index's predicate, for a role that may execute it (writers must), and ``search_key = <key>``
    then matches. Planted as the admin (what an SQL identity would have done); verify finds it."""
    center = unit([RNG.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
    _seed(target.require_admin(), tenants.a, 66, center)
    _seed(target.require_admin(), tenants.b, 50, center)
    index = index_tenant(target, tenants.a, min_chunks=1)
    before = Database(target.runtime_url)
    try:
        assert index.index_name not in _oracle(before, tenants.b, index.search_key, center)
    finally:
        before.close()
    with psycopg.connect(to_libpq_url(target.require_admin()), autocommit=True) as admin:
        admin.execute("CREATE OR REPLACE FUNCTION rtv_secret.search_partition(key integer) RETURNS integer "
                      "LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS 'SELECT key'")
    after = Database(target.runtime_url)  # new backends: each loads the predicate afresh
    try:
        plan = _oracle(after, tenants.b, index.search_key, center)
        assert f"Index Scan using {index.index_name}" in plan and _removed(plan) == 66, plan
    finally:
        after.close()
    from rtv_db.verify import verify

    assert "FUNCTION_ALTERED" in {f.code for f in verify(target.require_admin())}


def test_what_stays_visible(target, db, tenants):
    """What any role still reads about A's index (docs/search.md), each shown with a count."""
    center = unit([RNG.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
    a, b = tenants.a, tenants.b
    kbs = {a: _seed(target.require_admin(), a, 66, center), b: _seed(target.require_admin(), b, 50, center)}
    index = index_tenant(target, a, min_chunks=1)
    spy = with_tenant_scope(db, b)

    def read(sql: str, **params: Any) -> Any:
        with spy.scoped_transaction() as tx:
            return tx.connection.execute(text(sql), {"n": index.index_name, **params}).one()

    # Catalog sizes: reltuples is A's row count when the index was built (and at each VACUUM or
    # ANALYZE); pg_relation_size grows by one 8 kB page per few rows (four, at 384 dimensions).
    reltuples, size = read("SELECT c.reltuples, pg_relation_size(c.oid) FROM pg_class c WHERE c.relname = :n")
    assert reltuples == 66
    _add(db, a, kbs[a], 8, center)
    assert read("SELECT pg_relation_size(c.oid) FROM pg_class c WHERE c.relname = :n")[0] >= size + 8192
    # The table's total: a sequential scan under the policy counts every row of every tenant.
    plan = _oracle(db, b, index.search_key, center, "seqscan")
    with psycopg.connect(to_libpq_url(target.require_admin())) as admin:
        total = admin.execute("SELECT count(*) FROM knowledge_chunks").fetchone()[0]
    assert "Seq Scan on knowledge_chunks" in plan and _removed(plan) == total == 66 + 8 + 50, plan
    # Usage counters: A's searches, once A's backend has reported them.
    scans = read("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = :n")[0]
    owner = with_tenant_scope(db, a)
    for _ in range(3):
        owner.similar_chunks(center, k=5)
    with owner.scoped_transaction() as tx:
        tx.connection.execute(text("SELECT pg_stat_force_next_flush()"))  # reported when it goes idle
    assert read("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = :n")[0] == scans + 3
    # Locks: while A's search transaction is open, pg_locks shows a lock on A's index.
    with owner.session() as session:
        similar_chunk_models(session, center, k=5)
        assert read("SELECT count(*) FROM pg_locks WHERE relation = CAST(:n AS regclass)")[0] == 1
    assert read("SELECT count(*) FROM pg_locks WHERE relation = CAST(:n AS regclass)")[0] == 0


# -- item 9: the build of B's index and A's transactions -------------------------------------------


class Held:
    """One of A's transactions, through rtv-db's API: it writes a chunk, then stays open until closed."""

    def __init__(self, db: Database, tenant: uuid.UUID, kb: uuid.UUID) -> None:
        self._opened, self._close = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(db, tenant, kb), daemon=True)
        self._thread.start()
        assert self._opened.wait(30), "A's transaction did not open"
        assert self.error is None, self.error

    def _run(self, db: Database, tenant: uuid.UUID, kb: uuid.UUID) -> None:
        try:
            with with_tenant_scope(db, tenant).scoped_transaction() as tx:
                tx.connection.execute(text("INSERT INTO knowledge_chunks (client_id, knowledge_base_id, content) "
                                           "VALUES (:t, :kb, 'held')"), {"t": tenant, "kb": kb})
                self._opened.set()
                self._close.wait(60)
        except BaseException as exc:  # noqa: BLE001 - the watchdog may end it: the test looks
            self.error = exc
            self._opened.set()

    def close(self) -> None:
        self._close.set()
        self._thread.join(30)


def _old_wait_for_older_transactions(admin: psycopg.Connection, since: object, wait_seconds: float) -> None:
    """``_wait_for_older_transactions`` of src/rtv_db/search_index.py at 77eaf0a, verbatim but for
    its constant (``_WAIT_SECONDS = 120.0``), which is a parameter here."""
    deadline = time.monotonic() + wait_seconds
    while True:
        # As the admin login itself: the owner role may not read other sessions (bootstrap.sql).
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start < %s", (since,)).fetchone()
        if not row or row[0] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{row[0]} transaction(s) older than the key stayed open for {wait_seconds:.0f} s; "
                "nothing was built. Run the command again when they have finished.")
        time.sleep(0.05)


# The real limits: the watchdog ends a runtime transaction at 300 s, the old wait gave up at 120 s.
# Here both are scaled by 1/60: 5 s and 2 s.
MAX_TRANSACTION_MS = 5_000
OLD_WAIT_SECONDS = 120.0 * MAX_TRANSACTION_MS / 300_000


@pytest.fixture()
def limits(monkeypatch: pytest.MonkeyPatch) -> WatchdogLimits:
    monkeypatch.setenv("RTV_DB_WATCHDOG_MAX_TRANSACTION_MS", str(MAX_TRANSACTION_MS))
    monkeypatch.setenv("RTV_DB_WATCHDOG_GRACE_MS", "0")
    monkeypatch.setenv("RTV_DB_WATCHDOG_INTERVAL_MS", "100")
    from rtv_db.config import Settings

    return WatchdogLimits.from_settings(Settings.from_env())


@pytest.fixture()
def stall(target, system, limits):
    """B with 300 chunks to index; A (the attacker) with a knowledge base, and a pool for its
    transactions."""
    a, b = make_tenants(system, "Stall-A", "Stall-B")
    center = unit([RNG.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
    kb_a = _seed(target.require_admin(), a, 1, center)
    _seed(target.require_admin(), b, 300, center)
    db = Database(target.runtime_url, options=EngineOptions(pool_size=4, max_overflow=4))
    yield Tenants(a, b), kb_a, db, center
    db.close()


def test_control_the_old_wait_gives_up_on_every_retry_while_a_keeps_transactions_open(target, stall):
    t, kb_a, db, _ = stall
    held = Held(db, t.a, kb_a)                             # A's transaction, open before the key
    give_ups = 0
    with psycopg.connect(to_libpq_url(target.require_admin()), autocommit=True) as admin:
        for _ in range(3):                                 # the operator runs the command again
            since = admin.execute("SELECT now()").fetchone()[0]  # the key is given
            with pytest.raises(RuntimeError, match="older than the key stayed open"):
                _old_wait_for_older_transactions(admin, since, OLD_WAIT_SECONDS)
            give_ups += 1
            newer = Held(db, t.a, kb_a)                    # overlapping: opened before the old one ends
            held.close()                                   # each lived OLD_WAIT_SECONDS and a little,
            held = newer                                   # under MAX_TRANSACTION_MS
    held.close()
    assert give_ups == 3


def test_overlapping_transactions_do_not_starve_the_build(target, db, stall):
    t, kb_a, pool, center = stall
    events: list[BuildProgress] = []
    waiting = threading.Event()

    def progress(p: BuildProgress) -> None:
        events.append(p)
        if p.step == "waiting":
            waiting.set()

    result: dict[str, Any] = {}

    def build() -> None:
        try:
            result["index"] = index_tenant(target, t.b, min_chunks=1, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    held = Held(pool, t.a, kb_a)                           # open before the key is given
    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    assert waiting.wait(30), events                        # the build waits for it
    cycles = 0
    while builder.is_alive() and cycles < 200:             # A keeps one transaction open at every moment
        newer = Held(pool, t.a, kb_a)
        held.close()
        held = newer
        cycles += 1
        builder.join(1.0)                                  # each of A's lives about 1 s (limit: 5 s)
    held.close()
    builder.join(30)
    assert "error" not in result, result
    index = result["index"]
    assert index.state == "ready" and index.size_bytes
    assert cycles >= 1 and [e.step for e in events][-1] == "ready" and "waiting" in {e.step for e in events}
    # B's searches switch to it: the walk is in B's transaction's own counters.
    search_keys.clear()
    with with_tenant_scope(db, t.b).session() as session:
        assert len(similar_chunk_models(session, center, k=10)) == 10
        assert session.execute(text("SELECT pg_stat_get_xact_numscans(CAST(:n AS regclass))"),
                               {"n": index.index_name}).scalar() == 1


def test_a_transaction_no_watchdog_ends_makes_the_build_give_up(target, stall):
    t, kb_a, pool, _ = stall
    held = Held(pool, t.a, kb_a)                           # open before the key, and never ended
    try:
        with pytest.raises(SearchIndexError, match="past the watchdog's max transaction"):
            index_tenant(target, t.b, min_chunks=1)
    finally:
        held.close()
    assert held.error is None                              # it was open all along: nothing ended it
    assert [i.state for i in tenant_indexes(target)] == ["building"]


def test_with_the_watchdog_running_that_transaction_is_ended_and_the_build_goes_on(target, stall, limits):
    t, kb_a, pool, _ = stall
    stop = threading.Event()
    ended: list[Any] = []
    # The watchdog ends it at 2 s, inside the 5 s the build allows for: which of the two acts first
    # is not left to the machine's speed.
    enforced = dataclasses.replace(limits, max_transaction_ms=2_000)

    def watch() -> None:
        for done in run_watchdog(target.require_admin(), enforced, stop=stop):
            ended.extend(done)

    watchdog = threading.Thread(target=watch, daemon=True)
    held = Held(pool, t.a, kb_a)                           # open before the key; nobody closes it
    watchdog.start()
    try:
        index = index_tenant(target, t.b, min_chunks=1)
    finally:
        stop.set()
        watchdog.join(30)
        held.close()
    assert index.state == "ready"
    assert held.error is not None and [e.reason for e in ended] == ["transaction"]


def test_another_roles_older_transaction_is_waited_for_wait_seconds(target, stall):
    t, _, _, _ = stall
    with psycopg.connect(to_libpq_url(target.system_url)) as other:  # the system role, in a transaction
        other.execute("SELECT 1")
        with pytest.raises(SearchIndexError, match="older than the key .* is still open after 1 s"):
            index_tenant(target, t.b, min_chunks=1, wait_seconds=1)
    assert index_tenant(target, t.b, min_chunks=1, wait_seconds=1).state == "ready"
