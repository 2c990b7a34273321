"""SQL-level attacks as the runtime role, on every tenant table: each is blocked or shown harmless.

The attacker here is someone who can run arbitrary SQL on the application's connection (an
injection, a compromised dependency): they connect as ``rtv_app``, the role the application
uses. Raw psycopg connections are used so that nothing of the scoped API stands in the way;
the only walls are PostgreSQL's: the role's privileges and Row-Level Security.

Setting the context to another tenant's id (``set_config`` / ``SET LOCAL`` / the plain setter /
a session-level ``SET``) worked until issue 8: the policies trusted bare settings. With the signed
context (the default) it shows nothing; the tests below prove it, in signed mode.

The application's own, legitimate context is set here as rtv-db sets it: a token minted with the
run's key for this connection's backend (``_set_context``). What the attacker adds comes after.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy.exc
from psycopg import sql

from reliability_checks import TENANT_TABLES, assert_no_context_left, table_counts
from rtv_db import Database, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.schema import brand_kits, platform_accounts, platform_actions
from rtv_db.signing import load_keys, mint_token

# Tables the runtime role may write: everything but clients (a tenant may only rename itself).
WRITABLE = tuple(t for t in TENANT_TABLES if t != "clients")


def _owner_column(table: str) -> str:
    return "id" if table == "clients" else "client_id"


@pytest.fixture()
def world(db, system, tenants):
    """Tenants A and B with a row in every tenant table (A's and B's), made by the system scope."""
    rows = {}
    with system.transaction() as conn:
        for tenant in (tenants.a, tenants.b):
            account = uuid.uuid4()
            kb = uuid.uuid4()
            conn.execute(platform_accounts.insert().values(client_id=tenant, id=account, platform="x", handle=f"h{tenant.hex[:6]}"))
            conn.execute(sql_text("INSERT INTO knowledge_bases (client_id, id, name) VALUES (:c, :k, 'kb')"), {"c": tenant, "k": kb})
            conn.execute(sql_text("INSERT INTO knowledge_chunks (client_id, knowledge_base_id, content) VALUES (:c, :k, 'secret of ' || :c)"),
                         {"c": tenant, "k": kb})
            conn.execute(platform_actions.insert().values(client_id=tenant, platform_account_id=account, kind="post", lane="api"))
            rows[tenant] = account
    return tenants, rows


def sql_text(statement: str):
    from sqlalchemy import text

    return text(statement)


@pytest.fixture()
def runtime(target) -> Iterator[psycopg.Connection]:
    """A raw connection as the runtime role (rtv_app), in manual-commit mode."""
    with psycopg.connect(to_libpq_url(target.runtime_url)) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "rtv_app"
        yield conn


def _set_context(conn: psycopg.Connection, tenant: uuid.UUID, account: uuid.UUID | None = None) -> None:
    """The application's context for ``tenant``, as rtv-db sets it (a signed token for one transaction)."""
    token = mint_token(load_keys()[-1], tenant_id=tenant, platform_account_id=account, lane="api",
                       expires_at=int(time.time()) + 300, correlation_id="corr-1")
    conn.execute("SELECT rtv.set_signed_context(%s, NULL, 'corr-1')", (token,))


def _refused(conn: psycopg.Connection, statement: str | sql.Composable, error: type[Exception], params=None) -> str:
    """Run ``statement``; it must fail with ``error``. Roll back and return the message."""
    with pytest.raises(error) as info:
        conn.execute(statement, params)
    conn.rollback()
    return str(info.value)


# -- the role cannot switch RLS off, become someone else, or empty a table ----------------------

