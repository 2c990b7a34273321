"""rtv-db behind a real PgBouncer (issue 11): session and transaction pooling, as the runtime role.

Debian's pgbouncer (installed by tests/pgbouncer.py when missing; the tests skip with the reason
when it cannot be) runs on a loopback port in front of the test server with a pool of 4 server
connections per database and role, so that client connections really share backends. Every
test connects as ``rtv_app`` through the pooler, with rtv-db's default EngineOptions unless it
says otherwise, in the default signed tenant context mode. docs/pooling.md describes what these
tests show.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from rtv_db import AsyncDatabase, Database, EngineOptions, brand_kits, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.errors import DatabaseConnectionError, TenantContextRefusedError
from tests.conftest import make_tenants

MODES = ("session", "transaction")
POOL = 4  # PgBouncer's default_pool_size (tests/pgbouncer.py)
TENANTS = 6
WORKERS = 8
TRANSACTIONS_PER_WORKER = 60  # 8 x 60 = 480 transactions over 6 tenants
WRITE_EVERY = 3  # every third transaction also writes a row and reads it back
GIVE_UP_AFTER = 40  # errors: a broken setup fails fast instead of running every transaction


@pytest.fixture(params=MODES)
def bouncer(request, bouncers):
    return bouncers.get(request.param)


@pytest.fixture()
def pooled_url(bouncer, target):
    """The runtime role's URL for this test's migrated database, through the pooler."""
    return bouncer.url(target.runtime_url)


def _engine_options(pool_mode: str) -> EngineOptions:
    # Session mode pins one backend per client connection for the connection's lifetime, so the
    # application's pool must not be larger than PgBouncer's (a 5th client would wait for a
    # backend forever). Transaction mode: 8 client connections over PgBouncer's 4 backends.
    if pool_mode == "session":
        return EngineOptions(pool_size=POOL, max_overflow=0, pool_timeout=10)
    return EngineOptions(pool_size=WORKERS, max_overflow=0, pool_timeout=10)


# -- connecting ----------------------------------------------------------------------------------


def test_default_engine_options_connect(bouncer, pooled_url, tenants):
    assert "options" not in EngineOptions().engine_kwargs()["connect_args"]  # no startup options
    db = Database(pooled_url)
    try:
        info = db.test_connection()
        assert (info.user, info.database) == ("rtv_app", make_url(pooled_url).database)
        rows = with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
        assert [r.name for r in rows] == ["Brand A"]
    finally:
        db.close()


def test_startup_option_is_refused_by_the_pooler(bouncer, pooled_url):
    """What rtv-db sent before: the timeouts as ``options``. PgBouncer refuses the connection."""
    db = Database(pooled_url, options=EngineOptions(statement_timeout_ms=30000))
    assert "statement_timeout=30000" in db.options.engine_kwargs()["connect_args"]["options"]
    try:
        with pytest.raises(DatabaseConnectionError, match="unsupported startup parameter: options"):
            db.test_connection()
    finally:
        db.close()


def test_ignoring_the_options_parameter_drops_the_timeouts_silently(bouncers, target):
    """``ignore_startup_parameters = options`` makes the connection work and loses the setting."""
    ignoring = bouncers.get("transaction", ignore_startup_parameters="options")
    options = EngineOptions(statement_timeout_ms=1234)
    plain = Database(target.runtime_url)  # the role's own setting
    direct = Database(target.runtime_url, options=options)
    pooled = Database(ignoring.url(target.runtime_url), options=options)
    show = text("SHOW statement_timeout")
    try:
        with plain.engine.connect() as conn:
            role_default = conn.execute(show).scalar()
        with direct.engine.connect() as conn:
            assert conn.execute(show).scalar() == "1234ms"  # honoured when it reaches the server
        with pooled.engine.connect() as conn:
            assert conn.execute(show).scalar() == role_default != "1234ms"  # dropped, no error
    finally:
        for db in (plain, direct, pooled):
            db.close()


# -- timeouts --------------------------------------------------------------------------------------


def test_timeouts_are_in_force_through_the_pooler(bouncer, pooled_url, tenants):
    """The role settings `rtv-db migrate` installs hold on the backends PgBouncer hands out."""
    db = Database(pooled_url, options=_engine_options(bouncer.pool_mode))
    seen = set()
    try:
        scope = with_tenant_scope(db, tenants.a)
        for _ in range(2 * POOL):
            with scope.scoped_transaction() as tx:
                seen.add(tuple(tx.connection.execute(text(
                    "SELECT current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')"
                )).one()))
        with db.engine.connect() as conn:  # and outside any tenant transaction
            seen.add((conn.execute(text("SHOW statement_timeout")).scalar(),
                      conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()))
    finally:
        db.close()
    assert seen == {("30s", "1min")}


# -- no server-side prepared statements ------------------------------------------------------------


def test_no_server_side_prepared_statements(bouncer, pooled_url, tenants):
    """rtv-db's default (prepare_threshold=None) leaves no prepared statement on any backend."""
    db = Database(pooled_url, options=_engine_options(bouncer.pool_mode))
    try:
        scope = with_tenant_scope(db, tenants.a)
        for _ in range(20):  # psycopg's own default would prepare after 5
            scope.scoped_query(brand_kits)
        with scope.scoped_transaction() as tx:
            assert tx.connection.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar() == 0
    finally:
        db.close()


