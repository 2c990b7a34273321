"""Issue 24, item 7: ``rtv-db verify`` finds a replaced or weakened rtv-db function, whatever it was
replaced with, because it compares every function of ``rtv`` and ``rtv_secret`` with the manifest of
what the migrations install (src/rtv_db/verify/functions.json).

Each planted hole below is shown working first (as the runtime role: what the replaced function
lets a tenant do), then found. ``RTV_DB_WRITE_FUNCTION_MANIFEST=1 pytest tests/test_function_manifest.py``
rewrites the manifest from a freshly migrated database after a revision changes a function; the
diff of functions.json is then part of the review.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy.exc

from rtv_db import Database, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.migrate import head_revision
from rtv_db.schema import brand_kits
from rtv_db.verify import VerifyConfig, check_function_definitions, verify
from rtv_db.verify.functions import MANIFEST_FILE, function_definitions, load_manifest

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "rtv_db" / "verify" / MANIFEST_FILE


def _findings(target, url=None):
    return verify(url or target.require_admin(), checks=[check_function_definitions])


def test_the_manifest_is_what_the_migrations_install(target):
    with psycopg.connect(to_libpq_url(target.require_admin())) as conn:
        live = function_definitions(conn, VerifyConfig())
    if os.environ.get("RTV_DB_WRITE_FUNCTION_MANIFEST"):
        MANIFEST.write_text(json.dumps({"revision": head_revision(), "functions": live}, indent=1, sort_keys=True) + "\n")
        load_manifest.cache_clear()
    manifest = load_manifest()
    assert manifest["revision"] == head_revision(), "stale manifest: RTV_DB_WRITE_FUNCTION_MANIFEST=1 (module docstring)"
    assert live == manifest["functions"], "stale manifest: RTV_DB_WRITE_FUNCTION_MANIFEST=1 (module docstring)"
    assert _findings(target) == []


def test_the_runtime_role_sees_the_same(target):
    assert _findings(target, target.runtime_url) == []


def _replace_body(admin: psycopg.Connection, signature: str, body: str) -> None:
    """Re-create ``signature`` with everything as it is but its body."""
    definition = admin.execute("SELECT pg_get_functiondef(%s::regprocedure)", (signature,)).fetchone()[0]
    head, _, rest = definition.partition("AS $function$")
    assert rest, definition
    admin.execute(f"{head}AS $function${body}$function$")


def _tenant(admin: psycopg.Connection, name: str) -> uuid.UUID:
    tenant = uuid.uuid4()
    admin.execute("INSERT INTO clients (id, name, slug) VALUES (%s, %s, %s)", (tenant, name, f"t-{tenant.hex[:12]}"))
    admin.execute("INSERT INTO brand_kits (client_id, name) VALUES (%s, %s)", (tenant, f"Brand {name}"))
    return tenant


def _altered(target, signature: str) -> list[str]:
    return [f.code for f in _findings(target) if f.object == f"function {signature}"]


def test_verify_token_without_its_mac_check(target, admin_conn):
    """A forged token (any MAC) is accepted by the planted verify_token: a tenant becomes any other."""
    victim = _tenant(admin_conn, "Victim")
    signature = "rtv_secret.verify_token(text,text,text)"
    source = admin_conn.execute("SELECT prosrc FROM pg_proc WHERE oid = %s::regprocedure", (signature,)).fetchone()[0]
    assert source.count("<> parts[8] THEN") == 1
    _replace_body(admin_conn, signature, source.replace("<> parts[8] THEN", "<> parts[8] AND false THEN"))
    key_id = admin_conn.execute("SELECT key_id FROM rtv_secret.context_keys LIMIT 1").fetchone()[0]
    forged = f"v2.{key_id}.{victim}.-.api.{int(time.time()) + 300}.{uuid.uuid4().hex}.{'0' * 64}"
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT rtv.set_signed_context(%s, NULL, NULL)", (forged,))
        assert [r[0] for r in conn.execute("SELECT name FROM brand_kits")] == ["Brand Victim"]
        conn.execute("ROLLBACK")
    assert _altered(target, signature) == ["FUNCTION_ALTERED"]


def test_verified_context_trusting_a_plain_setting(target, admin_conn):
    victim = _tenant(admin_conn, "Victim")
    signature = "rtv_secret.verified_context()"
    _replace_body(admin_conn, signature, """
    DECLARE result rtv_secret.transaction_context;
    BEGIN
        result.tenant_id := rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true));
        RETURN result;
    END""")
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT set_config('app.current_tenant_id', %s, true)", (str(victim),))
        assert [r[0] for r in conn.execute("SELECT name FROM brand_kits")] == ["Brand Victim"]
        conn.execute("ROLLBACK")
    assert _altered(target, signature) == ["FUNCTION_ALTERED"]


def test_a_clean_session_that_does_nothing(target, admin_conn):
    signature = "rtv.clean_session()"
    returns = admin_conn.execute("SELECT pg_get_function_result(%s::regprocedure)", (signature,)).fetchone()[0]
    _replace_body(admin_conn, signature, " BEGIN END " if returns == "void" else " BEGIN RETURN NULL; END ")
    db = Database(target.runtime_url)
    try:
        tenant = _tenant(admin_conn, "A")
        with db.engine.connect() as conn:  # A's planted setting reaches the next transaction on the connection
            with conn.begin():
                conn.exec_driver_sql("SELECT set_config('search_path', 'pg_catalog', false)")
            with conn.begin():
                assert conn.exec_driver_sql("SHOW search_path").scalar() == "pg_catalog"
        with pytest.raises(sqlalchemy.exc.ProgrammingError, match="brand_kits"):  # the next tenant's request
            with_tenant_scope(db, tenant).scoped_query(brand_kits)
    finally:
        db.close()
    assert _altered(target, signature) == ["FUNCTION_ALTERED"]


def test_a_search_key_trigger_that_lets_the_writer_choose(target, admin_conn):
    signature = "rtv.assign_search_key()"
    _replace_body(admin_conn, signature, " BEGIN RETURN NEW; END ")
    victim_key = 4242
    tenant = _tenant(admin_conn, "A")
    db = Database(target.runtime_url)
    try:
        scope = with_tenant_scope(db, tenant)
        with scope.scoped_transaction() as tx:
            kb = tx.connection.exec_driver_sql(
                "INSERT INTO knowledge_bases (client_id, name) VALUES (rtv.current_tenant_id(), 'kb') RETURNING id").scalar()
            tx.connection.exec_driver_sql(
                "INSERT INTO knowledge_chunks (client_id, knowledge_base_id, content, search_key) "
                f"VALUES (rtv.current_tenant_id(), '{kb}', 'x', {victim_key})")
    finally:
        db.close()
    assert admin_conn.execute("SELECT count(*) FROM knowledge_chunks WHERE search_key = %s", (victim_key,)).fetchone()[0] == 1
    assert _altered(target, signature) == ["FUNCTION_ALTERED"]


def test_attributes_count_not_only_bodies(target, admin_conn):
    admin_conn.execute("ALTER FUNCTION rtv.current_tenant_id() SECURITY INVOKER")
    admin_conn.execute("ALTER FUNCTION rtv.current_lane() RESET search_path")
    found = {f.object: f.message for f in _findings(target)}
    assert re.search(r"security_definer is False", found["function rtv.current_tenant_id()"])
    assert "config" in found["function rtv.current_lane()"]


def test_a_look_alike_overload_and_a_missing_function(target, admin_conn):
    admin_conn.execute("CREATE FUNCTION rtv.current_tenant_id(hint text) RETURNS uuid LANGUAGE sql STABLE"
                       " AS $$ SELECT hint::uuid $$")
    admin_conn.execute("ALTER FUNCTION rtv.current_tenant_id(text) OWNER TO rtv_owner")
    admin_conn.execute("DROP FUNCTION rtv.context_mode()")
    found = {(f.code, f.object) for f in _findings(target)}
    assert ("FUNCTION_UNEXPECTED", "function rtv.current_tenant_id(text)") in found
    assert ("FUNCTION_MISSING", "function rtv.context_mode()") in found


def test_other_role_names_compare_equal(target):
    """Bodies and owners are compared with the role names as placeholders."""
    with psycopg.connect(to_libpq_url(target.require_admin())) as conn:
        live = function_definitions(conn, VerifyConfig())
        renamed = function_definitions(conn, VerifyConfig(owner_role="someone_else"))
    assert all(d["owner"] == "@owner@" for d in live.values())
    assert any(d["owner"] == "rtv_owner" for d in renamed.values())
