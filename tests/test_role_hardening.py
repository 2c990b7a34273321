"""Issue 11, findings 3 (advisory locks), 4 and 5: what sessions of the runtime role can do to
each other, and the runtime role changing itself.

Every tenant connects as the one runtime role, and PostgreSQL lets a role signal, inspect and
lock against its own other sessions, and change its own defaults. `rtv-db migrate` revokes the
session functions from PUBLIC in the database, installs the role's settings (timeouts, no bind
parameters in the log) after resetting all others; the runtime-role guard puts back at connect what
the role may put back itself and refuses a role whose other settings differ (issue 24, item 6);
`rtv-db verify` reports each.

Each attack runs as the runtime role (never as the superuser or the owner). It is first shown
WORKING against the old state (the admin undoes the hardening in this test's own database, as it
was before this change), then BLOCKED after `migrate`. Waits are bounded (lock_timeout,
statement_timeout, join timeouts); connections are local.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

import rtv_db
from rtv_db import (
    AsyncDatabase,
    ConfigurationError,
    Database,
    MigrationError,
    RuntimeRoleSettingsError,
    migrate,
    with_tenant_scope,
)
from rtv_db.config import Settings, runtime_role_settings, to_libpq_url
from rtv_db.connection import check_runtime_role
from rtv_db.migrate import _MIGRATION_LOCK
from rtv_db.verify import check_runtime_role_sessions, check_runtime_role_settings, verify

RUNTIME = "rtv_app"
INSTALLED = runtime_role_settings()  # the defaults: 30 s, 60 s, log parameters 0

# What the old state granted to PUBLIC (PostgreSQL's defaults), by finding.
SIGNAL_FUNCTIONS = ("pg_terminate_backend(integer,bigint)", "pg_cancel_backend(integer)")
ADVISORY_FUNCTIONS = ("pg_advisory_lock(bigint)", "pg_advisory_unlock(bigint)", "pg_try_advisory_lock(bigint)",
                      "pg_advisory_xact_lock(bigint)", "pg_advisory_lock(integer,integer)", "pg_advisory_unlock_all()")
LO_FUNCTIONS = ("lo_create(oid)", "lo_put(oid,bigint,bytea)", "lo_get(oid)", "lo_from_bytea(oid,bytea)")
ACTIVITY_FUNCTIONS = ("pg_stat_get_activity(integer)", "pg_stat_get_backend_activity(integer)",
                      "pg_stat_get_backend_idset()")
ACTIVITY_VIEWS = ("pg_stat_activity",)


# -- helpers --------------------------------------------------------------------------------------


@contextmanager
def runtime_session(target) -> Iterator[psycopg.Connection]:
    """A raw session of the runtime role (what SQL injected into a tenant's request can use)."""
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as conn:
        yield conn


def old_state(admin_conn: psycopg.Connection, functions=(), views=()) -> None:
    """Undo the hardening in this test's database: PUBLIC may execute/select as PostgreSQL's defaults say."""
    for fn in functions:
        admin_conn.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} TO PUBLIC")
    for view in views:
        admin_conn.execute(f"GRANT SELECT ON pg_catalog.{view} TO PUBLIC")


def remigrate(target) -> None:
    migrate(target.require_admin(), target.settings)


def database_name(admin_conn: psycopg.Connection) -> str:
    return admin_conn.execute("SELECT current_database()").fetchone()[0]


def role_rows(admin_conn: psycopg.Connection, role: str = RUNTIME) -> dict[str, list[str]]:
    """The role's pg_db_role_setting rows: 'global' and 'database' (this one), sorted."""
    rows = admin_conn.execute(
        "SELECT CASE WHEN s.setdatabase = 0 THEN 'global' ELSE 'database' END, s.setconfig "
        "FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = %s "
        "AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))",
        (role,),
    ).fetchall()
    return {kind: sorted(config) for kind, config in rows}


