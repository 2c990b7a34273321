"""The audit trail (issue 4): every write leaves one event, in its transaction, names but no values.

Writes under test go through the runtime role (``db``): the scoped API and raw SQL. Setup uses
the system scope; the superuser ``admin_conn`` only ages events for the retention test and reads
the raw table to prove no value was copied.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from rtv_db import (
    AsyncDatabase,
    AuditError,
    InvalidInputError,
    audit_events,
    brand_kits,
    clients,
    knowledge_bases,
    platform_accounts,
    platform_actions,
    purge_audit_events,
    read_audit_trail,
    read_audit_trail_async,
    with_tenant_scope,
)
from rtv_db.rls import set_tenant_context
from rtv_db.audit import AuditEvent, build_audit_query, parse_age
from rtv_db.cli import cli
from rtv_db.migrate import downgrade, migrate

SECRET = "sk-live-Zq8cDO-NOT-LEAK-4f2a"


def set_context(conn, t, p=None, l="api", u=None, c=None):
    """Raw SQL's way in: the (signed) context for the rest of this transaction."""
    set_tenant_context(conn, t, p, l, user_id=u, correlation_id=c)


def all_events(system, **where):
    """Every event of the database (system scope reads across tenants), oldest first."""
    stmt = audit_events.select().order_by(audit_events.c.occurred_at, audit_events.c.id)
    for column, value in where.items():
        stmt = stmt.where(audit_events.c[column] == value)
    with system.transaction() as conn:
        return [AuditEvent.from_row(row) for row in conn.execute(stmt)]


@pytest.fixture()
def account_a(system, tenants) -> uuid.UUID:
    account = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(platform_accounts.insert().values(client_id=tenants.a, id=account, platform="x",
                                                        handle="a_on_x", lanes=["api", "browser"]))
    return account


def is_permission_denied(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, psycopg.errors.InsufficientPrivilege)


# -- what an event records -----------------------------------------------------------------------


def test_scoped_insert_update_delete_each_leave_one_event_with_the_context(db, system, tenants, account_a):
    scope = with_tenant_scope(db, tenants.a, platform_account_id=account_a, lane="browser",
                              user_id="user-42", correlation_id="req-insert-1")
    before = len(all_events(system))

    with scope.scoped_transaction() as tx:
        kit = tx.scoped_insert(brand_kits, {"name": "Audited kit"})[0]
        # Same transaction: the event exists before the commit.
        inside = read_audit_trail(tx, row_id=kit.id).events
        assert [e.action for e in inside] == ["INSERT"]

    events = all_events(system, row_id=kit.id)
    assert len(events) == 1 and len(all_events(system)) == before + 1
    e = events[0]
    assert (e.client_id, e.action, e.table_name, e.row_id) == (tenants.a, "INSERT", "brand_kits", kit.id)
    assert (e.platform_account_id, e.lane, e.user_id, e.correlation_id) == (account_a, "browser", "user-42", "req-insert-1")
    assert e.changed_columns is None
    assert e.db_role == "rtv_app"
    assert abs(e.occurred_at - datetime.now(timezone.utc)) < timedelta(minutes=5)

    update_scope = with_tenant_scope(db, tenants.a, correlation_id="req-update-1")
    update_scope.scoped_update(brand_kits, {"colors": {"api_key": SECRET}}, brand_kits.c.id == kit.id)
    update_scope.scoped_delete(brand_kits, brand_kits.c.id == kit.id)

    events = all_events(system, row_id=kit.id)
    assert [e.action for e in events] == ["INSERT", "UPDATE", "DELETE"]
    updated, deleted = events[1], events[2]
    assert "colors" in updated.changed_columns
    assert set(updated.changed_columns) <= {"colors", "updated_at"}  # updated_at: the model's onupdate
    assert "name" not in updated.changed_columns and "tone" not in updated.changed_columns
    assert updated.correlation_id == "req-update-1" and updated.user_id is None
    assert updated.platform_account_id is None and updated.lane == "api"
    assert (deleted.action, deleted.table_name, deleted.client_id, deleted.changed_columns) == ("DELETE", "brand_kits", tenants.a, None)


