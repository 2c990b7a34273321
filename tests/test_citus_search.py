"""Issue 14, item 5: similarity search on a real Citus cluster (CITUS_URL), as the runtime role.

Three tenants with clustered random 384-dimension embeddings: A's chunks around one topic; B's
(on the same shard as A, so only the tenant filter and RLS keep them apart) and C's (on another
shard) right around the query. A's ``similar_chunks`` returns exactly the brute-force top k over
A's own chunks, never one of B's or C's; B's knowledge base reads like a missing one; and the
search is routed to A's shard alone (``Task Count: 1``, the shard of A's ``client_id``). A per-tenant
index (rtv_db.search_index) is refused on Citus, and the search stays exact.

The database is test_citus.py's ``citus_target`` (CITUS_URL, migrated unsigned and so
distributed); ``make test-citus`` gives it a fresh database on every node. Skipped without
CITUS_URL.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import event, text

from rtv_db import AsyncDatabase, Database, SystemScope, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.schema import clients, knowledge_bases, knowledge_chunks
from rtv_db.schema.models import EMBEDDING_DIM
from rtv_db.targets import Target
from test_citus import citus_target, needs_citus, unsigned_env  # noqa: F401 (fixtures)
from tests.vectors import cosine, near, unit

pytestmark = [needs_citus, pytest.mark.citus, pytest.mark.usefixtures("unsigned_env")]
RNG = random.Random(145)
PER_TENANT = 60


@dataclass
class Corpus:
    a: uuid.UUID
    b: uuid.UUID  # on A's shard
    c: uuid.UUID  # on another shard
    query: list[float]
    kbs: dict[uuid.UUID, uuid.UUID]
    chunks: dict[uuid.UUID, list[tuple[uuid.UUID, list[float]]]]
    shards: dict[uuid.UUID, int]  # knowledge_chunks shard id of each tenant

    def expected(self, tenant: uuid.UUID, k: int) -> list[uuid.UUID]:
        return [cid for cid, _ in sorted(self.chunks[tenant], key=lambda c: cosine(c[1], self.query))[:k]]


def _shards(admin_url: str, tenants: list[uuid.UUID]) -> list[int]:
    with psycopg.connect(to_libpq_url(admin_url)) as conn:
        return [int(conn.execute("SELECT get_shard_id_for_distribution_column('knowledge_chunks', %s)",
                                 (t,)).fetchone()[0]) for t in tenants]  # type: ignore[index]


@pytest.fixture(scope="module")
def corpus(citus_target: Target) -> Iterator[Corpus]:
    admin = citus_target.require_admin()
    a = uuid.uuid4()
    candidates = [uuid.uuid4() for _ in range(400)]
    shard_a, *others = _shards(admin, [a, *candidates])
    b = next(t for t, s in zip(candidates, others) if s == shard_a)
    c = next(t for t, s in zip(candidates, others) if s != shard_a)
    topic = unit([RNG.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
    query = near(RNG, topic, 0.3)
    kbs = {t: uuid.uuid4() for t in (a, b, c)}
    chunks: dict[uuid.UUID, list[tuple[uuid.UUID, list[float]]]] = {}
    system = SystemScope(citus_target.system_url, reason="citus search tests")  # type: ignore[arg-type]
    try:
        with system.transaction() as conn:
            conn.execute(clients.insert(), [{"id": t, "name": f"Search {t.hex[:6]}", "slug": f"search-{t.hex[:12]}"}
                                            for t in kbs])
            conn.execute(knowledge_bases.insert(), [{"client_id": t, "id": kb, "name": "kb"} for t, kb in kbs.items()])
            rows = []
            for tenant, center, spread in ((a, topic, 0.6), (b, query, 0.05), (c, query, 0.05)):
                chunks[tenant] = [(uuid.uuid4(), near(RNG, center, spread)) for _ in range(PER_TENANT)]
                rows += [{"client_id": tenant, "id": cid, "knowledge_base_id": kbs[tenant], "content": f"c{i}",
                          "embedding": emb} for i, (cid, emb) in enumerate(chunks[tenant])]
            conn.execute(knowledge_chunks.insert(), rows)
        yield Corpus(a, b, c, query, kbs, chunks, dict(zip((a, b, c), _shards(admin, [a, b, c]))))
    finally:
        with system.transaction() as conn:  # the Citus database is shared between runs
            conn.execute(text("DELETE FROM clients WHERE id = ANY(:ids)"), {"ids": list(kbs)})
        system.close()


@pytest.fixture()
def db(citus_target: Target) -> Iterator[Database]:
    database = Database(citus_target.runtime_url)
    yield database
    database.close()


def test_the_shards_are_as_planned(corpus: Corpus) -> None:
    assert corpus.shards[corpus.a] == corpus.shards[corpus.b] != corpus.shards[corpus.c]


def test_results_are_the_exact_in_tenant_nearest(db: Database, corpus: Corpus) -> None:
    scope = with_tenant_scope(db, corpus.a)
    results = scope.similar_chunks(corpus.query, k=10)
    assert [r.id for r in results] == corpus.expected(corpus.a, 10)  # recall@10 = 1.0, in order
    by_id = dict(corpus.chunks[corpus.a])
    for r in results:
        assert r.distance == pytest.approx(cosine(by_id[r.id], corpus.query), abs=1e-5)
    # Every chunk of B (same shard) and C (another shard) is nearer to the query than A's: none comes back.
    everything = {r.id for r in scope.similar_chunks(corpus.query, k=1000)}
    assert everything == set(by_id)
    assert len(scope.similar_chunks(corpus.query, k=PER_TENANT)) == PER_TENANT  # never fewer than k
    for tenant in (corpus.b, corpus.c):
        assert [r.id for r in with_tenant_scope(db, tenant).similar_chunks(corpus.query, k=10)] == corpus.expected(tenant, 10)


def test_another_tenants_knowledge_base_reads_as_missing(db: Database, corpus: Corpus) -> None:
    scope = with_tenant_scope(db, corpus.a)
    own = scope.similar_chunks(corpus.query, k=5, knowledge_base_id=corpus.kbs[corpus.a])
    assert [r.id for r in own] == corpus.expected(corpus.a, 5)
    for kb in (corpus.kbs[corpus.b], corpus.kbs[corpus.c], uuid.uuid4()):
        assert scope.similar_chunks(corpus.query, k=5, knowledge_base_id=kb) == []


def _sent_search(db: Database, tenant: uuid.UUID, query: list[float]) -> tuple[str, object]:
    """The search statement rtv-db sends, as sent (captured from its engine)."""
    sent: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, context: object, many: bool) -> None:
        if "<=>" in statement:
            sent.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with_tenant_scope(db, tenant).similar_chunks(query, k=10)
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    assert len(sent) == 1, sent
    return sent[0]


def test_the_search_is_routed_to_the_tenants_shard_alone(db: Database, corpus: Corpus) -> None:
    statement, params = _sent_search(db, corpus.a, corpus.query)
    with with_tenant_scope(db, corpus.a).scoped_transaction() as tx:
        cur = tx.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cur.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + statement, params)
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert re.findall(r"Task Count: (\d+)", plan) == ["1"], plan
    shards = set(re.findall(r"knowledge_chunks_(\d+)", plan))
    assert shards == {str(corpus.shards[corpus.a])}, plan
    assert "Distributed Subplan" not in plan, plan  # one query on the worker, nothing pulled to the coordinator


async def test_the_async_twin(citus_target: Target, corpus: Corpus) -> None:
    adb = AsyncDatabase(citus_target.runtime_url)
    try:
        results = await with_tenant_scope(adb, corpus.a).similar_chunks(corpus.query, k=10)
        assert await with_tenant_scope(adb, corpus.a).similar_chunks(
            corpus.query, k=5, knowledge_base_id=corpus.kbs[corpus.b]) == []
    finally:
        await adb.close()
    assert [r.id for r in results] == corpus.expected(corpus.a, 10)


def test_a_per_tenant_index_is_refused_and_the_search_stays_exact(citus_target: Target, db: Database,
                                                                  corpus: Corpus) -> None:
    from rtv_db.search_index import SearchIndexError, index_tenant

    with pytest.raises(SearchIndexError, match="Citus"):
        index_tenant(citus_target, corpus.a)
    with psycopg.connect(to_libpq_url(citus_target.require_admin())) as conn:  # nothing was changed
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'knowledge_chunks_search_%'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM rtv_secret.search_indexes").fetchone() == (0,)
    assert [r.id for r in with_tenant_scope(db, corpus.a).similar_chunks(corpus.query, k=10)] == corpus.expected(corpus.a, 10)
