"""Checks shared by the reliability tests (properties, faults, soak): leaks, left-over context, writes.

Every check that asks "what can the application see" runs as the runtime role (a
:class:`~rtv_db.Database`); "what is really there" is read through the system scope.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass

from sqlalchemy import text

from rtv_db import Database, SystemScope, with_tenant_scope
from rtv_db.schema import tenant_tables
from rtv_db.tenant import current_tenant_context

# The settings the context setters write with SET LOCAL; none may outlive a transaction.
CONTEXT_SETTINGS = (
    "app.tenant_token",
    "app.tenant_token_xact",
    "app.current_tenant_id",
    "app.current_platform_account_id",
    "app.current_lane",
    "app.current_user_id",
    "app.correlation_id",
)

TENANT_TABLES = tuple(sorted(tenant_tables()))


@dataclass(frozen=True)
class PooledConnectionState:
    """What one idle pooled connection carries when a transaction without context starts on it."""

    backend_pid: int
    settings: dict[str, str | None]

    @property
    def clean(self) -> bool:
        # '' once a SET LOCAL has come and gone on this backend, NULL if it never happened.
        return all(value in ("", None) for value in self.settings.values())


def pooled_connection_states(db: Database) -> list[PooledConnectionState]:
    """The context settings of every idle connection in ``db``'s pool, each checked out once.

    All idle connections are held at the same time, so each is a different backend. The query
    goes through the raw DBAPI connection, past the engine's ``begin`` hook: what it reads is the
    session's own value, not one a new transaction would set or clear.
    """
    assert current_tenant_context() is None, "run the pool check outside any tenant context"
    columns = ", ".join(f"current_setting('{name}', true)" for name in CONTEXT_SETTINGS)
    states = []
    with ExitStack() as stack:
        for _ in range(db.engine.pool.checkedin()):  # type: ignore[attr-defined]
            raw = db.engine.raw_connection()
            stack.callback(raw.close)  # back to the pool, after all are held
            cur = raw.cursor()
            cur.execute(f"SELECT pg_backend_pid(), {columns}")
            pid, *values = cur.fetchone()
            raw.rollback()
            states.append(PooledConnectionState(pid, dict(zip(CONTEXT_SETTINGS, values))))
    assert len({s.backend_pid for s in states}) == len(states), "a pooled connection was counted twice"
    return states


def assert_no_context_left(db: Database) -> list[PooledConnectionState]:
    """Fail if any idle pooled connection still carries a tenant context; return what was seen."""
    states = pooled_connection_states(db)
    dirty = [s for s in states if not s.clean]
    assert not dirty, f"tenant context left on pooled connection(s): {dirty}"
    return states


def raw_visible_counts(db: Database) -> dict[str, int]:
    """Rows each tenant table shows to raw SQL with no tenant context (must all be 0)."""
    assert current_tenant_context() is None
    with db.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TENANT_TABLES}


def assert_raw_sql_sees_nothing(db: Database) -> None:
    counts = raw_visible_counts(db)
    assert set(counts.values()) == {0}, f"rows visible with no tenant context: {counts}"


def foreign_rows_seen_by(db: Database, tenant_id: uuid.UUID) -> dict[str, int]:
    """Rows of other tenants visible to raw SQL inside ``tenant_id``'s scoped transaction."""
    scope = with_tenant_scope(db, tenant_id)
    seen: dict[str, int] = {}
    with scope.scoped_transaction() as tx:
        for table in TENANT_TABLES:
            column = "id" if table == "clients" else "client_id"
            seen[table] = tx.connection.execute(
                text(f"SELECT count(*) FROM {table} WHERE {column} <> :me"), {"me": tenant_id}
            ).scalar_one()
    return seen


def assert_no_cross_tenant_rows(db: Database, tenant_ids: Iterable[uuid.UUID]) -> None:
    """Fail if any tenant can see any row of another tenant, in any tenant table."""
    leaks = {}
    for tenant_id in tenant_ids:
        seen = foreign_rows_seen_by(db, tenant_id)
        if any(seen.values()):
            leaks[tenant_id] = seen
    assert not leaks, f"cross-tenant rows visible: {leaks}"


def rows_by_tenant(system: SystemScope, table: str) -> Counter[uuid.UUID]:
    """How many rows of ``table`` each tenant really has (read through the system scope)."""
    column = "id" if table == "clients" else "client_id"
    with system.transaction() as conn:
        return Counter({row[0]: row[1] for row in conn.execute(text(f"SELECT {column}, count(*) FROM {table} GROUP BY 1"))})


def table_counts(system: SystemScope) -> dict[str, int]:
    """Total rows per tenant table (system scope): to prove that nothing was written."""
    with system.transaction() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TENANT_TABLES}


def audit_trail_mismatches(system: SystemScope) -> list[str] | None:
    """Differences between the audit trail and the data, or None when there is no audit trail.

    For every tenant table: the rows that exist are exactly the rows whose latest audit event is
    not a DELETE, and each of those events names the row's own tenant. A write that was rolled
    back leaves neither row nor event; a committed one leaves both.
    """
    with system.transaction() as conn:
        if conn.execute(text("SELECT to_regclass('public.audit_events')")).scalar() is None:
            return None
        problems = []
        for table in TENANT_TABLES:
            owner = "id" if table == "clients" else "client_id"
            live = {tuple(row) for row in conn.execute(text(f"SELECT {owner}, id FROM {table}"))}
            latest = conn.execute(text(
                "SELECT DISTINCT ON (row_id) client_id, row_id, action FROM audit_events WHERE table_name = :t "
                "ORDER BY row_id, occurred_at DESC, CASE action WHEN 'DELETE' THEN 0 WHEN 'UPDATE' THEN 1 ELSE 2 END"
            ), {"t": table}).all()
            trail = {(c, r) for c, r, action in latest if action != "DELETE"}
            if live - trail:
                problems.append(f"{table}: {len(live - trail)} row(s) without a matching audit trail, e.g. {sorted(live - trail)[:2]}")
            if trail - live:
                problems.append(f"{table}: audit trail shows {len(trail - live)} row(s) that do not exist, e.g. {sorted(trail - live)[:2]}")
        return problems


def assert_audit_matches(system: SystemScope) -> None:
    """The audit trail matches the data; a no-op while the audit trail does not exist."""
    problems = audit_trail_mismatches(system)
    assert not problems, problems