def expected_rows() -> dict[str, list[str]]:
    return {"database": sorted(f"{k}={v}" for k, v in INSTALLED.items())}


@pytest.fixture()
def reset_global_settings(admin_conn) -> Iterator[None]:
    """Role settings for every database reach every database of the cluster (the template and other
    tests' included): put them back whatever the test does."""
    yield
    admin_conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(RUNTIME)))


def codes(findings) -> set[str]:
    return {f.code for f in findings}


def _wait_until_active(admin_conn: psycopg.Connection, pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin_conn.execute("SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row[0] == "active" and row[1] == "PgSleep":
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never started its statement")


# -- the migrated state: what migrate installs --------------------------------------------------


def test_migrate_installs_exactly_the_role_settings(target, admin_conn):
    assert role_rows(admin_conn) == expected_rows()
    with runtime_session(target) as conn:
        shown = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in INSTALLED}
    assert shown == {"statement_timeout": "30s", "idle_in_transaction_session_timeout": "1min",
                     "log_parameter_max_length": "0", "log_parameter_max_length_on_error": "0",
                     "temp_file_limit": "1GB"}


def test_timeouts_come_from_the_role_not_from_startup_options(db):
    assert "options" not in db.options.engine_kwargs()["connect_args"]
    with db.engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "30s"
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "1min"


def test_revoked_functions_belong_to_nobody_but_the_superuser(target, admin_conn):
    """Nothing is granted back: rtv-db's roles need none of them (migrate locks as the superuser),
    but the owner's two shared transaction-level advisory locks (the watchdog's marks, taken by
    rtv.set_signed_context as the owner: revision 0010)."""
    rows = admin_conn.execute(
        r"""
        SELECT p.oid::regprocedure::text, p.proacl::text[],
               has_function_privilege('rtv_app', p.oid, 'EXECUTE'),
               has_function_privilege('rtv_owner', p.oid, 'EXECUTE'),
               has_function_privilege('rtv_system', p.oid, 'EXECUTE')
        FROM pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND (p.proname IN ('pg_terminate_backend', 'pg_cancel_backend', 'pg_stat_get_activity', 'loread', 'lowrite')
               OR p.proname LIKE 'pg\_advisory\_%' OR p.proname LIKE 'pg\_try\_advisory\_%'
               OR p.proname LIKE 'lo\_%' OR p.proname LIKE 'pg\_stat\_get\_backend\_%')
        """
    ).fetchall()
    names = {r[0] for r in rows}
    assert set(SIGNAL_FUNCTIONS + ADVISORY_FUNCTIONS + LO_FUNCTIONS + ACTIVITY_FUNCTIONS) <= names
    assert {"lo_creat(integer)", "lo_open(oid,integer)", "loread(integer,integer)", "lowrite(integer,bytea)",
            "lo_unlink(oid)", "lo_truncate(integer,integer)", "lo_lseek(integer,integer,integer)", "lo_tell(integer)",
            "lo_close(integer)", "lo_import(text)", "lo_export(oid,text)",
            "pg_advisory_xact_lock_shared(integer,integer)",
            "pg_try_advisory_xact_lock_shared(bigint)", "pg_advisory_unlock_shared(bigint)"} <= names
    superuser = admin_conn.execute("SELECT current_user").fetchone()[0]
    marks = {"pg_advisory_xact_lock_shared(bigint)", "pg_advisory_xact_lock_shared(integer,integer)"}
    for name, acl, runtime, owner, system in rows:
        assert acl == [f"{superuser}=X/{superuser}"] + ([f"rtv_owner=X/{superuser}"] if name in marks else []), (name, acl)
        assert not (runtime or system) and owner == (name in marks), name
    views = dict(admin_conn.execute(
        "SELECT relname, relacl::text[] FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace "
        "AND relname IN ('pg_stat_activity', 'pg_stat_ssl', 'pg_stat_gssapi', 'pg_stat_replication')").fetchall())
    assert len(views) == 4 and all(acl == [f"{superuser}=arwdDxtm/{superuser}"] for acl in views.values()), views


def test_migrate_on_a_new_database_hardens_it_and_twice_changes_nothing(empty_target):
    admin = to_libpq_url(empty_target.require_admin())
    checks = [check_runtime_role_sessions]
    before = verify(empty_target.require_admin(), checks=checks)
    assert codes(before) == {"ROLE_CAN_SIGNAL_SESSIONS", "ROLE_CAN_LOCK_ADVISORY", "ROLE_CAN_USE_LARGE_OBJECTS",
                             "ROLE_CAN_READ_QUERY_TEXT"}
    assert {f.object for f in before} == {"PUBLIC"}
    migrate(empty_target.require_admin(), empty_target.settings)

    def snapshot():
        with psycopg.connect(admin) as conn:
            acls = conn.execute("SELECT oid::regprocedure::text, proacl::text FROM pg_proc ORDER BY 1").fetchall()
            return acls, role_rows(conn)

    first = snapshot()
    assert verify(empty_target.require_admin(), checks=checks + [check_runtime_role_settings]) == []
    migrate(empty_target.require_admin(), empty_target.settings)
    assert snapshot() == first
    assert first[1] == expected_rows()


# -- finding 5: pg_terminate_backend / pg_cancel_backend of another session of the same role --------


def test_terminating_another_tenants_session(target, admin_conn):
    old_state(admin_conn, SIGNAL_FUNCTIONS)
    with runtime_session(target) as victim, runtime_session(target) as attacker:
        victim.execute("BEGIN")
        victim.execute("SELECT 1")
        pid = victim.info.backend_pid
        assert attacker.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0] is True
        with pytest.raises(psycopg.OperationalError):  # the victim's transaction is gone
            victim.execute("SELECT 1")

    remigrate(target)
    with runtime_session(target) as victim, runtime_session(target) as attacker:
        victim.execute("BEGIN")
        pid = victim.info.backend_pid
        for call in ("SELECT pg_terminate_backend(%s)", "SELECT pg_terminate_backend(%s, 5000)"):
            with pytest.raises(pg_errors.InsufficientPrivilege, match="pg_terminate_backend"):
                attacker.execute(call, (pid,))
        assert victim.execute("SELECT 1").fetchone() == (1,)  # still alive, still in its transaction
        victim.execute("COMMIT")