def test_no_value_reaches_the_trail(db, system, admin_conn, tenants):
    scope = with_tenant_scope(db, tenants.a)
    kit = scope.scoped_query(brand_kits)[0]
    scope.scoped_update(brand_kits, {"logo_refs": [SECRET], "colors": {"token": SECRET}}, brand_kits.c.id == kit.id)
    with db.engine.connect() as conn, conn.begin():
        set_context(conn, tenants.a, None, "api", None, "raw")
        conn.execute(text("UPDATE clients SET settings = jsonb_build_object('password', CAST(:s AS text))"), {"s": SECRET})

    rows = admin_conn.execute("SELECT to_jsonb(a)::text FROM audit_events a").fetchall()
    assert len(rows) >= 4
    assert not [r for r in rows if SECRET in r[0]]
    changed = {e.table_name: e.changed_columns for e in all_events(system, action="UPDATE")}
    assert set(changed["brand_kits"]) >= {"logo_refs", "colors"}
    assert changed["clients"] == ("settings",)


def test_raw_sql_on_the_runtime_role_is_audited(db, system, tenants):
    kb = uuid.uuid4()
    with db.engine.connect() as conn, conn.begin():
        set_context(conn, tenants.a, None, "api", "svc-indexer", "raw-1")
        conn.execute(text("INSERT INTO knowledge_bases (client_id, id, name) VALUES (:t, :i, 'KB')"), {"t": tenants.a, "i": kb})
        conn.execute(text("INSERT INTO knowledge_chunks (client_id, knowledge_base_id, content) VALUES (:t, :i, 'c1'), (:t, :i, 'c2')"),
                     {"t": tenants.a, "i": kb})
        conn.execute(text("UPDATE knowledge_bases SET description = 'd' WHERE id = :i"), {"i": kb})
        conn.execute(text("UPDATE knowledge_chunks SET embedding = CAST(array_fill(0.25, ARRAY[384]) AS vector) WHERE content = 'c1'"))
        # A cascade is audited too: deleting the base deletes (and records) its chunks.
        conn.execute(text("DELETE FROM knowledge_bases WHERE id = :i"), {"i": kb})

    events = all_events(system, correlation_id="raw-1")
    summary = [(e.action, e.table_name) for e in events]
    assert summary[:5] == [
        ("INSERT", "knowledge_bases"), ("INSERT", "knowledge_chunks"), ("INSERT", "knowledge_chunks"),
        ("UPDATE", "knowledge_bases"), ("UPDATE", "knowledge_chunks")]
    assert events[4].changed_columns == ("embedding",)
    # The cascade's order relative to the base's own event is PostgreSQL's trigger order.
    assert sorted(summary[5:]) == [("DELETE", "knowledge_bases"), ("DELETE", "knowledge_chunks"), ("DELETE", "knowledge_chunks")]
    assert {e.client_id for e in events} == {tenants.a}
    assert {e.user_id for e in events} == {"svc-indexer"}
    assert events[3].changed_columns == ("description",)
    assert len({e.row_id for e in events if e.table_name == "knowledge_chunks"}) == 2


def test_platform_actions_and_clients_are_audited(db, system, tenants, account_a):
    scope = with_tenant_scope(db, tenants.a, platform_account_id=account_a, lane="api", correlation_id="act-1")
    action = scope.scoped_insert(platform_actions, {"kind": "post"})[0]
    scope.scoped_update(platform_actions, {"status": "running"}, platform_actions.c.id == action.id)
    scope.scoped_update(clients, {"name": "Client A renamed"}, all_rows=True)  # the tenant's own row

    events = all_events(system, correlation_id="act-1")
    assert [(e.action, e.table_name) for e in events] == [
        ("INSERT", "platform_actions"), ("UPDATE", "platform_actions"), ("UPDATE", "clients")]
    assert all(e.client_id == tenants.a and e.platform_account_id == account_a for e in events)
    assert events[1].changed_columns is not None and "status" in events[1].changed_columns
    # For clients the tenant is the row itself.
    assert events[2].row_id == tenants.a and "name" in events[2].changed_columns


def test_only_real_changes_are_recorded(db, system, tenants):
    with db.engine.connect() as conn, conn.begin():
        set_context(conn, tenants.a, None, "api", None, "noop")
        # ON CONFLICT DO NOTHING that inserts nothing: no event (the trigger runs AFTER the row exists).
        conn.execute(text("INSERT INTO brand_kits (client_id, name) VALUES (:t, 'Brand A') ON CONFLICT DO NOTHING"), {"t": tenants.a})
        # An UPDATE that changes no value is still an UPDATE statement on the row: recorded, no column named.
        conn.execute(text("UPDATE brand_kits SET name = name"))
        # An UPDATE matching no row (another tenant's, hidden by RLS): nothing.
        conn.execute(text("UPDATE brand_kits SET name = 'x' WHERE client_id = :b"), {"b": tenants.b})
    events = all_events(system, correlation_id="noop")
    assert [(e.action, e.changed_columns) for e in events] == [("UPDATE", ())]


