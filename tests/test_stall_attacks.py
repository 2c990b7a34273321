"""Issue 24, items 3 and 5: the watchdog never ends a backend because the attacker queued behind it,
ends a repeat staller for good, and every resource one transaction can take is bounded.

Every attack runs as the runtime role, as SQL injected into tenant A's own transaction (through
rtv-db's API: the transaction starts with A's signed context). Each is shown working against the
behaviour before this change, then blocked:

* the lock queue: A queues ``LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE`` behind B's ordinary
  transaction; everything else on the table queues behind A. The old ``lock`` rule ended every
  backend in A's ``pg_blocking_pids()`` once A had waited ``max_lock_wait``: B, the victim (shown
  by asking PostgreSQL what that rule read). Now A is ended at the first sweep (``lock_mode``) and
  nobody else, however long everyone has waited.
* the repeat staller: on revision 0009 (before this change) the watchdog ends A again and again and
  A's next transaction starts as before; now A's third counted termination quarantines the tenant:
  its next context is refused (``TenantContextRefusedError``) until an operator releases it.
* a row wait across tenants (a global unique key a tenant can write, planted: today's schema has
  none): A inserts B's in-flight key and waits on B. The old rule ended B; now A, the waiter, goes.
* memory (``work_mem`` raised in the transaction), locks (a sweep of the catalogs), temporary files
  (``temp_file_limit`` was -1): unbounded before, shown; now the ``memory`` and ``locks`` rules end
  the backend and the role's ``temp_file_limit`` refuses the sort, and the role cannot lift it.

No timing is asserted: who was terminated, for which rule, whether B's request completed, counts
of terminations, the quarantine's state. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from conftest import Cluster, Tenants, database_at, make_tenants
from rtv_db import Database, EngineOptions, brand_kits, migrate, with_tenant_scope
from rtv_db._backend_memory import BackendMemory
from rtv_db.cli import cli
from rtv_db.config import to_libpq_url
from rtv_db.errors import TenantContextRefusedError
from rtv_db.targets import Target
from rtv_db.verify import check_runtime_role_settings, verify
from rtv_db.watchdog import connect_watchdog, quarantined_tenants, sweep
from test_watchdog import LIFT, STALL, in_thread, limits

# -- helpers --------------------------------------------------------------------------------------


@contextmanager
def open_transaction(db: Database, tenant: uuid.UUID, *statements: str) -> Iterator[dict]:
    """``tenant``'s transaction through rtv-db's API, in a thread: it runs ``statements`` and stays
    open until ``release`` is set (then commits), or until its backend is ended. The dict has its
    pid as soon as the transaction has started (before the statements: one of them may wait),
    ``done`` (statements run), ``committed`` or ``error``."""
    state: dict = {"started": threading.Event(), "done": threading.Event(), "release": threading.Event(),
                   "pid": None, "committed": False, "error": None}

    def run() -> None:
        try:
            with with_tenant_scope(db, tenant).scoped_transaction() as tx:
                state["pid"] = tx.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                state["started"].set()
                for statement in statements:
                    tx.connection.execute(text(statement))
                state["done"].set()
                state["release"].wait(30)
                tx.connection.execute(text("SELECT 1"))  # an ended backend fails here
            state["committed"] = True
        except (DBAPIError, TenantContextRefusedError) as exc:
            state["error"] = exc
        finally:
            state["started"].set()
            state["done"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert state["started"].wait(10) and state["pid"], state["error"]
    try:
        yield state
    finally:
        state["release"].set()
        thread.join(timeout=35)
        assert not thread.is_alive()


def blocking_pids(admin_conn: psycopg.Connection, pid: int) -> list[int]:
    return sorted(admin_conn.execute("SELECT pg_blocking_pids(%s)", (pid,)).fetchone()[0])


def waiting_on(admin_conn: psycopg.Connection, holder: int, timeout: float = 5.0) -> int:
    """The pid of a backend that waits for ``holder`` (bounded poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin_conn.execute("SELECT l.pid FROM pg_locks l WHERE NOT l.granted AND %s = ANY (pg_blocking_pids(l.pid))",
                                 (holder,)).fetchone()
        if row:
            return row[0]
        time.sleep(0.02)
    raise AssertionError(f"nobody waits for {holder}")


# The `lock` rule before this change, as it read pg_locks: every holder in a waiter's
# pg_blocking_pids() was ended once the waiter had waited max_lock_wait (here: any wait at all).
_OLD_LOCK_RULE = """
SELECT DISTINCT holder.pid
FROM pg_catalog.pg_locks l CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(l.pid)) AS holder(pid)
JOIN pg_catalog.pg_stat_activity a ON a.pid = holder.pid AND a.usename = 'rtv_app'
WHERE NOT l.granted AND l.waitstart IS NOT NULL
ORDER BY 1
"""


def old_lock_rule_victims(admin_conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in admin_conn.execute(_OLD_LOCK_RULE)]


def wait_for_sleep(admin_conn: psycopg.Connection, pid: int, timeout: float = 60.0) -> None:
    """Until ``pid`` runs the pg_sleep at the end of its statement (what it took is then held)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin_conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == ("PgSleep",):
            return
        time.sleep(0.05)
    raise AssertionError(f"backend {pid} never reached its pg_sleep")


def terminations(done) -> list[tuple]:
    return sorted((t.pid, t.reason, t.tenant, t.terminated) for t in done)


# -- item 3: the lock queue -------------------------------------------------------------------------


def test_the_lock_queue_ends_the_attacker_never_the_victim(db, system, target, tenants, admin_conn):
    (c,) = make_tenants(system, "C")
    with open_transaction(db, tenants.b, "UPDATE brand_kits SET name = name") as victim:  # B's ordinary transaction
        assert victim["done"].wait(5)
        with open_transaction(db, tenants.a, *STALL) as attacker:
            assert waiting_on(admin_conn, victim["pid"]) == attacker["pid"]  # A queued behind B ...
            queued, result = in_thread(lambda: with_tenant_scope(db, c).scoped_query(brand_kits))
            other = waiting_on(admin_conn, attacker["pid"])  # ... and C's read queued behind A
            assert blocking_pids(admin_conn, attacker["pid"]) == [victim["pid"]]
            assert blocking_pids(admin_conn, other) == [attacker["pid"]]
            time.sleep(0.05)  # every wait is now past the 1 ms limit below
            # The old rule: once A had waited, the holder of what A asked for went: B.
            assert victim["pid"] in old_lock_rule_victims(admin_conn)
            with connect_watchdog(target.require_admin()) as conn:
                done = sweep(conn, limits(max_lock_wait_ms=1))
            assert terminations(done) == [(attacker["pid"], "lock_mode", tenants.a, True)]
            assert "AccessExclusiveLock (waiting) on brand_kits" in done[0].detail
            queued.join(timeout=10)
            assert result.get("rows") and [r.name for r in result["rows"]] == ["Brand C"], result
            assert attacker["done"].wait(5) and isinstance(attacker["error"], DBAPIError)
    assert victim["committed"] and victim["error"] is None  # B's request completed
    assert [r.name for r in with_tenant_scope(db, tenants.b).scoped_query(brand_kits)] == ["Brand B"]


def _attack_three_times(db, target, tenants, victim) -> list[list]:
    """A queues ACCESS EXCLUSIVE behind B three times; one sweep after each."""
    rounds = []
    for _ in range(3):
        with open_transaction(db, tenants.a, *STALL) as attacker:
            with psycopg.connect(to_libpq_url(target.require_admin()), autocommit=True) as admin:
                assert waiting_on(admin, victim["pid"]) == attacker["pid"]
            with connect_watchdog(target.require_admin()) as conn:
                rounds.append(sweep(conn, limits(max_lock_wait_ms=60_000)))
            assert attacker["done"].wait(5) and isinstance(attacker["error"], DBAPIError)
    return rounds


@pytest.fixture()
def old_world(cluster: Cluster, template: str) -> Iterator[tuple[Target, Tenants]]:
    """A database at revision 0009 (before this change), with tenants A and B."""
    with database_at(cluster, template, "0009") as world:
        yield world


def test_control_on_0009_the_watchdog_ends_a_repeat_staller_again_and_again(old_world):
    target, tenants = old_world
    db = Database(target.runtime_url)
    try:
        with open_transaction(db, tenants.b, "UPDATE brand_kits SET name = name") as victim:
            assert victim["done"].wait(5)
            rounds = _attack_three_times(db, target, tenants, victim)
            # no mark: the watchdog cannot tell whose the backends were, and quarantines nobody
            assert [[(t.reason, t.tenant, t.quarantined) for t in done] for done in rounds] == [[("lock_mode", None, False)]] * 3
            with open_transaction(db, tenants.a, *LIFT) as fourth:  # ... and A is back, as often as it likes
                assert fourth["done"].wait(5) and fourth["error"] is None
        assert victim["committed"]
    finally:
        db.close()


def test_a_repeat_staller_is_quarantined_until_released(db, target, tenants, admin_conn):
    with open_transaction(db, tenants.b, "UPDATE brand_kits SET name = name") as victim:
        assert victim["done"].wait(5)
        with open_transaction(db, tenants.a, "SELECT count(*) FROM brand_kits") as bystander:  # another request of A's
            rounds = _attack_three_times(db, target, tenants, victim)
        assert [[(t.reason, t.tenant, t.quarantined) for t in done if t.reason != "quarantine"] for done in rounds] \
            == [[("lock_mode", tenants.a, False)], [("lock_mode", tenants.a, False)], [("lock_mode", tenants.a, True)]]
        # quarantined: A's other open transaction ended with it
        assert [(t.pid, t.reason) for t in rounds[2] if t.reason == "quarantine"] == [(bystander["pid"], "quarantine")]
        assert isinstance(bystander["error"], DBAPIError)
        # A's next transaction is refused at its start, before any statement of its runs
        with pytest.raises(TenantContextRefusedError, match="quarantined by the watchdog"):
            with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
                tx.connection.execute(text("LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE"))
        assert victim["error"] is None
    assert victim["committed"]
    assert [r.name for r in with_tenant_scope(db, tenants.b).scoped_query(brand_kits)] == ["Brand B"]
    with connect_watchdog(target.require_admin()) as conn:
        (held,) = quarantined_tenants(conn)
    assert (held.tenant_id, held.reason, held.terminations) == (tenants.a, "lock_mode", 3)
    listed = CliRunner().invoke(cli, ["watchdog", "quarantined", "--database-url", target.require_admin()])
    shown = " ".join(listed.output.split())  # the console wraps long lines
    assert listed.exit_code == 0 and f"{tenants.a}" in shown and "after 3 terminations (last: lock_mode)" in shown
    released = CliRunner().invoke(cli, ["watchdog", "release", str(tenants.a), "--database-url", target.require_admin()])
    assert released.exit_code == 0 and f"released tenant {tenants.a}" in " ".join(released.output.split()), released.output
    assert [r.name for r in with_tenant_scope(db, tenants.a).scoped_query(brand_kits)] == ["Brand A"]
    again = CliRunner().invoke(cli, ["watchdog", "release", str(tenants.a), "--database-url", target.require_admin()])
    assert "was not quarantined" in " ".join(again.output.split())
    assert "no tenant is quarantined" in CliRunner().invoke(
        cli, ["watchdog", "quarantined", "--database-url", target.require_admin()]).output
    bad = CliRunner().invoke(cli, ["watchdog", "release", "not-a-tenant", "--database-url", target.require_admin()])
    assert bad.exit_code == 1 and "not a tenant id" in " ".join(bad.output.split())


def test_the_runtime_role_can_neither_forge_a_mark_nor_touch_the_quarantine(db, target, tenants, admin_conn):
    """The marks: two shared advisory locks per transaction, different in every transaction (so
    pg_locks, which the runtime role reads, links no two transactions and names no tenant); only
    the watchdog's function reads the tenant back. The runtime role cannot take advisory locks
    or call the watchdog's functions."""
    marks = []
    for _ in range(2):
        with with_tenant_scope(db, tenants.b).scoped_transaction() as tx:
            keys = tx.connection.execute(text(
                "SELECT array_agg((classid::bigint << 32) | objid::bigint ORDER BY objsubid) FROM pg_locks "
                "WHERE pid = pg_backend_pid() AND locktype = 'advisory'")).scalar_one()
            xid = tx.connection.execute(text("SELECT pg_current_xact_id()::text::bigint % 4294967296")).scalar_one()
            marks.append((keys, xid))
    (k1, x1), (k2, x2) = marks
    assert len(k1) == len(k2) == 2 and set(k1).isdisjoint(k2)
    decrypt = "SELECT rtv.watchdog_tenant(%s, %s, %s::text::xid)"
    assert admin_conn.execute(decrypt, (k1[0], k1[1], x1)).fetchone()[0] == tenants.b
    assert admin_conn.execute(decrypt, (k2[0], k2[1], x2)).fetchone()[0] == tenants.b
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as attacker:
        for statement in ("SELECT pg_advisory_xact_lock_shared(1)", "SELECT pg_advisory_xact_lock_shared(1, 2)",
                          f"SELECT rtv.watchdog_tenant({k1[0]}, {k1[1]}, '{x1}')",
                          f"SELECT rtv.watchdog_release('{tenants.a}')", "SELECT * FROM rtv.watchdog_quarantined()",
                          f"SELECT rtv.watchdog_record_termination('{tenants.b}', 'lock_mode', 1, 60000)",
                          "SELECT * FROM rtv_secret.stall_quarantine"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attacker.execute(statement)


def test_without_a_context_the_staller_is_ended_but_counted_against_nobody(db, target, tenants, admin_conn):
    """What stays stated, not blocked: SQL injected into A's transaction ends it (COMMIT) and stalls
    in a new one, which has no context and so no mark. ``lock_mode`` ends it at the first sweep like
    any other, but the watchdog cannot tell whose it was: nobody is counted or quarantined. (A mark
    that outlived the transaction would be worse: behind PgBouncer the next transaction on that
    backend may be another tenant's.)"""
    with open_transaction(db, tenants.b, "UPDATE brand_kits SET name = name") as victim:
        assert victim["done"].wait(5)
        with open_transaction(db, tenants.a, "COMMIT", "BEGIN", *STALL) as attacker:
            assert waiting_on(admin_conn, victim["pid"]) == attacker["pid"]
            with connect_watchdog(target.require_admin()) as conn:
                done = sweep(conn, limits())
            assert terminations(done) == [(attacker["pid"], "lock_mode", None, True)]
    assert victim["committed"]
    assert admin_conn.execute("SELECT count(*) FROM rtv_secret.stall_terminations").fetchone() == (0,)


# -- row waits across tenants -----------------------------------------------------------------------


def test_a_row_wait_across_tenants_ends_the_waiter(db, target, tenants, admin_conn):
    """Planted: a table with a global unique key the runtime role may write (rtv-db's schema has
    none: every unique of a tenant table leads with client_id, and the runtime role cannot write
    clients' keys). B inserts a key in an open transaction; A inserts the same and waits on B."""
    admin_conn.execute("CREATE TABLE public.shared_names (name text PRIMARY KEY)")
    admin_conn.execute("GRANT SELECT, INSERT ON public.shared_names TO rtv_app")
    with open_transaction(db, tenants.b, "INSERT INTO shared_names VALUES ('taken')") as victim:
        assert victim["done"].wait(5)
        with open_transaction(db, tenants.a, *LIFT, "INSERT INTO shared_names VALUES ('taken')") as attacker:
            assert waiting_on(admin_conn, victim["pid"]) == attacker["pid"]
            assert blocking_pids(admin_conn, attacker["pid"]) == [victim["pid"]]
            time.sleep(0.05)
            assert victim["pid"] in old_lock_rule_victims(admin_conn)  # the old rule ended B
            with connect_watchdog(target.require_admin()) as conn:
                done = sweep(conn, limits(max_lock_wait_ms=1))
            assert terminations(done) == [(attacker["pid"], "cross_wait", tenants.a, True)]
            assert f"on backend {victim['pid']} of another tenant" in done[0].detail
            assert attacker["done"].wait(5) and isinstance(attacker["error"], DBAPIError)
    assert victim["committed"]
    assert admin_conn.execute("SELECT count(*) FROM shared_names").fetchone() == (1,)


# -- item 5: memory, locks, temporary files ---------------------------------------------------------

_BIG_HASH = ("SELECT s.n, pg_sleep(20) FROM (SELECT count(*) AS n FROM "
             "(SELECT g FROM generate_series(1, 4000000) g GROUP BY g) x) s")


def test_memory_rule_ends_a_statement_that_raised_work_mem(db, target, tenants, admin_conn):
    """A raises work_mem in its transaction and hashes 4 million groups (about 380 MB measured
    here), then holds it. Before: no limit anywhere (the old rules end nothing); now the
    ``memory`` rule (200 MB) ends A."""
    memory = BackendMemory()
    with open_transaction(db, tenants.a, *LIFT, "SET LOCAL work_mem = '1GB'", _BIG_HASH) as attacker:
        wait_for_sleep(admin_conn, attacker["pid"])  # the hash is built and held
        held = memory.rss_anon_kb(attacker["pid"]) or 0
        assert held >= 250 * 1024, held
        with connect_watchdog(target.require_admin()) as conn:
            assert sweep(conn, limits(max_memory_mb=0)) == []  # the rules before this change
            done = sweep(conn, limits(max_memory_mb=200))
        assert terminations(done) == [(attacker["pid"], "memory", tenants.a, True)]
        print(f"\nmemory: A's backend held {held // 1024} MB when measured; ended: {done[0].detail}")
        assert attacker["done"].wait(10) and isinstance(attacker["error"], DBAPIError)


_SWEEP_THE_CATALOGS = """
DO $$
DECLARE r regclass;
BEGIN
    FOR r IN SELECT c.oid::regclass FROM pg_class c
             WHERE c.relkind IN ('r', 'v', 'm', 'p') AND has_schema_privilege(c.relnamespace, 'USAGE')
               AND has_table_privilege(c.oid, 'SELECT')
    LOOP
        EXECUTE format('SELECT 1 FROM %s LIMIT 0', r);
    END LOOP;
END
$$
"""


def test_locks_rule_ends_a_transaction_that_fills_the_lock_table(db, target, tenants, admin_conn):
    """One SELECT of every readable relation: each keeps its lock to the end of the transaction."""
    with open_transaction(db, tenants.a, *LIFT, _SWEEP_THE_CATALOGS, "SELECT pg_sleep(20)") as attacker:
        wait_for_sleep(admin_conn, attacker["pid"])
        held = admin_conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT fastpath",
                                  (attacker["pid"],)).fetchone()[0]
        assert held > 100, held
        with connect_watchdog(target.require_admin()) as conn:
            assert sweep(conn, limits(max_locks=0)) == []  # the rules before this change
            done = sweep(conn, limits(max_locks=100))
        assert terminations(done) == [(attacker["pid"], "locks", tenants.a, True)]
        print(f"\nlocks: A's backend held {held} entries of the shared lock table; ended: {done[0].detail}")
        assert attacker["done"].wait(10) and isinstance(attacker["error"], DBAPIError)


def test_the_runtime_role_cannot_lift_its_temp_file_limit(target, admin_conn):
    database = admin_conn.execute("SELECT current_database()").fetchone()[0]
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as attacker:
        assert attacker.execute("SHOW temp_file_limit").fetchone() == ("1GB",)
        for statement in ("SET temp_file_limit = -1", "SELECT set_config('temp_file_limit', '-1', false)",
                          "RESET temp_file_limit",
                          "ALTER ROLE current_user SET temp_file_limit = -1",
                          sql.SQL("ALTER ROLE current_user IN DATABASE {} SET temp_file_limit = -1").format(
                              sql.Identifier(database))):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="temp_file_limit"):
                attacker.execute(statement)
        with attacker.transaction():
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="temp_file_limit"):
                attacker.execute("SET LOCAL temp_file_limit = -1")
        attacker.execute("RESET ALL")  # what rtv.clean_session() runs: it leaves the role's own setting alone
        assert attacker.execute("SHOW temp_file_limit").fetchone() == ("1GB",)
    db = Database(target.runtime_url)
    try:
        with with_tenant_scope(db, uuid.uuid4()).scoped_transaction() as tx:
            assert tx.connection.execute(text("SHOW temp_file_limit")).scalar_one() == "1GB"
    finally:
        db.close()