def test_cancelling_another_tenants_statement(target, admin_conn):
    def victim_statement(results: list) -> None:
        with runtime_session(target) as victim:
            pids.append(victim.info.backend_pid)
            try:
                victim.execute("SELECT pg_sleep(3)")  # under the role's 30 s statement_timeout
                results.append("finished")
            except pg_errors.QueryCanceled as exc:
                results.append(f"cancelled: {exc}")

    old_state(admin_conn, SIGNAL_FUNCTIONS)
    pids: list[int] = []
    results: list[str] = []
    thread = threading.Thread(target=victim_statement, args=(results,))
    started = time.monotonic()
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not pids and time.monotonic() < deadline:
            time.sleep(0.01)
        _wait_until_active(admin_conn, pids[0])
        with runtime_session(target) as attacker:
            assert attacker.execute("SELECT pg_cancel_backend(%s)", (pids[0],)).fetchone()[0] is True
    finally:
        thread.join(timeout=10)
    assert results and results[0].startswith("cancelled"), results
    assert time.monotonic() - started < 3

    remigrate(target)
    with runtime_session(target) as victim, runtime_session(target) as attacker:
        with pytest.raises(pg_errors.InsufficientPrivilege, match="pg_cancel_backend"):
            attacker.execute("SELECT pg_cancel_backend(%s)", (victim.info.backend_pid,))


# -- finding 3: advisory locks ---------------------------------------------------------------------


