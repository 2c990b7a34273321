"""Unique and foreign-key violations as typed errors, through the scoped API and ORM sessions,
as the runtime role; the messages carry names, never key values (PostgreSQL's DETAIL)."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy.exc
from sqlalchemy import select

from rtv_db import (
    AsyncDatabase,
    BrandKit,
    DuplicateError,
    KnowledgeChunk,
    ReferenceNotFoundError,
    RtvDbError,
    StillReferencedError,
    TenantContext,
    async_tenant_session,
    brand_kits,
    knowledge_bases,
    knowledge_chunks,
    tenant_session,
    with_tenant_scope,
)


def _kb(db, tenant, name="KB") -> uuid.UUID:
    (row,) = with_tenant_scope(db, tenant).scoped_insert(knowledge_bases, {"name": name})
    return row.id


def _assert_no_values(exc: BaseException, *values: object) -> None:
    text = f"{exc} {exc!r} {exc.args}"
    assert "DETAIL" not in text and "Key (" not in text, text
    for value in values:
        assert str(value) not in text, (value, text)


def test_duplicate_through_the_scoped_api(db, tenants) -> None:
    scope = with_tenant_scope(db, tenants.a)
    with pytest.raises(DuplicateError) as caught:
        scope.scoped_insert(brand_kits, {"name": "Brand A"})
    err = caught.value
    assert isinstance(err, RtvDbError) and isinstance(err, sqlalchemy.exc.IntegrityError)  # old handlers still catch it
    assert err.table == "brand_kits" and err.constraint == "brand_kits_client_id_name_key"
    assert err.columns == ("client_id", "name")
    assert str(err) == ('duplicate brand_kits: this tenant already has a row with the same (name) '
                        '(constraint "brand_kits_client_id_name_key")')
    _assert_no_values(err, "Brand A", tenants.a)
    # The same name in another tenant is no duplicate.
    with_tenant_scope(db, tenants.b).scoped_insert(brand_kits, {"name": "Brand A"})


def test_duplicate_inside_a_scoped_transaction_and_by_update(db, tenants) -> None:
    scope = with_tenant_scope(db, tenants.a)
    scope.scoped_insert(brand_kits, {"name": "Second"})
    with pytest.raises(DuplicateError):
        scope.scoped_update(brand_kits, {"name": "Brand A"}, brand_kits.c.name == "Second")
    with pytest.raises(DuplicateError):
        with scope.scoped_transaction() as tx:
            tx.scoped_insert(brand_kits, {"name": "Third"})
            tx.scoped_insert(brand_kits, {"name": "Third"})
    assert sorted(r.name for r in scope.scoped_query(brand_kits)) == ["Brand A", "Second"]  # rolled back


def test_reference_to_a_missing_and_to_another_tenants_parent_look_the_same(db, tenants) -> None:
    kb_b = _kb(db, tenants.b, "B's KB")
    scope = with_tenant_scope(db, tenants.a)
    caught = []
    for parent in (kb_b, uuid.uuid4()):
        with pytest.raises(ReferenceNotFoundError) as info:
            scope.scoped_insert(knowledge_chunks, {"knowledge_base_id": parent, "content": "x"})
        _assert_no_values(info.value, parent, tenants.a, tenants.b)
        caught.append((type(info.value), str(info.value), info.value.table, info.value.constraint))
    assert caught[0] == caught[1]
    assert caught[0][1] == ('knowledge_chunks: the referenced knowledge_bases does not exist '
                            '(constraint "knowledge_chunks_knowledge_base_fkey")')
    assert isinstance(info.value, RtvDbError)


def test_reference_through_an_orm_session(db, tenants) -> None:
    kb_b = _kb(db, tenants.b, "B's KB")
    ctx = TenantContext(tenants.a)
    messages = []
    for parent in (kb_b, uuid.uuid4()):
        with tenant_session(db, ctx) as session:
            session.add(KnowledgeChunk(knowledge_base_id=parent, content="x"))
            with pytest.raises(ReferenceNotFoundError) as info:
                session.commit()
            _assert_no_values(info.value, parent, tenants.b)
            messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_duplicate_through_an_orm_session(db, tenants) -> None:
    with tenant_session(db, TenantContext(tenants.a)) as session:
        session.add(BrandKit(name="Brand A"))
        with pytest.raises(DuplicateError) as info:
            session.flush()
        _assert_no_values(info.value, "Brand A", tenants.a)
        session.rollback()
        assert session.scalars(select(BrandKit.name)).all() == ["Brand A"]


def test_still_referenced_is_its_own_type(db, tenants) -> None:
    """A key change of a parent its children still point at is no "not found" (raw SQL on a
    scope's connection: the scoped API refuses to change ids before the database does)."""
    kb = _kb(db, tenants.a)
    with_tenant_scope(db, tenants.a).scoped_insert(knowledge_chunks, {"knowledge_base_id": kb, "content": "x"})
    with pytest.raises(StillReferencedError) as info:
        with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
            tx.connection.execute(knowledge_bases.update().where(knowledge_bases.c.id == kb).values(id=uuid.uuid4()))
    assert str(info.value) == ('knowledge_bases is still referenced from knowledge_chunks '
                               '(constraint "knowledge_chunks_knowledge_base_fkey")')
    _assert_no_values(info.value, kb, tenants.a)


async def test_async_scope_and_session(target, tenants) -> None:
    adb = AsyncDatabase(target.runtime_url)
    try:
        scope = with_tenant_scope(adb, tenants.a)
        with pytest.raises(DuplicateError):
            await scope.scoped_insert(brand_kits, {"name": "Brand A"})
        with pytest.raises(ReferenceNotFoundError):
            await scope.scoped_insert(knowledge_chunks, {"knowledge_base_id": uuid.uuid4(), "content": "x"})
        async with async_tenant_session(adb, TenantContext(tenants.a)) as session:
            session.add(BrandKit(name="Brand A"))
            with pytest.raises(DuplicateError) as info:
                await session.commit()
            _assert_no_values(info.value, "Brand A")
    finally:
        await adb.close()