_BIG_SORT = ("SELECT count(*) FROM (SELECT md5(g::text) AS m FROM generate_series(1, 400000) g "
             "ORDER BY 1 OFFSET 0) s")


def test_the_temp_file_limit_refuses_a_big_sort(target, admin_conn, monkeypatch):
    """With RTV_DB_TEMP_FILE_LIMIT_KB=4096 (4 MB, so that the test stays small): the same sort of
    about 20 MB with work_mem 64kB wrote its temporary files before (the role's setting removed,
    as before this change) and is refused now."""
    database = admin_conn.execute("SELECT current_database()").fetchone()[0]
    monkeypatch.setenv("RTV_DB_TEMP_FILE_LIMIT_KB", "4096")  # what the application and migrate both see
    migrate(target.require_admin(), dataclasses.replace(target.settings, temp_file_limit_kb=4096))
    admin_conn.execute(sql.SQL("ALTER ROLE rtv_app IN DATABASE {} RESET temp_file_limit").format(sql.Identifier(database)))
    assert [f.code for f in verify(target.require_admin(), checks=[check_runtime_role_settings])] == ["ROLE_TEMP_FILES_UNBOUNDED"]
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as before:
        assert before.execute("SHOW temp_file_limit").fetchone() == ("-1",)
        before.execute("SET work_mem = '64kB'")
        plan = before.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {_BIG_SORT}").fetchone()[0][0]["Plan"]
        nodes = [plan]
        while nodes[-1].get("Node Type") != "Sort" and nodes[-1].get("Plans"):
            nodes.append(nodes[-1]["Plans"][0])
        sort = nodes[-1]
        assert sort["Node Type"] == "Sort" and sort["Sort Space Type"] == "Disk" and sort["Sort Space Used"] > 4096, sort
        print(f"\ntemp files: before, one sort wrote {sort['Sort Space Used']} kB")
    migrate(target.require_admin(), dataclasses.replace(target.settings, temp_file_limit_kb=4096))
    assert verify(target.require_admin(), checks=[check_runtime_role_settings]) == []
    db = Database(target.runtime_url)
    try:
        with pytest.raises(DBAPIError, match=r"temporary file size exceeds \"temp_file_limit\" \(4096kB\)"):
            with with_tenant_scope(db, uuid.uuid4()).scoped_transaction() as tx:
                tx.connection.execute(text("SET LOCAL work_mem = '64kB'"))
                tx.connection.execute(text(_BIG_SORT))
    finally:
        db.close()