def _advisory_locks(admin_conn: psycopg.Connection, pid: int) -> list[tuple]:
    return admin_conn.execute(
        "SELECT objid, granted FROM pg_locks WHERE locktype = 'advisory' AND pid = %s", (pid,)).fetchall()


def test_a_session_advisory_lock_outlives_the_tenants_transaction(db, target, tenants, admin_conn):
    old_state(admin_conn, ADVISORY_FUNCTIONS)
    with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
        pid = tx.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert tx.connection.execute(text("SELECT pg_advisory_lock(4242)")).scalar_one() == ""
    # The transaction is over; the pooled connection (the next tenant's) still holds the lock.
    assert _advisory_locks(admin_conn, pid) == [(4242, True)]
    with with_tenant_scope(db, tenants.b).scoped_transaction() as tx:
        assert tx.connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid  # same backend
    assert _advisory_locks(admin_conn, pid) == [(4242, True)]
    db.close()

    remigrate(target)
    for call in ("SELECT pg_advisory_lock(4242)", "SELECT pg_try_advisory_lock(4242)",
                 "SELECT pg_advisory_lock_shared(4242)", "SELECT pg_advisory_lock(1, 2)",
                 "SELECT pg_advisory_xact_lock(4242)", "SELECT pg_advisory_unlock_all()"):
        with pytest.raises(DBAPIError, match="permission denied for function pg_"):
            with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
                tx.connection.execute(text(call))
    with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
        pid = tx.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    assert _advisory_locks(admin_conn, pid) == []


def _with_lock_timeout(admin_url: str, ms: int) -> str:
    url = make_url(admin_url)
    return url.update_query_dict({"options": f"-c lock_timeout={ms}"}).render_as_string(hide_password=False)


def test_the_runtime_role_holding_migrates_lock_makes_migrate_wait(target, admin_conn):
    old_state(admin_conn, ADVISORY_FUNCTIONS)
    bounded = _with_lock_timeout(target.require_admin(), 500)
    with runtime_session(target) as attacker:
        assert attacker.execute("SELECT pg_try_advisory_lock(%s)", (_MIGRATION_LOCK,)).fetchone()[0] is True
        started = time.monotonic()
        with pytest.raises(MigrationError, match="lock timeout"):
            migrate(bounded, target.settings)  # without lock_timeout: for as long as the session lives
        assert time.monotonic() - started >= 0.4
    remigrate(target)  # the attacker's session is gone; migrate hardens

    with runtime_session(target) as attacker:
        for call in ("SELECT pg_advisory_lock(%s)", "SELECT pg_try_advisory_lock(%s)",
                     "SELECT pg_advisory_lock_shared(%s)", "SELECT pg_try_advisory_xact_lock(%s)"):
            with pytest.raises(pg_errors.InsufficientPrivilege, match="permission denied for function"):
                attacker.execute(call, (_MIGRATION_LOCK,))
        # The attacker's session is still open: migrate does not wait for it.
        migrate(bounded, target.settings)


# -- finding 3: large objects ----------------------------------------------------------------------


def test_a_large_object_of_one_tenant_read_by_another(db, target, tenants, admin_conn):
    secret = f"A's secret {uuid.uuid4()}".encode()
    old_state(admin_conn, LO_FUNCTIONS)
    with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
        oid = tx.connection.execute(text("SELECT lo_create(0)")).scalar_one()
        tx.connection.execute(text("SELECT lo_put(:oid, 0, :data)"), {"oid": oid, "data": secret})
    with with_tenant_scope(db, tenants.b).scoped_transaction() as tx:
        assert tx.connection.execute(text("SELECT lo_get(:oid)"), {"oid": oid}).scalar_one() == secret

    remigrate(target)
    for tenant, call, params in (
        (tenants.a, "SELECT lo_create(0)", {}),
        (tenants.a, "SELECT lo_from_bytea(0, :data)", {"data": secret}),
        (tenants.a, "SELECT lo_put(:oid, 0, :data)", {"oid": oid, "data": b"overwritten"}),
        (tenants.b, "SELECT lo_get(:oid)", {"oid": oid}),  # the object made before still exists...
        (tenants.b, "SELECT lo_open(:oid, 262144)", {"oid": oid}),  # ...and cannot be opened either
        (tenants.b, "SELECT lo_unlink(:oid)", {"oid": oid}),
    ):
        with pytest.raises(DBAPIError, match="permission denied for function lo"):
            with with_tenant_scope(db, tenant).scoped_transaction() as tx:
                tx.connection.execute(text(call), params)


