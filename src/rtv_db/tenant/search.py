"""Similarity search over one tenant's knowledge chunks (issue 14, first part: exact search).

``scope.similar_chunks(embedding, k=10)`` returns the tenant's ``k`` nearest chunks with their
distance, nearest first. The search is exact within the tenant: the tenant's chunks (through the
``client_id`` index, under RLS) are gathered in a ``MATERIALIZED`` CTE and ranked there, so no
index that holds other tenants' vectors is walked. The HNSW index over every tenant's embeddings
therefore does no work for a tenant's search, and ``EXPLAIN ANALYZE`` of a search does not depend
on what other tenants store (a filtered HNSW walk reports how many candidates it threw away,
which maps where other tenants' vectors lie). Recall is 1.0 by construction; the cost grows with
the tenant's chunk count (large tenants: see docs/search.md).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import text

from ..errors import InvalidInputError
from ..schema.models import EMBEDDING_DIM
from .context import TenantContext, parse_uuid

__all__ = ["Metric", "SimilarChunk", "similar_chunks_statement", "MAX_K"]

Metric = Literal["cosine", "l2", "inner_product"]
MAX_K: Final = 1000
# pgvector's operators: cosine distance, Euclidean distance, negative inner product.
_OPERATORS: Final = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}


@dataclass(frozen=True)
class SimilarChunk:
    """One result: the chunk's fields (``embedding`` only when asked for) and its distance."""

    id: uuid.UUID
    knowledge_base_id: uuid.UUID
    content: str
    metadata: dict[str, Any]
    distance: float
    embedding: list[float] | None = None


def _vector_literal(embedding: Sequence[float]) -> str:
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
    return "[" + ",".join(values) + "]"


def similar_chunks_statement(
    context: TenantContext,
    embedding: Sequence[float],
    k: int,
    *,
    knowledge_base_id: uuid.UUID | str | None,
    metric: str,
    max_distance: float | None,
    with_embedding: bool,
) -> tuple[Any, dict[str, Any]]:
    """The SQL and parameters of one search, validated (``InvalidInputError``, nothing sent)."""
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
        params["max_distance"] = float(max_distance)
        distance_filter = " WHERE distance <= :max_distance"
    sql = f"""
        WITH mine AS MATERIALIZED (
            SELECT id, knowledge_base_id, content, metadata, embedding
            FROM knowledge_chunks
            WHERE client_id = :tenant{kb_filter} AND embedding IS NOT NULL
        ), ranked AS (
            SELECT id, knowledge_base_id, content, metadata, {"embedding, " if with_embedding else ""}
                   embedding {operator} CAST(:q AS vector) AS distance
            FROM mine
        )
        SELECT * FROM ranked{distance_filter}
        ORDER BY distance, id
        LIMIT :k
    """
    return text(sql), params


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