@pytest.mark.parametrize("table", TENANT_TABLES)
def test_row_security_off_is_refused(runtime, world, table) -> None:
    tenants, accounts = world
    # The SET itself is allowed; any query that RLS would filter then fails instead of bypassing it.
    _set_context(runtime, tenants.a, accounts[tenants.a])
    runtime.execute("SET LOCAL row_security = off")
    message = _refused(runtime, f"SELECT * FROM {table}", psycopg.errors.InsufficientPrivilege)
    assert "row-level security" in message
    runtime.execute("SET row_security = off")  # session-wide: the same
    runtime.commit()
    _refused(runtime, f"SELECT count(*) FROM {table}", psycopg.errors.InsufficientPrivilege)


@pytest.mark.parametrize("statement", [
    "SET ROLE rtv_owner",
    "SET ROLE rtv_system",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION rtv_owner",
    "SET SESSION AUTHORIZATION rtv_system",
    "SET SESSION AUTHORIZATION postgres",
])
def test_cannot_become_another_role(runtime, statement) -> None:
    message = _refused(runtime, statement, psycopg.errors.InsufficientPrivilege)
    assert "permission denied" in message
    assert runtime.execute("SELECT current_user, session_user").fetchone() == ("rtv_app", "rtv_app")


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_truncate_is_refused(runtime, world, system, table) -> None:
    before = table_counts(system)
    _refused(runtime, f"TRUNCATE {table} CASCADE", psycopg.errors.InsufficientPrivilege)
    _refused(runtime, f"TRUNCATE {table}", psycopg.errors.InsufficientPrivilege)
    assert table_counts(system) == before


# -- COPY --------------------------------------------------------------------------------------

def _copy_out(conn: psycopg.Connection, statement: str) -> list[str]:
    with conn.cursor().copy(statement) as copy:
        data = b"".join(bytes(chunk) for chunk in copy)
    return [line for line in data.decode().splitlines() if line]


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_copy_to_stdout_returns_only_own_rows(runtime, world, table) -> None:
    tenants, accounts = world
    col = _owner_column(table)
    # Without a context: nothing at all.
    assert _copy_out(runtime, f"COPY (SELECT {col} FROM {table}) TO STDOUT") == []
    assert _copy_out(runtime, f"COPY {table} TO STDOUT") == []
    runtime.rollback()
    # With tenant A's context: A's rows, never B's.
    _set_context(runtime, tenants.a, accounts[tenants.a])
    owners = _copy_out(runtime, f"COPY (SELECT {col} FROM {table}) TO STDOUT")
    whole = _copy_out(runtime, f"COPY {table} TO STDOUT")
    runtime.rollback()
    assert owners and set(owners) == {str(tenants.a)}
    assert len(whole) == len(owners)
    assert not any(str(tenants.b) in line for line in whole)


@pytest.mark.parametrize("statement", [
    "COPY {table} TO '/tmp/rtv-stolen.csv'",
    "COPY (SELECT * FROM {table}) TO '/tmp/rtv-stolen.csv'",
    "COPY {table} TO PROGRAM 'cat > /tmp/rtv-stolen.csv'",
])
def test_copy_to_a_server_file_or_program_is_refused(runtime, world, statement) -> None:
    tenants, accounts = world
    for table in TENANT_TABLES:
        _set_context(runtime, tenants.a, accounts[tenants.a])
        message = _refused(runtime, statement.format(table=table), psycopg.errors.InsufficientPrivilege)
        assert "pg_write_server_files" in message or "pg_execute_server_program" in message


@pytest.mark.parametrize("table", WRITABLE)
def test_copy_from_is_refused_on_rls_tables(runtime, world, system, table) -> None:
    # COPY FROM would skip the WITH CHECK of the policy, so PostgreSQL refuses it under RLS.
    tenants, accounts = world
    before = table_counts(system)
    _set_context(runtime, tenants.a, accounts[tenants.a])
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="row-level security"):
        with runtime.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            copy.write("")
    runtime.rollback()
    assert table_counts(system) == before


# -- smuggling code into the query: pg_temp functions, leaky functions --------------------------

