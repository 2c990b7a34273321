"""A scoped call in its own transaction is one round trip: BEGIN, the clean session, the tenant
context, the statement and COMMIT travel together (issue 13)."""

from __future__ import annotations

import pytest

from bench.wire import WireCounter
from rtv_db import Database, brand_kits, with_tenant_scope


@pytest.fixture()
def wired(target):
    counter = WireCounter(target.runtime_url)
    db = Database(counter.proxied_url(target.runtime_url), pool_pre_ping=False)
    yield counter, db
    db.close()
    counter.close()


# After BEGIN, the timeouts and JIT settings an earlier transaction may have planted are switched
# off for the start (issue 24): SET LOCAL statements in the same pipeline (3 on PostgreSQL 17+).
NEUTRALISE = 3


def _start(trip: list[str]) -> None:
    assert trip[0].startswith("BEGIN ISOLATION LEVEL"), trip
    assert all(sql.startswith("SET LOCAL ") for sql in trip[1:1 + NEUTRALISE]), trip
    assert trip[1 + NEUTRALISE] == "SELECT rtv.clean_session()", trip
    assert "set_signed_context" in trip[2 + NEUTRALISE], trip


def test_a_scoped_call_is_one_round_trip(wired, tenants):
    counter, db = wired
    scope = with_tenant_scope(db, tenants.a)
    [kit] = scope.scoped_query(brand_kits)  # warm: connect, role check
    calls = {
        "get": lambda: scope.scoped_get(brand_kits, kit.id),
        "query": lambda: scope.scoped_query(brand_kits),
        "insert": lambda: scope.scoped_insert(brand_kits, {"name": "Second"}),
        "update": lambda: scope.scoped_update(brand_kits, {"name": "Third"}, brand_kits.c.name == "Second"),
        "delete": lambda: scope.scoped_delete(brand_kits, brand_kits.c.name == "Third"),
    }
    for name, call in calls.items():
        before = counter.snapshot()
        call()
        spent = counter.snapshot().minus(before)
        assert spent.round_trips == 1, (name, spent.transcript)
        # The proxy's transcript may cut one pipeline in two where the client wrote it in pieces;
        # the round trips above are what the server answered.
        trip = [sql for part in spent.transcript for sql in part]
        _start(trip)
        assert len(trip) == 5 + NEUTRALISE and trip[-1] == "COMMIT", (name, trip)
    assert scope.scoped_get(brand_kits, kit.id).name == "Brand A"


def test_a_scoped_transaction_costs_one_more_per_statement(wired, tenants):
    counter, db = wired
    scope = with_tenant_scope(db, tenants.a)
    scope.scoped_query(brand_kits)
    before = counter.snapshot()
    with scope.scoped_transaction() as tx:
        tx.scoped_query(brand_kits)
        tx.scoped_query(brand_kits)
    spent = counter.snapshot().minus(before)
    # BEGIN + neutralise + clean + context; two statements; COMMIT
    assert spent.round_trips == 4, spent.transcript
    sent = [sql for part in spent.transcript for sql in part]
    _start(sent[:3 + NEUTRALISE])
    assert sent[-1] == "COMMIT" and len(sent) == 3 + NEUTRALISE + 2 + 1, sent


def test_the_default_pool_pings_only_after_idle(target, tenants):
    from rtv_db import EngineOptions

    counter = WireCounter(target.runtime_url)
    db = Database(counter.proxied_url(target.runtime_url), options=EngineOptions(pre_ping_after_idle=0.3))
    try:
        scope = with_tenant_scope(db, tenants.a)
        scope.scoped_query(brand_kits)
        before = counter.snapshot()
        scope.scoped_query(brand_kits)  # used a moment ago: no ping
        assert counter.snapshot().minus(before).round_trips == 1
        import time

        time.sleep(0.4)
        before = counter.snapshot()
        scope.scoped_query(brand_kits)  # idle past the threshold: one ping first
        assert counter.snapshot().minus(before).round_trips == 2
    finally:
        db.close()
        counter.close()
