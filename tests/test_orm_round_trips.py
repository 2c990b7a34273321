"""A tenant ORM session's own transaction: BEGIN, the clean session and the context ride with its
first statement (two round trips for a read: that one and COMMIT), and the tenant criteria are
built once per tenant with one compiled statement for all tenants (issue 13)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from rtv_db import BrandKit, TenantContext, TenantContextRefusedError, tenant_session
from rtv_db.tenant import orm
from test_round_trips import wired  # noqa: F401  (the counted Database, as there)


def _spent(counter, fn):
    before = counter.snapshot()
    result = fn()
    spent = counter.snapshot().minus(before)
    return result, spent, [sql for part in spent.transcript for sql in part]


def test_orm_get_and_select_are_two_round_trips(wired, tenants):
    counter, db = wired
    ctx = TenantContext(tenants.a)
    with tenant_session(db, ctx) as s:  # warm: connect, role check
        [kit] = s.scalars(select(BrandKit)).all()

    def get():
        with tenant_session(db, ctx) as s, s.begin():
            return s.get(BrandKit, kit.id).name

    def listing():
        with tenant_session(db, ctx) as s, s.begin():
            return [k.name for k in s.scalars(select(BrandKit).order_by(BrandKit.id).limit(100))]

    for fn, expected in ((get, "Brand A"), (listing, ["Brand A"])):
        result, spent, trip = _spent(counter, fn)
        assert result == expected
        assert spent.round_trips == 2, spent.transcript
        # BEGIN, the SET LOCALs that switch off planted timeouts and JIT for the start (issue 24), ...
        n = sum(sql.startswith("SET LOCAL ") for sql in trip)
        assert n == 3 and all(sql.startswith("SET LOCAL ") for sql in trip[1:1 + n]), trip
        assert trip[0].startswith("BEGIN ISOLATION LEVEL") and trip[1 + n] == "SELECT rtv.clean_session()", trip
        assert "set_signed_context" in trip[2 + n] and trip[3 + n].startswith("SELECT"), trip
        assert trip[4 + n:] == ["COMMIT"], trip


def test_a_session_that_runs_nothing_sends_nothing(wired, tenants):
    counter, db = wired
    ctx = TenantContext(tenants.a)
    with tenant_session(db, ctx) as s:
        s.scalars(select(BrandKit)).all()

    def nothing():
        with tenant_session(db, ctx) as s, s.begin():
            s.connection()
        with tenant_session(db, ctx) as s:
            s.begin()
            s.connection()
            s.rollback()

    _, spent, trip = _spent(counter, nothing)
    assert spent.round_trips == 0 and trip == [], spent.transcript


def test_a_refused_context_fails_the_first_statement(db, tenants, monkeypatch):
    from rtv_db.tenant import _transaction

    def forged(self, ctx):
        sql, params = real(self, ctx)
        token = params[0]
        return sql, (token[:-1] + ("1" if token[-1] == "0" else "0"),) + params[1:]  # a broken MAC

    real = _transaction.ContextSetter.statement
    monkeypatch.setattr(_transaction.ContextSetter, "statement", forged)
    with pytest.raises(TenantContextRefusedError):
        with tenant_session(db, TenantContext(tenants.a)) as s, s.begin():
            s.get(BrandKit, tenants.a)


def test_criteria_are_built_once_per_tenant_and_compiled_once(db, tenants):
    orm._criteria.cache_clear()
    cache = db.engine._compiled_cache
    seen: dict[str, list[str]] = {}
    for _ in range(2):
        for tenant in (tenants.a, tenants.b):
            with tenant_session(db, TenantContext(tenant)) as s:
                seen.setdefault(str(tenant), []).append(
                    s.scalars(select(BrandKit).order_by(BrandKit.id)).one().name)
        if _ == 0:
            size = len(cache)
    assert seen == {str(tenants.a): ["Brand A"] * 2, str(tenants.b): ["Brand B"] * 2}
    assert len(cache) == size  # the second round compiled nothing new
    info = orm._criteria.cache_info()
    assert (info.misses, info.hits) == (2, 2), info
    assert orm._criteria(tenants.a) is orm._criteria(tenants.a)