def test_server_side_prepares_break_in_transaction_mode(bouncers, target):
    """Why: PgBouncer 1.18 in transaction mode hands one backend's prepared statements to others.

    Plain psycopg with ``prepare_threshold=0`` (what ``EngineOptions(prepare_threshold=0)`` asks
    psycopg for), two client connections, one shared backend.
    """
    if tuple(int(p) for p in bouncers.version.split(".")[:2]) >= (1, 21):
        pytest.skip(f"PgBouncer {bouncers.version} can track protocol-level prepared statements")
    single = bouncers.get("transaction", default_pool_size=1)
    url = to_libpq_url(single.url(target.runtime_url))
    with psycopg.connect(url, autocommit=True, prepare_threshold=0) as first, \
            psycopg.connect(url, autocommit=True, prepare_threshold=0) as second:
        first.execute("SELECT 1")  # prepared as _pg3_0 on the one backend
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement, match="_pg3_0"):
            second.execute("SELECT 1")  # its own _pg3_0, on the same backend


# -- a clean session for every transaction -----------------------------------------------------------

_PLANTS = (  # session state SQL in tenant A's transaction could leave on the backend
    "SET search_path = pg_catalog",
    "SET statement_timeout = 4321",
    "SET enable_indexscan = off",
    "PREPARE rtv_planted AS SELECT 1",
    "SELECT pg_advisory_lock(4242)",
)
_STATE = text(
    "SELECT current_setting('search_path'), current_setting('statement_timeout'),"
    " current_setting('enable_indexscan'),"
    " (SELECT count(*) FROM pg_catalog.pg_prepared_statements),"
    " (SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())"
)


@pytest.mark.parametrize("pool_mode", MODES)
def test_state_planted_by_one_tenant_does_not_reach_the_next(bouncers, target, tenants, pool_mode):
    """One backend (PgBouncer pool of 1), one client connection, tenant A then tenant B.

    Neither pool mode resets the backend between the transactions of a client connection, so
    whatever A's transaction leaves at session level meets B's, unless rtv-db cleans it.
    """
    single = bouncers.get(pool_mode, default_pool_size=1)
    db = Database(single.url(target.runtime_url), options=EngineOptions(pool_size=1, max_overflow=0, pool_timeout=10))
    a, b = with_tenant_scope(db, tenants.a), with_tenant_scope(db, tenants.b)
    try:
        with b.scoped_transaction() as tx:
            before = tuple(tx.connection.execute(_STATE).one())
            pid = tx.connection.execute(_PID).scalar()
        planted = []
        for plant in _PLANTS:  # each its own transaction: a refused one (permission denied) plants nothing
            try:
                with a.scoped_transaction() as tx:
                    tx.connection.execute(text(plant))
            except Exception:
                continue
            planted.append(plant)
        with b.scoped_transaction() as tx:
            assert tx.connection.execute(_PID).scalar() == pid  # the same backend
            after = tuple(tx.connection.execute(_STATE).one())
            assert [r.name for r in tx.scoped_query(brand_kits)] == ["Brand B"]
    finally:
        db.close()
    assert set(_PLANTS[:4]) <= set(planted)  # the settings and the prepared statement did get planted
    assert after == before