# -- finding 5: another session's query text --------------------------------------------------------


def test_another_tenants_query_text_in_pg_stat_activity(db, target, tenants, admin_conn):
    literal = f"secret plan of B {uuid.uuid4()}"

    def read_others(attacker: psycopg.Connection) -> list[str]:
        rows = attacker.execute(
            "SELECT query FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND usename = current_user").fetchall()
        return [r[0] or "" for r in rows]

    old_state(admin_conn, ACTIVITY_FUNCTIONS, ACTIVITY_VIEWS)
    with runtime_session(target) as attacker:
        with with_tenant_scope(db, tenants.b).scoped_transaction() as tx:
            tx.connection.execute(text(f"SELECT count(*) FROM brand_kits WHERE name = '{literal}'"))
            assert any(literal in q for q in read_others(attacker))
            backend = attacker.execute(
                "SELECT pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() AS b "
                "WHERE pg_stat_get_backend_activity(b) LIKE %s", (f"%{literal}%",)).fetchall()
            assert backend

    remigrate(target)
    with runtime_session(target) as attacker:
        with with_tenant_scope(db, tenants.b).scoped_transaction() as tx:
            tx.connection.execute(text(f"SELECT count(*) FROM brand_kits WHERE name = '{literal}'"))
            for query in ("SELECT query FROM pg_stat_activity", "SELECT * FROM pg_stat_get_activity(NULL)",
                          "SELECT pg_stat_get_backend_activity(1)", "SELECT pg_stat_get_backend_idset()",
                          "SELECT * FROM pg_stat_ssl", "SELECT * FROM pg_stat_gssapi",
                          "SELECT * FROM pg_stat_replication"):
                with pytest.raises(pg_errors.InsufficientPrivilege):
                    attacker.execute(query)
        # What a session may still see: its own pid and settings; no other session at all.
        assert attacker.execute("SELECT pg_backend_pid()").fetchone()[0] == attacker.info.backend_pid


# -- finding 4: the runtime role changes itself --------------------------------------------------


def test_alter_role_search_path_breaks_every_next_connection(target, tenants, admin_conn, reset_global_settings,
                                                            caplog):
    with runtime_session(target) as attacker:  # the runtime role may do this to itself
        attacker.execute("ALTER ROLE current_user SET search_path = pg_catalog")
    # The old state (no settings check): the next connection of any tenant inherits it.
    unguarded = Database(target.runtime_url, check_role=False)
    try:
        with pytest.raises(DBAPIError, match='relation "brand_kits" does not exist'):
            with with_tenant_scope(unguarded, tenants.a).scoped_transaction() as tx:
                tx.connection.execute(text("SELECT count(*) FROM brand_kits"))
    finally:
        unguarded.close()
    assert codes(verify(target.require_admin())) == {"ROLE_SETTINGS_UNEXPECTED"}
    # Now (issue 24, item 6): put back at connect, by the guard as the runtime role, with the setting
    # named in a security warning; the connection that found it is replaced. (Refused before: an
    # outage until someone ran `rtv-db migrate`.)
    guarded = Database(target.runtime_url)
    try:
        with caplog.at_level(logging.WARNING, logger="rtv_db.connection"):
            assert with_tenant_scope(guarded, tenants.a).scoped_query(rtv_db.brand_kits)
        assert "search_path='pg_catalog' for every database" in caplog.text and "rtv-db security" in caplog.text
        assert role_rows(admin_conn) == expected_rows()
        with guarded.engine.connect() as conn:
            assert conn.execute(text("SHOW search_path")).scalar() == '"$user", public'
    finally:
        guarded.close()
    assert codes(verify(target.require_admin())) == set()


