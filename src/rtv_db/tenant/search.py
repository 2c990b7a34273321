"""Similarity search over one tenant's knowledge chunks (issue 14).

``scope.similar_chunks(embedding, k=10)`` returns the tenant's ``k`` nearest chunks with their
distance, nearest first. No index that holds another tenant's vectors is ever walked (revision
0007 dropped the HNSW index over every tenant: a filtered walk of it reports how many candidates
it threw away, which maps where other tenants' vectors lie). Two plans:

* **Exact** (every tenant, by default): the tenant's chunks (``client_id = :tenant``, under RLS)
  ranked by a top-N sort on a distance no vector index can order by, so no index walk is ever
  chosen. Recall is 1.0; the cost grows with the tenant's chunk count.
* **The tenant's own HNSW index** (cosine), once ``rtv-db search index`` built it
  (rtv_db.search_index): a partial index on the tenant's opaque ``search_key``, walked by
  ``rtv.search_own_index`` (revision 0011), a SECURITY DEFINER function that reads the tenant
  from the verified context and its key from the owner's map. The runtime role cannot write the
  index's predicate itself, so no statement of any tenant walks another's index (and counts its
  rows in ``EXPLAIN ANALYZE``). The function walks with ``hnsw.ef_search`` at least ``k`` and
  iterative scan on, so a filter on a knowledge base still yields ``k`` results.

Which plan a tenant gets is read from ``rtv.current_search_key()`` (NULL until its index is
ready), cached per engine for :data:`SEARCH_KEY_TTL` seconds. A stale answer is still correct:
with no index ready the function returns no rows, and the search is done exactly instead.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import text

from ..errors import InvalidInputError
from ..schema.models import EMBEDDING_DIM
from .context import TenantContext, parse_uuid

__all__ = ["EF_SEARCH", "MAX_K", "SEARCH_KEY_TTL", "Metric", "SearchPlan", "SimilarChunk", "async_similar_chunk_models",
           "similar_chunk_models", "similar_chunks_statement"]

Metric = Literal["cosine", "l2", "inner_product"]
MAX_K: Final = 1000
# pgvector's operators: cosine distance, Euclidean distance, negative inner product.
_OPERATORS: Final = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}
# The metric the per-tenant indexes serve (vector_cosine_ops); the others are always exact.
INDEXED_METRIC: Final = "cosine"
# hnsw.ef_search of a search on a tenant's own index: the candidate list, at least k (pgvector's
# ceiling is 1000, MAX_K). On the bench corpus (100,000 chunks, m 16, ef_construction 200),
# walking the index directly: recall@10 0.965 at 200, 0.975 at 400, 0.979 at 800 and 0.987 at
# 1000, at p50 5.1, 6.1, 7.5 and 8.8 ms; through similar_chunks at 400, 8.5 ms p50 (the full run
# of docs/benchmarks/search.md). The recall lost is on queries near topics the tenant has no
# chunks on; near its own topics it is 1.0. On 3,000 chunks of gaussian clusters
# (tests/test_search_index.py): 0.67 at pgvector's default of 40, 0.95 at 100, 0.996 at 200.
# rtv.search_own_index (revision 0011) sets it, max(k, this); a test checks the two agree.
EF_SEARCH: Final = 400
SEARCH_KEY_TTL: Final = 30.0


@dataclass(frozen=True)
class SimilarChunk:
    """One result: the chunk's fields (``embedding`` only when asked for) and its distance."""

    id: uuid.UUID
    knowledge_base_id: uuid.UUID
    content: str
    metadata: dict[str, Any]
    distance: float
    embedding: list[float] | None = None


class _VectorLiteral(str):
    """An embedding already checked and written as pgvector's text form."""


def _vector_literal(embedding: Sequence[float]) -> str:
    if isinstance(embedding, _VectorLiteral):
        return embedding
    if isinstance(embedding, (str, bytes)) or not isinstance(embedding, Sequence):
        raise InvalidInputError("embedding must be a sequence of numbers")
    if len(embedding) != EMBEDDING_DIM:
        raise InvalidInputError(f"embedding must have {EMBEDDING_DIM} dimensions, not {len(embedding)}")
    values = []
    for value in embedding:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError("embedding values must be numbers")
        if not math.isfinite(value):
            raise InvalidInputError("embedding values must be finite (no NaN or infinity)")
        values.append(repr(float(value)))
    return _VectorLiteral("[" + ",".join(values) + "]")


