"""Bulk synthetic data: N tenants x M rows each, loaded with COPY through the system role.

What one tenant gets (``rows`` = M):

* one ``clients`` row, slug ``synthetic-<index>`` (6+ digits);
* ``rows`` brand kits (the table the benchmarks read);
* one platform account and one knowledge base;
* ``rows * chunk_ratio`` knowledge chunks (embedding NULL unless ``embeddings=True``);
* ``rows * action_ratio`` platform actions on the account, lane ``api``.

Ids are deterministic (:func:`synthetic_tenant_id`, :func:`synthetic_row_id`), so a benchmark
can pick rows without reading them back. Tenants are loaded in batches, one transaction per
batch, each tenant whole inside one batch: an interrupted load leaves complete tenants only,
and ``if_exists="skip"`` resumes it. Loading over existing synthetic tenants with the default
``if_exists="fail"`` raises :class:`~rtv_db.errors.SyntheticDataExistsError` before writing.

COPY fires row triggers (foreign-key checks, and the audit trail's triggers when present), so
their cost is part of the load time; the system role cannot disable them, by design.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from ..config import to_libpq_url
from ..errors import InvalidInputError, SyntheticDataExistsError

__all__ = [
    "SyntheticResult",
    "load_synthetic",
    "synthetic_tenant_id",
    "synthetic_row_id",
    "synthetic_slug",
    "SLUG_PREFIX",
    "KIND_BRAND_KIT",
    "KIND_PLATFORM_ACCOUNT",
    "KIND_KNOWLEDGE_BASE",
    "KIND_KNOWLEDGE_CHUNK",
    "KIND_PLATFORM_ACTION",
]

_log = logging.getLogger("rtv_db.system")

SLUG_PREFIX = "synthetic-"
KIND_PLATFORM_ACCOUNT = 1
KIND_BRAND_KIT = 2
KIND_KNOWLEDGE_BASE = 3
KIND_KNOWLEDGE_CHUNK = 4
KIND_PLATFORM_ACTION = 5
_MAX_TENANTS = 16**8  # the tenant index fills the first 8 hex digits of row ids
_MAX_ROWS = 16**12
_VOICES = ("neutral", "friendly", "professional", "playful")
_PLATFORMS = ("instagram", "x", "linkedin", "tiktok", "facebook", "youtube", "threads")
_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


def synthetic_tenant_id(index: int) -> uuid.UUID:
    """The id of synthetic tenant ``index`` (a well-formed version-4-shaped UUID)."""
    return uuid.UUID(_tenant_text(index))


def synthetic_row_id(kind: int, tenant_index: int, row: int) -> uuid.UUID:
    """The id of row ``row`` of ``kind`` (``KIND_*``) of synthetic tenant ``tenant_index``."""
    return uuid.UUID(_row_text(kind, tenant_index, row))


def synthetic_slug(index: int) -> str:
    return f"{SLUG_PREFIX}{index:06d}"


def _tenant_text(index: int) -> str:
    return f"5e000000-0000-4000-8000-{index:012x}"


def _row_text(kind: int, tenant_index: int, row: int) -> str:
    return f"{tenant_index:08x}-{kind:04x}-4000-8000-{row:012x}"


@dataclass
class SyntheticResult:
    """What a load wrote (tenants skipped because they existed are not counted)."""

    tenants: int
    rows_per_tenant: int
    first_tenant: int
    skipped_tenants: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_second(self) -> float:
        return self.total_rows / self.seconds if self.seconds > 0 else 0.0


# -- COPY text lines, one generator per table -----------------------------------------------------
# Values are fixed-shape ASCII with no tab, newline or backslash, so no COPY escaping is needed.

_COLUMNS: dict[str, str] = {
    "clients": "id, name, slug",
    "platform_accounts": "client_id, id, platform, handle, display_name",
    "brand_kits": "client_id, id, name, tone, colors",
    "knowledge_bases": "client_id, id, name, description",
    "knowledge_chunks": "client_id, id, knowledge_base_id, content, metadata, embedding",
    "platform_actions": "client_id, id, platform_account_id, kind, payload, lane, status",
}
# Parents first: the composite foreign keys are checked row by row.
_TABLE_ORDER = tuple(_COLUMNS)


def _embedding_text(tenant: int, row: int, dim: int = 384) -> str:
    # Cheap and deterministic; a unit-ish vector so cosine distance is defined.
    base = ((tenant * 31 + row) % 97 + 1) / 100.0
    return "[" + ",".join(f"{base if i % 7 else -base:.2f}" for i in range(dim)) + "]"


def _tenant_lines(t: int, rows: int, n_chunks: int, n_actions: int, embeddings: bool) -> dict[str, list[str]]:
    tid = _tenant_text(t)
    account = _row_text(KIND_PLATFORM_ACCOUNT, t, 0)
    kb = _row_text(KIND_KNOWLEDGE_BASE, t, 0)
    prefix_bk = f"{t:08x}-{KIND_BRAND_KIT:04x}-4000-8000-"
    prefix_ch = f"{t:08x}-{KIND_KNOWLEDGE_CHUNK:04x}-4000-8000-"
    prefix_ac = f"{t:08x}-{KIND_PLATFORM_ACTION:04x}-4000-8000-"
    brand = [
        f'{tid}\t{prefix_bk}{r:012x}\tBrand {r}\t{{"voice": "{_VOICES[r % 4]}", "personality": []}}'
        f'\t{{"primary": "#{(t * 7919 + r) % 0xFFFFFF:06x}"}}\n'
        for r in range(rows)
    ]
    chunks = [
        f'{tid}\t{prefix_ch}{r:012x}\t{kb}\tSynthetic chunk {r} of tenant {t}\t{{"n": {r}}}'
        f"\t{_embedding_text(t, r) if embeddings else chr(92) + 'N'}\n"
        for r in range(n_chunks)
    ]
    actions = [
        f'{tid}\t{prefix_ac}{r:012x}\t{account}\tpost\t{{"n": {r}}}\tapi\t{_STATUSES[r % 5]}\n'
        for r in range(n_actions)
    ]
    return {
        "clients": [f"{tid}\tSynthetic {t}\t{synthetic_slug(t)}\n"],
        "platform_accounts": [f"{tid}\t{account}\t{_PLATFORMS[t % 7]}\tsynthetic_{t}\tSynthetic {t}\n"],
        "brand_kits": brand,
        "knowledge_bases": [f"{tid}\t{kb}\tSynthetic KB\tSynthetic knowledge base of tenant {t}\n"],
        "knowledge_chunks": chunks,
        "platform_actions": actions,
    }


def _batches(indexes: list[int], per_batch: int) -> Iterator[list[int]]:
    for start in range(0, len(indexes), per_batch):
        yield indexes[start : start + per_batch]


def _existing(conn: psycopg.Connection[Any], indexes: list[int]) -> set[int]:
    slugs = [synthetic_slug(i) for i in indexes]
    found = conn.execute("SELECT slug FROM clients WHERE slug = ANY(%s)", (slugs,)).fetchall()
    present = {row[0] for row in found}
    return {i for i, slug in zip(indexes, slugs) if slug in present}


def load_synthetic(
    system_url: str,
    tenants: int,
    rows: int,
    *,
    progress: bool = True,
    first_tenant: int = 0,
    if_exists: Literal["fail", "skip"] = "fail",
    chunk_ratio: float = 0.1,
    action_ratio: float = 0.1,
    embeddings: bool = False,
    batch_rows: int = 50_000,
    on_batch: Callable[[int], None] | None = None,
) -> SyntheticResult:
    """Load ``tenants`` synthetic tenants (indexes ``first_tenant``...) with ``rows`` brand kits each.

    ``system_url`` is the system role's URL (BYPASSRLS; the load is logged like any system-scope
    use). ``if_exists="fail"`` raises :class:`SyntheticDataExistsError` when any of these tenants
    exists; ``"skip"`` loads only the missing ones (resuming an interrupted load). ``progress``
    shows a rich progress bar on stderr. Returns row counts per table and the elapsed time.
    """
    if tenants < 0 or rows < 0:
        raise InvalidInputError("tenants and rows must not be negative")
    if first_tenant < 0 or first_tenant + tenants > _MAX_TENANTS:
        raise InvalidInputError(f"tenant indexes must lie in [0, {_MAX_TENANTS})")
    if rows >= _MAX_ROWS:
        raise InvalidInputError(f"rows must be below {_MAX_ROWS}")
    if if_exists not in ("fail", "skip"):
        raise InvalidInputError("if_exists must be 'fail' or 'skip'")
    n_chunks = int(rows * chunk_ratio)
    n_actions = int(rows * action_ratio)
    per_tenant = 3 + rows + n_chunks + n_actions
    result = SyntheticResult(tenants=0, rows_per_tenant=rows, first_tenant=first_tenant,
                             rows={name: 0 for name in _TABLE_ORDER})
    indexes = list(range(first_tenant, first_tenant + tenants))
    started = time.perf_counter()
    _log.warning("system scope (cross-tenant, RLS bypassed) used: synthetic load of %d tenants x %d rows",
                 tenants, rows)
    with psycopg.connect(to_libpq_url(system_url)) as conn:
        existing = _existing(conn, indexes)
        conn.rollback()
        if existing and if_exists == "fail":
            raise SyntheticDataExistsError(
                f"{len(existing)} of the {tenants} synthetic tenants to load already exist "
                f"(e.g. slug {synthetic_slug(min(existing))!r}); load into an empty database, choose "
                "another first_tenant, or pass if_exists='skip' to load only the missing ones"
            )
        todo = [i for i in indexes if i not in existing]
        result.skipped_tenants = len(existing)
        per_batch = max(1, batch_rows // per_tenant)
        bar, task = _progress(progress, len(todo) * per_tenant)
        try:
            for batch in _batches(todo, per_batch):
                lines: dict[str, list[str]] = {name: [] for name in _TABLE_ORDER}
                for t in batch:
                    for name, tenant_lines in _tenant_lines(t, rows, n_chunks, n_actions, embeddings).items():
                        lines[name].extend(tenant_lines)
                with conn.transaction(), conn.cursor() as cur:
                    for name in _TABLE_ORDER:
                        if not lines[name]:
                            continue
                        with cur.copy(f"COPY {name} ({_COLUMNS[name]}) FROM STDIN") as copy:
                            copy.write("".join(lines[name]))
                        result.rows[name] += len(lines[name])
                result.tenants += len(batch)
                if bar is not None:
                    bar.update(task, advance=len(batch) * per_tenant)
                if on_batch is not None:
                    on_batch(result.tenants)
        finally:
            if bar is not None:
                bar.stop()
    result.seconds = time.perf_counter() - started
    return result


def _progress(enabled: bool, total: int) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("synthetic load"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )
    bar.start()
    return bar, bar.add_task("load", total=total)