def test_the_runtime_role_unbounding_its_own_timeouts(target, db, admin_conn, caplog):
    database = database_name(admin_conn)
    with runtime_session(target) as attacker:
        attacker.execute(sql.SQL("ALTER ROLE current_user IN DATABASE {} SET statement_timeout = 0").format(
            sql.Identifier(database)))
        attacker.execute(sql.SQL("ALTER ROLE current_user IN DATABASE {} RESET idle_in_transaction_session_timeout")
                         .format(sql.Identifier(database)))
        # ...but not the log parameters: superuser-only.
        with pytest.raises(pg_errors.InsufficientPrivilege):
            attacker.execute(sql.SQL("ALTER ROLE current_user IN DATABASE {} SET log_parameter_max_length = -1")
                             .format(sql.Identifier(database)))
    with runtime_session(target) as next_one:  # the old state: unbounded
        assert next_one.execute("SHOW statement_timeout").fetchone()[0] == "0"
        assert next_one.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "0"
    assert codes(verify(target.require_admin())) == {"ROLE_SETTINGS_UNEXPECTED", "ROLE_TIMEOUTS_MISSING"}
    # The guard puts both back at connect (issue 24, item 6) and says so.
    with caplog.at_level(logging.WARNING, logger="rtv_db.connection"):
        assert db.test_connection().user == RUNTIME
    assert "statement_timeout='0' (rtv-db installs '30000')" in caplog.text
    assert "idle_in_transaction_session_timeout missing" in caplog.text
    assert role_rows(admin_conn) == expected_rows()
    with db.engine.connect() as conn:
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "30s"


def test_a_one_millisecond_statement_timeout_is_still_named(target, admin_conn):
    """The role's 1 ms statement_timeout cancels the guard's own probe: the guard looks again."""
    with runtime_session(target) as attacker:
        attacker.execute(sql.SQL("ALTER ROLE current_user IN DATABASE {} SET statement_timeout = 1").format(
            sql.Identifier(database_name(admin_conn))))
    with psycopg.connect(to_libpq_url(target.runtime_url)) as conn:
        with pytest.raises(RuntimeRoleSettingsError, match="statement_timeout='1'"):
            check_runtime_role(conn)
    remigrate(target)
    with psycopg.connect(to_libpq_url(target.runtime_url)) as conn:
        check_runtime_role(conn)


async def test_the_async_engine_puts_it_back_too(target, admin_conn, reset_global_settings, caplog):
    with runtime_session(target) as attacker:
        attacker.execute("ALTER ROLE current_user SET default_transaction_read_only = on")
    adb = AsyncDatabase(target.runtime_url)
    try:
        with caplog.at_level(logging.WARNING, logger="rtv_db.connection"):
            assert (await adb.test_connection()).user == RUNTIME  # put back in a READ WRITE transaction
        assert "default_transaction_read_only='on' for every database" in caplog.text
        assert role_rows(admin_conn) == expected_rows()
    finally:
        await adb.close()


