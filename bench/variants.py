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
from sqlalchemy import bindparam, insert, select

from rtv_db import BrandKit, Database, EngineOptions, TenantContext, brand_kits, tenant_session, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.seed.synthetic import KIND_BRAND_KIT, synthetic_row_id, synthetic_tenant_id
from rtv_db.signing import load_keys
from rtv_db.tenant._transaction import ContextSetter, context_params

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


# The unsigned (debugging) setter, as rtv-db's begin hook calls it with RTV_DB_CONTEXT_MODE=unsigned.
UNSIGNED_SQL = "SELECT rtv.set_tenant_context(%s::uuid, %s::uuid, %s::text, %s::text, %s::text)"

_signer: list[ContextSetter] = []


def context_statement(conn: psycopg.Connection[Any], tenant: uuid.UUID, *, signed: bool = True) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters that set ``tenant``'s context on ``conn``: a token for one
    transaction, signed with the configured key (the default), or the plain ids (unsigned)."""
    ctx = TenantContext(tenant)
    if not signed:
        return UNSIGNED_SQL, context_params(ctx)
    if not _signer:
        _signer.append(ContextSetter(load_keys()[-1]))
    return _signer[0].statement(ctx)


def _rls_psycopg_txn(conn: psycopg.Connection[Any], tenant: uuid.UUID, *, signed: bool = True) -> None:
    """A transaction started the way rtv-db's begin hook starts it: driver in autocommit, BEGIN
    and the context call pipelined in ONE round trip (commit() still sends COMMIT: the server is
    in a transaction)."""
    sql, params = context_statement(conn, tenant, signed=signed)
    with conn.pipeline():
        conn.execute("BEGIN")
        conn.execute(sql, params)  # type: ignore[arg-type]


# Unsigned mode only: the same five settings as rtv.set_tenant_context, with set_config(..., is_local => true)
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
    statement. A measuring device only, and only in unsigned mode (a signed token is valid only in
    the transaction that set it); rtv-db itself always sets the context per transaction."""
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


def _unsigned_database(url: str, v: Variants, probe: Op, **options: Any) -> Database:
    """A Database whose engine sets the context unsigned (``RTV_DB_CONTEXT_MODE=unsigned`` while
    its setter resolves its mode, at the first transaction, run here). The database itself must be
    in unsigned mode (see ``run.context_mode``)."""
    import os

    db = _database(url, v, **options)
    before = os.environ.get("RTV_DB_CONTEXT_MODE")
    os.environ["RTV_DB_CONTEXT_MODE"] = "unsigned"
    try:
        _check(with_tenant_scope(db, probe.tenant).scoped_get(brand_kits, probe.row) is not None, "unsigned probe")
    finally:
        if before is None:
            os.environ.pop("RTV_DB_CONTEXT_MODE", None)
        else:
            os.environ["RTV_DB_CONTEXT_MODE"] = before
    return db


def _psycopg_variants(v: Variants, runtime_url: str, system_url: str, ops: list[Op], query: str,
                      args: Callable[[Op], tuple[Any, ...]], ok: Callable[[list[Any], Op], bool], *,
                      unsigned: bool) -> None:
    """baseline, rls_query_only, rls_psycopg (+ rls_psycopg_unsigned): the same query by hand."""
    base = _psycopg(system_url, v)

    def baseline(i: int) -> None:
        rows = base.execute(query, args(ops[i])).fetchall()
        base.commit()
        _check(ok(rows, ops[i]), "baseline")

    v.add("baseline", baseline)
    if unsigned:
        qo, qo_tenant = _session_context(runtime_url, v, []), [None]

        def rls_query_only(i: int) -> None:
            _ensure_session_tenant(qo, qo_tenant, ops[i].tenant)  # no-op here: done by prepare(), untimed
            rows = qo.execute(query, args(ops[i])).fetchall()
            qo.commit()
            _check(ok(rows, ops[i]), "rls_query_only")

        rls_query_only.prepare = lambda i: _ensure_session_tenant(qo, qo_tenant, ops[i].tenant)  # type: ignore[attr-defined]
        v.add("rls_query_only", rls_query_only)

    for signed in ((True, False) if unsigned else (True,)):
        conn = _psycopg_autocommit(runtime_url, v)

        def rls(i: int, conn: psycopg.Connection[Any] = conn, signed: bool = signed) -> None:
            _rls_psycopg_txn(conn, ops[i].tenant, signed=signed)
            rows = conn.execute(query, args(ops[i])).fetchall()
            conn.commit()
            _check(ok(rows, ops[i]), "rls_psycopg")

        v.add("rls_psycopg" if signed else "rls_psycopg_unsigned", rls)


# -- workload 1: point read by id -----------------------------------------------------------------


