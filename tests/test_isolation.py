"""Tenant isolation (S0-B3), as the runtime role: the spec's tests and the database's own wall."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from rtv_db import (
    CrossTenantWriteError,
    InvalidInputError,
    InvalidTenantContextError,
    MissingTenantContextError,
    TenantAccessError,
    UnscopedWriteError,
    assert_tenant_ownership,
    brand_kits,
    clear_tenant_context,
    clients,
    get_current_tenant,
    is_rls_enabled,
    knowledge_bases,
    knowledge_chunks,
    platform_accounts,
    platform_actions,
    set_tenant_context,
    with_rls_context,
    with_tenant_scope,
)
from rtv_db.schema import tenant_tables

# -- the spec's four tests ----------------------------------------------------------------


def test_with_tenant_scope_only_returns_data_for_specified_client(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    kits = scope.scoped_query(brand_kits, brand_kits.c.client_id == tenants.a)
    assert len(kits) == 1
    assert kits[0].name == "Brand A"


def test_scoped_query_adds_client_id_filter_automatically(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    kits = scope.scoped_query(brand_kits)
    assert len(kits) == 1
    assert all(k.client_id == tenants.a for k in kits)
    # The filter is in the statement itself, not only in RLS.
    from rtv_db.tenant._statements import build_select

    compiled = str(build_select(brand_kits, scope.context).compile())
    assert "brand_kits.client_id = " in compiled


def test_different_tenants_see_different_data(db, tenants):
    kits_a = with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
    kits_b = with_tenant_scope(db, tenants.b).scoped_query(brand_kits)
    assert kits_a[0].name == "Brand A"
    assert kits_b[0].name == "Brand B"


def test_insert_automatically_adds_client_id(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    [inserted] = scope.scoped_insert(brand_kits, {
        "name": "Auto-scoped Brand",
        "tone": {"voice": "friendly", "personality": []},
        "colors": {"primary": "#0000ff"},
        "logo_refs": [],
    })
    assert inserted.client_id == tenants.a
    assert [k.name for k in with_tenant_scope(db, tenants.b).scoped_query(brand_kits)] == ["Brand B"]


# -- the scoped API's refusals --------------------------------------------------------------


def test_scoped_insert_refuses_another_tenants_client_id(db, tenants, system):
    with pytest.raises(CrossTenantWriteError):
        with_tenant_scope(db, tenants.a).scoped_insert(brand_kits, {"client_id": tenants.b, "name": "sneaky"})
    with system.transaction() as conn:
        assert conn.execute(text("select count(*) from brand_kits where name = 'sneaky'")).scalar() == 0


def test_scoped_insert_accepts_its_own_client_id(db, tenants):
    [row] = with_tenant_scope(db, tenants.a).scoped_insert(brand_kits, {"client_id": str(tenants.a), "name": "own"})
    assert row.client_id == tenants.a


def test_scoped_insert_many_rows(db, tenants):
    rows = with_tenant_scope(db, tenants.a).scoped_insert(brand_kits, [{"name": f"k{i}"} for i in range(5)])
    assert len(rows) == 5 and {r.client_id for r in rows} == {tenants.a}


def test_update_and_delete_require_a_condition(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    with pytest.raises(UnscopedWriteError):
        scope.scoped_update(brand_kits, {"name": "x"})
    with pytest.raises(UnscopedWriteError):
        scope.scoped_delete(brand_kits)
    from sqlalchemy import true

    # A condition that is literally TRUE is no condition.
    with pytest.raises(UnscopedWriteError):
        scope.scoped_delete(brand_kits, true())
    with pytest.raises(UnscopedWriteError):
        scope.scoped_update(brand_kits, {"name": "x"}, true(), True)
    assert len(scope.scoped_query(brand_kits)) == 1


def test_scoped_update_cannot_change_client_id(db, tenants):
    with pytest.raises(CrossTenantWriteError):
        with_tenant_scope(db, tenants.a).scoped_update(brand_kits, {"client_id": tenants.b}, brand_kits.c.name == "Brand A")


def test_scoped_update_and_delete_touch_only_own_rows(db, tenants, system):
    scope_a = with_tenant_scope(db, tenants.a)
    # A condition that would match B's row too: only A's is touched.
    updated = scope_a.scoped_update(brand_kits, {"colors": {"primary": "#000"}}, brand_kits.c.name.like("Brand %"))
    assert [r.name for r in updated] == ["Brand A"]
    deleted = scope_a.scoped_delete(brand_kits, brand_kits.c.name.like("Brand %"))
    assert [r.name for r in deleted] == ["Brand A"]
    with system.transaction() as conn:  # these two tenants' rows (a Citus run shares one database)
        names = conn.execute(text("select name, colors->>'primary' from brand_kits where client_id = any(:ids)"),
                             {"ids": [tenants.a, tenants.b]}).all()
    assert names == [("Brand B", "#ff0000")]


def test_scoped_api_rejects_unknown_columns_and_non_tenant_tables(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    with pytest.raises(InvalidInputError, match="no column"):
        scope.scoped_insert(brand_kits, {"nmae": "typo"})
    from sqlalchemy import Column, Integer, MetaData, Table

    other = Table("not_a_tenant_table", MetaData(), Column("x", Integer))
    with pytest.raises(InvalidInputError, match="not a tenant table"):
        scope.scoped_query(other)


def test_scoped_get_hides_other_tenants_rows(db, tenants):
    [kit_b] = with_tenant_scope(db, tenants.b).scoped_query(brand_kits)
    assert with_tenant_scope(db, tenants.a).scoped_get(brand_kits, kit_b.id) is None
    assert with_tenant_scope(db, tenants.b).scoped_get(brand_kits, kit_b.id).name == "Brand B"


def test_scoped_transaction_commits_together_and_rolls_back_together(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    with scope.scoped_transaction() as tx:
        tx.scoped_insert(brand_kits, {"name": "one"})
        tx.scoped_insert(brand_kits, {"name": "two"})
    with pytest.raises(RuntimeError):
        with scope.scoped_transaction() as tx:
            tx.scoped_insert(brand_kits, {"name": "three"})
            raise RuntimeError("boom")
    assert sorted(k.name for k in scope.scoped_query(brand_kits)) == ["Brand A", "one", "two"]


def test_nested_scoped_transaction_is_a_savepoint(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    with scope.scoped_transaction() as tx:
        tx.scoped_insert(brand_kits, {"name": "outer"})
        with pytest.raises(ValueError):
            with tx.scoped_transaction() as inner:
                inner.scoped_insert(brand_kits, {"name": "inner"})
                raise ValueError("undo the savepoint only")
        assert tx.connection.execute(text("select rtv.current_tenant_id()")).scalar() == tenants.a
    assert sorted(k.name for k in scope.scoped_query(brand_kits)) == ["Brand A", "outer"]


# -- assert_tenant_ownership ------------------------------------------------------------------


def test_assert_tenant_ownership(db, tenants, caplog):
    [kit_a] = with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
    assert assert_tenant_ownership(kit_a, tenants.a, "brand kit") is kit_a
    with pytest.raises(TenantAccessError) as mismatch:
        assert_tenant_ownership(kit_a, tenants.b, "brand kit")
    with pytest.raises(TenantAccessError) as missing:
        assert_tenant_ownership(None, tenants.b, "brand kit")
    # No existence oracle: both read the same to the caller; the log tells them apart.
    assert str(mismatch.value) == str(missing.value) == "brand kit not found"
    assert "owned by" in caplog.text and str(tenants.a) in caplog.text
    assert assert_tenant_ownership({"client_id": str(tenants.a)}, str(tenants.a), "dict") == {"client_id": str(tenants.a)}


# -- the database's wall: raw SQL on the runtime role -------------------------------------------


def _raw(db, tenant, sql, params=None):
    with db.engine.begin() as conn:
        if tenant is not None:
            set_tenant_context(conn, tenant)
        result = conn.execute(text(sql), params or {})
        return result.all() if result.returns_rows else result.rowcount


def test_raw_sql_reads_only_the_current_tenant(db, tenants):
    assert _raw(db, tenants.a, "select name from brand_kits") == [("Brand A",)]
    assert _raw(db, tenants.a, "select name from brand_kits where client_id = :b", {"b": tenants.b}) == []
    assert _raw(db, tenants.a, "select id from clients") == [(tenants.a,)]


def test_raw_sql_cross_tenant_insert_is_rejected(db, tenants):
    with pytest.raises(DBAPIError, match="row-level security"):
        _raw(db, tenants.a, "insert into brand_kits (client_id, name) values (:b, 'x')", {"b": tenants.b})


def test_raw_sql_cross_tenant_update_and_delete_touch_nothing(db, tenants, system):
    assert _raw(db, tenants.a, "update brand_kits set name = 'pwned' where client_id = :b", {"b": tenants.b}) == 0
    assert _raw(db, tenants.a, "delete from brand_kits where client_id = :b", {"b": tenants.b}) == 0
    with system.transaction() as conn:
        assert conn.execute(text("select name from brand_kits where client_id = :b"), {"b": tenants.b}).scalar() == "Brand B"


def test_raw_sql_cannot_move_a_row_to_another_tenant(db, tenants):
    # RLS refuses it; Citus refuses it first (a row's distribution column cannot change).
    with pytest.raises(DBAPIError, match="row-level security|modifying the partition value of rows is not allowed"):
        _raw(db, tenants.a, "update brand_kits set client_id = :b", {"b": tenants.b})


def test_raw_sql_cannot_rename_another_client(db, tenants):
    assert _raw(db, tenants.a, "update clients set name = 'pwned' where id = :b", {"b": tenants.b}) == 0


def test_composite_foreign_key_blocks_cross_tenant_reference_under_rls(db, tenants, system):
    kb_b = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(knowledge_bases.insert().values(client_id=tenants.b, id=kb_b, name="B KB"))
    with pytest.raises(DBAPIError):
        # Even naming its own client_id, A cannot hang a chunk on B's knowledge base.
        with_tenant_scope(db, tenants.a).scoped_insert(knowledge_chunks, {"knowledge_base_id": kb_b, "content": "x"})


# -- no context, empty and garbage contexts -------------------------------------------------


@pytest.mark.parametrize("table", ["clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions"])
def test_no_context_sees_zero_rows(db, tenants, system, table):
    from tests.conftest import make_tenants  # noqa: F401  (tenants fixture already made rows)

    _seed_every_table(system, tenants)
    assert _raw(db, None, f"select count(*) from {table}") == [(0,)]


def test_no_context_rejects_writes(db, tenants):
    with pytest.raises(DBAPIError, match="row-level security"):
        _raw(db, None, "insert into brand_kits (client_id, name) values (:a, 'x')", {"a": tenants.a})
    assert _raw(db, None, "update brand_kits set name = 'x'") == 0
    assert _raw(db, None, "delete from brand_kits") == 0


@pytest.mark.parametrize("value", ["", "   ", "not-a-uuid", "'; drop table clients; --", "00000000-0000-0000-0000-00000000000", "{}"])
def test_empty_and_garbage_contexts_are_safe(db, tenants, value):
    with db.engine.begin() as conn:
        conn.execute(text("select set_config('app.current_tenant_id', :v, true)"), {"v": value})
        assert conn.execute(text("select rtv.current_tenant_id()")).scalar() is None
        assert conn.execute(text("select count(*) from brand_kits")).scalar() == 0


def test_plain_setter_is_refused_in_signed_mode(db, tenants):
    if os.environ.get("RTV_DB_CONTEXT_MODE") == "unsigned":
        pytest.skip("signed mode only (the Citus run is unsigned: docs/citus.md)")
    # Raw SQL cannot name a tenant: only a token the application signed sets the context.
    for call in ("select rtv.set_tenant_context(:t)", "select rtv.set_tenant_context(:t, NULL, 'api')"):
        with pytest.raises(DBAPIError, match="must be signed"):
            with db.engine.begin() as conn:
                conn.execute(text(call), {"t": str(tenants.a)})


@pytest.mark.parametrize("bad", [None, "", "nope", 42, b"\x00" * 16, "' OR 1=1 --", ["x"]])
def test_api_raises_before_any_query_on_bad_tenant_ids(db, bad):
    before = db.get_pool_stats()
    with pytest.raises(InvalidTenantContextError):
        with_tenant_scope(db, bad)
    assert db.get_pool_stats() == before  # no connection was even checked out


def test_bad_lane_raises(db, tenants):
    with pytest.raises(InvalidTenantContextError, match="lane"):
        with_tenant_scope(db, tenants.a, lane="ftp")


# -- context lifetime ---------------------------------------------------------------------------


def test_context_does_not_survive_commit_or_rollback_on_the_same_pooled_connection(target, tenants):
    from rtv_db import Database

    one = Database(target.runtime_url, pool_size=1, max_overflow=0)
    try:
        with one.engine.begin() as conn:
            pid = conn.execute(text("select pg_backend_pid()")).scalar()
            set_tenant_context(conn, tenants.a)
            assert conn.execute(text("select count(*) from brand_kits")).scalar() == 1
        with one.engine.begin() as conn:  # after COMMIT
            assert conn.execute(text("select pg_backend_pid()")).scalar() == pid
            assert conn.execute(text("select current_setting('app.current_tenant_id', true)")).scalar() in ("", None)
            assert conn.execute(text("select count(*) from brand_kits")).scalar() == 0
        conn = one.engine.connect()
        conn.begin()
        set_tenant_context(conn, tenants.a)
        conn.rollback()
        conn.close()
        with one.engine.begin() as conn:  # after ROLLBACK
            assert conn.execute(text("select pg_backend_pid()")).scalar() == pid
            assert conn.execute(text("select count(*) from brand_kits")).scalar() == 0
        # ...and after a scope's transaction, too
        with_tenant_scope(one, tenants.a).scoped_query(brand_kits)
        with one.engine.begin() as conn:
            assert conn.execute(text("select pg_backend_pid()")).scalar() == pid
            assert conn.execute(text("select rtv.current_tenant_id()")).scalar() is None
    finally:
        one.close()


def test_transaction_keeps_its_context_across_statements_and_savepoints(db, tenants):
    with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
        conn = tx.connection
        for _ in range(3):
            assert conn.execute(text("select count(*) from brand_kits")).scalar() == 1
        with conn.begin_nested():
            assert conn.execute(text("select rtv.current_tenant_id()")).scalar() == tenants.a
        savepoint = conn.begin_nested()
        savepoint.rollback()
        assert conn.execute(text("select rtv.current_tenant_id()")).scalar() == tenants.a


# -- the spec's Python RLS helpers ----------------------------------------------------------------


def test_rls_helpers(db, tenants):
    with db.engine.connect() as conn:
        conn.begin()
        assert get_current_tenant(conn) is None
        set_tenant_context(conn, tenants.a)
        assert get_current_tenant(conn) == tenants.a
        assert conn.execute(text("select count(*) from brand_kits")).scalar() == 1
        clear_tenant_context(conn)
        assert get_current_tenant(conn) is None
        assert conn.execute(text("select count(*) from brand_kits")).scalar() == 0
        conn.commit()
    with with_rls_context(db, tenants.b) as conn:
        assert conn.execute(text("select name from brand_kits")).scalar() == "Brand B"
    with pytest.raises(InvalidInputError):
        with db.engine.connect() as conn:
            clear_tenant_context(conn)


def test_is_rls_enabled_on_every_tenant_table(db):
    for table in tenant_tables():
        assert is_rls_enabled(db, table), table
    assert not is_rls_enabled(db, "no_such_table")


def test_is_rls_enabled_is_false_when_not_forced(target, admin_conn, db):
    admin_conn.execute("ALTER TABLE brand_kits NO FORCE ROW LEVEL SECURITY")
    try:
        assert not is_rls_enabled(db, "brand_kits")
    finally:  # put back: a Citus run shares one database between tests
        admin_conn.execute("ALTER TABLE brand_kits FORCE ROW LEVEL SECURITY")


# -- platform actions need the account and lane ----------------------------------------------------


def test_platform_actions_require_account_and_lane(db, tenants, system):
    account = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(platform_accounts.insert().values(client_id=tenants.a, id=account, platform="x", handle="@a", lanes=["api", "browser"]))
    with pytest.raises(MissingTenantContextError):
        with_tenant_scope(db, tenants.a).scoped_insert(platform_actions, {"kind": "post"})
    api = with_tenant_scope(db, tenants.a, platform_account_id=account, lane="api")
    browser = with_tenant_scope(db, tenants.a, platform_account_id=account, lane="browser")
    [row] = api.scoped_insert(platform_actions, {"kind": "post", "payload": {"text": "hi"}})
    assert (row.client_id, row.platform_account_id, row.lane) == (tenants.a, account, "api")
    assert len(api.scoped_query(platform_actions)) == 1
    assert browser.scoped_query(platform_actions) == []  # other lane: not visible
    # RLS itself, not only the predicate: a raw query in the browser lane sees nothing.
    with browser.scoped_transaction() as tx:
        assert tx.connection.execute(text("select count(*) from platform_actions")).scalar() == 0
    with pytest.raises(CrossTenantWriteError):
        api.scoped_insert(platform_actions, {"kind": "post", "lane": "browser"})


def _seed_every_table(system, tenants):
    with system.transaction() as conn:
        for tid in (tenants.a, tenants.b):
            kb, account = uuid.uuid4(), uuid.uuid4()
            conn.execute(platform_accounts.insert().values(client_id=tid, id=account, platform="x", handle=f"@{tid.hex[:6]}"))
            conn.execute(knowledge_bases.insert().values(client_id=tid, id=kb, name="kb"))
            conn.execute(knowledge_chunks.insert().values(client_id=tid, knowledge_base_id=kb, content="c"))
            conn.execute(platform_actions.insert().values(client_id=tid, platform_account_id=account, kind="post", lane="api"))
        assert conn.execute(text("select count(*) from clients")).scalar() >= 2
    _ = clients


def test_scoped_get_on_platform_actions_needs_the_account_and_lane(db, tenants, system):
    account = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(platform_accounts.insert().values(client_id=tenants.a, id=account, platform="x", handle="@g",
                                                       lanes=["api", "browser"]))
    api = with_tenant_scope(db, tenants.a, platform_account_id=account, lane="api")
    [action] = api.scoped_insert(platform_actions, {"kind": "post"})
    assert api.scoped_get(platform_actions, action.id).id == action.id
    assert api.scoped_get(platform_actions, str(action.id)).kind == "post"
    assert with_tenant_scope(db, tenants.a, platform_account_id=account, lane="browser").scoped_get(platform_actions, action.id) is None
    assert with_tenant_scope(db, tenants.b).scoped_get(platform_actions, action.id) is None
    assert api.scoped_get(platform_actions, uuid.uuid4()) is None


async def test_async_scoped_get(target, tenants):
    from rtv_db import AsyncDatabase

    adb = AsyncDatabase(target.runtime_url)
    try:
        [kit] = await with_tenant_scope(adb, tenants.a).scoped_query(brand_kits)
        assert (await with_tenant_scope(adb, tenants.a).scoped_get(brand_kits, kit.id)).name == "Brand A"
        assert await with_tenant_scope(adb, tenants.b).scoped_get(brand_kits, kit.id) is None
    finally:
        await adb.close()