def test_migrate_resets_every_setting_and_the_password(target, admin_conn, reset_global_settings):
    database = database_name(admin_conn)
    with runtime_session(target) as attacker:
        attacker.execute("ALTER ROLE current_user SET search_path = pg_catalog")
        attacker.execute("ALTER ROLE current_user SET work_mem = '1GB'")
        attacker.execute(sql.SQL("ALTER ROLE current_user IN DATABASE {} SET enable_indexscan = off").format(
            sql.Identifier(database)))
        # PostgreSQL lets a role change its own password; nothing can see or stop it.
        attacker.execute("ALTER ROLE current_user PASSWORD 'attacker-chose-this'")
    # An admin's own extra setting is not what migrate installs either.
    admin_conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET jit = off").format(
        sql.Identifier(RUNTIME), sql.Identifier(database)))
    rows = role_rows(admin_conn)
    assert rows["global"] == ["search_path=pg_catalog", "work_mem=1GB"]
    assert "enable_indexscan=off" in rows["database"] and "jit=off" in rows["database"]
    assert admin_conn.execute("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s",
                              (RUNTIME,)).fetchone()[0]

    remigrate(target)
    assert role_rows(admin_conn) == expected_rows()
    # No password configured: migrate removes the attacker's (with one configured, it sets it again).
    assert admin_conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (RUNTIME,)).fetchone()[0] is None


def test_a_role_without_the_installed_settings_is_refused(target, admin_conn):
    role = f"rtv_test_role_{uuid.uuid4().hex[:8]}"
    admin_conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        url = make_url(target.runtime_url).set(username=role).render_as_string(hide_password=False)
        with pytest.raises(RuntimeRoleSettingsError) as caught:
            Database(url).test_connection()
        message = str(caught.value)
        assert f"role {role!r}" in message and "statement_timeout missing (rtv-db installs '30000')" in message
        assert "log_parameter_max_length missing" in message and "`rtv-db migrate`" in message
    finally:
        admin_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_citus_propagation_setting_is_accepted_only_as_migrate_sets_it(target, admin_conn):
    database = database_name(admin_conn)
    admin_conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET citus.propagate_set_commands = 'local'").format(
        sql.Identifier(RUNTIME), sql.Identifier(database)))
    db = Database(target.runtime_url)
    try:
        assert db.test_connection().user == RUNTIME
        assert verify(target.require_admin()) == []
        admin_conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET citus.propagate_set_commands = 'none'").format(
            sql.Identifier(RUNTIME), sql.Identifier(database)))
        db.close()
        with pytest.raises(RuntimeRoleSettingsError, match="citus.propagate_set_commands='none', which rtv-db never"):
            db.test_connection()
    finally:
        db.close()


# -- the timeouts are settings ---------------------------------------------------------------------


