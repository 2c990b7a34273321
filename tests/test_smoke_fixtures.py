from sqlalchemy import text

from rtv_db import brand_kits, with_tenant_scope


def test_fixture_db_is_runtime_role(db):
    assert db.test_connection().user == "rtv_app"


def test_tenants_fixture(db, tenants):
    rows = with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
    assert [r.name for r in rows] == ["Brand A"]
    with db.engine.connect() as conn:
        assert conn.execute(text("select count(*) from brand_kits")).scalar() == 0
