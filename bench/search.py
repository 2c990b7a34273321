"""Issue 14, item 4: tenant-scoped similarity search against plain pgvector, per tenant size.

    PYTHONPATH=src:. .venv/bin/python -m bench.search            # full: 1,000 x 200 + one 100,000
    PYTHONPATH=src:. .venv/bin/python -m bench.search --smoke    # tiny sizes, well under a minute

Its own throw-away embedded server (bench/env.py's ``BenchServer``; ``--database-url`` for
another, a superuser URL, used as configured), started with ``shared_buffers`` = SHARED_BUFFERS
(2 GB: the indexes measured, about 200-260 MB per-tenant and 600 MB baseline, and the heap pages
their walks read fit in it, as a production server is sized to hold its hot indexes; PostgreSQL's
default of 128 MB holds neither index),
one migrated database (signed context, as shipped), then:

* **Data**: synthetic *clustered* 384-dimension embeddings (numpy, seeded). 64 global topics are
  shared by all tenants; each tenant's topic centres are global topics moved by a tenant-specific
  offset, and each chunk is a centre plus gaussian noise, normalised. Neighbourhoods of different
  tenants therefore overlap, which is what a filtered index walk over every tenant meets. Small
  tenants get 4 centres, the large one 64. Tenants, platform accounts and knowledge bases come
  from ``BenchServer.load`` (``load_synthetic`` with 0 rows per tenant); the chunks are COPYed
  (binary) into ``knowledge_chunks`` as the system role in one transaction with ``SET LOCAL
  rtv.audit_bulk_load = 'on'``, rtv-db's bulk switch (revision 0003: only the system role's
  setting counts), so the load writes no audit events. ANALYZE.
* **Baselines**, in schema ``bench_baseline``, copies of ``(client_id, id, embedding)`` owned
  by the admin, no RLS: ``hnsw_chunks`` with one HNSW index over every tenant (pgvector defaults
  m = 16, ef_construction = 64) and nothing else, so a search is the filtered HNSW walk;
  ``exact_chunks`` with a primary key ``(client_id, id)`` and no vector index, so a search reads the
  tenant's rows through that btree and sorts them (exact). Build times and sizes are reported.
* **Variants**, interleaved in rounds (bench/harness.py's ``interleave``: the order rotates every
  round, warm-up first), the same (tenant, query) sequence for each, top 10 by cosine distance:
  ``rtvdb`` = ``with_tenant_scope(Database(runtime_url), t).similar_chunks(q, k=10)`` as the
  runtime role; ``pgvector_hnsw`` = one held psycopg connection (admin), one pipeline of
  ``SET LOCAL hnsw.iterative_scan = relaxed_order`` and ``WITH r AS MATERIALIZED (SELECT ... WHERE
  client_id = %s ORDER BY embedding <=> q LIMIT 10) SELECT * FROM r ORDER BY distance`` (pgvector's
  documented form for relaxed order), then COMMIT; ``exact_scan`` = the same connection kind,
  ``SELECT ... WHERE client_id = %s ORDER BY embedding <=> q LIMIT 10`` on ``exact_chunks``. Each
  formats the query vector from the same Python floats in the timed call, as rtv-db does.
* **Recall@10** of every answer against an exact search done in numpy (float64 over the stored
  float32 vectors; a returned chunk counts when its true distance is within 1e-6 of the tenth
  nearest, so float rounding at a tie is not a miss). Queries: 80 % near one of the tenant's own
  centres, 20 % near a random global topic (another tenant's neighbourhood, in general); recall is
  given for both. Any chunk of another tenant in an answer is counted (and must be 0).
* **Tenant sizes**: ``small`` = a sample of the 200-chunk tenants (the query's tenant rotates
  over the sample); ``large`` = the 100,000-chunk tenant, measured twice: before and after
  ``rtv_db.search_index.index_tenant(admin_url, tenant)`` (its per-tenant HNSW index; build time
  and size reported), when that module exists; a new ``Database`` after the index. After the
  index, also rtv-db alone (no other variant's index walk between its batches), and the tenant's
  index walked directly at ``hnsw.ef_search`` 40 to 1000 (admin, psycopg, interleaved): recall
  and latency per candidate-list size.
* **EXPLAIN (ANALYZE, COSTS OFF)** of one search per variant and size: the SQL rtv-db sent is
  captured from its engine and explained inside a scoped transaction as the runtime role.

Results: docs/benchmarks/search.md and search.json (``--smoke``: build/bench-smoke/).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import event, text

from bench.env import BenchServer, Dataset, machine_info
from bench.harness import interleave
from rtv_db.config import to_libpq_url
from rtv_db.seed.synthetic import KIND_KNOWLEDGE_BASE, KIND_KNOWLEDGE_CHUNK, synthetic_row_id, synthetic_tenant_id

DIM = 384
K = 10
GLOBAL_TOPICS = 64
TENANT_OFFSET = 0.5  # a tenant's centre: a global topic + this x a random unit vector, normalised
CHUNK_SIGMA = 0.05  # per-dimension noise of a chunk around its centre (cosine to it ~0.7)
QUERY_SIGMA = 0.05
FOREIGN_SHARE = 0.2  # queries near a random global topic instead of one of the tenant's centres
TIE_EPS = 1e-6
# The embedded server's shared_buffers: the per-tenant index (about 200-260 MB at full size), the
# baseline HNSW over every tenant (about 600 MB) and the heap pages their walks read all fit, as on
# a server sized for its hot indexes (the machine has 23 GB).
SHARED_BUFFERS = "2GB"
BASELINE = "bench_baseline"
# The execution option that carries a transaction's settings (rtv_db.tenant._transaction's
# TRANSACTION_SETTINGS_OPTION): read from rtv-db's statements so their EXPLAIN runs with them.
SETTINGS_OPTION = "rtv_db_transaction_settings"


@dataclass(frozen=True)
class Sizes:
    name: str
    small_tenants: int
    small_chunks: int
    large_chunks: int
    small_centres: int
    large_centres: int
    sample: int  # small tenants the queries rotate over
    small_rounds: int
    small_batch: int
    large_rounds: int
    large_batch: int
    warmup: int


FULL = Sizes("full", small_tenants=1000, small_chunks=200, large_chunks=100_000, small_centres=4, large_centres=64,
             sample=200, small_rounds=40, small_batch=10, large_rounds=20, large_batch=5, warmup=20)
SMOKE = Sizes("smoke", small_tenants=20, small_chunks=200, large_chunks=3_000, small_centres=4, large_centres=8,
              sample=10, small_rounds=4, small_batch=5, large_rounds=3, large_batch=3, warmup=3)


# -- the corpus ---------------------------------------------------------------------------------


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


@dataclass
class Tenant:
    index: int
    id: uuid.UUID
    vectors: np.ndarray  # float32, (n, DIM), normalised
    centres: np.ndarray  # float64, (c, DIM)
    _exact: np.ndarray | None = None

    def exact(self) -> np.ndarray:  # float64 copy of the stored float32 values, for the truth
        if self._exact is None:
            self._exact = self.vectors.astype(np.float64)
        return self._exact


@dataclass
class Corpus:
    topics: np.ndarray
    small: list[Tenant]
    large: Tenant

    @property
    def tenants(self) -> list[Tenant]:
        return [*self.small, self.large]


def make_corpus(sizes: Sizes, seed: int = 14) -> Corpus:
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((GLOBAL_TOPICS, DIM)))

    def tenant(index: int, n: int, n_centres: int) -> Tenant:
        picks = topics[rng.integers(GLOBAL_TOPICS, size=n_centres)]
        centres = _unit(picks + TENANT_OFFSET * _unit(rng.standard_normal((n_centres, DIM))))
        assign = rng.integers(n_centres, size=n)
        vectors = _unit(centres[assign] + CHUNK_SIGMA * rng.standard_normal((n, DIM))).astype(np.float32)
        return Tenant(index, synthetic_tenant_id(index), vectors, centres)

    small = [tenant(i, sizes.small_chunks, sizes.small_centres) for i in range(sizes.small_tenants)]
    return Corpus(topics, small, tenant(sizes.small_tenants, sizes.large_chunks, sizes.large_centres))


@dataclass
class Query:
    tenant: Tenant
    values: list[float]  # what every variant is given (Python floats)
    foreign: bool
    truth: np.ndarray  # the exact top-K row numbers
    kth: float  # the K-th smallest true distance
    mean: float  # the mean true distance of the exact top K


def _distances(t: Tenant, q: np.ndarray) -> np.ndarray:
    m = t.exact()
    return 1.0 - (m @ q) / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))


def make_queries(corpus: Corpus, tenants: list[Tenant], n: int, seed: int) -> list[Query]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = tenants[i % len(tenants)]
        foreign = bool(rng.random() < FOREIGN_SHARE)
        centre = corpus.topics[rng.integers(GLOBAL_TOPICS)] if foreign else t.centres[rng.integers(len(t.centres))]
        q = _unit(centre + QUERY_SIGMA * rng.standard_normal(DIM)).astype(np.float32).astype(np.float64)
        d = _distances(t, q)
        top = np.argsort(d, kind="stable")[:K]
        out.append(Query(t, [float(x) for x in q], foreign, top, float(d[top[-1]]), float(d[top].mean())))
    return out


def _row_of(chunk_id: uuid.UUID) -> tuple[int, int]:
    """(tenant index, row number) of a synthetic chunk id (rtv_db.seed.synthetic's layout)."""
    h = chunk_id.hex
    return int(h[:8], 16), int(h[20:], 16)


def recall(q: Query, ids: list[uuid.UUID]) -> tuple[float, int, float | None]:
    """Recall@K of ``ids`` for ``q`` (ties within TIE_EPS of the K-th count), the number of other
    tenants' chunks, and the mean true distance of the tenant's chunks returned / that of the exact
    top K, minus 1 (how much farther the answer is: 0 when exact)."""
    qv = np.asarray(q.values)
    hits = foreign = 0
    distances = []
    for chunk_id in ids[:K]:
        tenant, row = _row_of(chunk_id)
        if tenant != q.tenant.index:
            foreign += 1
            continue
        v = q.tenant.exact()[row]
        d = 1.0 - float(v @ qv) / (np.linalg.norm(v) * np.linalg.norm(qv))
        distances.append(d)
        hits += d <= q.kth + TIE_EPS
    return hits / K, foreign, (statistics.fmean(distances) / q.mean - 1.0) if distances else None


def quality(queries: list[Query], got: dict[str, dict[int, list[uuid.UUID]]]) -> dict[str, Any]:
    """Per variant: recall@K (all queries, own-topic, foreign-topic), the lowest, answers with fewer
    than K, other tenants' chunks, and the mean distance excess (see :func:`recall`)."""
    out: dict[str, Any] = {}
    for name, answers in got.items():
        per: dict[str, list[float]] = {"all": [], "own_topic": [], "foreign_topic": []}
        excess: dict[str, list[float]] = {"own_topic": [], "foreign_topic": []}
        foreign = short = 0
        for i, ids in answers.items():
            q = queries[i]
            r, f, x = recall(q, ids)
            kind = "foreign_topic" if q.foreign else "own_topic"
            per["all"].append(r)
            per[kind].append(r)
            if x is not None:
                excess[kind].append(x)
            foreign += f
            short += len(ids) < min(K, len(q.tenant.vectors))
        out[name] = {"recall_at_10": {k: round(statistics.fmean(v), 4) if v else None for k, v in per.items()},
                     "min_recall": round(min(per["all"]), 2), "queries": len(per["all"]),
                     "fewer_than_k": short, "other_tenants_chunks": foreign,
                     "distance_excess": {k: round(statistics.fmean(v), 5) if v else None for k, v in excess.items()}}
    return out


def _literal(values: list[float]) -> str:
    return "[" + ",".join(map(repr, values)) + "]"


# -- loading ------------------------------------------------------------------------------------


def _chunk_rows(t: Tenant) -> Iterator[tuple[Any, ...]]:
    kb = synthetic_row_id(KIND_KNOWLEDGE_BASE, t.index, 0)
    prefix = f"{t.index:08x}{KIND_KNOWLEDGE_CHUNK:04x}40008000"
    for r, v in enumerate(t.vectors):
        yield t.id, uuid.UUID(prefix + f"{r:012x}"), kb, f"Synthetic chunk {r} of tenant {t.index}", v


def load(server: BenchServer, ds: Dataset, corpus: Corpus, say: Callable[[str], None]) -> dict[str, Any]:
    from pgvector.psycopg import register_vector

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    server.load(ds, len(corpus.tenants), 0)  # clients, a platform account and a knowledge base each
    out["tenants_seconds"] = round(time.perf_counter() - t0, 2)
    total = sum(len(t.vectors) for t in corpus.tenants)
    say(f"  COPY {total:,} chunks as the system role, SET LOCAL rtv.audit_bulk_load = 'on'")
    t0 = time.perf_counter()
    assert ds.target.system_url is not None
    with psycopg.connect(to_libpq_url(ds.target.system_url)) as conn:
        register_vector(conn)
        with conn.transaction(), conn.cursor() as cur:
            # rtv-db's bulk switch (revision 0003): the system role, and only it, may skip the
            # audit trail for one transaction; 300k chunk events would be setup, not workload.
            cur.execute("SET LOCAL rtv.audit_bulk_load = 'on'")
            with cur.copy("COPY knowledge_chunks (client_id, id, knowledge_base_id, content, embedding)"
                          " FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["uuid", "uuid", "uuid", "text", "vector"])
                for t in corpus.tenants:
                    for row in _chunk_rows(t):
                        copy.write_row(row)
    out["copy_seconds"] = round(time.perf_counter() - t0, 2)
    out["chunks"] = total
    with server.admin(ds.name) as conn:
        conn.execute("ANALYZE knowledge_chunks")
        out["table_bytes"] = _size(conn, "knowledge_chunks")
        out["indexes"] = {name: _size(conn, name) for (name,) in conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'knowledge_chunks'::regclass ORDER BY 1")}
        audit = conn.execute("SELECT count(*) FROM audit_events WHERE table_name = 'knowledge_chunks'").fetchone()[0]  # type: ignore[index]
        out["audit_events_of_the_load"] = audit
    return out


def _size(conn: psycopg.Connection[Any], relation: str) -> int:
    return int(conn.execute("SELECT pg_relation_size(%s::regclass)", (relation,)).fetchone()[0])  # type: ignore[index]


def _timed_index(conn: psycopg.Connection[Any], ddl: str, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    conn.execute(ddl)  # type: ignore[arg-type]
    return {"build_seconds": round(time.perf_counter() - t0, 2), "bytes": _size(conn, name)}


def build_baselines(server: BenchServer, ds: Dataset, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with server.admin(ds.name) as conn:
        conn.execute("SET maintenance_work_mem = '2GB'")
        conn.execute(f"CREATE SCHEMA {BASELINE}")
        for table in ("exact_chunks", "hnsw_chunks"):
            conn.execute(f"CREATE TABLE {BASELINE}.{table} AS SELECT client_id, id, embedding FROM knowledge_chunks")
        say("  exact_chunks: primary key (client_id, id), no vector index")
        out["exact_chunks"] = _timed_index(
            conn, f"ALTER TABLE {BASELINE}.exact_chunks ADD CONSTRAINT exact_chunks_pkey PRIMARY KEY (client_id, id)",
            f"{BASELINE}.exact_chunks_pkey")
        say("  hnsw_chunks: one HNSW index over every tenant")
        out["hnsw_chunks"] = _timed_index(
            conn, f"CREATE INDEX hnsw_chunks_embedding_idx ON {BASELINE}.hnsw_chunks USING hnsw (embedding vector_cosine_ops)",
            f"{BASELINE}.hnsw_chunks_embedding_idx")
        for table in ("exact_chunks", "hnsw_chunks"):
            conn.execute(f"ANALYZE {BASELINE}.{table}")
            out[table]["table_bytes"] = _size(conn, f"{BASELINE}.{table}")
        out["hnsw_settings"] = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                                for name in ("hnsw.ef_search", "hnsw.max_scan_tuples", "hnsw.scan_mem_multiplier")}
    return out


# -- the variants -------------------------------------------------------------------------------

HNSW_SQL = (f"WITH r AS MATERIALIZED (SELECT id, embedding <=> %(q)s::vector AS distance FROM {BASELINE}.hnsw_chunks"
            f" WHERE client_id = %(t)s ORDER BY embedding <=> %(q)s::vector LIMIT {K}) SELECT id, distance FROM r ORDER BY distance")
EXACT_SQL = (f"SELECT id, embedding <=> %(q)s::vector AS distance FROM {BASELINE}.exact_chunks"
             f" WHERE client_id = %(t)s ORDER BY distance LIMIT {K}")


# rtv-db's exact search as one plain statement (no MATERIALIZED CTE), on knowledge_chunks as the
# runtime role: a measuring device for the cost of the statement's shape, not an API.
PLAIN_SQL = text(f"SELECT id, knowledge_base_id, content, metadata, embedding <=> CAST(:q AS vector) AS distance"
                 f" FROM knowledge_chunks WHERE client_id = :tenant AND embedding IS NOT NULL ORDER BY distance, id LIMIT {K}")


class Variants:
    """The searches over one list of queries; each keeps the ids it returned per query."""

    def __init__(self, server: BenchServer, ds: Dataset, queries: list[Query], names: tuple[str, ...]) -> None:
        from rtv_db import Database, with_tenant_scope

        self.queries = queries
        self.db = Database(ds.target.runtime_url)
        self.sent: list[tuple[str, Any, tuple[tuple[str, str], ...]]] = []
        self.settings: tuple[tuple[str, str], ...] = ()
        event.listen(self.db.engine, "before_cursor_execute", self._capture)
        self.hnsw = psycopg.connect(to_libpq_url(server.url_for(ds.name)))
        self.exact = psycopg.connect(to_libpq_url(server.url_for(ds.name)), autocommit=True)
        n = len(queries)

        def rtvdb(i: int) -> None:
            q = queries[i % n]
            self.got["rtvdb"][i % n] = [r.id for r in with_tenant_scope(self.db, q.tenant.id).similar_chunks(q.values, k=K)]

        def hnsw(i: int) -> None:
            q = queries[i % n]
            with self.hnsw.pipeline():
                self.hnsw.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                cur = self.hnsw.execute(HNSW_SQL, {"q": _literal(q.values), "t": q.tenant.id})
            rows = cur.fetchall()
            self.hnsw.commit()
            self.got["pgvector_hnsw"][i % n] = [r[0] for r in rows]

        def exact(i: int) -> None:
            q = queries[i % n]
            self.got["exact_scan"][i % n] = [r[0] for r in self.exact.execute(EXACT_SQL, {"q": _literal(q.values), "t": q.tenant.id})]

        def plain_sql(i: int) -> None:
            q = queries[i % n]
            with with_tenant_scope(self.db, q.tenant.id).scoped_transaction() as tx:
                rows = tx.connection.execute(PLAIN_SQL, {"q": _literal(q.values), "tenant": q.tenant.id}).all()
            self.got["rtvdb_plain_sql"][i % n] = [r.id for r in rows]

        every = {"rtvdb": rtvdb, "pgvector_hnsw": hnsw, "exact_scan": exact, "rtvdb_plain_sql": plain_sql}
        self.fns: dict[str, Callable[[int], None]] = {name: every[name] for name in names}
        self.got: dict[str, dict[int, list[uuid.UUID]]] = {name: {} for name in names}

    def _capture(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        # The search (the walk of a tenant's own index is a call of rtv.search_own_index, whose
        # EXPLAIN shows the call), with the transaction settings rtv-db sent with it.
        if "<=>" in statement or "search_own_index" in statement:
            settings = dict(context.execution_options).get(SETTINGS_OPTION) if context is not None else None
            self.sent.append((statement, parameters, tuple(tuple(p) for p in (settings.items() if isinstance(settings, dict) else settings or ()))))

    def explain(self) -> dict[str, list[str]]:
        """EXPLAIN ANALYZE of the first query in each variant's own form."""
        from rtv_db import with_tenant_scope

        q = self.queries[0]
        out: dict[str, list[str]] = {}
        self.sent.clear()
        self.fns["rtvdb"](0)
        statement, params, settings = self.sent[-1]
        self.settings = settings
        with with_tenant_scope(self.db, q.tenant.id).scoped_transaction() as tx:
            cur = tx.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for name, value in settings:
                cur.execute("SELECT set_config(%s, %s, true)", (name, str(value)))
            cur.execute("EXPLAIN (ANALYZE, COSTS OFF) " + statement, params)
            out["rtvdb"] = [r[0] for r in cur.fetchall()]
        params = {"q": _literal(q.values), "t": q.tenant.id}
        if "pgvector_hnsw" in self.fns:
            with self.hnsw.transaction():
                self.hnsw.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                out["pgvector_hnsw"] = [r[0] for r in self.hnsw.execute("EXPLAIN (ANALYZE, COSTS OFF) " + HNSW_SQL, params)]
            self.hnsw.commit()
        if "exact_scan" in self.fns:
            out["exact_scan"] = [r[0] for r in self.exact.execute("EXPLAIN (ANALYZE, COSTS OFF) " + EXACT_SQL, params)]
        if "rtvdb_plain_sql" in self.fns:
            with with_tenant_scope(self.db, q.tenant.id).scoped_transaction() as tx:
                out["rtvdb_plain_sql"] = [r[0] for r in tx.connection.execute(
                    text("EXPLAIN (ANALYZE, COSTS OFF) " + PLAIN_SQL.text), {"q": params["q"], "tenant": q.tenant.id})]
        return out

    def close(self) -> None:
        self.hnsw.close()
        self.exact.close()
        self.db.close()


ALL_VARIANTS = ("rtvdb", "pgvector_hnsw", "exact_scan", "rtvdb_plain_sql")


def measure(server: BenchServer, ds: Dataset, queries: list[Query], rounds: int, batch: int, warmup: int,
            names: tuple[str, ...] = ALL_VARIANTS) -> dict[str, Any]:
    v = Variants(server, ds, queries, names)
    try:
        t0 = time.perf_counter()
        stats = interleave(v.fns, rounds=rounds, batch=batch, warmup=warmup, baseline="exact_scan" if "exact_scan" in names else None)
        seconds = time.perf_counter() - t0
        quality_ = quality(queries, v.got)
        plans = v.explain()
        settings = [list(p) for p in v.settings]
    finally:
        v.close()
    return {
        "rounds": rounds, "batch": batch, "warmup": warmup, "distinct_queries": len(queries),
        "seconds": round(seconds, 1), "loadavg": [round(x, 2) for x in os.getloadavg()],
        "variants": {name: {"p50_ms": round(s.median_us / 1000, 3), "p95_ms": round(s.p95_us / 1000, 3),
                            "mean_ms": round(s.mean_us / 1000, 3), "n": s.n,
                            "x_exact_scan_p50": round(s.ratio, 3) if s.ratio is not None else None,
                            **quality_[name]} for name, s in stats.items()},
        "plans": {name: _elide(plan) for name, plan in plans.items()},
        "rtvdb_transaction_settings": settings,
    }


# -- the per-tenant index ------------------------------------------------------------------------


def index_large_tenant(server: BenchServer, ds: Dataset, tenant: Tenant) -> dict[str, Any] | None:
    try:
        from rtv_db import search_index
    except ImportError:
        return None
    import inspect

    # index_tenant refuses a tenant below its size guard (min_chunks); the smoke run's "large"
    # tenant is below it, and is indexed anyway (the guard is lowered to its size).
    kwargs = {"min_chunks": len(tenant.vectors)} if "min_chunks" in inspect.signature(search_index.index_tenant).parameters \
        and len(tenant.vectors) < getattr(search_index, "DEFAULT_MIN_CHUNKS", 0) else {}
    t0 = time.perf_counter()
    try:
        info = search_index.index_tenant(ds.target.require_admin(), tenant.id, **kwargs)
    except Exception as exc:  # recorded and reported: the rest of the run stands
        return {"error": f"{type(exc).__name__}: {exc}", "call_seconds": round(time.perf_counter() - t0, 2)}
    seconds = time.perf_counter() - t0
    fields = asdict(info) if hasattr(info, "__dataclass_fields__") else dict(info) if isinstance(info, dict) else {"info": repr(info)}
    fields = {k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in fields.items()}
    name = next((fields[k] for k in ("index_name", "index", "name") if isinstance(fields.get(k), str)), None)
    out: dict[str, Any] = {"call_seconds": round(seconds, 2), "info": fields, "arguments": kwargs}
    if name:
        with server.admin(ds.name) as conn:
            regclass = conn.execute("SELECT to_regclass(%s)::text", (name,)).fetchone()[0]  # type: ignore[index]
            if regclass:
                out["index"] = regclass
                out["bytes"] = _size(conn, regclass)
                out["definition"] = conn.execute("SELECT pg_get_indexdef(%s::regclass)", (regclass,)).fetchone()[0]  # type: ignore[index]
    return out


EF_VALUES = (40, 100, 200, 400, 600, 800, 1000)


def ef_sweep(server: BenchServer, ds: Dataset, key: int, queries: list[Query], rounds: int, batch: int,
             warmup: int) -> dict[str, Any]:
    """The large tenant's own index walked directly (admin, psycopg, one pipeline each: ``SET LOCAL
    hnsw.ef_search``, iterative scan, the partial index's predicate), at each of EF_VALUES,
    interleaved: what recall and latency each candidate-list size gives on this tenant."""
    statement = (f"WITH r AS MATERIALIZED (SELECT id, embedding <=> %(q)s::vector AS distance FROM public.knowledge_chunks"
                 f" WHERE rtv_secret.search_partition(search_key) = {int(key)} ORDER BY embedding <=> %(q)s::vector LIMIT {K})"
                 " SELECT id FROM r ORDER BY distance")
    n = len(queries)
    conns: list[psycopg.Connection[Any]] = []
    got: dict[str, dict[int, list[uuid.UUID]]] = {}
    fns: dict[str, Callable[[int], None]] = {}
    for ef in EF_VALUES:
        conn = psycopg.connect(to_libpq_url(server.url_for(ds.name)))
        conns.append(conn)
        name = f"ef_search_{ef}"
        got[name] = {}

        def walk(i: int, conn: psycopg.Connection[Any] = conn, ef: int = ef, name: str = name) -> None:
            q = queries[i % n]
            with conn.pipeline():
                conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                cur = conn.execute(statement, {"q": _literal(q.values)})
            rows = cur.fetchall()
            conn.commit()
            got[name][i % n] = [r[0] for r in rows]

        fns[name] = walk
    try:
        stats = interleave(fns, rounds=rounds, batch=batch, warmup=warmup, baseline=None)
        with conns[0].transaction():
            plan = [r[0] for r in conns[0].execute("EXPLAIN (COSTS OFF) " + statement, {"q": _literal(queries[0].values)})]
    finally:
        for conn in conns:
            conn.close()
    q = quality(queries, got)
    return {"rounds": rounds, "batch": batch, "warmup": warmup, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "plan": _elide(plan),
            "variants": {name: {"ef_search": int(name.rsplit("_", 1)[1]), "p50_ms": round(st.median_us / 1000, 3),
                                "p95_ms": round(st.p95_us / 1000, 3), "n": st.n, **q[name]} for name, st in stats.items()}}


# -- running ------------------------------------------------------------------------------------


def _head() -> dict[str, Any]:
    """The commit, and the files of src/ that differ from it (the code that ran, if any)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True, cwd=root).stdout  # noqa: E731
        return {"commit": git("rev-parse", "--short", "HEAD").strip(),
                "src_changes": [line[3:] for line in git("status", "--porcelain", "src").splitlines()]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "src_changes": []}


def run(sizes: Sizes, database_url: str | None, say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    started, started_at = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    say(f"corpus: {sizes.small_tenants} x {sizes.small_chunks} + 1 x {sizes.large_chunks} chunks, {DIM} dimensions")
    corpus = make_corpus(sizes)
    server = BenchServer(database_url, progress=progress, server_settings={"shared_buffers": SHARED_BUFFERS})
    res: dict[str, Any] = {
        "started_at": started_at, "head": _head(), "sizes": asdict(sizes), "machine": machine_info(),
        "server": {"version": server.server_version(), "embedded": database_url is None,
                   "settings": server.settings_of_interest()},
        "corpus": {"dimensions": DIM, "global_topics": GLOBAL_TOPICS, "tenant_offset": TENANT_OFFSET,
                   "chunk_sigma": CHUNK_SIGMA, "query_sigma": QUERY_SIGMA, "foreign_share": FOREIGN_SHARE, "k": K},
    }
    try:
        with server.admin() as conn:
            res["server"]["pgvector"] = conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]  # type: ignore[index]
            # what an HNSW build may use (index_tenant sets maintenance_work_mem in its own session)
            res["server"]["settings"]["max_parallel_maintenance_workers"] = conn.execute(
                "SHOW max_parallel_maintenance_workers").fetchone()[0]  # type: ignore[index]
        ds = server.create("search")
        say("loading")
        res["load"] = load(server, ds, corpus, say)
        say("baselines")
        res["baselines"] = build_baselines(server, ds, say)
        sample = corpus.small[:: max(1, len(corpus.small) // sizes.sample)][: sizes.sample]
        n_small = max(sizes.warmup, sizes.small_rounds * sizes.small_batch)
        n_large = max(sizes.warmup, sizes.large_rounds * sizes.large_batch)
        small_q = make_queries(corpus, sample, n_small, seed=1)
        large_q = make_queries(corpus, [corpus.large], n_large, seed=2)
        res["measurements"] = {}
        say(f"small tenants ({sizes.small_chunks} chunks, {len(sample)} sampled): interleaved")
        res["measurements"]["small"] = measure(server, ds, small_q, sizes.small_rounds, sizes.small_batch, sizes.warmup)
        say(f"large tenant ({sizes.large_chunks} chunks), before its index: interleaved")
        res["measurements"]["large_before_index"] = measure(server, ds, large_q, sizes.large_rounds, sizes.large_batch, sizes.warmup)
        say("per-tenant index for the large tenant (rtv_db.search_index.index_tenant)")
        indexed = index_large_tenant(server, ds, corpus.large)
        res["tenant_index"] = indexed
        if indexed is not None and "error" in indexed:
            say(f"  index_tenant failed: {indexed['error']}")
        elif indexed is not None:
            say(f"  {indexed.get('index')}: {indexed['call_seconds']} s")
            say("large tenant, after its index: interleaved")
            key = (indexed.get("info") or {}).get("search_key")
            if isinstance(key, int):
                say(f"  the large tenant's index walked directly at hnsw.ef_search {', '.join(map(str, EF_VALUES))}: interleaved")
                res["ef_sweep"] = ef_sweep(server, ds, key, large_q, sizes.large_rounds, sizes.large_batch, sizes.warmup)
            res["measurements"]["large_after_index"] = measure(server, ds, large_q, sizes.large_rounds, sizes.large_batch,
                                                               sizes.warmup, ALL_VARIANTS[:3])  # plain SQL: exact, measured before
            # Alone: no other variant's walk between its batches (at PostgreSQL's default 128 MB of
            # shared_buffers, which held neither HNSW index, it was 8.9 ms p50 alone, 14.1 interleaved).
            say("large tenant, after its index: rtv-db alone")
            res["measurements"]["large_after_index_alone"] = measure(server, ds, large_q, sizes.large_rounds, sizes.large_batch,
                                                                     sizes.warmup, ("rtvdb",))
        else:
            say("  rtv_db.search_index not available: skipped")
        res["seconds"] = round(time.perf_counter() - started, 1)
        return res
    finally:
        server.close()


# -- the report ---------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MB"


_LABELS = {
    "rtvdb": "rtv-db `similar_chunks`, runtime role",
    "pgvector_hnsw": "pgvector, one HNSW over all tenants, tenant filter, `iterative_scan = relaxed_order`",
    "exact_scan": "plain exact scan (client_id btree, no vector index)",
    "rtvdb_plain_sql": "rtv-db's exact search as one plain statement, no CTE (runtime role, `scoped_transaction`; a measuring device)",
}
_MEASUREMENTS = {
    "small": "{small_chunks:,}-chunk tenants ({sample} sampled)",
    "large_before_index": "{large_chunks:,}-chunk tenant, before its per-tenant index",
    "large_after_index": "{large_chunks:,}-chunk tenant, after `index_tenant`",
    "large_after_index_alone": "{large_chunks:,}-chunk tenant, after `index_tenant`, rtv-db alone (no other variant between its batches)",
}


_SCAN = re.compile(r"((?:Parallel )?(?:Index Only Scan|Index Scan|Seq Scan|Bitmap Heap Scan|Bitmap Index Scan|CTE Scan)"
                   r"(?: using \S+)?(?: on \S+)?)")
_VECTOR = re.compile(r"'\[[^\]]*\]'::vector")


def _elide(plan: list[str]) -> list[str]:
    return [_VECTOR.sub("'[...384 values...]'::vector", line) for line in plan]


def _scan_nodes(plan: list[str]) -> str:
    return "; ".join(dict.fromkeys(m.group(1) for line in plan if (m := _SCAN.search(line)))) or "-"


def markdown(r: dict[str, Any], command: str) -> str:
    m, s, sz = r["machine"], r["server"], r["sizes"]
    load = r["load"]
    lines = [
        "# Similarity search benchmark (issue 14)",
        "",
        f"Run `{sz['name']}` started {r['started_at']} at commit `{r['head']['commit']}`"
        + (f" (src/ differing from it: {', '.join(r['head']['src_changes'])})" if r["head"]["src_changes"] else "")
        + f", took {r['seconds']} s: `{command}`.",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, {m['os']}; Python {m['python']}, "
        f"psycopg {m['psycopg']}. Server: {s['version'].split(' on ')[0]} ({'embedded, throw-away' if s['embedded'] else 'given URL'}), "
        f"pgvector {s.get('pgvector')}, " + ", ".join(f"{k} {v}" for k, v in s["settings"].items()) + ".",
        "The machine is shared with other work (load average at each measurement below).",
        "",
        f"Data: {sz['small_tenants']:,} tenants × {sz['small_chunks']} chunks + one tenant × {sz['large_chunks']:,} chunks = "
        f"{load['chunks']:,} rows of `knowledge_chunks`, 384-dimension clustered embeddings "
        f"({r['corpus']['global_topics']} global topics shared by all tenants; {sz['small_centres']} centres per small tenant, "
        f"{sz['large_centres']} for the large one; see bench/search.py). COPY (binary) as the system role in "
        f"{load['copy_seconds']} s, in one transaction with `SET LOCAL rtv.audit_bulk_load = 'on'` (rtv-db's bulk switch "
        f"for the system role: {load['audit_events_of_the_load']} audit events from the load). Queries: top {r['corpus']['k']} by cosine distance, "
        f"{round(100 * (1 - r['corpus']['foreign_share']))} % near one of the tenant's own centres, "
        f"{round(100 * r['corpus']['foreign_share'])} % near a random global topic. Recall@10 is against an exact search in numpy; "
        "*distance excess*: how much farther (mean cosine distance) the tenant's chunks returned are than the exact top 10.",
        "",
        "## Latency and recall",
        "",
        "Variants interleaved in rounds (bench/harness.py), the same query sequence for each.",
        "",
    ]
    for key, title in _MEASUREMENTS.items():
        meas = r["measurements"].get(key)
        if meas is None:
            continue
        lines += [f"### {title.format(**sz)}", "",
                  f"{meas['rounds']} rounds × {meas['batch']} searches per variant after {meas['warmup']} warm-up, "
                  f"{meas['distinct_queries']} distinct queries, {meas['seconds']} s, load average {meas['loadavg']}"
                  + (f"; rtv-db's transaction settings: {', '.join(f'`{n} = {v}`' for n, v in meas['rtvdb_transaction_settings'])}"
                     if meas.get("rtvdb_transaction_settings") else "") + ".", "",
                  "| variant | p50 ms | p95 ms | p50 × exact | recall@10 | own topic | foreign topic | min | < k | other tenants' chunks"
                  " | distance excess (own / foreign) | plan |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, v in meas["variants"].items():
            rc = v["recall_at_10"]
            lines.append(f"| {_LABELS[name]} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {_fmt(v['x_exact_scan_p50'], 2)} | "
                         f"{rc['all']:.4f} | {_fmt(rc['own_topic'])} | {_fmt(rc['foreign_topic'])} | {v['min_recall']:.1f} | "
                         f"{v['fewer_than_k']} | {v['other_tenants_chunks']} | {_excess(v)} | {_scan_nodes(meas['plans'][name])} |")
        lines.append("")
    sweep = r.get("ef_sweep")
    if sweep:
        lines += ["### The large tenant's own index walked directly, by `hnsw.ef_search`", "",
                  f"Admin, psycopg, `SET LOCAL hnsw.ef_search`, `hnsw.iterative_scan = relaxed_order`, the partial index's predicate "
                  f"`rtv_secret.search_partition(search_key) = <key>`; {sweep['rounds']} rounds × {sweep['batch']} per value, interleaved, the same queries as above, "
                  f"load average {sweep['loadavg']}. Plan: {_scan_nodes(sweep['plan'])}.", "",
                  "| ef_search | p50 ms | p95 ms | recall@10 | own topic | foreign topic | min | distance excess (own / foreign) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v in sweep["variants"].values():
            rc = v["recall_at_10"]
            lines.append(f"| {v['ef_search']} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {rc['all']:.4f} | {_fmt(rc['own_topic'])} | "
                         f"{_fmt(rc['foreign_topic'])} | {v['min_recall']:.1f} | {_excess(v)} |")
        lines.append("")
    lines += _targets(r)
    lines += ["## Indexes: sizes and build times", "", "| index | rows | size | build s |", "|---|---:|---:|---:|"]
    b = r["baselines"]
    lines.append(f"| baseline `hnsw_chunks_embedding_idx` (HNSW over every tenant, m 16, ef_construction 64) | {load['chunks']:,} | "
                 f"{_mb(b['hnsw_chunks']['bytes'])} | {b['hnsw_chunks']['build_seconds']} |")
    lines.append(f"| baseline `exact_chunks_pkey` (btree (client_id, id)) | {load['chunks']:,} | {_mb(b['exact_chunks']['bytes'])} | "
                 f"{b['exact_chunks']['build_seconds']} |")
    ti = r.get("tenant_index")
    if ti and "error" in ti:
        lines += ["", f"`index_tenant` failed after {ti['call_seconds']} s: `{ti['error']}`."]
        ti = None
    if ti:
        lines.append(f"| per-tenant index of the large tenant, `{ti.get('index')}` (`index_tenant`, call time) | {sz['large_chunks']:,} | "
                     f"{_mb(ti.get('bytes'))} | {ti['call_seconds']} |")
    for name, n in load["indexes"].items():
        if not name.startswith("knowledge_chunks_search_"):
            lines.append(f"| `{name}` (rtv-db's schema, built during the COPY) | {load['chunks']:,} | {_mb(n)} | - |")
    lines += ["", f"Tables: `knowledge_chunks` {_mb(load['table_bytes'])}, baseline copies {_mb(b['hnsw_chunks']['table_bytes'])} each. "
              f"The baseline HNSW is built with `maintenance_work_mem = 2GB` in its session (the per-tenant index: `index_tenant`'s "
              f"own `maintenance_work_mem`); query settings: "
              + ", ".join(f"`{k} = {v}`" for k, v in b["hnsw_settings"].items()) + ".", ""]
    if ti:
        lines += [f"Per-tenant index: `{ti.get('definition')}`; `index_tenant` returned `{json.dumps(ti['info'], default=str)}`.", ""]
    else:
        lines += ["No per-tenant index: `rtv_db.search_index` was not available in this tree.", ""]
    lines += ["## Plans (EXPLAIN ANALYZE of the first query)", ""]
    for key, meas in r["measurements"].items():
        for name, plan in meas["plans"].items():
            lines += [f"`{key}` / `{name}`:", "", "```", *plan, "```", ""]
    return "\n".join(lines)


def _targets(r: dict[str, Any]) -> list[str]:
    """Issue 14's targets on rtv-db's figures: p50 <= 5 ms (small), <= 10 ms (large); recall@10
    1.0 up to 10,000 chunks, >= 0.98 above."""
    sz, meas = r["sizes"], r["measurements"]
    rows = []
    for key, limit in (("small", 5.0), ("large_before_index", 10.0), ("large_after_index", 10.0),
                       ("large_after_index_alone", 10.0)):
        if key not in meas:
            continue
        v = meas[key]["variants"]["rtvdb"]
        chunks = sz["small_chunks"] if key == "small" else sz["large_chunks"]
        floor = 1.0 if chunks <= 10_000 else 0.98
        rc = v["recall_at_10"]["all"]
        rows.append(f"| {_MEASUREMENTS[key].format(**sz)} | {v['p50_ms']:.2f} ms (≤ {limit:g}: **{'met' if v['p50_ms'] <= limit else 'not met'}**) | "
                    f"{rc:.4f} ({'=' if floor == 1.0 else '≥'} {floor:g}: **{'met' if rc >= floor else 'not met'}**) |")
    return ["## Issue 14's targets (rtv-db)", "", "| tenant | p50 | recall@10 |", "|---|---|---|", *rows, ""]


def _excess(v: dict[str, Any]) -> str:
    e = v["distance_excess"]
    # never negative but for float rounding (the exact top 10 has the least mean distance)
    return " / ".join("-" if e[k] is None else f"{max(0.0, 100 * e[k]):.2f} %" for k in ("own_topic", "foreign_topic"))


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(r: dict[str, Any]) -> str:
    out = []
    for key, meas in r["measurements"].items():
        out.append(f"{key}:")
        for name, v in meas["variants"].items():
            out.append(f"  {name:<16} p50 {v['p50_ms']:8.2f} ms  p95 {v['p95_ms']:8.2f} ms  recall@10 {v['recall_at_10']['all']:.4f}"
                       f"  <k {v['fewer_than_k']}  foreign {v['other_tenants_chunks']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (well under a minute): checks the benchmark runs")
    p.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks, or build/bench-smoke with --smoke)")
    p.add_argument("--database-url", default=None, help="a superuser URL of a server to use instead of a throw-away embedded one")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", type=Path, default=None, help="only write search.md again from a run's search.json")
    p.add_argument("--small-tenants", type=int, default=None, help="override the number of small tenants")
    p.add_argument("--large-chunks", type=int, default=None, help="override the large tenant's chunk count")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the system scope's one line per load is expected
    say = lambda msg: print(f"bench.search {msg}", file=sys.stderr, flush=True)  # noqa: E731
    sizes = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("small_tenants", args.small_tenants), ("large_chunks", args.large_chunks)) if v is not None}
    if overrides:
        sizes = replace(sizes, name=sizes.name + "-custom", **overrides)
    out = args.out or (Path("build/bench-smoke") if args.smoke else Path("docs/benchmarks"))
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        (out / "search.md").write_text(markdown(res, res["command"]) + "\n")
        return 0
    command = "PYTHONPATH=src:. .venv/bin/python -m bench.search" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    res = run(sizes, args.database_url, say, progress=not args.no_progress)
    res["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "search.md").write_text(markdown(res, command) + "\n")
    print(_table(res))
    say(f"done in {res['seconds']} s: {out / 'search.md'}, {out / 'search.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
