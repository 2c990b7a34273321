"""Issue 24, item 8: what walking a tenant's own index through ``rtv.search_own_index`` costs.

    PYTHONPATH=src:. .venv/bin/python -m bench.search_reach              # 20,000 chunks, 300 searches each
    PYTHONPATH=src:. .venv/bin/python -m bench.search_reach --chunks 5000 --searches 100

Its own throw-away embedded server (bench/env.py), one migrated database (head), one tenant L
with ``--chunks`` clustered 384-dimension chunks (8 topics) and 20 small tenants of 200. L gets
two HNSW indexes over the same rows with the same parameters (m 16, ef_construction 200): the
one ``rtv-db search index`` builds now (``WHERE rtv_secret.search_partition(search_key) = k``)
and, beside it, the form of revisions 0007-0010 (``WHERE search_key = k``). Then, interleaved
(the order alternates every round), the same queries (near L's topics), k = 10, as the runtime
role through rtv-db's own transaction path (``TenantScope._connection``: BEGIN, clean session,
signed context and the transaction settings in one pipeline):

* ``before``: the statement of 0007-0010's ``similar_chunks_statement`` (``client_id = :tenant
  AND search_key = :key ... ORDER BY embedding <=> q LIMIT k``, with ``hnsw.ef_search`` 400,
  iterative scan and ``enable_sort = off`` as transaction settings), which walks the old-form index;
* ``after``: the statement rtv-db sends now (``rtv.search_own_index(q, k, NULL, false)``, no
  transaction settings), which walks the new-form one.

Reported: p50 / p95 of each (ms), and recall@10 of each against an exact search.

``--inserts``: the other cost of the design. Every write of ``knowledge_chunks`` evaluates the
predicate of every per-tenant index; with 20 indexed tenants, 2,000 rows of an unindexed tenant
are inserted (and rolled back), interleaved, with the 20 indexes in the old form and in the new.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import text

from rtv_db import Database, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.search_index import index_tenant

from .env import BenchServer

DIM = 384
OLD_SQL = """
    SELECT * FROM (
        SELECT id, knowledge_base_id, content, metadata, embedding <=> CAST(:q AS vector) AS distance
        FROM knowledge_chunks
        WHERE client_id = :tenant AND search_key = :search_key AND embedding IS NOT NULL
        ORDER BY embedding <=> CAST(:q AS vector)
        LIMIT :k
    ) nearest
    ORDER BY distance, id
