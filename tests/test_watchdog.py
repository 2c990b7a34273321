"""Issue 16, item 2: no tenant can stall the others, whatever it does to its own session.

A tenant's transaction (the runtime role, signed context of tenant A) lifts both its timeouts
(``SET LOCAL statement_timeout = 0``, ``SET LOCAL idle_in_transaction_session_timeout = 0``) and
takes ``LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE``, which needs only the UPDATE grant.
Without the watchdog tenant B's ``scoped_query`` waits for as long as A likes (shown first, with
a bounded wait); with ``rtv-db watchdog`` A's backend is terminated within the limit and B's query
then succeeds. Reaction times are measured and printed. Every wait is bounded (lock_timeout,
join timeouts, iteration counts); connections are local.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from rtv_db import brand_kits, with_tenant_scope
from rtv_db.cli import cli
from rtv_db.config import to_libpq_url
from rtv_db.errors import ConfigurationError
from rtv_db.watchdog import WatchdogLimits, connect_watchdog, run_watchdog, sweep

STALL = ("SET LOCAL statement_timeout = 0", "SET LOCAL idle_in_transaction_session_timeout = 0",
         "LOCK TABLE brand_kits IN ACCESS EXCLUSIVE MODE")


def limits(**overrides) -> WatchdogLimits:
    values = dict(statement_ms=30_000, idle_in_transaction_ms=60_000, grace_ms=0, max_lock_wait_ms=1_000,
                  max_transaction_ms=300_000, interval_ms=100)
    values.update(overrides)
    return WatchdogLimits(**values)


@contextmanager
def stalling_tenant(db, tenant, *, then: str | None = None) -> Iterator[dict]:
    """Tenant ``tenant``'s transaction with both timeouts lifted, holding ACCESS EXCLUSIVE on brand_kits.

    In a thread: it sleeps in Python (idle in transaction), or runs ``then`` (say, pg_sleep), until
    its backend is terminated or ``release`` is set. Yields a dict with its pid and what happened.
    """
    state: dict = {"locked": threading.Event(), "release": threading.Event(), "error": None, "pid": None}

    def hold() -> None:
        try:
            with with_tenant_scope(db, tenant).scoped_transaction() as tx:
                for statement in STALL:
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


def other_tenant_query(db, tenant, result: dict) -> threading.Thread:
    def query() -> None:
        started = time.monotonic()
        try:
            result["rows"] = with_tenant_scope(db, tenant).scoped_query(brand_kits)
        except DBAPIError as exc:
            result["error"] = exc
        result["waited"] = time.monotonic() - started

    thread = threading.Thread(target=query, daemon=True)
    thread.start()
    return thread


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
        result: dict = {}
        thread = other_tenant_query(db, tenants.b, result)
        wait_until_waiting(admin_conn, holder["pid"])
        thread.join(timeout=2.5)
        assert thread.is_alive(), "B should still be waiting: nothing bounds A's lock"
        # B's own statement_timeout (30 s) is B's, not A's: A's session has no timeout at all.
        assert admin_conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                  (holder["pid"],)).fetchone()[0] == "idle in transaction"
        holder["release"].set()
        thread.join(timeout=10)
    assert result.get("rows") and result["waited"] >= 2.5


@pytest.mark.parametrize("rule", ["lock", "idle", "statement"])
def test_the_watchdog_ends_the_holder_and_the_other_tenant_proceeds(db, target, tenants, admin_conn, rule):
    """``lock``: B waits on A's lock; ``idle``: A sits idle in its transaction; ``statement``: A runs
    pg_sleep with statement_timeout 0. Each is ended within its limit; B's query then succeeds."""
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

    with stalling_tenant(db, tenants.a, then="SELECT pg_sleep(20)" if rule == "statement" else None) as holder:
        locked_at = time.monotonic()
        result: dict = {}
        waiter = other_tenant_query(db, tenants.b, result)
        wait_until_waiting(admin_conn, holder["pid"])
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            waiter.join(timeout=15)
        finally:
            stop.set()
            watcher.join(timeout=10)
    assert not waiter.is_alive(), "B still waits"
    assert "error" not in result, result.get("error")
    assert [r.name for r in result["rows"]] == ["Brand B"]
    assert [(t.pid, t.reason, t.terminated) for t in seen] == [(holder["pid"], rule, True)], seen
    assert isinstance(holder["error"], DBAPIError)  # A's transaction is gone (rolled back)
    limit_s = {"lock": 1.0, "idle": 1.0, "statement": 1.0}[rule]
    reaction = result["waited"] - limit_s
    print(f"\nwatchdog [{rule}]: B waited {result['waited']:.3f} s (limit {limit_s:.1f} s, interval "
          f"{configured.interval_ms} ms): reaction {reaction * 1000:.0f} ms after the limit")
    assert result["waited"] < limit_s + 1.0, result["waited"]
    # A's rows are intact: termination is a rollback of A's open transaction, nothing else.
    assert len(with_tenant_scope(db, tenants.a).scoped_query(brand_kits)) == 1
    assert time.monotonic() - locked_at < 10


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
    with stalling_tenant(db, tenants.a) as holder:
        time.sleep(0.3)
        with connect_watchdog(target.require_admin()) as conn:
            (done,) = sweep(conn, limits(max_transaction_ms=200, max_lock_wait_ms=60_000))
        assert (done.pid, done.reason) == (holder["pid"], "transaction")
        holder["locked"].wait(1)
    assert isinstance(holder["error"], DBAPIError)


def test_the_runtime_role_cannot_run_the_watchdog(target):
    with pytest.raises(ConfigurationError, match="may not see or end other sessions"):
        connect_watchdog(target.runtime_url)


def test_limits_are_validated():
    with pytest.raises(ConfigurationError, match="positive"):
        WatchdogLimits(max_lock_wait_ms=0)
    with pytest.raises(ConfigurationError, match="grace_ms"):
        WatchdogLimits(grace_ms=-1)


def test_limits_from_settings_and_environment(target, monkeypatch):
    monkeypatch.setenv("RTV_DB_WATCHDOG_MAX_LOCK_WAIT_MS", "2500")
    got = WatchdogLimits.from_settings(target.settings, interval_ms=50)
    assert (got.statement_ms, got.idle_in_transaction_ms, got.max_lock_wait_ms, got.interval_ms) == (30_000, 60_000, 2500, 50)
    monkeypatch.setenv("RTV_DB_WATCHDOG_GRACE_MS", "soon")
    with pytest.raises(ConfigurationError, match="RTV_DB_WATCHDOG_GRACE_MS"):
        WatchdogLimits.from_settings(target.settings)


def test_cli_once(db, target, tenants):
    with stalling_tenant(db, tenants.a) as holder:
        time.sleep(0.3)
        result = CliRunner().invoke(cli, ["watchdog", "--once", "--max-transaction-ms", "100",
                                          "--database-url", target.require_admin()])
        assert result.exit_code == 0, result.output
        assert f"terminated backend {holder['pid']} from " in result.output and "(transaction" in result.output
    clean = CliRunner().invoke(cli, ["watchdog", "--once", "--database-url", target.require_admin()])
    assert clean.exit_code == 0 and "terminated" not in clean.output
