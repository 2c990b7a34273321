"""Issue 16, item 2 (and issue 24, items 3 and 5): no tenant can stall the others, whatever it does to
its own session; the watchdog's rules one by one.

A tenant's transaction (the runtime role, signed context of tenant A) lifts both its timeouts
(``SET LOCAL statement_timeout = 0``, ``SET LOCAL idle_in_transaction_session_timeout = 0``). With
``LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE`` (which needs only the grants the application
needs) every other tenant's query on the table waits for as long as A likes: shown first, with a
bounded wait, without the watchdog. With it, A's backend is ended at the first sweep (``lock_mode``)
and B's query then succeeds. Without a strong lock A can only hold its own rows: another request
of A's own waits, never B's; the ``lock``, ``idle`` and ``statement`` rules end the holder within
their limits. Reaction times are measured and printed, never asserted. The attacks of issue 24
(the lock queue, repeat stallers, memory, locks, temporary files) are in tests/test_stall_attacks.py.
Every wait is bounded (lock_timeout, join timeouts, iteration counts); connections are local.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from rtv_db import brand_kits, with_tenant_scope
from rtv_db._backend_memory import probe_backend_memory
from rtv_db.cli import cli
from rtv_db.config import to_libpq_url
from rtv_db.errors import ConfigurationError
from rtv_db.watchdog import WatchdogLimits, connect_watchdog, probe, run_watchdog, sweep

LIFT = ("SET LOCAL statement_timeout = 0", "SET LOCAL idle_in_transaction_session_timeout = 0")
STALL = (*LIFT, "LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE")
# A's own row, locked: what a tenant can hold without a strong lock (only A's requests need it).
OWN_ROW = (*LIFT, "UPDATE brand_kits SET name = name")


def limits(**overrides) -> WatchdogLimits:
    values = dict(statement_ms=30_000, idle_in_transaction_ms=60_000, grace_ms=0, max_lock_wait_ms=1_000,
                  max_transaction_ms=300_000, interval_ms=100)
    values.update(overrides)
    return WatchdogLimits(**values)


@contextmanager
def stalling_tenant(db, tenant, *, statements=STALL, then: str | None = None) -> Iterator[dict]:
    """Tenant ``tenant``'s transaction with both timeouts lifted, having run ``statements``.

    In a thread: it sleeps in Python (idle in transaction), or runs ``then`` (say, pg_sleep), until
    its backend is terminated or ``release`` is set. Yields a dict with its pid and what happened.
    """
    state: dict = {"locked": threading.Event(), "release": threading.Event(), "error": None, "pid": None}

    def hold() -> None:
        try:
            with with_tenant_scope(db, tenant).scoped_transaction() as tx:
                for statement in statements:
                    tx.connection.execute(text(statement))
                state["pid"] = tx.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                assert tx.connection.execute(text("SHOW statement_timeout")).scalar_one() == "0"
                state["locked"].set()
                if then:
                    tx.connection.execute(text(then))
                else:
                    state["release"].wait(20)
                    tx.connection.execute(text("SELECT 1"))  # a terminated backend fails here
        except DBAPIError as exc:
            state["error"] = exc
        finally:
            state["ended"] = time.monotonic()
            state["locked"].set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert state["locked"].wait(10) and state["pid"], state["error"]
    try:
        yield state
    finally:
        state["release"].set()
        thread.join(timeout=25)
        assert not thread.is_alive()


def in_thread(work) -> tuple[threading.Thread, dict]:
    """Run ``work()`` in a thread; its result or DBAPIError, and how long it took, in the dict."""
    result: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result["rows"] = work()
        except DBAPIError as exc:
            result["error"] = exc
        result["waited"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def own_row_update(db, tenant):
    """Another request of ``tenant``: it updates the same brand kit (and so waits for its holder)."""
    def work():
        with with_tenant_scope(db, tenant).scoped_transaction() as tx:
            return tx.connection.execute(text("UPDATE brand_kits SET name = name RETURNING name")).scalars().all()
    return in_thread(work)


def wait_until_waiting(admin_conn, pid_holder: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin_conn.execute("SELECT count(*) FROM pg_locks l WHERE NOT l.granted AND %s = ANY (pg_blocking_pids(l.pid))",
                              (pid_holder,)).fetchone()[0]:
            return
        time.sleep(0.02)
    raise AssertionError("nobody waits for the holder")


def test_without_the_watchdog_the_stall_lasts_as_long_as_the_holder_likes(db, tenants, admin_conn):
    with stalling_tenant(db, tenants.a) as holder:
        thread, result = in_thread(lambda: with_tenant_scope(db, tenants.b).scoped_query(brand_kits))
        wait_until_waiting(admin_conn, holder["pid"])
        thread.join(timeout=2.5)
        assert thread.is_alive(), "B should still be waiting: nothing bounds A's lock"
        # B's own statement_timeout (30 s) is B's, not A's: A's session has no timeout at all.
        assert admin_conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                  (holder["pid"],)).fetchone()[0] == "idle in transaction"
        holder["release"].set()
        thread.join(timeout=10)
    assert result.get("rows") and result["waited"] >= 2.5


def test_a_strong_lock_is_ended_at_the_first_sweep_and_the_other_tenant_proceeds(db, target, tenants, admin_conn):
    """``lock_mode``: A holds ACCESS EXCLUSIVE, B waits. With every time limit far away (60 s), the
    first sweep ends A; B's query then succeeds."""
    stop = threading.Event()
    seen: list = []
    configured = limits(max_lock_wait_ms=60_000)

    def watch() -> None:
        for done in run_watchdog(target.require_admin(), configured, stop=stop, iterations=400):
            seen.extend(done)

    with stalling_tenant(db, tenants.a) as holder:
        thread, result = in_thread(lambda: with_tenant_scope(db, tenants.b).scoped_query(brand_kits))
        wait_until_waiting(admin_conn, holder["pid"])
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            thread.join(timeout=15)
        finally:
            stop.set()
            watcher.join(timeout=10)
    assert not thread.is_alive(), "B still waits"
    assert "error" not in result, result.get("error")
    assert [r.name for r in result["rows"]] == ["Brand B"]
    assert [(t.pid, t.reason, t.terminated, t.tenant) for t in seen] == [(holder["pid"], "lock_mode", True, tenants.a)], seen
    assert "AccessExclusiveLock on brand_kits" in seen[0].detail
    assert isinstance(holder["error"], DBAPIError)  # A's transaction is gone (rolled back)
    print(f"\nwatchdog [lock_mode]: B waited {result['waited']:.3f} s (interval {configured.interval_ms} ms)")
    # A's rows are intact: termination is a rollback of A's open transaction, nothing else.
    assert len(with_tenant_scope(db, tenants.a).scoped_query(brand_kits)) == 1


