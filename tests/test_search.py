"""Issue 14, first part: exact similarity search within one tenant, as the runtime role.

Clustered random 384-dimension embeddings for two tenants, B's placed right next to the query:
A's search returns exactly what a brute-force search over A's own chunks returns (recall 1.0),
never one of B's, and its plan walks no index that holds B's vectors.
"""

from __future__ import annotations

import functools
import random
import uuid

import pytest
from sqlalchemy import text

from rtv_db import AsyncDatabase, InvalidInputError, with_tenant_scope
from rtv_db.schema import knowledge_bases, knowledge_chunks
from rtv_db.schema.models import EMBEDDING_DIM
from tests.vectors import cosine, near, unit

RNG = random.Random(14)


_near = functools.partial(near, RNG)


@pytest.fixture()
def corpus(system, tenants):
    """60 chunks for A around one topic, 60 for B right around the query; one knowledge base each."""
    topic = unit([RNG.gauss(0, 1) for _ in range(EMBEDDING_DIM)])
    query = _near(topic, 0.3)
    kbs = {t: uuid.uuid4() for t in (tenants.a, tenants.b)}
    chunks: dict[uuid.UUID, list[tuple[uuid.UUID, list[float]]]] = {tenants.a: [], tenants.b: []}
    with system.transaction() as conn:
        for tenant, kb in kbs.items():
            conn.execute(knowledge_bases.insert().values(client_id=tenant, id=kb, name="kb"))
        rows = []
        for tenant, spread in ((tenants.a, 0.6), (tenants.b, 0.05)):
            for i in range(60):
                cid, emb = uuid.uuid4(), _near(query if tenant == tenants.b else topic, spread)
                chunks[tenant].append((cid, emb))
                rows.append({"client_id": tenant, "id": cid, "knowledge_base_id": kbs[tenant], "content": f"c{i}",
                             "embedding": emb})
        conn.execute(knowledge_chunks.insert(), rows)
    return query, kbs, chunks


def test_results_are_the_exact_in_tenant_nearest(db, tenants, corpus):
    query, kbs, chunks = corpus
    results = with_tenant_scope(db, tenants.a).similar_chunks(query, k=10)
    expected = sorted(chunks[tenants.a], key=lambda c: cosine(c[1], query))[:10]
    assert [r.id for r in results] == [c[0] for c in expected]  # recall@10 = 1.0, in order
    assert all(r.embedding is None for r in results)
    for r, (_, emb) in zip(results, expected, strict=True):
        assert r.distance == pytest.approx(cosine(emb, query), abs=1e-5)
    # B's chunks are all nearer to the query, and none comes back
    b_ids = {c[0] for c in chunks[tenants.b]}
    assert not b_ids & {r.id for r in with_tenant_scope(db, tenants.a).similar_chunks(query, k=100)}


def test_never_fewer_than_k_when_the_tenant_has_k(db, tenants, corpus):
    query, kbs, chunks = corpus
    assert len(with_tenant_scope(db, tenants.a).similar_chunks(query, k=60)) == 60
    assert len(with_tenant_scope(db, tenants.a).similar_chunks(query, k=61)) == 60


def test_filters_metrics_and_the_embedding_on_request(db, tenants, corpus):
    query, kbs, chunks = corpus
    scope = with_tenant_scope(db, tenants.a)
    assert len(scope.similar_chunks(query, k=5, knowledge_base_id=kbs[tenants.a])) == 5
    # another tenant's knowledge base reads exactly like a missing one
    assert scope.similar_chunks(query, k=5, knowledge_base_id=kbs[tenants.b]) == []
    assert scope.similar_chunks(query, k=5, knowledge_base_id=uuid.uuid4()) == []
    for metric in ("l2", "inner_product"):
        assert len(scope.similar_chunks(query, k=3, metric=metric)) == 3
    near = scope.similar_chunks(query, k=60, max_distance=0.5)
    assert all(r.distance <= 0.5 for r in near)
    [first] = scope.similar_chunks(query, k=1, with_embedding=True)
    assert first.embedding is not None and len(first.embedding) == EMBEDDING_DIM


def _explain(scope, sql, params) -> str:
    with scope.scoped_transaction() as tx:
        # The planner's choices most in favour of walking an index (as on a large table):
        tx.connection.execute(text("SELECT set_config('enable_seqscan', 'off', true), "
                                   "set_config('enable_sort', 'off', true)"))
        return "\n".join(r[0] for r in tx.connection.execute(
            text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql), params))


def test_the_plan_walks_no_index_holding_other_tenants_vectors(db, admin_conn, tenants, corpus):
    query, kbs, chunks = corpus
    from rtv_db.tenant.search import similar_chunks_statement

    # Planted: an HNSW index over every tenant's vectors (revision 0001 had one; verify reports
    # it as VECTOR_INDEX_SHARED).
    admin_conn.execute("CREATE INDEX shared_hnsw ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)")
    scope = with_tenant_scope(db, tenants.a)
    stmt, params, _ = similar_chunks_statement(scope.context, query, 10, knowledge_base_id=None, metric="cosine",
                                            max_distance=None, with_embedding=False)
    plan = _explain(scope, stmt.text, params)
    assert "shared_hnsw" not in plan and "Rows Removed by Filter" not in plan, plan
    assert "top-N heapsort" in plan, plan
    # The search as a plain ORDER BY on the distance (what a user would write) walks it, and the
    # walk reports the other tenant's chunks it dropped: where B's vectors lie, seen from A.
    naive = ("SELECT id, embedding <=> CAST(:q AS vector) AS distance FROM knowledge_chunks "
             "WHERE client_id = :tenant ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k")
    plan = _explain(scope, naive, params)
    assert "Index Scan using shared_hnsw" in plan and "Rows Removed by Filter" in plan, plan


@pytest.mark.parametrize("kwargs,message", [
    (dict(embedding=[0.1] * 3), "384 dimensions"),
    (dict(embedding=[float("nan")] * EMBEDDING_DIM), "finite"),
    (dict(embedding=[float("inf")] * EMBEDDING_DIM), "finite"),
    (dict(embedding="[1,2,3]"), "sequence of numbers"),
    (dict(embedding=[True] * EMBEDDING_DIM), "numbers"),
    (dict(k=0), "k must be"),
    (dict(k=1001), "k must be"),
    (dict(k=2.5), "k must be"),
    (dict(metric="hamming"), "metric must be"),
    (dict(knowledge_base_id="1 OR 1=1"), "not a UUID"),
    (dict(max_distance=float("nan")), "max_distance"),
])
def test_bad_input_is_refused_before_anything_is_sent(db, tenants, kwargs, message):
    args = {"embedding": [0.1] * EMBEDDING_DIM, "k": 10} | kwargs
    embedding = args.pop("embedding")
    with pytest.raises(InvalidInputError, match=message):
        with_tenant_scope(db, tenants.a).similar_chunks(embedding, **args)


async def test_the_async_twin(target, tenants, corpus):
    query, kbs, chunks = corpus
    adb = AsyncDatabase(target.runtime_url)
    try:
        results = await with_tenant_scope(adb, tenants.a).similar_chunks(query, k=10)
    finally:
        await adb.close()
    expected = sorted(chunks[tenants.a], key=lambda c: cosine(c[1], query))[:10]
    assert [r.id for r in results] == [c[0] for c in expected]