# -- concurrency -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the workers saw; checked after all of them finished."""

    transactions: int = 0
    refused: int = 0  # TenantContextRefusedError
    errors: Counter[str] = field(default_factory=Counter)  # any other exception, by first line
    foreign_rows: int = 0  # rows of another tenant, through the scoped API or raw SQL under RLS
    missing_own: int = 0  # reads that did not see the tenant's own seed row (a context not in force)
    missing_writes: int = 0  # a row written in the transaction and not read back in it
    backends: set[int] = field(default_factory=set)
    timeouts: set[tuple[str, str]] = field(default_factory=set)
    clients: set[int] = field(default_factory=set)
    written: dict[uuid.UUID, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            if isinstance(exc, TenantContextRefusedError) or isinstance(exc.__cause__, TenantContextRefusedError):
                self.refused += 1
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            self.errors[f"{type(exc).__name__}: {first}"] += 1

    def give_up(self, deadline: float) -> bool:
        return time.monotonic() > deadline or sum(self.errors.values()) >= GIVE_UP_AFTER


def _plan(worker: int, step: int, tenants: list[uuid.UUID]) -> tuple[uuid.UUID, str | None]:
    """Which tenant this transaction is for, and the name it writes (or None)."""
    tid = tenants[(worker + step) % len(tenants)]
    return tid, (f"w-{worker}-{step}" if step % WRITE_EVERY == 0 else None)


def _record(tally: Tally, tid: uuid.UUID, own: str, name: str | None, kits, raw_ids, backend, client: int) -> None:
    with tally.lock:
        tally.transactions += 1
        tally.foreign_rows += sum(1 for r in kits if r.client_id != tid) + sum(1 for c in raw_ids if c != tid)
        if own not in {r.name for r in kits}:
            tally.missing_own += 1
        if name is not None:
            if name in {r.name for r in kits}:
                tally.written.setdefault(tid, set()).add(name)
            else:
                tally.missing_writes += 1
        pid, statement_timeout, idle_timeout = backend
        tally.backends.add(pid)
        tally.timeouts.add((statement_timeout, idle_timeout))
        tally.clients.add(client)


_RAW = text("SELECT client_id FROM brand_kits")  # no predicate: RLS alone decides
_PID = text("SELECT pg_backend_pid()")
_BACKEND = text("SELECT pg_backend_pid(), current_setting('statement_timeout'),"
                " current_setting('idle_in_transaction_session_timeout')")


def _expected_writes(tenants: list[uuid.UUID]) -> dict[uuid.UUID, set[str]]:
    expected: dict[uuid.UUID, set[str]] = {}
    for worker in range(WORKERS):
        for step in range(TRANSACTIONS_PER_WORKER):
            tid, name = _plan(worker, step, tenants)
            if name is not None:
                expected.setdefault(tid, set()).add(name)
    return expected


def _check(tally: Tally, tenants: list[uuid.UUID], system, pool_mode: str) -> None:
    total = WORKERS * TRANSACTIONS_PER_WORKER
    assert (tally.refused, dict(tally.errors)) == (0, {}), (
        f"{tally.refused} refused contexts in {tally.transactions + sum(tally.errors.values())} transactions "
        f"(stopped after {GIVE_UP_AFTER} errors)")
    assert tally.transactions == total
    assert tally.foreign_rows == 0, "rows of another tenant were visible"
    assert (tally.missing_own, tally.missing_writes) == (0, 0)
    expected = _expected_writes(tenants)
    assert tally.written == expected
    # Every tenant's writes are there afterwards (read across tenants by the system scope).
    with system.transaction() as conn:
        rows = conn.execute(select(brand_kits.c.client_id, brand_kits.c.name).where(brand_kits.c.name.like("w-%"))).all()
    stored: dict[uuid.UUID, set[str]] = {}
    for row in rows:
        stored.setdefault(row.client_id, set()).add(row.name)
    assert stored == expected
    # The pooler really shared its backends: never more than its pool, and in transaction mode
    # fewer backends than the client connections that used them.
    assert len(tally.backends) <= POOL
    if pool_mode == "transaction":
        assert len(tally.clients) > len(tally.backends)
    assert tally.timeouts == {("30s", "1min")}, "the role's timeouts were not in force on every backend used"


@pytest.fixture()
def world(system):
    tenants = make_tenants(system, *[f"P{i}" for i in range(TENANTS)])
    return tenants, {tid: f"Brand P{i}" for i, tid in enumerate(tenants)}


def test_threads_through_the_pooler(bouncer, pooled_url, world, system):
    tenants, own = world
    db = Database(pooled_url, options=_engine_options(bouncer.pool_mode))
    tally = Tally()
    deadline = time.monotonic() + 30  # bounded in time as well as in count

    def work(worker: int) -> None:
        for step in range(TRANSACTIONS_PER_WORKER):
            if tally.give_up(deadline):
                return
            tid, name = _plan(worker, step, tenants)
            try:
                with with_tenant_scope(db, tid).scoped_transaction() as tx:
                    if name is not None:
                        tx.scoped_insert(brand_kits, {"name": name})
                    kits = tx.scoped_query(brand_kits)
                    raw_ids = tx.connection.execute(_RAW).scalars().all()
                    backend = tuple(tx.connection.execute(_BACKEND).one())
                    client = id(tx.connection.connection.driver_connection)
                _record(tally, tid, own[tid], name, kits, raw_ids, backend, client)
            except Exception as exc:  # counted, not raised: the test reports all of them
                tally.failed(exc)

    try:
        if bouncer.pool_mode == "transaction":  # open all 8 client connections up front
            held = [db.engine.connect() for _ in range(WORKERS)]
            for conn in held:
                conn.close()
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            list(pool.map(work, range(WORKERS)))
    finally:
        db.close()
    _check(tally, tenants, system, bouncer.pool_mode)


async def test_asyncio_through_the_pooler(bouncer, pooled_url, world, system):
    tenants, own = world
    adb = AsyncDatabase(pooled_url, options=_engine_options(bouncer.pool_mode))
    tally = Tally()
    deadline = time.monotonic() + 30

    async def work(worker: int) -> None:
        for step in range(TRANSACTIONS_PER_WORKER):
            if tally.give_up(deadline):
                return
            tid, name = _plan(worker, step, tenants)
            try:
                async with with_tenant_scope(adb, tid).scoped_transaction() as tx:
                    if name is not None:
                        await tx.scoped_insert(brand_kits, {"name": name})
                    await asyncio.sleep(0)  # let the other tasks interleave mid-transaction
                    kits = await tx.scoped_query(brand_kits)
                    raw_ids = (await tx.connection.execute(_RAW)).scalars().all()
                    backend = tuple((await tx.connection.execute(_BACKEND)).one())
                    client = id((await tx.connection.get_raw_connection()).driver_connection)
                _record(tally, tid, own[tid], name, kits, raw_ids, backend, client)
            except Exception as exc:
                tally.failed(exc)

    try:
        if bouncer.pool_mode == "transaction":
            held = [await adb.engine.connect() for _ in range(WORKERS)]
            for conn in held:
                await conn.close()
        await asyncio.gather(*(work(w) for w in range(WORKERS)))
    finally:
        await adb.close()
    _check(tally, tenants, system, bouncer.pool_mode)