def test_a_rollback_leaves_no_event(db, system, tenants):
    scope = with_tenant_scope(db, tenants.a, correlation_id="rolled-back")
    with pytest.raises(RuntimeError):
        with scope.scoped_transaction() as tx:
            tx.scoped_insert(brand_kits, {"name": "Never"})
            tx.scoped_update(brand_kits, {"name": "Brand A2"}, brand_kits.c.name == "Brand A")
            assert len(read_audit_trail(tx, correlation_id="rolled-back").events) == 2
            raise RuntimeError("abort")
    assert all_events(system, correlation_id="rolled-back") == []
    # A failing statement takes its event with it, even when the transaction goes on.
    with scope.scoped_transaction() as tx:
        with pytest.raises(DBAPIError):
            with tx.scoped_transaction():  # a savepoint
                tx.scoped_insert(brand_kits, {"name": "Brand A"})  # duplicate name
        tx.scoped_insert(brand_kits, {"name": "Kept"})
    assert [e.action for e in all_events(system, correlation_id="rolled-back")] == ["INSERT"]


def test_system_scope_writes_carry_the_rows_tenant(system, tenants):
    events = all_events(system)
    # The tenants fixture: two clients and a brand kit each, by the system role, with no context.
    assert sorted((e.table_name, e.client_id == tenants.a) for e in events) == [
        ("brand_kits", False), ("brand_kits", True), ("clients", False), ("clients", True)]
    assert {e.db_role for e in events} == {"rtv_system"}
    assert {(e.lane, e.user_id, e.correlation_id, e.platform_account_id) for e in events} == {(None, None, None, None)}


def test_an_event_cannot_name_another_tenant_than_the_context(system, tenants):
    # The system role bypasses RLS on the data, but with a tenant context set, the audit insert
    # policy still refuses an event about another tenant: the policy is not "always true".
    with pytest.raises(DBAPIError, match="row-level security"):
        with system.transaction() as conn:
            set_context(conn, tenants.a, None, "api", None, None)
            conn.execute(brand_kits.update().where(brand_kits.c.client_id == tenants.b).values(name="hijack"))


# -- append-only and isolation ----------------------------------------------------------------------


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET action = 'INSERT'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
    "INSERT INTO audit_events (client_id, action, table_name, row_id) VALUES (CAST(:t AS uuid), 'DELETE', 'clients', CAST(:t AS uuid))",
    "SELECT rtv.purge_audit_events(interval '0')",
])
def test_the_runtime_role_cannot_change_the_trail(db, system, tenants, statement):
    before = all_events(system)
    with pytest.raises(DBAPIError) as caught:
        with db.engine.connect() as conn, conn.begin():
            set_context(conn, tenants.a, None, "api", None, None)
            conn.execute(text(statement), {"t": tenants.a})
    assert is_permission_denied(caught.value), caught.value
    assert all_events(system) == before


def test_a_tenant_reads_only_its_own_events(db, tenants):
    a_events = read_audit_trail(with_tenant_scope(db, tenants.a)).events
    b_scope = with_tenant_scope(db, tenants.b)
    b_events = read_audit_trail(b_scope).events
    assert a_events and b_events
    assert {e.client_id for e in a_events} == {tenants.a}
    assert {e.client_id for e in b_events} == {tenants.b}
    # Naming A's row from B finds nothing, and raw SQL as B sees only B's rows.
    assert read_audit_trail(b_scope, row_id=tenants.a).events == []
    with db.engine.connect() as conn, conn.begin():
        set_context(conn, tenants.b, None, "api", None, None)
        assert set(conn.execute(text("SELECT DISTINCT client_id FROM audit_events")).scalars()) == {tenants.b}
    # With no tenant context: nothing.
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one() == 0


def test_the_bulk_load_switch_is_for_the_system_role_only(db, system, tenants):
    with system.transaction() as conn:
        conn.execute(text("SET LOCAL rtv.audit_bulk_load = 'on'"))
        conn.execute(brand_kits.insert(), [{"client_id": tenants.a, "name": f"bulk {i}"} for i in range(5)])
    assert len(all_events(system, table_name="brand_kits")) == 2  # the fixture's two kits only

    with db.engine.connect() as conn, conn.begin():
        set_context(conn, tenants.a, None, "api", None, "bulk-try")
        conn.execute(text("SET LOCAL rtv.audit_bulk_load = 'on'"))
        conn.execute(text("INSERT INTO brand_kits (client_id, name) VALUES (:t, 'sneaky')"), {"t": tenants.a})
    assert [e.action for e in all_events(system, correlation_id="bulk-try")] == ["INSERT"]