# -- through PgBouncer ----------------------------------------------------------------------------


def test_through_pgbouncer_the_staller_is_quarantined_and_the_shared_backends_serve_the_others(
        bouncers, target, tenants, admin_conn):
    """Transaction pooling, three backends shared by every client connection: the marks are per
    transaction, so a backend that served A's attack serves B next without being A's."""
    bouncer = bouncers.get("transaction", default_pool_size=3)
    db = Database(bouncer.url(target.runtime_url), options=EngineOptions(pool_size=4, max_overflow=0, pool_timeout=10))
    try:
        with open_transaction(db, tenants.b, "UPDATE brand_kits SET name = name") as victim:
            assert victim["done"].wait(5)
            rounds = _attack_three_times(db, target, tenants, victim)
            assert [[(t.reason, t.tenant, t.quarantined) for t in done] for done in rounds] == \
                [[("lock_mode", tenants.a, False)], [("lock_mode", tenants.a, False)], [("lock_mode", tenants.a, True)]]
            with pytest.raises(TenantContextRefusedError, match="quarantined"):
                with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
        assert victim["committed"]
        served = set()
        for _ in range(12):  # B's requests on the pooled backends, A's among them
            with with_tenant_scope(db, tenants.b).scoped_transaction() as tx:
                served.add(tx.connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
                assert [r.name for r in tx.scoped_query(brand_kits)] == ["Brand B"]
        with open_transaction(db, tenants.b, "SELECT count(*) FROM brand_kits") as later:
            assert later["done"].wait(5)
            with connect_watchdog(target.require_admin()) as conn:
                assert sweep(conn, limits()) == []  # nothing of A's is left on any backend
        assert later["committed"]
    finally:
        db.close()