@pytest.mark.parametrize("statement", [
    "CREATE FUNCTION pg_temp.spy(uuid) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
    "CREATE TEMP TABLE loot (c uuid)",
    "CREATE TEMP VIEW loot AS SELECT 1",
])
def test_no_temporary_objects(runtime, statement) -> None:
    # TEMPORARY is revoked from PUBLIC on the database (bootstrap.sql): no pg_temp schema at all.
    message = _refused(runtime, statement, psycopg.errors.InsufficientPrivilege)
    assert "temporary" in message


def test_leaky_function_sees_only_rows_that_rls_let_through(admin_conn, runtime, world) -> None:
    """Even a function with a side effect, called in WHERE, is never handed another tenant's row.

    The runtime role cannot create one (no TEMPORARY, no CREATE anywhere), so the admin plants it,
    as an attacker with a foothold might. The function is not LEAKPROOF (only a superuser can
    mark one so), and PostgreSQL applies the policy's quals before any non-leakproof qual of the
    query, whatever the function's cost: the function only ever sees rows the policy passed.
    """
    tenants, accounts = world
    admin_conn.execute("""
        CREATE FUNCTION public.spy(c uuid, v text) RETURNS boolean LANGUAGE plpgsql COST 0.000001 AS $$
        BEGIN RAISE NOTICE 'spy:%:%', c, v; RETURN true; END $$;
        GRANT EXECUTE ON FUNCTION public.spy(uuid, text) TO rtv_app;
    """)
    seen: list[str] = []
    runtime.add_notice_handler(lambda diag: seen.append(diag.message_primary or ""))
    _set_context(runtime, tenants.a, accounts[tenants.a])
    for table in WRITABLE:
        runtime.execute(f"SELECT * FROM {table} WHERE public.spy(client_id, {table}::text)").fetchall()
        # Aimed straight at B: still only rows that passed the policy reach the function.
        runtime.execute(f"SELECT * FROM {table} WHERE client_id = %s AND public.spy(client_id, {table}::text)",
                        (tenants.b,)).fetchall()
    runtime.rollback()
    spied = [m for m in seen if m.startswith("spy:")]
    assert spied, "the planted function never ran: the test proves nothing"
    assert all(m.startswith(f"spy:{tenants.a}:") for m in spied), spied
    assert not any(str(tenants.b) in m for m in spied)


@pytest.mark.parametrize("table", WRITABLE)
def test_error_side_channel_is_closed(runtime, world, table) -> None:
    """A built-in, non-leakproof expression that errors on B's rows never errors: it never sees them."""
    tenants, accounts = world
    _set_context(runtime, tenants.a, accounts[tenants.a])
    count = runtime.execute(
        f"SELECT count(*) FROM {table} WHERE 1 / (CASE WHEN client_id = %s THEN 0 ELSE 1 END) = 1", (tenants.b,)
    ).fetchone()[0]
    runtime.rollback()
    assert count == 1  # A's own row; B's row would have raised division_by_zero


# -- reading other sessions' context -------------------------------------------------------------