def similar_chunks_statement(
    context: TenantContext,
    embedding: Sequence[float],
    k: int,
    *,
    knowledge_base_id: uuid.UUID | str | None,
    metric: str,
    max_distance: float | None,
    with_embedding: bool,
    search_key: int | None = None,
) -> tuple[Any, dict[str, Any], tuple[tuple[str, str], ...]]:
    """The SQL, parameters and transaction settings of one search, validated
    (``InvalidInputError``, nothing sent). ``search_key``: the tenant's, when its index is ready
    (then the statement is a call of ``rtv.search_own_index``, which reads the key itself)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInputError(f"k must be an integer from 1 to {MAX_K}")
    operator = _OPERATORS.get(metric) if isinstance(metric, str) else None
    if operator is None:
        raise InvalidInputError(f"metric must be one of {', '.join(_OPERATORS)}")
    if max_distance is not None and (isinstance(max_distance, bool) or not isinstance(max_distance, (int, float))
                                     or not math.isfinite(max_distance)):
        raise InvalidInputError("max_distance must be a finite number")
    params: dict[str, Any] = {"tenant": context.tenant_id, "q": _vector_literal(embedding), "k": k}
    kb_filter = ""
    if knowledge_base_id is not None:
        try:
            params["kb"] = parse_uuid(knowledge_base_id, "knowledge_base_id")
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        kb_filter = " AND knowledge_base_id = :kb"
    distance_filter = ""
    if max_distance is not None:
        # Filtering the k nearest by distance gives the nearest within the distance: exact.
        params["max_distance"] = float(max_distance)
        distance_filter = " WHERE distance <= :max_distance"
    columns = f"id, knowledge_base_id, content, metadata, {'embedding, ' if with_embedding else ''}"
    if search_key is not None and metric == INDEXED_METRIC:
        # The walk is rtv.search_own_index's (revision 0011): it finds the tenant's key itself,
        # and sets ef_search (max(k, 400)), iterative scan and enable_sort for its own duration.
        # max_distance is applied by SearchPlan to the k rows of the walk, which tell it whether
        # the walk fell short.
        params.pop("max_distance", None)
        params.pop("tenant")  # the function reads the tenant from the verified context
        params["kb"] = params.get("kb")
        params["with_embedding"] = with_embedding
        sql = f"""
            SELECT {columns}distance
            FROM rtv.search_own_index(CAST(:q AS text), :k, CAST(:kb AS uuid), :with_embedding)
            ORDER BY distance, id
        """
        return text(sql), params, ()
    # "+ 0": an ORDER BY that no vector index can serve, so this plan never walks one, whatever
    # indexes exist (one over several tenants' vectors, which verify reports as
    # VECTOR_INDEX_SHARED, or another tenant's own); the k nearest are kept by a top-N sort over
    # the tenant's rows. (Until revision 0007 a MATERIALIZED CTE did this; it carried every
    # column of every row of the tenant, and spilled to disk for a large one.)
    sql = f"""
        SELECT * FROM (
            SELECT {columns}(embedding {operator} CAST(:q AS vector)) + 0 AS distance
            FROM knowledge_chunks
            WHERE client_id = :tenant{kb_filter} AND embedding IS NOT NULL
            ORDER BY distance, id
            LIMIT :k
        ) nearest{distance_filter}
        ORDER BY distance, id
    """
    return text(sql), params, ()


SEARCH_KEY_STATEMENT: Final = text("SELECT rtv.current_search_key()")


class SearchKeys:
    """Each tenant's search key as last read, per engine, for :data:`SEARCH_KEY_TTL` seconds."""

    def __init__(self) -> None:
        self._by_engine: weakref.WeakKeyDictionary[Any, dict[uuid.UUID, tuple[int | None, float]]] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def get(self, engine: Any, tenant: uuid.UUID) -> tuple[bool, int | None]:
        """``(known, key)``: known is false when the key must be read again."""
        with self._lock:
            entry = self._by_engine.get(engine, {}).get(tenant)
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def put(self, engine: Any, tenant: uuid.UUID, key: int | None) -> None:
        with self._lock:
            self._by_engine.setdefault(engine, {})[tenant] = (key, time.monotonic() + SEARCH_KEY_TTL)

    def clear(self) -> None:
        with self._lock:
            self._by_engine.clear()


search_keys: Final = SearchKeys()