# -- reading the trail ------------------------------------------------------------------------------


@pytest.fixture()
def busy_tenant(db, tenants):
    """Tenant A with 25 kits made by three requests, and a change to one of them."""
    scope = with_tenant_scope(db, tenants.a)
    ids = []
    for request in range(3):
        with with_tenant_scope(db, tenants.a, correlation_id=f"req-{request}").scoped_transaction() as tx:
            ids += [row.id for row in tx.scoped_insert(brand_kits, [{"name": f"kit {request}-{i}"} for i in range(8 + request)])]
    with_tenant_scope(db, tenants.a, correlation_id="req-rename").scoped_update(brand_kits, {"name": "renamed"}, brand_kits.c.id == ids[0])
    return scope, ids


def test_read_by_resource_correlation_action_and_time(busy_tenant, tenants):
    scope, ids = busy_tenant
    history = read_audit_trail(scope, table="brand_kits", row_id=ids[0]).events
    assert [e.action for e in history] == ["UPDATE", "INSERT"]  # newest first
    assert len(read_audit_trail(scope, correlation_id="req-1", limit=100).events) == 9
    assert [e.row_id for e in read_audit_trail(scope, action="UPDATE").events] == [ids[0]]
    assert {e.table_name for e in read_audit_trail(scope, table="clients").events} == {"clients"}

    everything = read_audit_trail(scope, limit=1000).events
    assert len(everything) == 1 + 1 + 27 + 1  # client, fixture kit, 8+9+10 kits, the rename
    assert everything == sorted(everything, key=lambda e: (e.occurred_at, e.id), reverse=True)
    middle = everything[10].occurred_at
    newer = read_audit_trail(scope, since=middle, limit=1000).events
    older = read_audit_trail(scope, until=middle, limit=1000).events
    assert all(e.occurred_at >= middle for e in newer) and all(e.occurred_at < middle for e in older)
    assert {e.id for e in newer} | {e.id for e in older} == {e.id for e in everything}
    assert not {e.id for e in newer} & {e.id for e in older}
    assert read_audit_trail(scope, since=datetime.now(timezone.utc) + timedelta(hours=1)).events == []


