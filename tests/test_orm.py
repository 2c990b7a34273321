"""ORM integration: tenant sessions filter every statement and stamp every new object."""

from __future__ import annotations

import logging
import uuid

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, selectinload

from rtv_db import (
    AsyncDatabase,
    BrandKit,
    Client,
    CrossTenantWriteError,
    KnowledgeBase,
    KnowledgeChunk,
    MissingTenantContextError,
    TenantContext,
    async_tenant_session,
    tenant_session,
    use_tenant_context,
    with_tenant_scope,
)


@pytest.fixture()
def kbs(system, tenants):
    """One knowledge base with two chunks per tenant."""
    ids = {}
    with system.session() as s:
        for tid, label in ((tenants.a, "A"), (tenants.b, "B")):
            kb = KnowledgeBase(client_id=tid, id=uuid.uuid4(), name=f"KB {label}")
            s.add(kb)
            s.flush()
            s.add_all([KnowledgeChunk(client_id=tid, knowledge_base_id=kb.id, content=f"{label}{i}") for i in range(2)])
            ids[label] = kb.id
        s.commit()
    return ids


def _queries(db):
    """Collect the SQL the engine sends."""
    seen: list[str] = []
    from sqlalchemy import event

    @event.listens_for(db.engine, "before_cursor_execute")
    def _record(conn, cursor, statement, params, context, executemany):
        seen.append(statement)

    return seen


def test_select_gets_the_literal_tenant_predicate(db, tenants):
    seen = _queries(db)
    with tenant_session(db, TenantContext(tenants.a)) as s:
        names = s.scalars(select(BrandKit.name)).all()
    assert names == ["Brand A"]
    assert any("brand_kits.client_id = " in q for q in seen)


def test_client_is_filtered_on_id(db, tenants):
    with tenant_session(db, TenantContext(tenants.a)) as s:
        assert [c.id for c in s.scalars(select(Client))] == [tenants.a]


def test_relationship_loads_and_joins_are_scoped(db, tenants, kbs):
    seen = _queries(db)
    with tenant_session(db, TenantContext(tenants.a)) as s:
        kb = s.scalars(select(KnowledgeBase)).one()
        assert sorted(c.content for c in kb.chunks) == ["A0", "A1"]  # lazy load
        kb2 = s.scalars(select(KnowledgeBase).options(selectinload(KnowledgeBase.chunks))).one()
        assert len(kb2.chunks) == 2
        joined = s.execute(select(KnowledgeBase.name, KnowledgeChunk.content).join(KnowledgeBase.chunks)).all()
        assert sorted(c for _, c in joined) == ["A0", "A1"]
    lazy = [q for q in seen if "FROM knowledge_chunks" in q and "knowledge_bases" not in q.split("FROM")[1]]
    assert lazy and all("knowledge_chunks.client_id = " in q for q in lazy)


def test_orm_update_and_delete_are_scoped(db, tenants, system):
    with tenant_session(db, TenantContext(tenants.a)) as s:
        s.execute(update(BrandKit).values(colors={"primary": "#123"}))
        s.execute(delete(BrandKit).where(BrandKit.name.like("Brand%")))
        s.commit()
    with system.transaction() as conn:
        assert conn.execute(text("select name from brand_kits")).scalars().all() == ["Brand B"]


def test_new_objects_are_stamped(db, tenants):
    with tenant_session(db, TenantContext(tenants.a)) as s:
        kit = BrandKit(name="Stamped")
        s.add(kit)
        s.commit()
        assert kit.client_id == tenants.a
    assert {k.name for k in with_tenant_scope(db, tenants.a).scoped_query(BrandKit)} == {"Brand A", "Stamped"}


def test_new_object_naming_another_tenant_is_refused(db, tenants):
    with tenant_session(db, TenantContext(tenants.a)) as s:
        s.add(BrandKit(name="sneaky", client_id=tenants.b))
        with pytest.raises(CrossTenantWriteError):
            s.flush()


def test_changing_client_id_is_refused(db, tenants):
    with tenant_session(db, TenantContext(tenants.a)) as s:
        kit = s.scalars(select(BrandKit)).one()
        kit.client_id = tenants.b
        with pytest.raises(CrossTenantWriteError):
            s.flush()


def test_no_context_raises_before_the_database(db, tenants):
    seen = _queries(db)
    with Session(db.engine) as s:
        with pytest.raises(MissingTenantContextError):
            s.scalars(select(BrandKit)).all()
        with pytest.raises(MissingTenantContextError):
            s.execute(update(BrandKit).values(name="x"))
        s.add(BrandKit(name="orphan"))
        with pytest.raises(MissingTenantContextError):
            s.flush()
    assert not any("brand_kits" in q for q in seen)


def test_plain_session_uses_the_contextvar(db, tenants):
    with use_tenant_context(TenantContext(tenants.b)), Session(db.engine) as s:
        assert s.scalars(select(BrandKit.name)).all() == ["Brand B"]


def test_session_inside_scoped_transaction_shares_it(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    with scope.scoped_transaction() as tx:
        s = tx.session()
        s.add(BrandKit(name="in tx"))
        s.flush()
        assert tx.connection.execute(text("select count(*) from brand_kits")).scalar() == 2
        s.close()
    assert len(scope.scoped_query(BrandKit)) == 2


def test_count_through_the_orm(db, tenants):
    with tenant_session(db, TenantContext(tenants.a)) as s:
        assert s.scalar(select(func.count()).select_from(BrandKit)) == 1


async def test_async_session(target, tenants):
    adb = AsyncDatabase(target.runtime_url)
    try:
        async with async_tenant_session(adb, TenantContext(tenants.b)) as s:
            assert (await s.scalars(select(BrandKit.name))).all() == ["Brand B"]
            s.add(BrandKit(name="async kit"))
            await s.commit()
        async with async_tenant_session(adb, TenantContext(tenants.a)) as s:
            assert (await s.scalars(select(BrandKit.name))).all() == ["Brand A"]
    finally:
        await adb.close()


def test_system_scope_is_logged_and_sees_everything(system, tenants, caplog):
    caplog.set_level(logging.WARNING, logger="rtv_db.system")
    with system.session() as s:
        assert len(s.scalars(select(BrandKit)).all()) == 2
    assert "system scope ORM session opened: test setup" in caplog.text


def test_system_scope_needs_a_reason(target):
    from rtv_db import ConfigurationError, SystemScope

    with pytest.raises(ConfigurationError):
        SystemScope(target.system_url, reason=" ")