def point_read(runtime_url: str, system_url: str, ops: list[Op], *, with_orm: bool = True,
               with_no_ping: bool = True, unsigned: bool = True) -> Variants:
    """``unsigned``: add the unsigned-context variants (the database must be in unsigned mode)."""
    v = Variants()
    _psycopg_variants(v, runtime_url, system_url, ops, POINT_SQL, lambda op: (op.tenant, op.row),
                      lambda rows, op: len(rows) == 1 and rows[0][0] == op.tenant, unsigned=unsigned)
    if unsigned:
        sc = _psycopg_autocommit(runtime_url, v)

        def set_config_unsigned(i: int) -> None:
            op = ops[i]
            _set_config_txn(sc, op.tenant)
            row = sc.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
            sc.commit()
            _check(row is not None and row[0] == op.tenant, "set_config_unsigned point read")

        v.add("set_config_unsigned", set_config_unsigned)

    plain = _plain_engine(system_url, v)

    def sqlalchemy_core(i: int) -> None:
        op = ops[i]
        with plain.begin() as conn:
            row = conn.execute(
                select(brand_kits).where(brand_kits.c.client_id == op.tenant, brand_kits.c.id == op.row).limit(1)
            ).first()
        _check(row is not None and row.client_id == op.tenant, "sqlalchemy_core point read")

    v.add("sqlalchemy_core", sqlalchemy_core)
    point_once = select(brand_kits).where(brand_kits.c.client_id == bindparam("t"), brand_kits.c.id == bindparam("r")).limit(1)

    def sqlalchemy_core_once(i: int) -> None:
        op = ops[i]
        with plain.begin() as conn:
            row = conn.execute(point_once, {"t": op.tenant, "r": op.row}).first()
        _check(row is not None and row.client_id == op.tenant, "sqlalchemy_core_once point read")

    v.add("sqlalchemy_core_once", sqlalchemy_core_once)
    dbs = {"": _database(runtime_url, v)}
    if unsigned:
        dbs["_unsigned"] = _unsigned_database(runtime_url, v, ops[0])
    for suffix, db in dbs.items():
        def core(i: int, db: Database = db, suffix: str = suffix) -> None:
            op = ops[i]
            row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant, f"core{suffix} point read")

        v.add("core" + suffix, core)
    if with_no_ping:
        db_np = _database(runtime_url, v, pool_pre_ping=False)

        def core_no_ping(i: int) -> None:
            op = ops[i]
            row = with_tenant_scope(db_np, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant, "core_no_ping point read")

        v.add("core_no_ping", core_no_ping)
    if with_orm:
        for suffix, db in dbs.items():
            def orm(i: int, db: Database = db, suffix: str = suffix) -> None:
                op = ops[i]
                with tenant_session(db, TenantContext(op.tenant)) as session, session.begin():
                    kit = session.get(BrandKit, (op.tenant, op.row))
                    _check(kit is not None and kit.client_id == op.tenant, f"orm{suffix} point read")

            v.add("orm" + suffix, orm)
    return v


# -- workload 2: tenant-scoped list ---------------------------------------------------------------


def tenant_list(runtime_url: str, system_url: str, ops: list[Op], limit: int, *, unsigned: bool = True) -> Variants:
    v = Variants()
    _psycopg_variants(v, runtime_url, system_url, ops, LIST_SQL, lambda op: (op.tenant, limit),
                      lambda rows, op: len(rows) == limit and rows[0][0] == op.tenant, unsigned=unsigned)
    plain = _plain_engine(system_url, v)

    def sqlalchemy_core(i: int) -> None:
        tenant = ops[i].tenant
        with plain.begin() as conn:
            rows = conn.execute(
                select(brand_kits).where(brand_kits.c.client_id == tenant).order_by(brand_kits.c.id).limit(limit)
            ).all()
        _check(len(rows) == limit and rows[0].client_id == tenant, "sqlalchemy_core list")

    v.add("sqlalchemy_core", sqlalchemy_core)
    list_once = select(brand_kits).where(brand_kits.c.client_id == bindparam("t")).order_by(brand_kits.c.id).limit(limit)

    def sqlalchemy_core_once(i: int) -> None:
        tenant = ops[i].tenant
        with plain.begin() as conn:
            rows = conn.execute(list_once, {"t": tenant}).all()
        _check(len(rows) == limit and rows[0].client_id == tenant, "sqlalchemy_core_once list")

    v.add("sqlalchemy_core_once", sqlalchemy_core_once)
    dbs = {"": _database(runtime_url, v)}
    if unsigned:
        dbs["_unsigned"] = _unsigned_database(runtime_url, v, ops[0])
    for suffix, db in dbs.items():
        def core(i: int, db: Database = db, suffix: str = suffix) -> None:
            tenant = ops[i].tenant
            rows = with_tenant_scope(db, tenant).scoped_query(brand_kits, order_by=[brand_kits.c.id], limit=limit)
            _check(len(rows) == limit and rows[0].client_id == tenant, f"core{suffix} list")

        v.add("core" + suffix, core)
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

    db = _database(runtime_url, v)

    def core(i: int) -> None:
        tenant = ops[i].tenant
        rows = with_tenant_scope(db, tenant).scoped_insert(
            brand_kits, {"id": uuid.uuid4(), "name": f"bench {tag} c{i} {uuid.uuid4().hex[:8]}"}
        )
        _check(len(rows) == 1 and rows[0].client_id == tenant, "core insert")

    plain = _plain_engine(system_url, v)
    insert_once = insert(brand_kits).returning(*brand_kits.c)

    def sqlalchemy_core_once(i: int) -> None:
        tenant = ops[i].tenant
        with plain.begin() as conn:
            row = conn.execute(insert_once, {"client_id": tenant, "id": uuid.uuid4(),
                                             "name": f"bench {tag} s{i} {uuid.uuid4().hex[:8]}"}).first()
        _check(row is not None and row.client_id == tenant, "sqlalchemy_core_once insert")

    v.add("baseline", baseline)
    v.add("sqlalchemy_core_once", sqlalchemy_core_once)
    v.add("core", core)
    return v
