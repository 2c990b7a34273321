"""The clean session and the tenant context cost no extra round trip: they travel with BEGIN."""

from __future__ import annotations

from bench.wire import WireCounter
from rtv_db import Database, brand_kits, with_tenant_scope


def test_scoped_point_read_takes_three_round_trips_like_hand_written_sql(target, tenants):
    counter = WireCounter(target.runtime_url)
    db = Database(counter.proxied_url(target.runtime_url), pool_pre_ping=False)
    try:
        scope = with_tenant_scope(db, tenants.a)
        [kit] = scope.scoped_query(brand_kits)  # warm: connect, role check
        before = counter.snapshot()
        assert scope.scoped_get(brand_kits, kit.id).name == "Brand A"
        spent = counter.snapshot().minus(before)
        # Hand-written: BEGIN; SELECT ...; COMMIT -- three round trips. rtv-db: the same three.
        assert spent.round_trips == 3, spent.transcript
        first = spent.transcript[0]
        assert first[0].startswith("BEGIN"), spent.transcript
        assert first[1:] == ["SELECT rtv.clean_session()", first[2]] and "set_signed_context" in first[2], spent.transcript
        assert spent.transcript[-1] == ["COMMIT"]
    finally:
        db.close()
        counter.close()