"""
OLD_SETTINGS = (("hnsw.ef_search", "400"), ("hnsw.iterative_scan", "relaxed_order"), ("enable_sort", "off"))


def _unit(v: list[float]) -> list[float]:
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]


def _near(rng: random.Random, c: list[float], s: float) -> list[float]:
    return _unit([x + rng.gauss(0, s) for x in c])


def _literal(v: list[float]) -> str:
    return "[" + ",".join(repr(x) for x in v) + "]"


def _load(admin: psycopg.Connection[Any], tenant: uuid.UUID, rows: list[list[float]]) -> None:
    kb = uuid.uuid4()
    with admin.transaction():
        admin.execute("SELECT set_config('rtv.audit_bulk_load', 'on', true)")
        admin.execute("INSERT INTO clients (id, name, slug) VALUES (%s, %s, %s)",
                      (tenant, f"t {tenant.hex[:8]}", f"t-{tenant.hex[:12]}"))
        admin.execute("INSERT INTO knowledge_bases (client_id, id, name) VALUES (%s, %s, 'kb')", (tenant, kb))
        with admin.cursor().copy("COPY knowledge_chunks (client_id, knowledge_base_id, content, embedding) FROM STDIN") as cp:
            for v in rows:
                cp.write_row((tenant, kb, "c", _literal(v)))


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def searches(server: BenchServer, chunks: int, n: int) -> dict[str, Any]:
    ds = server.create("reach")
    rng = random.Random(24)
    topics = [_unit([rng.gauss(0, 1) for _ in range(DIM)]) for _ in range(8)]
    large = uuid.uuid4()
    data = [_near(rng, topics[i % 8], 0.35) for i in range(chunks)]
    with server.admin(ds.name) as admin:
        _load(admin, large, data)
        for _ in range(20):
            _load(admin, uuid.uuid4(), [_near(rng, topics[rng.randrange(8)], 0.35) for _ in range(200)])
        admin.execute("ANALYZE knowledge_chunks")
    built = index_tenant(ds.target, large, min_chunks=1)
    with server.admin(ds.name) as admin:
        admin.execute("SET maintenance_work_mem = '1GB'")
        admin.execute(f"CREATE INDEX knowledge_chunks_before_idx ON knowledge_chunks USING hnsw "
                      f"(embedding vector_cosine_ops) WITH (m = 16, ef_construction = 200) "
                      f"WHERE search_key = {built.search_key}")
        ids = {r[0]: r[1] for r in admin.execute("SELECT id, embedding::text FROM knowledge_chunks WHERE client_id = %s",
                                                (large,))}
    vectors = {i: [float(x) for x in e.strip("[]").split(",")] for i, e in ids.items()}
    queries = [_near(rng, topics[i % 8], 0.3) for i in range(n)]
    db = Database(ds.target.runtime_url)
    scope = with_tenant_scope(db, large)
    times: dict[str, list[float]] = {"before": [], "after": []}
    found: dict[str, list[list[uuid.UUID]]] = {"before": [], "after": []}

    def before(q: list[float]) -> list[uuid.UUID]:
        params = {"tenant": large, "q": _literal(q), "k": 10, "search_key": built.search_key}
        with scope._connection(OLD_SETTINGS) as conn:  # rtv-db's transaction path, as 0007-0010 used it
            return [r.id for r in conn.execute(text(OLD_SQL), params)]

    def after(q: list[float]) -> list[uuid.UUID]:
        return [r.id for r in scope.similar_chunks(q, k=10)]

    variants = {"before": before, "after": after}
    for q in queries[:20]:  # warm-up: caches, the key, both indexes in shared buffers
        before(q), after(q)
    for i, q in enumerate(queries):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for name in order:
            started = time.perf_counter()
            got = variants[name](q)
            times[name].append((time.perf_counter() - started) * 1000)
            found[name].append(got)
    db.close()

    def recall(name: str) -> float:
        hits = 0
        for q, got in zip(queries, found[name], strict=True):
            exact = sorted(vectors, key=lambda i: -sum(a * b for a, b in zip(vectors[i], q, strict=True)))[:10]
            hits += len(set(got) & set(exact))
        return hits / (10 * len(queries))

    return {name: {"p50_ms": round(statistics.median(t), 3), "p95_ms": round(_percentile(t, 0.95), 3),
                   "recall_at_10": round(recall(name), 3), "searches": len(t)} for name, t in times.items()}


def inserts(server: BenchServer, rounds: int) -> dict[str, Any]:
    ds = server.create("reach_ins")
    rng = random.Random(25)
    tenants = [uuid.uuid4() for _ in range(20)]
    other = uuid.uuid4()
    with server.admin(ds.name) as admin:
        for t in tenants:
            _load(admin, t, [_unit([rng.gauss(0, 1) for _ in range(DIM)]) for _ in range(200)])
        _load(admin, other, [])
        kb = admin.execute("SELECT id FROM knowledge_bases WHERE client_id = %s", (other,)).fetchone()[0]  # type: ignore[index]
        keys = [index_tenant(ds.target, t, min_chunks=1).search_key for t in tenants]
        rows = [(other, kb, "c", _literal(_unit([rng.gauss(0, 1) for _ in range(DIM)]))) for _ in range(2000)]

        def form(old: bool) -> None:
            for k in keys:
                admin.execute(f"DROP INDEX IF EXISTS knowledge_chunks_search_{k}_idx")
                predicate = f"search_key = {k}" if old else f"rtv_secret.search_partition(search_key) = {k}"
                admin.execute(f"CREATE INDEX knowledge_chunks_search_{k}_idx ON knowledge_chunks USING hnsw "
                              f"(embedding vector_cosine_ops) WHERE {predicate}")

        times: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(rounds):
            for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                form(name == "before")
                with psycopg.connect(to_libpq_url(ds.target.system_url)) as system:
                    system.execute("SELECT set_config('rtv.audit_bulk_load', 'on', true)")
                    started = time.perf_counter()
                    with system.cursor().copy("COPY knowledge_chunks (client_id, knowledge_base_id, content, embedding) "
                                              "FROM STDIN") as cp:
                        for row in rows:
                            cp.write_row(row)
                    times[name].append((time.perf_counter() - started) * 1000)
                    system.rollback()
    return {name: {"median_ms_per_2000_rows": round(statistics.median(t), 1), "rounds": len(t)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--inserts", type=int, default=0, help="rounds of the insert comparison (0: skip)")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    server = BenchServer(args.database_url, progress=False)
    try:
        print("searches", searches(server, args.chunks, args.searches))
        if args.inserts:
            print("inserts", inserts(server, args.inserts))
    finally:
        server.close()


if __name__ == "__main__":
    main()