def test_keyset_pagination_walks_every_page_once(busy_tenant):
    scope, _ = busy_tenant
    expected = [e.id for e in read_audit_trail(scope, limit=1000).events]
    seen, cursor, pages = [], None, 0
    while True:
        page = read_audit_trail(scope, limit=7, cursor=cursor)
        seen += [e.id for e in page.events]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # New events after the first page do not disturb the walk (they are newer than the cursor).
        scope.scoped_insert(brand_kits, {"name": f"during walk {pages}"})
    assert seen == expected and len(set(seen)) == len(seen)
    assert pages == -(-len(expected) // 7)


def test_bad_filters_are_refused_before_reaching_the_database(busy_tenant):
    scope, _ = busy_tenant
    for kwargs in ({"limit": 0}, {"limit": 1001}, {"table": "audit_events"}, {"table": "nope"},
                   {"cursor": "not-a-cursor"}, {"cursor": "MXx4fDE"}, {"since": datetime(2026, 1, 1)},
                   {"action": "TRUNCATE"}, {"row_id": "123"}, {"correlation_id": ""}):
        with pytest.raises(InvalidInputError):
            read_audit_trail(scope, **kwargs)
    with pytest.raises(TypeError):
        read_audit_trail(object())  # type: ignore[arg-type]


def test_the_statement_is_tenant_bound_and_uses_the_key(tenants):
    sql = str(build_audit_query(tenants.a, table=brand_kits, cursor=None).compile())
    assert "audit_events.client_id = " in sql and "ORDER BY audit_events.occurred_at DESC, audit_events.id DESC" in sql


async def test_async_reader(target, tenants):
    # check_role=False: the foundation's role guard does not yet work on async connections (reported).
    adb = AsyncDatabase(target.runtime_url, check_role=False)
    try:
        scope = with_tenant_scope(adb, tenants.a, correlation_id="async-1")
        await scope.scoped_insert(knowledge_bases, {"name": "async kb"})
        page = await read_audit_trail_async(scope, correlation_id="async-1")
        assert [(e.action, e.table_name) for e in page.events] == [("INSERT", "knowledge_bases")]
        first = await read_audit_trail_async(scope, limit=1)
        second = await read_audit_trail_async(scope, limit=1, cursor=first.next_cursor)
        assert first.events[0].id != second.events[0].id
        with pytest.raises(TypeError):
            await read_audit_trail_async(object())  # type: ignore[arg-type]
    finally:
        await adb.close()


# -- retention --------------------------------------------------------------------------------------


def test_purge_removes_only_old_events(target, system, admin_conn, busy_tenant, tenants):
    total = len(all_events(system))
    admin_conn.execute("UPDATE audit_events SET occurred_at = occurred_at - interval '100 days' WHERE correlation_id = 'req-0'")
    admin_conn.execute("UPDATE audit_events SET occurred_at = occurred_at - interval '60 days' WHERE correlation_id = 'req-1'")
    assert purge_audit_events(target.admin_url, "90d") == 8
    remaining = all_events(system)
    assert len(remaining) == total - 8 and not [e for e in remaining if e.correlation_id == "req-0"]
    assert purge_audit_events(target.admin_url, timedelta(days=30)) == 9
    assert purge_audit_events(target.admin_url, "30d") == 0
    assert len(all_events(system)) == total - 17


def test_only_the_owner_may_purge(target, db, system, admin_conn, tenants):
    for url in (target.runtime_url, target.system_url):
        with pytest.raises(AuditError, match="permission denied"):
            purge_audit_events(url, "0s")
    # Even with EXECUTE granted by mistake, the function itself refuses the runtime role.
    admin_conn.execute("GRANT EXECUTE ON FUNCTION rtv.purge_audit_events(interval) TO rtv_app")
    with pytest.raises(DBAPIError, match="only the owner role or an admin"):
        with db.engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT rtv.purge_audit_events(interval '0')"))
    assert len(all_events(system)) == 4
    with pytest.raises(InvalidInputError):
        purge_audit_events(target.admin_url, "-1d")
    assert parse_age("2w") == timedelta(weeks=2) and parse_age("45s") == timedelta(seconds=45)


def test_cli_audit_purge_and_show(target, busy_tenant, tenants, admin_conn, monkeypatch):
    import rtv_db.cli

    monkeypatch.setattr(rtv_db.cli.console, "width", 200)  # a wide terminal: no cell is shortened
    admin_conn.execute("UPDATE audit_events SET occurred_at = occurred_at - interval '100 days' WHERE correlation_id = 'req-2'")
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", "purge", "--database-url", target.admin_url, "--older-than", "90d", "--yes"])
    assert result.exit_code == 0, result.output
    assert "removed 10 audit event(s)" in result.output
    result = runner.invoke(cli, ["audit", "show", "--database-url", target.admin_url, "--tenant", str(tenants.a),
                                 "--table", "brand_kits", "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert "UPDATE" in result.output and "brand_kits" in result.output and "more" in result.output
    result = runner.invoke(cli, ["audit", "purge", "--database-url", target.admin_url, "--older-than", "ninety", "--yes"])
    assert result.exit_code == 1 and "not an age" in result.output


# -- schema -----------------------------------------------------------------------------------------


def test_downgrade_removes_the_audit_trail_and_upgrade_restores_it(target, admin_conn, tenants):
    catalog = """SELECT (SELECT count(*) FROM pg_class WHERE relname = 'audit_events'),
                        (SELECT count(*) FROM pg_trigger WHERE tgname = 'audit_row_change'),
                        (SELECT count(*) FROM pg_proc WHERE proname IN ('audit_row_change', 'purge_audit_events', 'audit_purge_cutoff'))"""
    assert admin_conn.execute(catalog).fetchone() == (1, 6, 3)
    downgrade(target.admin_url, target.settings, "0002")
    assert admin_conn.execute(catalog).fetchone() == (0, 0, 0)
    migrate(target.admin_url, target.settings)
    assert admin_conn.execute(catalog).fetchone() == (1, 6, 3)
    rls = admin_conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = 'audit_events'").fetchone()
    assert rls == (True, True)
    grants = admin_conn.execute("""SELECT privilege_type FROM information_schema.role_table_grants
                                   WHERE table_name = 'audit_events' AND grantee = 'rtv_app'""").fetchall()
    assert [g[0] for g in grants] == ["SELECT"]


def test_the_model_mirrors_the_migration(target):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from rtv_db.schema import metadata

    engine = create_engine(target.admin_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "compare_server_default": True,
                "include_object": lambda obj, name, type_, reflected, compare_to: not (type_ == "table" and name == "alembic_version"),
            })
            diff = [d for d in compare_metadata(context, metadata) if "audit_events" in repr(d)]
    finally:
        engine.dispose()
    assert diff == []