@pytest.mark.parametrize("rule", ["lock", "idle", "statement"])
def test_the_watchdog_ends_the_holder_of_its_own_tenants_row(db, target, tenants, admin_conn, rule):
    """A locks its own row (an UPDATE) with both timeouts lifted; another request of A's waits for
    it. B is never held back (its query returns while A holds the row). ``lock``: the waiter has
    waited 1 s; ``idle``: A sits idle in its transaction for 1 s; ``statement``: A runs pg_sleep.
    Each ends A's holder within its limit; A's other request then succeeds."""
    configured = {
        "lock": limits(max_lock_wait_ms=1_000),
        "idle": limits(max_lock_wait_ms=60_000, idle_in_transaction_ms=1_000),
        "statement": limits(max_lock_wait_ms=60_000, statement_ms=1_000),
    }[rule]
    stop = threading.Event()
    seen: list = []

    def watch() -> None:
        for done in run_watchdog(target.require_admin(), configured, stop=stop, iterations=400):
            seen.extend(done)

    with stalling_tenant(db, tenants.a, statements=OWN_ROW,
                         then="SELECT pg_sleep(20)" if rule == "statement" else None) as holder:
        assert [r.name for r in with_tenant_scope(db, tenants.b).scoped_query(brand_kits)] == ["Brand B"]
        waiter, result = own_row_update(db, tenants.a)
        wait_until_waiting(admin_conn, holder["pid"])
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            waiter.join(timeout=15)
        finally:
            stop.set()
            watcher.join(timeout=10)
    assert not waiter.is_alive(), "A's other request still waits"
    assert "error" not in result, result.get("error")
    assert result["rows"] == ["Brand A"]
    assert [(t.pid, t.reason, t.terminated, t.tenant) for t in seen] == [(holder["pid"], rule, True, tenants.a)], seen
    assert isinstance(holder["error"], DBAPIError)
    reaction = result["waited"] - 1.0
    print(f"\nwatchdog [{rule}]: A's other request waited {result['waited']:.3f} s (limit 1.0 s, interval "
          f"{configured.interval_ms} ms): reaction {reaction * 1000:.0f} ms after the limit")


