"""Issue 16, item 4: ``scoped_update`` / ``scoped_delete`` change every row of the tenant only with
an explicit ``all_rows=True``; a condition that is always true for the tenant is refused like no
condition (``UnscopedWriteError``), before any SQL. The rule is in docs/bad-input.md ("Not covered").
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import and_, false, func, literal, not_, or_, text, true

from rtv_db import BrandKit, UnscopedWriteError, with_tenant_scope
from rtv_db.schema import brand_kits, clients, platform_actions
from rtv_db.tenant._statements import _require_condition

c = brand_kits.c

REFUSED = {
    "no condition": [],
    "true()": [true()],
    "Python True": [True],
    "literal(True)": [literal(True)],
    "text('true')": [text("true")],
    "text('1 = 1')": [text("1 = 1")],
    "literal comparison": [literal(1) == 1],
    "now() is set": [func.now().isnot(None)],
    "id IS NOT NULL": [c.id.isnot(None)],
    "id != None": [c.id != None],  # noqa: E711
    "NOT (id IS NULL)": [not_(c.id.is_(None))],
    "ORM id IS NOT NULL": [BrandKit.id.isnot(None)],
    "NOT NULL column IS NOT NULL": [c.name.isnot(None)],
    "name = name": [c.name == c.name],
    "name >= name": [c.name >= c.name],
    "ORM name = name": [BrandKit.name == BrandKit.name],
    "id IS NOT DISTINCT FROM id": [c.id.is_not_distinct_from(c.id)],
    "OR true()": [or_(c.name == "x", true())],
    "OR literal(True)": [or_(c.name == "x", literal(True))],
    "OR text": [or_(c.name == "x", text("1 = 1"))],
    "OR id IS NOT NULL": [or_(c.name == "x", c.id.isnot(None))],
    "nested OR": [and_(or_(c.name == "x", or_(c.name == "y", c.id == c.id)))],
    "AND of unrestricted parts": [and_(text("true"), c.id.isnot(None))],
    "two unrestricted arguments": [literal(True), c.id.isnot(None)],
    "NOT false()": [not_(false())],
    "the tenant column only": [c.client_id == uuid.uuid4()],
    "another table's column": [platform_actions.c.id == uuid.uuid4()],
}

ACCEPTED = {
    "id = ...": [c.id == uuid.uuid4()],
    "name = ...": [c.name == "x"],
    "ORM name = ...": [BrandKit.name == "x"],
    "AND with a real condition": [and_(text("true"), c.name == "x")],
    "true() and a real condition": [true(), c.name == "x"],
    "OR of real conditions": [or_(c.name == "x", c.id == uuid.uuid4())],
    "IN a subquery": [c.id.in_(text("SELECT NULL::uuid"))],
    "name <> ...": [c.name != "x"],
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
@pytest.mark.parametrize("verb", ["scoped_update", "scoped_delete"])
def test_always_true_conditions_are_refused(case, verb):
    with pytest.raises(UnscopedWriteError, match=f"^{verb} on brand_kits.*all_rows=True"):
        _require_condition(verb, brand_kits, REFUSED[case])


@pytest.mark.parametrize("case", list(ACCEPTED), ids=list(ACCEPTED))
def test_restricting_conditions_pass(case):
    _require_condition("scoped_delete", brand_kits, ACCEPTED[case])


def test_the_scope_columns_do_not_count():
    pa = platform_actions.c
    for where in ([pa.lane == "api"], [pa.platform_account_id == uuid.uuid4()], [pa.client_id == uuid.uuid4()]):
        with pytest.raises(UnscopedWriteError, match="other than client_id, lane, platform_account_id"):
            _require_condition("scoped_delete", platform_actions, where)
    _require_condition("scoped_delete", platform_actions, [pa.status == "queued"])
    with pytest.raises(UnscopedWriteError, match="no column of clients other than id"):
        _require_condition("scoped_update", clients, [clients.c.id == uuid.uuid4()])


def test_refused_before_any_sql_and_nothing_changes(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    scope.scoped_insert(brand_kits, [{"name": "second"}, {"name": "third"}])
    for where in REFUSED.values():
        with pytest.raises(UnscopedWriteError):
            scope.scoped_update(brand_kits, {"name": "x"}, *where)
        with pytest.raises(UnscopedWriteError):
            scope.scoped_delete(brand_kits, *where)
    assert sorted(r.name for r in scope.scoped_query(brand_kits)) == ["Brand A", "second", "third"]


def test_all_rows_changes_every_row_of_this_tenant_only(db, tenants):
    a, b = with_tenant_scope(db, tenants.a), with_tenant_scope(db, tenants.b)
    a.scoped_insert(brand_kits, [{"name": "second"}, {"name": "third"}])
    tone = {"voice": "renamed", "personality": []}
    assert len(a.scoped_update(brand_kits, {"tone": tone}, all_rows=True)) == 3
    assert [r.tone for r in a.scoped_query(brand_kits)] == [tone] * 3
    assert [r.tone["voice"] for r in b.scoped_query(brand_kits)] == ["casual"]
    # all_rows with a condition: the condition still applies
    assert len(a.scoped_delete(brand_kits, c.id == a.scoped_query(brand_kits, limit=1)[0].id, all_rows=True)) == 1
    assert len(a.scoped_delete(brand_kits, all_rows=True)) == 2
    assert a.scoped_query(brand_kits) == [] and len(b.scoped_query(brand_kits)) == 1


def test_all_rows_inside_a_transaction(db, tenants):
    scope = with_tenant_scope(db, tenants.a)
    with scope.scoped_transaction() as tx:
        with pytest.raises(UnscopedWriteError):
            tx.scoped_delete(brand_kits, text("true"))
        assert len(tx.scoped_delete(brand_kits, all_rows=True)) == 1
    assert scope.scoped_query(brand_kits) == []


async def test_async_scope_too(target, tenants):
    from rtv_db import AsyncDatabase

    adb = AsyncDatabase(target.runtime_url)
    try:
        scope = with_tenant_scope(adb, tenants.a)
        with pytest.raises(UnscopedWriteError):
            await scope.scoped_update(brand_kits, {"name": "x"}, literal(True))
        with pytest.raises(UnscopedWriteError):
            await scope.scoped_delete(brand_kits, c.id.isnot(None))
        assert len(await scope.scoped_update(brand_kits, {"logo_refs": []}, all_rows=True)) == 1
        assert len(await scope.scoped_delete(brand_kits, all_rows=True)) == 1
    finally:
        await adb.close()
