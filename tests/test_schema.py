"""Migrations, roles and grants, and the tenant-safe shape of the core schema (S0-B2)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from rtv_db import current_revision, downgrade, migrate
from rtv_db.config import to_libpq_url
from rtv_db.migrate import head_revision
from rtv_db.schema import brand_kits, clients, knowledge_bases, knowledge_chunks, metadata, platform_accounts, platform_actions, tenant_tables
from rtv_db.tenant import with_tenant_scope

TENANT_TABLES = ["platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions"]

# Everything a migration can change, as one comparable snapshot of the catalog.
_SNAPSHOT = """
SELECT 'class', c.relname || ':' || c.relkind::text || ':' || pg_get_userbyid(c.relowner) || ':' || c.relrowsecurity::text
       || ':' || c.relforcerowsecurity::text || ':' || coalesce(c.relacl::text, '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'rtv')
UNION ALL
SELECT 'policy', p.polname || ':' || p.polrelid::regclass::text || ':' || coalesce(pg_get_expr(p.polqual, p.polrelid), '')
  FROM pg_policy p
UNION ALL
SELECT 'proc', p.oid::regprocedure::text || ':' || md5(p.prosrc) || ':' || coalesce(p.proacl::text, '')
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'rtv'
UNION ALL
SELECT 'constraint', conname || ':' || pg_get_constraintdef(oid) FROM pg_constraint
  WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'role', rolname || ':' || rolsuper::text || rolbypassrls::text || rolcanlogin::text || rolcreaterole::text || rolinherit::text
  FROM pg_roles WHERE rolname LIKE 'rtv\\_%'
UNION ALL
SELECT 'db', coalesce(datacl::text, '') FROM pg_database WHERE datname = current_database()
ORDER BY 1, 2
"""


def _snapshot(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(to_libpq_url(url)) as conn:
        return conn.execute(_SNAPSHOT).fetchall()


def test_migrate_on_an_empty_database_creates_roles_and_schema(empty_target):
    url = empty_target.require_admin()
    assert current_revision(url) is None
    result = migrate(url)
    assert result.changed and result.after == head_revision()
    tables = {r[1].split(":")[0] for r in _snapshot(url) if r[0] == "class"}
    assert {"clients", *TENANT_TABLES} <= tables


def test_migrate_twice_changes_nothing(target):
    url = target.require_admin()
    before = _snapshot(url)
    result = migrate(url)
    assert not result.changed
    assert _snapshot(url) == before


def test_down_to_base_and_up_again(empty_target):
    url = empty_target.require_admin()
    migrate(url)
    first = _snapshot(url)
    result = downgrade(url, revision="base")
    assert result.after is None
    remaining = {r[1].split(":")[0] for r in _snapshot(url) if r[0] == "class"}
    assert not remaining & {"clients", *TENANT_TABLES}
    migrate(url)
    assert _snapshot(url) == first


def test_models_agree_with_migrations(target):
    engine = create_engine(target.require_admin(), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={"include_object": lambda obj, name, type_, *_: not (type_ == "table" and name == "alembic_version")},
            )
            assert compare_metadata(ctx, metadata) == []
    finally:
        engine.dispose()


def test_tenant_tables_are_the_models():
    assert set(tenant_tables()) >= {"clients", *TENANT_TABLES}


# -- roles ---------------------------------------------------------------------------------


def test_runtime_role_attributes(admin_conn):
    row = admin_conn.execute(
        "SELECT rolcanlogin, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication FROM pg_roles WHERE rolname = 'rtv_app'"
    ).fetchone()
    assert row == (True, False, False, False, False, False)


def test_runtime_role_owns_nothing_and_owner_owns_everything(admin_conn):
    owners = dict(admin_conn.execute(
        "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
        "WHERE c.relnamespace IN ('public'::regnamespace, 'rtv'::regnamespace) AND c.relkind IN ('r','i','S','v')"
    ).fetchall())
    assert owners and set(owners.values()) == {"rtv_owner"}
    owned_by_app = admin_conn.execute(
        "SELECT count(*) FROM pg_class WHERE relowner = 'rtv_app'::regrole"
    ).fetchone()[0] + admin_conn.execute("SELECT count(*) FROM pg_proc WHERE proowner = 'rtv_app'::regrole").fetchone()[0]
    assert owned_by_app == 0


@pytest.mark.parametrize("table", ["clients", *TENANT_TABLES])
def test_runtime_role_grants_are_dml_only(admin_conn, table):
    def has(priv: str) -> bool:
        return admin_conn.execute("SELECT has_table_privilege('rtv_app', %s, %s)", (table, priv)).fetchone()[0]

    assert has("SELECT")
    assert not has("TRUNCATE")
    assert not has("REFERENCES")
    assert not has("TRIGGER")
    if table == "clients":
        assert not has("INSERT") and not has("DELETE")
    else:
        assert has("INSERT") and has("UPDATE") and has("DELETE")


def test_runtime_role_cannot_create_anywhere(admin_conn):
    schemas = [r[0] for r in admin_conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
    )]
    assert "public" in schemas and "rtv" in schemas
    for schema in schemas:
        assert not admin_conn.execute("SELECT has_schema_privilege('rtv_app', %s, 'CREATE')", (schema,)).fetchone()[0], schema
    assert not admin_conn.execute("SELECT has_database_privilege('rtv_app', current_database(), 'CREATE')").fetchone()[0]
    assert not admin_conn.execute("SELECT has_database_privilege('rtv_app', current_database(), 'TEMPORARY')").fetchone()[0]


def test_runtime_role_is_not_a_member_of_owner_or_system(admin_conn):
    for role in ("rtv_owner", "rtv_system"):
        assert not admin_conn.execute("SELECT pg_has_role('rtv_app', %s, 'MEMBER')", (role,)).fetchone()[0]


# -- tenant-safe keys --------------------------------------------------------------------------


def test_composite_foreign_key_rejects_another_tenants_row_even_for_the_system_role(system, tenants):
    kb_b = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(knowledge_bases.insert().values(client_id=tenants.b, id=kb_b, name="B's KB"))
    with pytest.raises(IntegrityError, match="knowledge_chunks_knowledge_base_fkey"):
        with system.transaction() as conn:  # BYPASSRLS: only the composite key stands in the way
            conn.execute(knowledge_chunks.insert().values(client_id=tenants.a, knowledge_base_id=kb_b, content="x"))


def test_composite_foreign_key_on_platform_actions(system, tenants):
    account_b = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(platform_accounts.insert().values(client_id=tenants.b, id=account_b, platform="x", handle="@b"))
    with pytest.raises(IntegrityError, match="platform_actions_platform_account_fkey"):
        with system.transaction() as conn:
            conn.execute(platform_actions.insert().values(
                client_id=tenants.a, platform_account_id=account_b, kind="post", lane="api"))


def test_uniques_are_per_tenant(db, tenants):
    with_tenant_scope(db, tenants.a).scoped_insert(brand_kits, {"name": "Main"})
    with_tenant_scope(db, tenants.b).scoped_insert(brand_kits, {"name": "Main"})  # same name, other tenant: fine
    with pytest.raises(IntegrityError, match="brand_kits_client_id_name_key"):
        with_tenant_scope(db, tenants.a).scoped_insert(brand_kits, {"name": "Main"})


def test_every_key_of_a_tenant_table_includes_client_id(admin_conn):
    rows = admin_conn.execute(
        """
        SELECT conrelid::regclass::text, conname, contype,
               'client_id' = ANY (SELECT attname FROM pg_attribute WHERE attrelid = conrelid AND attnum = ANY (conkey))
        FROM pg_constraint
        WHERE contype IN ('p', 'u', 'f') AND conrelid::regclass::text = ANY (%s)
        """,
        (TENANT_TABLES,),
    ).fetchall()
    assert rows
    for table, name, kind, has_client_id in rows:
        assert has_client_id, f"{table}.{name} ({kind}) does not include client_id"


def test_every_tenant_table_has_an_index_leading_with_client_id(admin_conn):
    for table in TENANT_TABLES:
        leading = admin_conn.execute(
            """
            SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = %s::regclass AND a.attname = 'client_id'
            """,
            (table,),
        ).fetchone()[0]
        assert leading >= 1, table


def test_clients_is_created_only_by_the_system_scope(db, tenants):
    with db.engine.begin() as conn, pytest.raises(Exception, match="permission denied"):
        from rtv_db import set_tenant_context

        set_tenant_context(conn, tenants.a)
        conn.execute(clients.insert().values(name="x", slug="x-new"))