def test_other_roles_and_healthy_transactions_are_left_alone(db, target, tenants, admin_conn):
    with psycopg.connect(to_libpq_url(target.require_admin()), autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")  # an admin's maintenance
        with pytest.raises(DBAPIError, match="terminating connection"):
            with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
                tx.connection.execute(text("SELECT count(*) FROM brand_kits"))  # young, not blocking anyone
                with connect_watchdog(target.require_admin()) as conn:
                    time.sleep(0.2)
                    assert sweep(conn, limits(statement_ms=100, idle_in_transaction_ms=100_000)) == []
                    # the admin's own lock and old transaction: not the runtime role's, never touched
                    (done,) = sweep(conn, limits(max_transaction_ms=1))  # ... but this rule does apply to A
                    assert done.reason == "transaction"
        assert other.execute("SELECT 1").fetchone() == (1,)
        other.execute("COMMIT")


def test_transaction_age_limit(db, target, tenants):
    with stalling_tenant(db, tenants.a, statements=OWN_ROW) as holder:
        time.sleep(0.3)
        with connect_watchdog(target.require_admin()) as conn:
            (done,) = sweep(conn, limits(max_transaction_ms=200, max_lock_wait_ms=60_000))
        assert (done.pid, done.reason, done.tenant) == (holder["pid"], "transaction", tenants.a)
        holder["locked"].wait(1)
    assert isinstance(holder["error"], DBAPIError)
    # `transaction` is not counted against the tenant: a slow transaction of its own application breaks it too.
    with psycopg.connect(to_libpq_url(target.require_admin())) as admin:
        assert admin.execute("SELECT count(*) FROM rtv_secret.stall_terminations").fetchone() == (0,)


def test_the_runtime_role_cannot_run_the_watchdog(target):
    with pytest.raises(ConfigurationError, match="may not see or end other sessions"):
        connect_watchdog(target.runtime_url)


def test_limits_are_validated():
    with pytest.raises(ConfigurationError, match="positive"):
        WatchdogLimits(max_lock_wait_ms=0)
    with pytest.raises(ConfigurationError, match="grace_ms"):
        WatchdogLimits(grace_ms=-1)
    for name in ("max_memory_mb", "max_locks", "quarantine_after"):
        with pytest.raises(ConfigurationError, match=name):
            WatchdogLimits(**{name: -1})
    with pytest.raises(ConfigurationError, match="quarantine_window_ms"):
        WatchdogLimits(quarantine_window_ms=0)
    assert WatchdogLimits(max_memory_mb=0, max_locks=0, quarantine_after=0).max_locks == 0  # 0: rule off


def test_limits_from_settings_and_environment(target, monkeypatch):
    monkeypatch.setenv("RTV_DB_WATCHDOG_MAX_LOCK_WAIT_MS", "2500")
    monkeypatch.setenv("RTV_DB_WATCHDOG_MAX_MEMORY_MB", "512")
    monkeypatch.setenv("RTV_DB_WATCHDOG_QUARANTINE_AFTER", "5")
    got = WatchdogLimits.from_settings(target.settings, interval_ms=50)
    assert (got.statement_ms, got.idle_in_transaction_ms, got.max_lock_wait_ms, got.interval_ms) == (30_000, 60_000, 2500, 50)
    assert (got.max_memory_mb, got.max_locks, got.quarantine_after, got.quarantine_window_ms) == (512, None, 5, 3_600_000)
    monkeypatch.setenv("RTV_DB_WATCHDOG_GRACE_MS", "soon")
    with pytest.raises(ConfigurationError, match="RTV_DB_WATCHDOG_GRACE_MS"):
        WatchdogLimits.from_settings(target.settings)


def test_probe_on_the_embedded_server(target):
    """The watchdog beside the embedded server sees tenant marks, may quarantine, and reads memory."""
    with connect_watchdog(target.require_admin()) as conn:
        found = probe(conn)
    assert found.marks and found.quarantine and found.memory is not None, found
    assert found.max_locks_per_transaction == 64
    assert "RssAnon" in found.describe()
    # the locks rule's default: 4 x max_locks_per_transaction, or more than the application's
    # schemas have relations (a transaction of the API locks only those), whichever is larger
    assert 0 < found.schema_relations < 4 * 64 - 64
    assert found.max_locks(WatchdogLimits()) == 256 and found.max_locks(WatchdogLimits(max_locks=0)) == 0
    assert dataclasses.replace(found, schema_relations=1000).max_locks(WatchdogLimits()) == 1064


def test_memory_is_not_read_where_the_server_is_not(tmp_path):
    """A remote server's backend pid means nothing here: said so, and the memory rule is off."""
    fake = tmp_path / "proc"
    (fake / "self").mkdir(parents=True)
    (fake / "self" / "status").write_text("Name: python\n")
    (fake / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    started = datetime.now(timezone.utc)
    reader, why = probe_backend_memory(4242, started, proc=fake)
    assert reader is None and "not a process of this host" in why
    # a process of that pid exists here, but it is not the server's backend (another start time)
    (fake / "4242").mkdir()
    (fake / "4242" / "stat").write_text("4242 (postgres) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 100 0\n")
    reader, why = probe_backend_memory(4242, started, proc=fake)
    assert reader is None and "not the server's backend" in why
    reader, why = probe_backend_memory(4242, started, proc=Path("/nonexistent-proc"))
    assert reader is None and "no /proc" in why


def test_cli_once(db, target, tenants):
    with stalling_tenant(db, tenants.a, statements=OWN_ROW) as holder:
        time.sleep(0.3)
        result = CliRunner().invoke(cli, ["watchdog", "--once", "--max-transaction-ms", "100",
                                          "--database-url", target.require_admin()])
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.split())  # the console wraps long lines
        assert f"terminated backend {holder['pid']} from " in shown and "(transaction" in shown
        assert f"tenant {tenants.a}" in shown and "watchdog sees: tenants from transaction marks" in shown
    clean = CliRunner().invoke(cli, ["watchdog", "--once", "--database-url", target.require_admin()])
    assert clean.exit_code == 0 and "terminated" not in clean.output