def test_pg_stat_activity_does_not_show_the_context(db, runtime, world) -> None:
    """Every tenant shares the runtime role, and same-role sessions could read each other's query
    text in pg_stat_activity (literals included): `rtv-db migrate` revokes it from the runtime role.
    The context travels as bind parameters anyway, and the role's log_parameter_max_length is 0."""
    tenants, accounts = world
    scope = with_tenant_scope(db, tenants.a, user_id="user-42")
    with scope.scoped_transaction():
        for query in ("SELECT query FROM pg_stat_activity", "SELECT pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() b"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                runtime.execute(query)
            runtime.rollback()
    # The other session's settings are not readable either: pg_settings is this session's own.
    assert runtime.execute("SELECT current_setting('app.current_tenant_id', true)").fetchone()[0] in ("", None)
    runtime.rollback()


# -- setting someone else's context --------------------------------------------------------------

@pytest.mark.parametrize("how", ["set_config", "set_local", "set_tenant_context", "session_set"])
def test_cannot_switch_to_another_tenants_context(db, world, how) -> None:
    """Inside tenant A's transaction, injected SQL names tenant B: it sees none of B's rows.

    This worked before issue 8 (the policies trusted the bare settings); the signed context closed it.
    """
    tenants, accounts = world
    with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
        conn = tx.connection
        b = str(tenants.b)
        if how == "set_config":
            conn.execute(sql_text("SELECT set_config('app.current_tenant_id', :b, true)"), {"b": b})
        elif how == "set_local":
            conn.exec_driver_sql(f"SET LOCAL app.current_tenant_id = '{b}'")
        elif how == "session_set":
            conn.exec_driver_sql(f"SET app.current_tenant_id = '{b}'")
        else:  # the plain setter is switched off in signed mode: it refuses outright
            with pytest.raises(sqlalchemy.exc.ProgrammingError, match="must be signed"):
                with conn.begin_nested():
                    conn.execute(sql_text("SELECT rtv.set_tenant_context(CAST(:b AS uuid))"), {"b": b})
        stolen = conn.execute(sql_text("SELECT count(*) FROM brand_kits WHERE client_id = :b"), {"b": tenants.b}).scalar_one()
        written = conn.execute(sql_text("UPDATE brand_kits SET name = 'pwned' WHERE client_id = :b"), {"b": tenants.b}).rowcount
    assert (stolen, written) == (0, 0)


def test_session_level_set_does_not_reach_a_later_transaction(db, world) -> None:
    """A session-level ``SET`` injected in one request must not reach a later one on the same connection.

    The value does stay on the pooled backend after checkin (the pool only rolls back); it is
    harmless because the policies trust only a token set in the current transaction.
    """
    tenants, _ = world
    with db.engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.exec_driver_sql(f"SET app.current_tenant_id = '{tenants.b}'")
        conn.commit()
    with db.engine.connect() as conn:  # the same pooled backend (the pool holds one idle connection)
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == pid
        assert conn.exec_driver_sql("SELECT rtv.current_tenant_id()").scalar_one() is None
        leaked = {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one() for t in TENANT_TABLES}
    assert set(leaked.values()) == {0}, leaked


def test_scoped_transactions_override_an_injected_session_setting(db, world) -> None:
    """What limits the hole above: every scoped transaction sets the whole context itself."""
    tenants, _ = world
    with db.engine.connect() as conn:
        conn.exec_driver_sql(f"SET app.current_tenant_id = '{tenants.b}'")
        conn.commit()
    rows = with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
    assert {r.client_id for r in rows} == {tenants.a}


def test_the_context_lasts_one_transaction(runtime, world) -> None:
    tenants, accounts = world
    _set_context(runtime, tenants.a)
    assert runtime.execute("SELECT count(*) FROM brand_kits").fetchone()[0] == 1
    runtime.commit()
    assert runtime.execute("SELECT count(*) FROM brand_kits").fetchone()[0] == 0
    runtime.rollback()
    # In autocommit each statement is its own transaction: the context is gone at once.
    runtime.autocommit = True
    _set_context(runtime, tenants.a)
    assert runtime.execute("SELECT count(*) FROM brand_kits").fetchone()[0] == 0
    assert runtime.execute("SELECT current_setting('app.tenant_token', true)").fetchone()[0] in ("", None)
    # The plain setter is no way around it: in signed mode its settings count for nothing.
    runtime.autocommit = False
    _refused(runtime, sql.SQL("SELECT rtv.set_tenant_context({})").format(sql.Literal(str(tenants.a))),
             psycopg.errors.InsufficientPrivilege)


@pytest.mark.parametrize("value", ["not-a-uuid", "' OR true --", "", "00000000-0000-0000-0000-000000000000' OR '1'='1"])
def test_garbage_in_the_setting_reads_as_no_tenant(runtime, world, value) -> None:
    """A malformed setting is NULL to the policies (zero rows), never a cast error or a wildcard."""
    runtime.execute("SELECT set_config('app.current_tenant_id', %s, true), set_config('app.tenant_token', %s, true)",
                    (value, value))
    for table in TENANT_TABLES:
        assert runtime.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    runtime.rollback()


# -- creating or changing objects ------------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "CREATE TABLE public.loot (c uuid)",
    "CREATE TABLE rtv.loot (c uuid)",
    "CREATE VIEW public.all_kits AS SELECT * FROM brand_kits",
    "CREATE VIEW rtv.all_kits AS SELECT * FROM brand_kits",
    "CREATE FUNCTION public.spy() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE FUNCTION rtv.current_tenant_id() RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'",
    "CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'",
    "CREATE SCHEMA loot",
    "CREATE MATERIALIZED VIEW public.all_kits AS SELECT * FROM brand_kits",
])
def test_cannot_create_objects(runtime, statement) -> None:
    _refused(runtime, statement, (psycopg.errors.InsufficientPrivilege,))


