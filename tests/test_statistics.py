"""Issue 16, item 3: planner statistics no longer leak other tenants' values (revision 0006).

Tenant B has many brand kits whose names start with a secret prefix; tenant A probes with
EXPLAIN (row estimates), as the runtime role under A's signed context. Before 0006 (the admin puts
the default statistics back and ANALYZEs) the estimate for B's prefix stands out from a prefix
nobody uses; after ``migrate`` the two are the same, and the planner still uses the ``client_id``
index.
"""

from __future__ import annotations

import json
import uuid

from sqlalchemy import text

from rtv_db import brand_kits, with_tenant_scope
from rtv_db.schema import clients

SECRET = "Qx7"


def _load(system, tenants) -> None:
    with system.transaction() as conn:
        conn.execute(brand_kits.insert(), [
            {"client_id": tenants.b, "name": f"{SECRET} kit {i}", "tone": {"voice": "casual", "personality": []}}
            for i in range(3000)
        ])
        extra = [uuid.uuid4() for _ in range(50)]
        conn.execute(clients.insert(), [{"id": t, "name": f"Filler {t.hex[:6]}", "slug": f"f-{t.hex}"} for t in extra])
        conn.execute(brand_kits.insert(), [
            {"client_id": t, "name": f"Other {j}", "tone": {"voice": "casual", "personality": []}}
            for t in extra for j in range(20)
        ])


def _estimate(db, tenant, pattern: str) -> tuple[float, str]:
    with with_tenant_scope(db, tenant).scoped_transaction() as tx:
        plan = tx.connection.execute(
            text("EXPLAIN (FORMAT JSON) SELECT * FROM brand_kits WHERE name LIKE :p"), {"p": pattern}).scalar_one()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    return plan[0]["Plan"]["Plan Rows"], json.dumps(plan)


def _statistics_targets(admin_conn) -> dict[str, int]:
    return dict(admin_conn.execute(
        "SELECT attname, attstattarget FROM pg_attribute WHERE attrelid = 'brand_kits'::regclass "
        "AND attnum > 0 AND NOT attisdropped").fetchall())


def test_the_prefix_probe_no_longer_distinguishes_another_tenants_values(db, target, system, tenants, admin_conn):
    from rtv_db import downgrade, migrate

    downgrade(target.require_admin(), target.settings, revision="0005")  # the schema before 0006
    _load(system, tenants)
    # The old state: default statistics on every column, analysed.
    for column in ("name", "tone", "colors", "logo_refs", "created_at", "updated_at"):
        admin_conn.execute(f"ALTER TABLE brand_kits ALTER COLUMN {column} SET STATISTICS -1")
    admin_conn.execute("ANALYZE brand_kits")
    secret, _ = _estimate(db, tenants.a, f"{SECRET}%")
    nobody, _ = _estimate(db, tenants.a, "Zzz%")
    print(f"\nbefore 0006: {SECRET}% -> {secret} rows, Zzz% -> {nobody} rows")
    assert secret > 2 * nobody  # the leak: A learns B's prefix

    # What migrate puts back: statistics 0 on the content columns; analysed again.
    migrate(target.require_admin(), target.settings)
    targets = _statistics_targets(admin_conn)
    # Every column, client_id and id included since revision 0009 (issue 24, item 12).
    assert all(targets[c] == 0 for c in ("client_id", "id", "name", "tone", "colors", "logo_refs", "created_at",
                                         "updated_at")), targets
    admin_conn.execute("ANALYZE brand_kits")  # ANALYZE collects nothing for them any more
    assert admin_conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'brand_kits' AND attname = 'name'"
                              ).fetchone()[0] == 0
    estimates = {p: _estimate(db, tenants.a, p)[0] for p in (f"{SECRET}%", "Zzz%", "Brand%", f"{SECRET[:1]}%")}
    print(f"after 0006: {estimates}")
    assert len(set(estimates.values())) == 1, estimates
    # The planner still uses the client_id index.
    _, plan = _estimate(db, tenants.a, "Zzz%")
    assert "Index" in plan and "client_id" in plan, plan
    assert "Seq Scan" not in plan


def test_created_at_ranges_are_not_revealed_either(db, system, tenants, admin_conn):
    _load(system, tenants)
    admin_conn.execute("ANALYZE brand_kits")
    estimates = set()
    for bound in ("2000-01-01", "2100-01-01"):
        with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
            plan = tx.connection.execute(text(
                "EXPLAIN (FORMAT JSON) SELECT * FROM brand_kits WHERE created_at > CAST(:b AS timestamptz)"),
                {"b": bound}).scalar_one()
        estimates.add((plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]["Plan Rows"])
    assert len(estimates) == 1, estimates


def test_downgrade_puts_the_default_back(target, admin_conn):
    from rtv_db import downgrade, migrate

    downgrade(target.require_admin(), target.settings, revision="0005")
    assert _statistics_targets(admin_conn)["name"] in (-1, None)
    migrate(target.require_admin(), target.settings)
    assert _statistics_targets(admin_conn)["name"] == 0