class SearchPlan:
    """One validated search (``InvalidInputError`` at construction, nothing sent), exact until
    the tenant's key says it has an index: the sync and async callers share it."""

    def __init__(self, context: TenantContext, embedding: Sequence[float], k: int, **options: Any) -> None:
        self.context, self.k, self.options = context, k, options
        self.statement, self.params, self.settings = similar_chunks_statement(context, embedding, k, **options)
        self.embedding = self.params["q"]  # checked and written once
        self.indexed = False  # walking the tenant's own index

    def needs_key(self, engine: Any) -> bool:
        """True when the tenant's key must be read (``SEARCH_KEY_STATEMENT``) and given to :meth:`use_key`."""
        if self.options.get("metric") != INDEXED_METRIC:
            return False
        known, key = search_keys.get(engine, self.context.tenant_id)
        if known:
            self._use(key)
        return not known

    def use_key(self, engine: Any, key: int | None) -> None:
        search_keys.put(engine, self.context.tenant_id, key)
        self._use(key)

    def _use(self, key: int | None) -> None:
        if key is not None and self.options.get("metric") == INDEXED_METRIC:
            self.statement, self.params, self.settings = similar_chunks_statement(
                self.context, self.embedding, self.k, search_key=key, **self.options)
            self.indexed = True

    def fell_short(self, rows: Sequence[Any]) -> bool:
        """True when the index walk gave fewer than k rows (a knowledge base with fewer chunks, or
        pgvector's hnsw.max_scan_tuples reached under a filter): the plan is then the exact one,
        to be run instead, so that a search never returns fewer than k of the tenant's chunks."""
        if not self.indexed or len(rows) >= self.k:
            return False
        self.statement, self.params, self.settings = similar_chunks_statement(
            self.context, self.embedding, self.k, **self.options)
        self.indexed = False
        return True

    def rows(self, rows: Sequence[Any]) -> list[Any]:
        """The result rows, ``max_distance`` applied where the SQL did not apply it."""
        limit = self.options.get("max_distance")
        if not self.indexed or limit is None:
            return list(rows)
        return [r for r in rows if r._mapping["distance"] <= limit]

    def settings_statement(self) -> tuple[Any, dict[str, str]] | None:
        """The transaction settings as one statement, for a transaction already begun (the ORM's)."""
        if not self.settings:
            return None
        calls = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(self.settings)))
        params = {f"{p}{i}": x for i, pair in enumerate(self.settings) for p, x in zip(("n", "v"), pair, strict=True)}
        return text(f"SELECT {calls}"), params


def to_results(rows: Sequence[Any], with_embedding: bool) -> list[SimilarChunk]:
    out = []
    for row in rows:
        m = row._mapping
        embedding = m["embedding"] if with_embedding else None
        if isinstance(embedding, str):  # pgvector's text form, '[1,2,3]'
            embedding = [float(x) for x in embedding.strip("[]").split(",")]
        out.append(SimilarChunk(
            id=m["id"], knowledge_base_id=m["knowledge_base_id"], content=m["content"], metadata=m["metadata"],
            distance=float(m["distance"]),
            embedding=[float(x) for x in embedding] if embedding is not None else None,
        ))
    return out


# -- the ORM form -------------------------------------------------------------------------------


def _session_context(session: Any) -> TenantContext:
    from ..errors import MissingTenantContextError
    from .orm import SESSION_CONTEXT_KEY

    context = session.info.get(SESSION_CONTEXT_KEY)
    if not isinstance(context, TenantContext):
        raise MissingTenantContextError("similar_chunk_models needs a tenant session (scope.session())")
    return context


def _models_by_id(rows: Sequence[Any], models: Sequence[Any]) -> list[tuple[Any, float]]:
    by_id = {m.id: m for m in models}
    return [(by_id[r.id], float(r.distance)) for r in rows if r.id in by_id]


def _models_select(rows: Sequence[Any]) -> Any:
    from sqlalchemy import select

    from ..schema.models import KnowledgeChunk

    return select(KnowledgeChunk).where(KnowledgeChunk.id.in_([r.id for r in rows]))


def similar_chunk_models(session: Any, embedding: Sequence[float], k: int = 10, *,
                         knowledge_base_id: uuid.UUID | str | None = None, metric: str = "cosine",
                         max_distance: float | None = None) -> list[tuple[Any, float]]:
    """``scope.similar_chunks`` for the ORM: ``(KnowledgeChunk, distance)`` pairs, nearest first,
    loaded in ``session`` (a tenant session), so they are the session's objects to change."""
    plan = SearchPlan(_session_context(session), embedding, k, knowledge_base_id=knowledge_base_id, metric=metric,
                      max_distance=max_distance, with_embedding=False)
    engine = session.get_bind().engine
    if plan.needs_key(engine):
        plan.use_key(engine, session.execute(SEARCH_KEY_STATEMENT).scalar())
    if (settings := plan.settings_statement()) is not None:
        session.execute(*settings)
    rows = list(session.execute(plan.statement, plan.params))
    if plan.fell_short(rows):
        rows = list(session.execute(plan.statement, plan.params))
    rows = plan.rows(rows)
    return _models_by_id(rows, session.scalars(_models_select(rows)).all())


async def async_similar_chunk_models(session: Any, embedding: Sequence[float], k: int = 10, *,
                                     knowledge_base_id: uuid.UUID | str | None = None, metric: str = "cosine",
                                     max_distance: float | None = None) -> list[tuple[Any, float]]:
    """The asyncio twin of :func:`similar_chunk_models`, for an ``AsyncSession``."""
    plan = SearchPlan(_session_context(session), embedding, k, knowledge_base_id=knowledge_base_id, metric=metric,
                      max_distance=max_distance, with_embedding=False)
    engine = session.get_bind().engine
    if plan.needs_key(engine):
        plan.use_key(engine, (await session.execute(SEARCH_KEY_STATEMENT)).scalar())
    if (settings := plan.settings_statement()) is not None:
        await session.execute(*settings)
    rows = list(await session.execute(plan.statement, plan.params))
    if plan.fell_short(rows):
        rows = list(await session.execute(plan.statement, plan.params))
    rows = plan.rows(rows)
    return _models_by_id(rows, (await session.scalars(_models_select(rows))).all())
