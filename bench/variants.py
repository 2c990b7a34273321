"""The code being timed: one factory per workload, returning named variants.

Each variant is a callable taking the operation number ``i``; ``ops[i]`` says which tenant and
row it works on, identical across variants. Every variant also checks its answer (the row of the
right tenant, the right number of rows), so a fast wrong answer cannot win.

Baselines are hand-written psycopg on one held connection as the system role, which has
BYPASSRLS: the same SQL with the literal ``client_id`` predicate and no isolation at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import select

from rtv_db import BrandKit, Database, EngineOptions, TenantContext, brand_kits, tenant_session, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.seed.synthetic import KIND_BRAND_KIT, synthetic_row_id, synthetic_tenant_id
from rtv_db.tenant._transaction import context_params, context_sql

__all__ = ["Op", "make_ops", "Variants", "point_read", "tenant_list", "writes", "context_switch"]

COLUMNS = "client_id, id, name, tone, colors, logo_refs, created_at, updated_at"
POINT_SQL = f"SELECT {COLUMNS} FROM brand_kits WHERE client_id = %s AND id = %s"
LIST_SQL = f"SELECT {COLUMNS} FROM brand_kits WHERE client_id = %s ORDER BY id LIMIT %s"
INSERT_SQL = (
    "INSERT INTO brand_kits (client_id, id, name) VALUES (%s, %s, %s) "
    f"RETURNING {COLUMNS}"
)


@dataclass(frozen=True)
class Op:
    tenant: uuid.UUID
    row: uuid.UUID


def make_ops(n: int, tenants: int, rows: int, *, seed: int = 5, tenant_of: Callable[[int], int] | None = None) -> list[Op]:
    """``n`` operations on random (tenant, row) pairs of the synthetic data, reproducible."""
    import random

    rng = random.Random(seed)
    ops = []
    for i in range(n):
        t = tenant_of(i) if tenant_of else rng.randrange(tenants)
        ops.append(Op(synthetic_tenant_id(t), synthetic_row_id(KIND_BRAND_KIT, t, rng.randrange(rows))))
    return ops


class Variants:
    """Named callables plus what must be closed after timing them."""

    def __init__(self) -> None:
        self.fns: dict[str, Callable[[int], Any]] = {}
        self._closers: list[Callable[[], Any]] = []

    def add(self, name: str, fn: Callable[[int], Any]) -> None:
        self.fns[name] = fn

    def on_close(self, fn: Callable[[], Any]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                pass


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"benchmark variant returned a wrong answer: {what}")


def _psycopg(url: str, v: Variants) -> psycopg.Connection[Any]:
    conn = psycopg.connect(to_libpq_url(url))
    v.on_close(conn.close)
    return conn


def _plain_engine(url: str, v: Variants) -> Any:
    """A plain SQLAlchemy engine (no rtv-db hooks) with rtv-db's pool defaults: SQLAlchemy's own cost."""
    from sqlalchemy import create_engine

    from rtv_db.config import to_sqlalchemy_url

    engine = create_engine(to_sqlalchemy_url(url), **EngineOptions().engine_kwargs())
    v.on_close(engine.dispose)
    return engine


def _database(url: str, v: Variants, **options: Any) -> Database:
    db = Database(url, options=EngineOptions(**options))
    v.on_close(db.close)
    return db


def _rls_psycopg_txn(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> None:
    """The tenant context set the way rtv-db's begin hook sets it: in a pipeline, on a connection
    that is not in autocommit (psycopg 3.3 then sends its implicit BEGIN and waits for it before
    the pipelined call: two round trips, as the wire counts show)."""
    with conn.pipeline():
        conn.execute(context_sql(), context_params(TenantContext(tenant)))


def _one_rt_txn(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> None:
    """BEGIN and the tenant context in ONE round trip: driver autocommit, an explicit BEGIN
    pipelined with the context call (commit() still sends COMMIT: the server is in a transaction)."""
    with conn.pipeline():
        conn.execute("BEGIN")
        conn.execute(context_sql(), context_params(TenantContext(tenant)))


# The same five settings as rtv.set_tenant_context, with set_config(..., is_local => true)
# instead of the PL/pgSQL function's five dynamic SET LOCAL statements: what that costs.
SET_CONFIG_SQL = (
    "SELECT set_config('app.current_tenant_id', %s, true), set_config('app.current_platform_account_id', '', true),"
    " set_config('app.current_lane', 'api', true), set_config('app.current_user_id', '', true),"
    " set_config('app.correlation_id', %s, true)"
)


def _set_config_txn(conn: psycopg.Connection[Any], tenant: uuid.UUID) -> None:
    ctx = TenantContext(tenant)
    with conn.pipeline():
        conn.execute("BEGIN")
        conn.execute(SET_CONFIG_SQL, (str(ctx.tenant_id), ctx.correlation_id))


def _session_context(url: str, v: Variants, tenant_holder: list[uuid.UUID | None]) -> psycopg.Connection[Any]:
    """A runtime-role connection for measuring RLS on the query alone: the context is set once per
    tenant change at SESSION level (set_config(..., false)), so a transaction carries no context
    statement. A measuring device only; rtv-db itself always sets the context per transaction."""
    conn = psycopg.connect(to_libpq_url(url))
    v.on_close(conn.close)
    return conn


def _ensure_session_tenant(conn: psycopg.Connection[Any], current: list[Any], tenant: uuid.UUID) -> None:
    if current[0] != tenant:
        conn.execute("SELECT set_config('app.current_tenant_id', %s, false)", (str(tenant),))
        conn.commit()
        current[0] = tenant


def _psycopg_autocommit(url: str, v: Variants) -> psycopg.Connection[Any]:
    conn = psycopg.connect(to_libpq_url(url), autocommit=True)
    v.on_close(conn.close)
    return conn


# -- workload 1: point read by id -----------------------------------------------------------------


def point_read(runtime_url: str, system_url: str, ops: list[Op], *, with_orm: bool = True,
               with_no_ping: bool = True) -> Variants:
    v = Variants()
    base = _psycopg(system_url, v)

    def baseline(i: int) -> None:
        op = ops[i]
        row = base.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
        base.commit()
        _check(row is not None and row[0] == op.tenant, "baseline point read")

    rls = _psycopg(runtime_url, v)

    def rls_psycopg(i: int) -> None:
        op = ops[i]
        _rls_psycopg_txn(rls, op.tenant)
        row = rls.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
        rls.commit()
        _check(row is not None and row[0] == op.tenant, "rls_psycopg point read")

    one = _psycopg_autocommit(runtime_url, v)

    def psycopg_1rt(i: int) -> None:
        op = ops[i]
        _one_rt_txn(one, op.tenant)
        row = one.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
        one.commit()
        _check(row is not None and row[0] == op.tenant, "psycopg_1rt point read")

    qo, qo_tenant = _session_context(runtime_url, v, []), [None]

    def rls_query_only(i: int) -> None:
        op = ops[i]
        _ensure_session_tenant(qo, qo_tenant, op.tenant)  # no-op here: done by prepare(), untimed
        row = qo.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
        qo.commit()
        _check(row is not None and row[0] == op.tenant, "rls_query_only point read")

    rls_query_only.prepare = lambda i: _ensure_session_tenant(qo, qo_tenant, ops[i].tenant)  # type: ignore[attr-defined]

    sc = _psycopg_autocommit(runtime_url, v)

    def set_config_1rt(i: int) -> None:
        op = ops[i]
        _set_config_txn(sc, op.tenant)
        row = sc.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
        sc.commit()
        _check(row is not None and row[0] == op.tenant, "set_config_1rt point read")

    plain = _plain_engine(system_url, v)

    def sqlalchemy_core(i: int) -> None:
        op = ops[i]
        with plain.begin() as conn:
            row = conn.execute(
                select(brand_kits).where(brand_kits.c.client_id == op.tenant, brand_kits.c.id == op.row).limit(1)
            ).first()
        _check(row is not None and row.client_id == op.tenant, "sqlalchemy_core point read")

    db = _database(runtime_url, v)

    def core(i: int) -> None:
        op = ops[i]
        row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
        _check(row is not None and row.client_id == op.tenant, "core point read")

    v.add("baseline", baseline)
    v.add("rls_query_only", rls_query_only)
    v.add("rls_psycopg", rls_psycopg)
    v.add("psycopg_1rt", psycopg_1rt)
    v.add("set_config_1rt", set_config_1rt)
    v.add("sqlalchemy_core", sqlalchemy_core)
    v.add("core", core)
    if with_no_ping:
        db_np = _database(runtime_url, v, pool_pre_ping=False)

        def core_no_ping(i: int) -> None:
            op = ops[i]
            row = with_tenant_scope(db_np, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant, "core_no_ping point read")

        v.add("core_no_ping", core_no_ping)
    if with_orm:
        def orm(i: int) -> None:
            op = ops[i]
            with tenant_session(db, TenantContext(op.tenant)) as session, session.begin():
                kit = session.get(BrandKit, (op.tenant, op.row))
                _check(kit is not None and kit.client_id == op.tenant, "orm point read")

        v.add("orm", orm)
    return v


# -- workload 2: tenant-scoped list ---------------------------------------------------------------


def tenant_list(runtime_url: str, system_url: str, ops: list[Op], limit: int) -> Variants:
    v = Variants()
    base = _psycopg(system_url, v)

    def baseline(i: int) -> None:
        tenant = ops[i].tenant
        rows = base.execute(LIST_SQL, (tenant, limit)).fetchall()
        base.commit()
        _check(len(rows) == limit and rows[0][0] == tenant, "baseline list")

    rls = _psycopg(runtime_url, v)

    def rls_psycopg(i: int) -> None:
        tenant = ops[i].tenant
        _rls_psycopg_txn(rls, tenant)
        rows = rls.execute(LIST_SQL, (tenant, limit)).fetchall()
        rls.commit()
        _check(len(rows) == limit and rows[0][0] == tenant, "rls_psycopg list")

    one = _psycopg_autocommit(runtime_url, v)

    def psycopg_1rt(i: int) -> None:
        tenant = ops[i].tenant
        _one_rt_txn(one, tenant)
        rows = one.execute(LIST_SQL, (tenant, limit)).fetchall()
        one.commit()
        _check(len(rows) == limit and rows[0][0] == tenant, "psycopg_1rt list")

    qo, qo_tenant = _session_context(runtime_url, v, []), [None]

    def rls_query_only(i: int) -> None:
        tenant = ops[i].tenant
        _ensure_session_tenant(qo, qo_tenant, tenant)  # no-op here: done by prepare(), untimed
        rows = qo.execute(LIST_SQL, (tenant, limit)).fetchall()
        qo.commit()
        _check(len(rows) == limit and rows[0][0] == tenant, "rls_query_only list")

    rls_query_only.prepare = lambda i: _ensure_session_tenant(qo, qo_tenant, ops[i].tenant)  # type: ignore[attr-defined]

    plain = _plain_engine(system_url, v)

    def sqlalchemy_core(i: int) -> None:
        tenant = ops[i].tenant
        with plain.begin() as conn:
            rows = conn.execute(
                select(brand_kits).where(brand_kits.c.client_id == tenant).order_by(brand_kits.c.id).limit(limit)
            ).all()
        _check(len(rows) == limit and rows[0].client_id == tenant, "sqlalchemy_core list")

    db = _database(runtime_url, v)

    def core(i: int) -> None:
        tenant = ops[i].tenant
        rows = with_tenant_scope(db, tenant).scoped_query(brand_kits, order_by=[brand_kits.c.id], limit=limit)
        _check(len(rows) == limit and rows[0].client_id == tenant, "core list")

    v.add("baseline", baseline)
    v.add("rls_query_only", rls_query_only)
    v.add("rls_psycopg", rls_psycopg)
    v.add("psycopg_1rt", psycopg_1rt)
    v.add("sqlalchemy_core", sqlalchemy_core)
    v.add("core", core)
    return v


# -- workload 4: context switching on one pooled connection ---------------------------------------


def context_switch(runtime_url: str, system_url: str, ops_by_pattern: dict[str, list[Op]]) -> Variants:
    """Scoped point reads on a pool of exactly one connection, tenants following each pattern."""
    v = Variants()
    db = _database(runtime_url, v, pool_size=1, max_overflow=0)
    for pattern, ops in ops_by_pattern.items():
        def fn(i: int, ops: list[Op] = ops, pattern: str = pattern) -> None:
            op = ops[i]
            row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant, f"context switch {pattern}")

        v.add(pattern, fn)
    return v


# -- workload 6: writes ---------------------------------------------------------------------------


def writes(runtime_url: str, system_url: str, ops: list[Op], *, tag: str) -> Variants:
    """A one-row insert into brand_kits in its own transaction; ``tag`` keeps names unique per run."""
    v = Variants()
    base = _psycopg(system_url, v)

    def baseline(i: int) -> None:
        tenant = ops[i].tenant
        row = base.execute(INSERT_SQL, (tenant, uuid.uuid4(), f"bench {tag} b{i} {uuid.uuid4().hex[:8]}")).fetchone()
        base.commit()
        _check(row is not None and row[0] == tenant, "baseline insert")

    plain = _plain_engine(system_url, v)

    def sqlalchemy_core(i: int) -> None:
        tenant = ops[i].tenant
        with plain.begin() as conn:
            rows = conn.execute(
                select(brand_kits).where(brand_kits.c.client_id == tenant).order_by(brand_kits.c.id).limit(limit)
            ).all()
        _check(len(rows) == limit and rows[0].client_id == tenant, "sqlalchemy_core list")

    db = _database(runtime_url, v)

    def core(i: int) -> None:
        tenant = ops[i].tenant
        rows = with_tenant_scope(db, tenant).scoped_insert(
            brand_kits, {"id": uuid.uuid4(), "name": f"bench {tag} c{i} {uuid.uuid4().hex[:8]}"}
        )
        _check(len(rows) == 1 and rows[0].client_id == tenant, "core insert")

    v.add("baseline", baseline)
    v.add("core", core)
    return v