def test_timeouts_from_the_environment(target, admin_conn, monkeypatch, caplog):
    monkeypatch.setenv("RTV_DB_STATEMENT_TIMEOUT_MS", "12345")
    monkeypatch.setenv("RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "54321")
    settings = Settings.from_env(data_dir=target.settings.data_dir)
    assert (settings.statement_timeout_ms, settings.idle_in_transaction_timeout_ms) == (12345, 54321)
    migrate(target.require_admin(), settings)
    assert "statement_timeout=12345" in role_rows(admin_conn)["database"]
    db = Database(target.runtime_url)
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "12345ms"
            assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "54321ms"
        db.close()
        # An application configured differently from the migration is told so, and (issue 24, item 6:
        # the guard cannot tell it from a planted value) its own configuration is put in place.
        monkeypatch.delenv("RTV_DB_STATEMENT_TIMEOUT_MS")
        with caplog.at_level(logging.WARNING, logger="rtv_db.connection"):
            db.test_connection()
        assert "statement_timeout='12345' (rtv-db installs '30000')" in caplog.text
        assert "RTV_DB_STATEMENT_TIMEOUT_MS" in caplog.text
        assert "statement_timeout=30000" in role_rows(admin_conn)["database"]
    finally:
        db.close()


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5"])
def test_timeouts_must_be_positive_milliseconds(monkeypatch, value):
    monkeypatch.setenv("RTV_DB_STATEMENT_TIMEOUT_MS", value)
    with pytest.raises(ConfigurationError, match="RTV_DB_STATEMENT_TIMEOUT_MS"):
        Settings.from_env()


# -- rtv-db verify: each finding planted, then clean after migrate --------------------------------

VERIFY_CASES = {
    "terminate through PUBLIC": ("GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) TO PUBLIC",
                                 {("ROLE_CAN_SIGNAL_SESSIONS", "PUBLIC")}),
    "cancel granted to the runtime role": ("GRANT EXECUTE ON FUNCTION pg_cancel_backend(integer) TO rtv_app",
                                           {("ROLE_CAN_SIGNAL_SESSIONS", "role rtv_app")}),
    "advisory lock": ("GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO PUBLIC",
                      {("ROLE_CAN_LOCK_ADVISORY", "PUBLIC")}),
    "xact advisory lock int4 pair": ("GRANT EXECUTE ON FUNCTION pg_try_advisory_xact_lock(integer, integer) TO rtv_app",
                                     {("ROLE_CAN_LOCK_ADVISORY", "role rtv_app")}),
    "large objects": ("GRANT EXECUTE ON FUNCTION lo_get(oid) TO PUBLIC", {("ROLE_CAN_USE_LARGE_OBJECTS", "PUBLIC")}),
    "pg_stat_get_activity": ("GRANT EXECUTE ON FUNCTION pg_stat_get_activity(integer) TO PUBLIC",
                             {("ROLE_CAN_READ_QUERY_TEXT", "PUBLIC")}),
    "pg_stat_activity": ("GRANT SELECT ON pg_stat_activity TO PUBLIC", {("ROLE_CAN_READ_QUERY_TEXT", "PUBLIC")}),
    "a setting for every database": ("ALTER ROLE rtv_app SET search_path = pg_catalog",
                                     {("ROLE_SETTINGS_UNEXPECTED", "role rtv_app")}),
    "an unexpected key": ("ALTER ROLE rtv_app IN DATABASE {database} SET work_mem = '64MB'",
                          {("ROLE_SETTINGS_UNEXPECTED", "role rtv_app")}),
    "a wrong timeout": ("ALTER ROLE rtv_app IN DATABASE {database} SET statement_timeout = 0",
                        {("ROLE_SETTINGS_UNEXPECTED", "role rtv_app")}),
    "no timeouts": ("ALTER ROLE rtv_app IN DATABASE {database} RESET statement_timeout;"
                    "ALTER ROLE rtv_app IN DATABASE {database} RESET idle_in_transaction_session_timeout",
                    {("ROLE_TIMEOUTS_MISSING", "role rtv_app")}),
    "log parameters": ("ALTER ROLE rtv_app IN DATABASE {database} RESET log_parameter_max_length",
                       {("ROLE_LOGS_PARAMETERS", "role rtv_app")}),
}


@pytest.mark.parametrize("case", list(VERIFY_CASES), ids=list(VERIFY_CASES))
def test_verify_reports_each_finding_until_migrate(target, admin_conn, reset_global_settings, case):
    statement, expected = VERIFY_CASES[case]
    admin_conn.execute(statement.format(database=sql.Identifier(database_name(admin_conn)).as_string(admin_conn)))
    findings = verify(target.require_admin())
    assert {(f.code, f.object) for f in findings} == expected, [f"{f.code} {f.object}: {f.message}" for f in findings]
    for f in findings:
        assert f.message and f.why and "rtv-db migrate" in f.fix
    # verify as the runtime role sees the same
    assert {(f.code, f.object) for f in verify(target.runtime_url)} == expected
    remigrate(target)
    assert verify(target.require_admin()) == []


def test_verify_names_the_functions_and_the_way_in(target, admin_conn):
    old_state(admin_conn, SIGNAL_FUNCTIONS)
    (finding,) = verify(target.require_admin())
    assert finding.code == "ROLE_CAN_SIGNAL_SESSIONS" and finding.severity == "error"
    assert "PUBLIC" in finding.message and "pg_terminate_backend(integer,bigint)" in finding.message
    assert "REVOKE EXECUTE ON FUNCTION pg_cancel_backend(integer), pg_terminate_backend(integer,bigint) FROM PUBLIC;" \
        in finding.fix