@pytest.mark.parametrize("statement", [
    "ALTER POLICY tenant_isolation ON {table} USING (true)",
    "DROP POLICY tenant_isolation ON {table}",
    "CREATE POLICY open_door ON {table} USING (true)",
    "ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY",
    "ALTER TABLE {table} OWNER TO rtv_app",
    "DROP TABLE {table}",
    "CREATE TRIGGER t BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION rtv.current_tenant_id()",
    "CREATE RULE r AS ON INSERT TO {table} DO INSTEAD NOTHING",
])
def test_cannot_change_policies_or_tables(runtime, world, admin_conn, statement) -> None:
    for table in TENANT_TABLES:
        message = _refused(runtime, statement.format(table=table), psycopg.errors.InsufficientPrivilege)
        assert "must be owner" in message or "permission denied" in message
        rls = admin_conn.execute(
            "SELECT relrowsecurity, relforcerowsecurity, (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid) "
            "FROM pg_class c WHERE oid = %s::regclass", (table,)
        ).fetchone()
        assert rls == (True, True, 1), table


def test_every_attack_left_the_pool_clean(db, world) -> None:
    """After scoped work, the runtime pool carries no context (the attacks above used their own connections)."""
    tenants, _ = world
    for tenant in (tenants.a, tenants.b):
        with_tenant_scope(db, tenant).scoped_query(brand_kits)
    assert isinstance(db, Database)
    assert_no_context_left(db)


def test_statistics_views_show_no_values_of_rls_tables(runtime, world, admin_conn) -> None:
    """pg_stats would list most-common values of every column across tenants; it hides RLS tables.

    (pg_statistic itself is readable by superusers only.) Totals (pg_class.reltuples,
    pg_stat_user_tables) stay visible: counts across tenants, never values.
    """
    tenants, accounts = world
    admin_conn.execute("ANALYZE")
    # Since revision 0009 no column of a tenant table collects statistics (docs/statistics.md);
    # planted here, as a mistake would, to show that pg_stats hides them from the runtime role anyway.
    assert admin_conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'brand_kits'").fetchone()[0] == 0
    admin_conn.execute("ALTER TABLE brand_kits ALTER COLUMN name SET STATISTICS -1; ANALYZE brand_kits")
    assert admin_conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'brand_kits'").fetchone()[0] > 0
    _set_context(runtime, tenants.a, accounts[tenants.a])
    for view in ("pg_stats", "pg_stats_ext", "pg_stats_ext_exprs"):
        rows = runtime.execute(f"SELECT count(*) FROM {view} WHERE tablename = ANY(%s)", (list(TENANT_TABLES),)).fetchone()[0]
        assert rows == 0, view
    runtime.rollback()
    _refused(runtime, "SELECT * FROM pg_statistic LIMIT 1", psycopg.errors.InsufficientPrivilege)
