"""ORM ergonomics in tenant sessions: get() by id alone; async sessions keep values after commit."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from rtv_db import AsyncDatabase, BrandKit, Client, InvalidInputError, TenantContext, async_tenant_session, tenant_session


def _kit_id(db, tenant) -> uuid.UUID:
    with tenant_session(db, TenantContext(tenant)) as session:
        return session.scalars(select(BrandKit.id)).one()


def test_get_by_id_alone(db, tenants) -> None:
    kit_a, kit_b = _kit_id(db, tenants.a), _kit_id(db, tenants.b)
    with tenant_session(db, TenantContext(tenants.a)) as session:
        kit = session.get(BrandKit, kit_a)
        assert kit is not None and kit.name == "Brand A"
        assert session.get(BrandKit, str(kit_a)) is kit
        assert session.get(BrandKit, (tenants.a, kit_a)) is kit  # the full key still works
        assert session.get_one(BrandKit, kit_a) is kit
        # Another tenant's id reads as a random one: None.
        assert session.get(BrandKit, kit_b) is None
        assert session.get(BrandKit, uuid.uuid4()) is None
        assert session.get(BrandKit, (tenants.b, kit_b)) is None  # naming B's key does not help
        assert session.get(Client, tenants.a).id == tenants.a
        assert session.get(Client, tenants.b) is None


@pytest.mark.parametrize("bad", ["not-a-uuid", "", 42, "{" + str(uuid.UUID(int=1)) + "}"])
def test_get_with_a_malformed_id(db, tenants, bad) -> None:
    with tenant_session(db, TenantContext(tenants.a)) as session:
        with pytest.raises(InvalidInputError):
            session.get(BrandKit, bad)


async def test_async_get_and_values_after_commit(target, tenants) -> None:
    adb = AsyncDatabase(target.runtime_url)
    try:
        async with async_tenant_session(adb, TenantContext(tenants.a)) as session:
            kit = BrandKit(name="Async")
            session.add(kit)
            await session.commit()
            assert kit.name == "Async" and isinstance(kit.id, uuid.UUID)  # no MissingGreenlet: not expired
            again = await session.get(BrandKit, kit.id)
            assert again is kit
        async with async_tenant_session(adb, TenantContext(tenants.b)) as session:
            assert await session.get(BrandKit, kit.id) is None
        async with async_tenant_session(adb, TenantContext(tenants.a), expire_on_commit=True) as session:
            assert session.sync_session.expire_on_commit is True
    finally:
        await adb.close()
