"""Issues 8 and 11: a tenant context that SQL injected on the runtime role cannot forge or replay.

Every attack here runs as the runtime role (``db`` or a raw psycopg connection on
``target.runtime_url``); the admin connection only inspects catalogs or flips the mode.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from rtv_db import AsyncDatabase, Database, brand_kits, migrate, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.errors import TenantContextRefusedError
from rtv_db.rls import set_tenant_context, with_rls_context
from rtv_db.schema import platform_accounts, platform_actions
from rtv_db.signing import ContextKey, check_context_mode, generate_key, load_keys, mint_token
from rtv_db.targets import Target

READ_NAMES = "SELECT name FROM brand_kits ORDER BY name"


def _key() -> ContextKey:
    return load_keys()[-1]


@pytest.fixture()
def runtime(target: Target) -> Iterator[psycopg.Connection]:
    """A raw psycopg connection as the runtime role: what injected SQL has in hand."""
    with psycopg.connect(to_libpq_url(target.runtime_url)) as conn:
        yield conn


def _token(conn: psycopg.Connection, tenant: uuid.UUID, *, key: ContextKey | None = None, account: uuid.UUID | None = None,
           lane: str = "api", expires_at: int | None = None, user_id: str | None = None,
           correlation_id: str | None = "corr-1") -> str:
    return mint_token(
        key or _key(), tenant_id=tenant, platform_account_id=account, lane=lane,
        expires_at=int(time.time()) + 300 if expires_at is None else expires_at,
        user_id=user_id, correlation_id=correlation_id,
    )


def _with_token(conn: psycopg.Connection, token: str, user_id: str | None = None, correlation_id: str | None = "corr-1") -> None:
    """Place a token as injected SQL would: set_config, bypassing the setter (which signed mode ignores)."""
    conn.execute("SELECT set_config('app.tenant_token', %s, true), set_config('app.current_user_id', %s, true),"
                 " set_config('app.correlation_id', %s, true)",
                 (token, user_id or "", correlation_id or ""))


def _spend(conn: psycopg.Connection, token: str, user_id: str | None = None, correlation_id: str | None = "corr-1") -> None:
    """Set a token through the setter, the only way a context is made."""
    conn.execute("SELECT rtv.set_signed_context(%s, %s, %s)", (token, user_id, correlation_id))


def _names(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(READ_NAMES)]


def _current_tenant(conn: psycopg.Connection) -> Any:
    return conn.execute("SELECT rtv.current_tenant_id()").fetchone()[0]


# -- the legitimate path -------------------------------------------------------------------


def test_signed_context_is_the_default_and_scopes_work(db, tenants, admin_conn):
    assert admin_conn.execute("SELECT mode FROM rtv_secret.context_settings").fetchone()[0] == "signed"
    assert [r.name for r in with_tenant_scope(db, tenants.a).scoped_query(brand_kits)] == ["Brand A"]
    assert [r.name for r in with_tenant_scope(db, tenants.b).scoped_query(brand_kits)] == ["Brand B"]
    with with_rls_context(db, tenants.a) as conn:
        assert conn.execute(text("SELECT rtv.current_tenant_id()")).scalar_one() == tenants.a
        # the token is not kept in any setting the transaction's SQL could read back
        assert conn.execute(text("SELECT current_setting('app.tenant_token', true)")).scalar_one() in (None, "")
        assert conn.execute(text("SELECT current_setting('app.current_tenant_id', true)")).scalar_one() in (None, "")


def test_set_tenant_context_helper_signs(db, tenants):
    with db.engine.connect() as conn, conn.begin():
        set_tenant_context(conn, tenants.b)
        assert conn.execute(text(READ_NAMES)).scalars().all() == ["Brand B"]


def test_platform_dimensions_are_signed(db, system, tenants):
    account = uuid.uuid4()
    with system.transaction() as conn:
        conn.execute(platform_accounts.insert().values(client_id=tenants.a, id=account, platform="x", handle="a", lanes=["api", "browser"]))
        conn.execute(platform_actions.insert().values(client_id=tenants.a, platform_account_id=account, kind="post", lane="browser"))
    assert len(with_tenant_scope(db, tenants.a, platform_account_id=account, lane="browser").scoped_query(platform_actions)) == 1
    assert with_tenant_scope(db, tenants.a, platform_account_id=account, lane="api").scoped_query(platform_actions) == []
    assert with_tenant_scope(db, tenants.a).scoped_query(platform_actions) == []


async def test_async_database_signs(target, tenants):
    # check_role=False: the async role guard has its own bug (connection.py uses a sync cursor), not ours
    adb = AsyncDatabase(target.runtime_url, check_role=False)
    try:
        rows = await with_tenant_scope(adb, tenants.a).scoped_query(brand_kits)
        assert [r.name for r in rows] == ["Brand A"]
    finally:
        await adb.close()


def test_policy_reads_the_context_once_per_statement(db, tenants):
    with with_rls_context(db, tenants.a) as conn:
        plan = conn.execute(text("EXPLAIN (ANALYZE, VERBOSE, COSTS OFF, TIMING OFF, FORMAT JSON) SELECT * FROM brand_kits")).scalar_one()
    init_plans = [p for p in _plan_nodes(plan[0]["Plan"]) if p.get("Parent Relationship") == "InitPlan"]
    assert len(init_plans) == 1, plan
    assert init_plans[0]["Output"] == ["rtv.current_tenant_id()"] and init_plans[0]["Actual Loops"] == 1


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


# -- the attack: SQL injected into A's request ---------------------------------------------------


def _vulnerable_search(db: Database, tenant: uuid.UUID, user_input: str) -> list[str]:
    """Application code with a SQL injection: the input is pasted into the query text, and the
    rows of every result set come back to the attacker (stacked statements are allowed)."""
    rows: list[str] = []
    with with_rls_context(db, tenant) as conn, conn.connection.driver_connection.cursor() as cur:
        cur.execute(f"SELECT name FROM brand_kits WHERE name = '{user_input}'")
        while True:
            if cur.description:
                rows += [r[0] for r in cur.fetchall()]
            if not cur.nextset():
                return rows


def _injections(b: uuid.UUID) -> list[str]:
    return [
        f"x'; SELECT set_config('app.current_tenant_id', '{b}', true); SELECT name FROM brand_kits; --",
        f"x'; SET LOCAL app.current_tenant_id = '{b}'; SELECT name FROM brand_kits; --",
        f"x'; SELECT rtv.set_tenant_context('{b}'); SELECT name FROM brand_kits; --",
        f"x'; SELECT set_config('app.current_tenant_id', '{b}', false); SELECT name FROM brand_kits; --",
        # rewrite the tenant inside the live, valid token (the MAC no longer matches)
        f"x'; SELECT set_config('app.tenant_token', replace(current_setting('app.tenant_token'), "
        f"split_part(current_setting('app.tenant_token'), '.', 3), '{b}'), true); SELECT name FROM brand_kits; --",
    ]


def test_injected_sql_in_a_request_cannot_read_b(db, tenants):
    for attack in _injections(tenants.b):
        try:
            seen = _vulnerable_search(db, tenants.a, attack)
        except (DBAPIError, psycopg.Error):
            seen = []  # refused outright: fine
        assert "Brand B" not in seen, attack


def test_the_same_injection_reads_b_in_unsigned_mode(target, tenants, admin_conn, monkeypatch):
    """The control: without signing the attack works, so the test above can fail."""
    admin_conn.execute("UPDATE rtv_secret.context_settings SET mode = 'unsigned'")
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    unsigned_db = Database(target.runtime_url)
    try:
        assert "Brand B" in _vulnerable_search(unsigned_db, tenants.a, _injections(tenants.b)[0])
        assert check_context_mode(admin_conn)[0]["code"] == "context-unsigned"
    finally:
        unsigned_db.close()


def test_injected_sql_cannot_write_into_b(db, tenants, system):
    attack = (f"x'; SET LOCAL app.current_tenant_id = '{tenants.b}'; "
              f"INSERT INTO brand_kits (client_id, name) VALUES ('{tenants.b}', 'pwned'); --")
    with pytest.raises(psycopg.Error, match="row-level security"):
        _vulnerable_search(db, tenants.a, attack)
    with system.transaction() as conn:
        assert conn.execute(text("SELECT count(*) FROM brand_kits WHERE name = 'pwned'")).scalar_one() == 0


def test_raw_setting_without_token_sees_nothing_and_cannot_write(runtime, tenants):
    runtime.execute("SELECT set_config('app.current_tenant_id', %s, true)", (str(tenants.b),))
    assert _names(runtime) == [] and _current_tenant(runtime) is None
    runtime.execute(f"SET LOCAL app.current_tenant_id = '{tenants.b}'")
    assert _names(runtime) == []
    with pytest.raises(pg_errors.InsufficientPrivilege):
        runtime.execute("INSERT INTO brand_kits (client_id, name) VALUES (%s, 'x')", (tenants.b,))
    runtime.rollback()
    with pytest.raises(pg_errors.InsufficientPrivilege, match="set_tenant_context is disabled"):
        runtime.execute("SELECT rtv.set_tenant_context(%s)", (tenants.b,))


# -- forged, altered, stale and replayed tokens ---------------------------------------------------


def test_a_valid_token_works_through_the_setter_only(runtime, tenants):
    _with_token(runtime, _token(runtime, tenants.a))
    assert _names(runtime) == []  # a setting is not a context
    runtime.rollback()
    _spend(runtime, _token(runtime, tenants.b))
    assert _names(runtime) == ["Brand B"]


def _alter(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


@pytest.mark.parametrize("field,index", [("version", 0), ("key id", 1), ("tenant", 2), ("account", 3), ("lane", 4),
                                         ("expiry", 5), ("nonce", 6), ("mac", 7)])
def test_a_token_altered_in_any_field_is_refused(runtime, tenants, field, index):
    good = _token(runtime, tenants.a)
    parts = good.split(".")
    replacement = {
        0: "v1", 1: "other", 2: str(tenants.b), 3: str(uuid.uuid4()), 4: "browser",
        5: str(int(parts[5]) + 3600), 6: ("0" if parts[6][0] != "0" else "1") + parts[6][1:],
        7: ("0" if parts[7][0] != "0" else "1") + parts[7][1:],
    }[index]
    with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="refused"):
        _spend(runtime, _alter(good, index, replacement))
    runtime.rollback()
    assert _current_tenant(runtime) is None and _names(runtime) == []


@pytest.mark.parametrize("label", ["user", "correlation"])
def test_a_changed_audit_label_voids_the_token(runtime, tenants, label):
    token = _token(runtime, tenants.a, user_id="alice")
    with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="bad signature"):
        if label == "user":
            _spend(runtime, token, user_id="mallory")
        else:
            _spend(runtime, token, user_id="alice", correlation_id="mallory")
    runtime.rollback()
    _spend(runtime, token, user_id="alice")  # the labels it was signed with: accepted (not spent by the refusals)
    assert _names(runtime) == ["Brand A"]
    # a label changed afterwards changes nothing: the context keeps the signed ones
    runtime.execute("SET LOCAL app.current_user_id = 'mallory'")
    assert runtime.execute("SELECT rtv.current_user_id()").fetchone()[0] == "alice"


@pytest.mark.parametrize("token", ["v1", "garbage", "v2.a.b.c.d.e.f.g", "x" * 10_000, "v2..." + "." * 300])
def test_malformed_tokens_are_refused(runtime, tenants, token):
    with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="malformed"):
        _spend(runtime, token)
    runtime.rollback()
    _with_token(runtime, token)
    assert _current_tenant(runtime) is None and _names(runtime) == []


def test_a_token_signed_with_another_key_is_refused(runtime, tenants):
    for key in (generate_key(), ContextKey(_key().key_id, generate_key().secret)):
        with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="unknown or retired key|bad signature"):
            _spend(runtime, _token(runtime, tenants.b, key=key))
        runtime.rollback()


def test_an_expired_token_is_refused(runtime, tenants):
    with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="expired"):
        _spend(runtime, _token(runtime, tenants.a, expires_at=int(time.time()) - 1))


def test_a_token_works_on_any_backend_but_only_once(target, tenants):
    token = _token(None, tenants.b)  # type: ignore[arg-type]
    with psycopg.connect(to_libpq_url(target.runtime_url)) as first, psycopg.connect(to_libpq_url(target.runtime_url)) as second:
        _spend(second, token)  # minted without naming a backend: any backend takes it (behind a pooler too)
        assert _names(second) == ["Brand B"]
        second.commit()
        with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="replayed"):
            _spend(first, token)
        first.rollback()
        with pytest.raises(pg_errors.InvalidAuthorizationSpecification, match="replayed"):
            _spend(second, token)


def test_a_live_token_cannot_be_read_or_reused_by_another_session(db, target, tenants):
    with with_rls_context(db, tenants.b) as victim:
        assert victim.execute(text(READ_NAMES)).scalars().all() == ["Brand B"]  # live and valid right now
        assert victim.execute(text("SELECT current_setting('app.tenant_token', true)")).scalar_one() in (None, "")
        with psycopg.connect(to_libpq_url(target.runtime_url)) as attacker:
            assert _current_tenant(attacker) is None
            with pytest.raises(pg_errors.InsufficientPrivilege):  # other sessions' queries are hidden
                attacker.execute("SELECT query FROM pg_stat_activity")


def test_the_token_ends_with_the_transaction(db, tenants):
    with db.engine.connect() as conn:
        with conn.begin():
            set_tenant_context(conn, tenants.a)
        assert conn.execute(text("SELECT rtv.current_tenant_id()")).scalar_one() is None
        assert conn.execute(text(READ_NAMES)).scalars().all() == []


def test_a_database_with_the_wrong_key_fails_loudly(target, tenants):
    wrong = Database(target.runtime_url, context_key=generate_key())
    try:
        with pytest.raises(TenantContextRefusedError, match="unknown or retired key"):
            with_tenant_scope(wrong, tenants.a).scoped_query(brand_kits)
    finally:
        wrong.close()


# -- the key stays secret -----------------------------------------------------------------------


def test_the_runtime_role_cannot_read_the_key(runtime, target, tenants):
    secret = _key().hex
    for stmt in ("SELECT * FROM rtv_secret.context_keys", "SELECT secret FROM rtv_secret.context_keys",
                 "SELECT rtv_secret.hmac_pad('\\x00'::bytea, 54)", "SELECT rtv_secret.verify_token('', '', '')",
                 "SELECT * FROM rtv_secret.context_settings"):
        with pytest.raises(pg_errors.InsufficientPrivilege):
            runtime.execute(stmt)
        runtime.rollback()
    assert runtime.execute("SELECT has_schema_privilege('rtv_secret', 'USAGE')").fetchone()[0] is False
    _spend(runtime, _token(runtime, tenants.a))
    # every function the runtime role may call with no argument: none returns anything key-like
    functions = runtime.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname IN ('rtv', 'rtv_secret') AND p.pronargs = 0 AND p.prorettype <> 'trigger'::regtype "
        "AND has_function_privilege(p.oid, 'EXECUTE') AND p.proname NOT IN ('clean_session', 'release_signed_context', "
        "'clear_tenant_context')").fetchall()
    assert {"rtv.current_tenant_id()", "rtv.context_refusal()", "rtv.context_mode()"} <= {f[0] for f in functions}
    for (fn,) in functions:
        with runtime.transaction():
            value = runtime.execute(f"SELECT {fn}::text").fetchone()[0]
        assert secret not in (value or ""), fn
    # nor the catalog: no key in any function's source, no key in any setting, nor any query text
    sources = runtime.execute("SELECT string_agg(coalesce(prosrc, ''), ' ') FROM pg_proc").fetchone()[0]
    assert secret not in sources and secret.upper() not in sources
    settings = runtime.execute("SELECT string_agg(coalesce(setting, ''), ' ') FROM pg_settings").fetchone()[0]
    assert secret not in settings
    with pytest.raises(pg_errors.InsufficientPrivilege):  # nor any session's query text
        runtime.execute("SELECT query FROM pg_stat_activity")


def test_the_system_role_cannot_read_the_key_either(system):
    with pytest.raises(DBAPIError, match="permission denied"):
        with system.transaction() as conn:
            conn.execute(text("SELECT secret FROM rtv_secret.context_keys"))


def test_functions_are_definer_with_a_fixed_search_path(admin_conn):
    rows = admin_conn.execute(
        "SELECT p.proname, p.prosecdef, p.proconfig, p.provolatile, r.rolname FROM pg_proc p "
        "JOIN pg_roles r ON r.oid = p.proowner WHERE p.oid IN ('rtv.current_tenant_id()'::regprocedure, "
        "'rtv.current_platform_account_id()'::regprocedure, 'rtv.current_lane()'::regprocedure)").fetchall()
    assert len(rows) == 3
    for name, secdef, config, volatility, owner in rows:
        assert secdef and config == ["search_path=pg_catalog, pg_temp"] and volatility == "s" and owner == "rtv_owner", name


# -- keys, modes and migrations --------------------------------------------------------------------


def test_migrate_refuses_to_replace_a_key_secret(target, cluster, monkeypatch):
    key = _key()
    monkeypatch.setenv("RTV_DB_CONTEXT_KEY", f"{key.key_id}:{generate_key().hex}")
    with pytest.raises(Exception, match="different secret"):
        migrate(target.require_admin(), cluster.settings)


def test_two_keys_are_valid_during_a_rollover(target, cluster, tenants, monkeypatch):
    old, new = _key(), generate_key()
    monkeypatch.setenv("RTV_DB_CONTEXT_KEY", f"{old.key_id}:{old.hex},{new.key_id}:{new.hex}")
    migrate(target.require_admin(), cluster.settings)
    for key in (old, new):
        rolled = Database(target.runtime_url, context_key=key)
        try:
            assert [r.name for r in with_tenant_scope(rolled, tenants.a).scoped_query(brand_kits)] == ["Brand A"]
        finally:
            rolled.close()
    Database(target.runtime_url)  # the default now signs with the last key
    with psycopg.connect(to_libpq_url(target.require_admin()), autocommit=True) as admin:
        admin.execute("DELETE FROM rtv_secret.context_keys WHERE key_id = %s", (old.key_id,))
    retired = Database(target.runtime_url, context_key=old)
    try:
        with pytest.raises(TenantContextRefusedError, match="unknown or retired key"):
            with_tenant_scope(retired, tenants.a).scoped_query(brand_kits)
    finally:
        retired.close()


def test_check_context_mode_reports_nothing_when_signed(db):
    with db.engine.connect() as conn:
        assert check_context_mode(conn) == []


def test_downgrade_restores_the_unsigned_functions(empty_target, cluster):
    from rtv_db.migrate import downgrade

    admin = empty_target.require_admin()
    migrate(admin, cluster.settings)
    downgrade(admin, cluster.settings, "0002")
    with psycopg.connect(to_libpq_url(admin), autocommit=True) as conn:
        assert conn.execute("SELECT prosecdef FROM pg_proc WHERE oid = 'rtv.current_tenant_id()'::regprocedure").fetchone()[0] is False
        assert conn.execute("SELECT to_regnamespace('rtv_secret')").fetchone()[0] is None
    migrate(admin, cluster.settings)


def test_a_context_does_not_outlive_its_transaction(runtime, tenants):
    """A context is the row its transaction spent: the next transaction on the same connection
    (another tenant's request, or one with no context) has none, whatever the session holds."""
    token = _token(runtime, tenants.a)
    _spend(runtime, token)
    runtime.execute("SELECT set_config('app.tenant_token', %s, false)", (token,))
    assert _names(runtime) == ["Brand A"]
    runtime.commit()
    assert runtime.execute("SELECT current_setting('app.tenant_token')").fetchone()[0] == token  # planted...
    assert _names(runtime) == [] and _current_tenant(runtime) is None  # ...and ignored


def test_a_refusal_is_written_to_the_server_log(runtime, tenants, admin_conn):
    try:
        logfile = admin_conn.execute("SELECT coalesce(pg_current_logfile(), 'log')").fetchone()[0]
        before = len(admin_conn.execute("SELECT pg_read_file(%s)", (logfile,)).fetchone()[0])
    except psycopg.Error:
        pytest.skip("the server log is not readable through pg_read_file on this server")
    forged = _alter(_token(runtime, tenants.a), 2, str(tenants.b))
    with pytest.raises(pg_errors.InvalidAuthorizationSpecification):
        _spend(runtime, forged)
    runtime.rollback()
    logged = ""
    for _ in range(50):  # the log is written asynchronously to the file
        logged = admin_conn.execute("SELECT pg_read_file(%s, %s, 1000000)", (logfile, before)).fetchone()[0]
        if "rtv-db security" in logged:
            break
        time.sleep(0.1)
    assert "rtv-db security: tenant context refused (bad signature)" in logged
    assert f"claimed tenant {tenants.b}" in logged and "role rtv_app" in logged


def test_key_file_generation_rotation_and_retirement(target, cluster, tenants, tmp_path, monkeypatch):
    from rtv_db.signing import retire_key, rotate_key

    key_file = tmp_path / "keys" / "context.key"
    monkeypatch.delenv("RTV_DB_CONTEXT_KEY")
    monkeypatch.setenv("RTV_DB_CONTEXT_KEY_FILE", str(key_file))
    migrate(target.require_admin(), cluster.settings)  # no key configured: generates the file
    assert key_file.stat().st_mode & 0o777 == 0o600
    (first,) = load_keys()

    def reads(db: Database) -> list[str]:
        return [r.name for r in with_tenant_scope(db, tenants.a).scoped_query(brand_kits)]

    old_app = Database(target.runtime_url)
    try:
        assert reads(old_app) == ["Brand A"]
        second = rotate_key(target.require_admin(), cluster.settings)
        assert [k.key_id for k in load_keys()] == [first.key_id, second.key_id]
        assert key_file.stat().st_mode & 0o777 == 0o600
        new_app = Database(target.runtime_url)
        try:
            assert reads(new_app) == ["Brand A"] and reads(old_app) == ["Brand A"]  # both valid mid-rollover
            with pytest.raises(Exception, match="signs with"):
                retire_key(target.require_admin(), cluster.settings, second.key_id)
            retire_key(target.require_admin(), cluster.settings, first.key_id)
            assert [k.key_id for k in load_keys()] == [second.key_id]
            assert reads(new_app) == ["Brand A"]
            with pytest.raises(TenantContextRefusedError, match="unknown or retired key"):
                reads(old_app)
        finally:
            new_app.close()
    finally:
        old_app.close()


def test_planner_statistics_do_not_leak_the_key(runtime, admin_conn):
    admin_conn.execute("ANALYZE rtv_secret.context_keys")
    leaked = runtime.execute("SELECT count(*) FROM pg_stats WHERE schemaname = 'rtv_secret'").fetchone()[0]
    assert leaked == 0
    assert admin_conn.execute("SELECT count(*) FROM pg_stats WHERE schemaname = 'rtv_secret'").fetchone()[0] > 0  # the control


def test_every_transaction_gets_a_token_of_its_own(db, tenants, admin_conn):
    for _ in range(3):
        with with_rls_context(db, tenants.a) as conn:
            assert conn.execute(text("SELECT rtv.current_tenant_id()")).scalar_one() == tenants.a
    nonces = admin_conn.execute("SELECT nonce FROM rtv_secret.transaction_contexts WHERE tenant_id = %s", (tenants.a,)).fetchall()
    assert len({n for (n,) in nonces}) == len(nonces) >= 3


def test_random_single_character_changes_are_all_refused(runtime, tenants):
    import random

    rng = random.Random(8)
    good = _token(runtime, tenants.a)
    alphabet = "0123456789abcdef-.vk"
    for _ in range(150):
        i = rng.randrange(len(good))
        mutated = good[:i] + rng.choice([c for c in alphabet if c != good[i]]) + good[i + 1:]
        with pytest.raises(pg_errors.InvalidAuthorizationSpecification):
            _spend(runtime, mutated)
        runtime.rollback()


def test_unsigned_mode_is_set_by_migrate_and_reported(target, cluster, tenants, monkeypatch, admin_conn):
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    migrate(target.require_admin(), cluster.settings)
    findings = check_context_mode(admin_conn)
    assert [f["code"] for f in findings] == ["context-unsigned"]
    assert set(findings[0]) == {"code", "object", "message", "why", "fix"}
    unsigned_db = Database(target.runtime_url)
    try:
        assert [r.name for r in with_tenant_scope(unsigned_db, tenants.a).scoped_query(brand_kits)] == ["Brand A"]
    finally:
        unsigned_db.close()
    monkeypatch.delenv("RTV_DB_CONTEXT_MODE")
    migrate(target.require_admin(), cluster.settings)
    assert check_context_mode(admin_conn) == []


def test_set_tenant_context_helper_reports_a_refusal(target, tenants):
    wrong = Database(target.runtime_url, context_key=generate_key())
    try:
        with wrong.engine.connect() as conn, conn.begin():
            with pytest.raises(TenantContextRefusedError, match="unknown or retired key"):
                set_tenant_context(conn, tenants.a)
    finally:
        wrong.close()
