"""Keyset pagination: scoped_query(page_size=, after=), sync and async, and the ORM's paginate."""

from __future__ import annotations

import base64
import json

import pytest

from rtv_db import (
    AsyncDatabase,
    BrandKit,
    InvalidCursorError,
    InvalidInputError,
    TenantContext,
    async_tenant_session,
    brand_kits,
    knowledge_bases,
    tenant_session,
    with_tenant_scope,
)
from rtv_db.tenant.pagination import Page, paginate, paginate_async


@pytest.fixture()
def kits(db, tenants) -> list[str]:
    """A has 23 kits (with duplicate-free names in an order unlike their ids); B has 5."""
    names = [f"kit-{(i * 7) % 23:02d}" for i in range(23)]
    with_tenant_scope(db, tenants.a).scoped_insert(brand_kits, [{"name": n} for n in names])
    with_tenant_scope(db, tenants.b).scoped_insert(brand_kits, [{"name": f"b-{i}"} for i in range(5)])
    return sorted(names + ["Brand A"])


def _all_pages(scope, **kwargs) -> tuple[list[str], int]:
    names, after, pages = [], None, 0
    while True:
        page = scope.scoped_query(brand_kits, page_size=5, after=after, **kwargs)
        assert isinstance(page, Page) and len(page.rows) <= 5
        names += [r.name for r in page.rows]
        pages += 1
        if page.next_cursor is None:
            return names, pages
        after = page.next_cursor


def test_pages_cover_every_row_once_in_order(db, tenants, kits) -> None:
    scope = with_tenant_scope(db, tenants.a)
    names, pages = _all_pages(scope, order_by=[brand_kits.c.name])
    assert names == kits and pages == 5
    names, _ = _all_pages(scope, order_by=[brand_kits.c.name.desc()])
    assert names == kits[::-1]
    by_id, _ = _all_pages(scope)  # id order by default
    assert sorted(by_id) == kits and len(by_id) == 24
    mixed, _ = _all_pages(scope, order_by=[brand_kits.c.created_at.desc(), brand_kits.c.name])
    assert sorted(mixed) == kits and len(set(mixed)) == 24
    assert scope.scoped_query(brand_kits, brand_kits.c.name == "nope", page_size=5) == Page([], None, 5)


def test_stable_while_rows_arrive(db, tenants, kits) -> None:
    scope = with_tenant_scope(db, tenants.a)
    first = scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=10)
    scope.scoped_insert(brand_kits, {"name": "AAA-before-everything"})
    second = scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=10, after=first.next_cursor)
    assert [r.name for r in second.rows] == kits[10:20]


def test_cursor_is_tamper_evident_and_bound(db, tenants, kits) -> None:
    a, b = with_tenant_scope(db, tenants.a), with_tenant_scope(db, tenants.b)
    cursor = a.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=5).next_cursor
    body, tag = cursor.split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    data["v"][0] = "b-0"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode() + "." + tag
    for bad in (forged, cursor[:-1] + ("0" if cursor[-1] != "0" else "1"), "x", "", "a.b.c", "%%%.abc", 5, "x" * 10_000):
        with pytest.raises(InvalidCursorError):
            a.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=5, after=bad)
    with pytest.raises(InvalidCursorError):  # another tenant's cursor
        b.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=5, after=cursor)
    with pytest.raises(InvalidCursorError):  # another order
        a.scoped_query(brand_kits, order_by=[brand_kits.c.name.desc()], page_size=5, after=cursor)
    with pytest.raises(InvalidCursorError):  # another table
        a.scoped_query(knowledge_bases, order_by=[knowledge_bases.c.name], page_size=5, after=cursor)
    assert isinstance(InvalidCursorError("x"), InvalidInputError)


@pytest.mark.parametrize("kwargs", [
    {"page_size": 0}, {"page_size": -1}, {"page_size": 10_000}, {"page_size": "5"}, {"page_size": True},
    {"page_size": 5, "limit": 5}, {"after": "x"},
    {"page_size": 5, "order_by": ["name"]},
    {"page_size": 5, "order_by": [knowledge_bases.c.name]},
    {"page_size": 5, "order_by": [brand_kits.c.name + "x"]},
])
def test_bad_arguments(db, tenants, kwargs) -> None:
    with pytest.raises(InvalidInputError):
        with_tenant_scope(db, tenants.a).scoped_query(brand_kits, **kwargs)


def test_nullable_columns_are_refused(db, tenants) -> None:
    with pytest.raises(InvalidInputError, match="NULL"):
        with_tenant_scope(db, tenants.a).scoped_query(knowledge_bases, order_by=[knowledge_bases.c.description],
                                                      page_size=5)


def test_without_page_size_it_is_a_list(db, tenants, kits) -> None:
    rows = with_tenant_scope(db, tenants.a).scoped_query(brand_kits, limit=3)
    assert isinstance(rows, list) and len(rows) == 3


def test_orm_paginate(db, tenants, kits) -> None:
    with tenant_session(db, TenantContext(tenants.a)) as session:
        names, after = [], None
        while True:
            page = paginate(session, BrandKit, order_by=[BrandKit.name], page_size=7, after=after)
            assert all(isinstance(k, BrandKit) for k in page.rows)
            names += [k.name for k in page.rows]
            if not (after := page.next_cursor):
                break
        assert names == kits
        core_cursor = with_tenant_scope(db, tenants.a).scoped_query(brand_kits, order_by=[brand_kits.c.name],
                                                                    page_size=7).next_cursor
        assert [k.name for k in paginate(session, BrandKit, order_by=[BrandKit.name], page_size=7,
                                         after=core_cursor)] == kits[7:14]  # one cursor format for both
    with tenant_session(db, TenantContext(tenants.b)) as session:
        with pytest.raises(InvalidCursorError):
            paginate(session, BrandKit, order_by=[BrandKit.name], page_size=7, after=core_cursor)
        assert [k.name for k in paginate(session, BrandKit, BrandKit.name != "b-0", page_size=50)] != []


async def test_async_scope_and_session(target, tenants, kits) -> None:
    adb = AsyncDatabase(target.runtime_url)
    try:
        scope = with_tenant_scope(adb, tenants.a)
        first = await scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=12)
        second = await scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=12, after=first.next_cursor)
        assert [r.name for r in first.rows + second.rows] == kits and second.next_cursor is None
        async with async_tenant_session(adb, TenantContext(tenants.a)) as session:
            page = await paginate_async(session, BrandKit, order_by=[BrandKit.name.desc()], page_size=4)
            assert [k.name for k in page.rows] == kits[::-1][:4]
            page = await paginate_async(session, BrandKit, order_by=[BrandKit.name.desc()], page_size=4,
                                        after=page.next_cursor)
            assert [k.name for k in page.rows] == kits[::-1][4:8]
    finally:
        await adb.close()
