"""Issue 11: nothing one transaction leaves on a connection reaches the next, and a token is
useless outside the transaction that spent it.

Every attack runs as the runtime role through rtv-db's own API (a one-connection pool, so that the
attacker's and the victim's transactions share one backend, as they would in production). Each
finding is first shown working against revision 0004 (the code before this change, driven the
way rtv-db drove it: psycopg's default prepare threshold, no clean session, a token bound to the
backend), so that the tests of the fix can fail.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from rtv_db import Database, brand_kits, migrate, with_tenant_scope
from rtv_db.audit import read_audit_trail
from rtv_db.config import to_libpq_url
from rtv_db.signing import load_keys, mint_token
from rtv_db.targets import Target
from rtv_db.tenant import _transaction

from conftest import Cluster, Tenants, attack, database_at, one_backend


@pytest.fixture()
def shared(target: Target) -> Iterator[Database]:
    """The runtime role's pool of one connection: every transaction below runs on one backend."""
    db = one_backend(target.runtime_url)
    yield db
    db.close()


@pytest.fixture()
def tokens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The setter's parameters (token, user id, correlation id) of every transaction rtv-db starts
    in this test, in order: what a thief would want."""
    minted: list[tuple[Any, ...]] = []
    original = _transaction.ContextSetter.statement

    def recording(self: Any, ctx: Any) -> tuple[str, tuple[Any, ...]]:
        sql, params = original(self, ctx)
        minted.append(params)
        return sql, params

    monkeypatch.setattr(_transaction.ContextSetter, "statement", recording)
    return minted


# -- the old behaviour (revision 0004), driven as rtv-db drove it ----------------------------------


def _v1_token(tenant: uuid.UUID, pid: int, correlation_id: str = "") -> str:
    key = load_keys()[-1]
    body = f"v1.{key.key_id}.{tenant}.-.api.{int(time.time()) + 300}.{pid}"
    mac = hmac.new(key.secret, f"{body}\n\n{correlation_id}".encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


@pytest.fixture()
def old_world(cluster: Cluster, template: str) -> Iterator[tuple[Target, Tenants]]:
    """A database at revision 0004, with tenants A and B."""
    with database_at(cluster, template, "0004") as (t, tenants):
        yield t, tenants
        migrate(t.require_admin(), cluster.settings)  # and back up: the upgrade path is exercised too


def _old_begin(conn: psycopg.Connection, tenant: uuid.UUID, correlation_id: str = "") -> None:
    conn.execute("BEGIN")
    conn.execute("SELECT rtv.set_signed_context(%s::text, %s::text, %s::text)",
                 (_v1_token(tenant, conn.info.backend_pid, correlation_id), None, correlation_id))


def test_control_on_0004_a_hijacked_prepared_statement_steals_and_replays_a_token(old_world):
    target, t = old_world
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True, prepare_threshold=5) as conn:
        for _ in range(6):  # B's ordinary traffic: psycopg prepares the setter as _pg3_0
            _old_begin(conn, t.b)
            conn.execute("COMMIT")
        (name,) = conn.execute("SELECT name FROM pg_prepared_statements WHERE statement LIKE %s",
                               ("%set_signed_context%",), prepare=False).fetchone()
        # A's injected SQL redefines it: still the real setter, plus a copy of its parameters.
        _old_begin(conn, t.a)
        conn.execute(f"DEALLOCATE {name}", prepare=False)
        conn.execute(f"PREPARE {name}(text, text, text) AS SELECT rtv.set_signed_context($1, $2, $3), "
                     "set_config('loot.token', coalesce(nullif(current_setting('loot.token', true), ''), $1), false)",
                     prepare=False)
        conn.execute("COMMIT")
        _old_begin(conn, t.b)  # B runs A's version and notices nothing
        assert [r[0] for r in conn.execute("SELECT name FROM brand_kits")] == ["Brand B"]
        conn.execute("COMMIT")
        # A's next request on that backend: the loot, replayed through the real setter
        _old_begin(conn, t.a)
        stolen = conn.execute("SELECT current_setting('loot.token')", prepare=False).fetchone()[0]
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        conn.execute("SELECT rtv.set_signed_context(%s, NULL, NULL)", (stolen,), prepare=False)
        assert [r[0] for r in conn.execute("SELECT name FROM brand_kits", prepare=False)] == ["Brand B"]
        conn.execute("ROLLBACK")


def test_control_on_0004_planted_session_state_outlives_the_transaction(old_world):
    target, t = old_world
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as conn:
        _old_begin(conn, t.a)
        conn.execute("SET search_path = pg_catalog")
        conn.execute("COMMIT")
        _old_begin(conn, t.b)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT name FROM brand_kits")
        conn.execute("ROLLBACK")


def test_control_on_0004_audit_labels_can_be_forged(old_world):
    target, t = old_world
    with psycopg.connect(to_libpq_url(target.runtime_url), autocommit=True) as conn:
        _old_begin(conn, t.a, correlation_id="real")
        conn.execute(
            "WITH ins AS (INSERT INTO brand_kits (client_id, name) VALUES (%s, 'forged') RETURNING id) "
            "SELECT set_config('app.current_user_id', 'someone-else', true), "
            "set_config('app.correlation_id', 'spoofed', true) FROM ins", (t.a,))
        conn.execute("COMMIT")
    with psycopg.connect(to_libpq_url(target.require_admin())) as admin:
        labels = admin.execute("SELECT user_id, correlation_id FROM audit_events WHERE table_name = 'brand_kits' "
                               "AND client_id = %s AND action = 'INSERT' ORDER BY occurred_at DESC LIMIT 1", (t.a,)).fetchone()
    assert labels == ("someone-else", "spoofed")


# -- finding 1 and 2: prepared statements ---------------------------------------------------------


def test_rtv_db_prepares_nothing_on_the_server(shared, tenants):
    scope = with_tenant_scope(shared, tenants.b)
    for _ in range(12):
        scope.scoped_query(brand_kits)
    with scope.scoped_transaction() as tx:
        assert tx.connection.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one() == 0


@pytest.fixture(params=[None, 1], ids=["nothing prepared", "prepare_threshold=1"])
def warm(request: pytest.FixtureRequest, target: Target, tenants: Tenants) -> Iterator[Database]:
    """A one-connection pool on which B has run enough reads for psycopg to prepare them (when
    a threshold is set: then statements are prepared, but live for one transaction only)."""
    db = one_backend(target.runtime_url, prepare_threshold=request.param)
    for _ in range(6):
        with_tenant_scope(db, tenants.b).scoped_query(brand_kits)
    yield db
    db.close()


def _plant(db: Database, tenant: uuid.UUID, body: str) -> None:
    """A's injected SQL takes every name psycopg could use next for a statement of its own."""
    attack(db, tenant, "DEALLOCATE ALL", *(f"PREPARE _pg3_{i} AS {body}" for i in range(40)))


def test_a_planted_prepared_statement_never_runs_in_the_next_transaction(warm, tenants):
    _plant(warm, tenants.a, "SELECT set_config('loot.token', 'planted-statement-ran', false)")
    b = with_tenant_scope(warm, tenants.b)
    assert [k.name for k in b.scoped_query(brand_kits)] == ["Brand B"]
    with b.scoped_transaction() as tx:
        conn = tx.connection
        assert conn.exec_driver_sql("SELECT current_setting('loot.token', true)").scalar_one() in (None, "")
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements WHERE from_sql").scalar_one() == 0


def test_a_hijacked_read_cannot_turn_into_a_write(warm, tenants, system):
    _plant(warm, tenants.a, "UPDATE brand_kits SET name = 'hijacked' RETURNING *")
    assert [k.name for k in with_tenant_scope(warm, tenants.b).scoped_query(brand_kits)] == ["Brand B"]
    with system.transaction() as conn:
        assert conn.execute(text("SELECT count(*) FROM brand_kits WHERE name = 'hijacked'")).scalar_one() == 0


# -- finding 3: settings, cursors, LISTEN, sequences ------------------------------------------------

_PLANTED = {
    "search_path": ("SET search_path = pg_catalog", "SHOW search_path", '"$user", public'),
    "read only": ("SET default_transaction_read_only = on", "SHOW default_transaction_read_only", "off"),
    "isolation": ("SET default_transaction_isolation = 'serializable'", "SHOW default_transaction_isolation", "read committed"),
    "statement_timeout 0": ("SET statement_timeout = 0", "SHOW statement_timeout", "30s"),
    "lock_timeout": ("SET lock_timeout = 1", "SHOW lock_timeout", "0"),
    "planner": ("SET enable_indexscan = off", "SHOW enable_indexscan", "on"),
    "hnsw.ef_search": ("SET hnsw.ef_search = 1", "SHOW hnsw.ef_search", "40"),
    "app setting": ("SELECT set_config('app.tenant_token', 'planted', false)", "SELECT current_setting('app.tenant_token', true)", ""),
}


@pytest.mark.parametrize("name", list(_PLANTED))
def test_a_planted_setting_is_gone_in_the_next_transaction(shared, tenants, name):
    plant, show, default = _PLANTED[name]
    if name == "hnsw.ef_search":
        attack(shared, tenants.a, "SELECT '[1,2,3]'::vector <-> '[1,2,3]'::vector")  # loads pgvector's settings
    before = attack(shared, tenants.a, plant, show)[1][0][0]
    assert before != default  # the plant took, for the rest of A's session...
    after = attack(shared, tenants.b, show)[0][0][0]
    assert (after or "") == default, (name, after)  # ...and B's transaction starts clean
    effective = attack(shared, tenants.b, "SHOW transaction_read_only", "SHOW transaction_isolation")
    assert [r[0][0] for r in effective] == ["off", "read committed"]  # BEGIN names both


def test_a_planted_one_millisecond_statement_timeout_does_not_cancel_the_next_tenant(shared, tenants):
    attack(shared, tenants.a, "SET statement_timeout = 1")
    scope = with_tenant_scope(shared, tenants.b)
    for _ in range(50):
        with scope.scoped_transaction() as tx:
            assert tx.connection.exec_driver_sql("SELECT count(*) FROM brand_kits, pg_sleep(0.002)").scalar_one() == 1


def test_cursors_and_listens_do_not_survive(shared, tenants):
    attack(shared, tenants.a, "DECLARE loot CURSOR WITH HOLD FOR SELECT 1", "LISTEN loot")
    assert attack(shared, tenants.a, "SELECT count(*) FROM pg_listening_channels()")[0][0][0] == 1  # the plant took
    with with_tenant_scope(shared, tenants.b).scoped_transaction() as tx:
        assert tx.connection.exec_driver_sql("SELECT count(*) FROM pg_cursors").scalar_one() == 0
    # UNLISTEN, like LISTEN, takes effect at commit: from B's commit on, the channel is gone
    assert attack(shared, tenants.a, "SELECT count(*) FROM pg_listening_channels()")[0][0][0] == 0


def test_a_planted_session_does_not_reach_a_no_context_transaction(shared, tenants):
    attack(shared, tenants.a, "SET search_path = pg_catalog")
    with shared.engine.connect() as conn:
        assert conn.execute(text("SHOW search_path")).scalar_one() == '"$user", public'
        assert conn.execute(text("SELECT count(*) FROM brand_kits")).scalar_one() == 0  # no context: no rows


def test_read_only_transactions_still_work(shared, tenants):
    scope = with_tenant_scope(shared, tenants.a)
    with shared.engine.connect() as conn:
        conn = conn.execution_options(postgresql_readonly=True, **{_transaction.CONTEXT_OPTION: scope.context})
        with conn.begin():
            assert conn.execute(text("SELECT name FROM brand_kits")).scalars().all() == ["Brand A"]
            assert conn.execute(text("SHOW transaction_read_only")).scalar_one() == "on"


# -- the context is bound to the transaction ---------------------------------------------------------


def test_a_stolen_token_is_refused_in_any_other_transaction(target, shared, tenants, tokens):
    assert [k.name for k in with_tenant_scope(shared, tenants.b).scoped_query(brand_kits)] == ["Brand B"]
    token, user_id, correlation_id = tokens[-1]
    replay = f"SELECT rtv.set_signed_context('{token}', NULL, '{correlation_id}')"
    assert user_id is None
    # on the same backend (through the API's own connection) and on another one
    with pytest.raises(Exception, match="replayed: the token was already used"):
        attack(shared, tenants.a, "COMMIT", "BEGIN", replay)
    with psycopg.connect(to_libpq_url(target.runtime_url)) as other:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification, match="replayed"):
            other.execute(replay)


def test_a_second_context_in_a_transaction_is_refused(shared, tenants):
    fresh = mint_token(load_keys()[-1], tenant_id=tenants.b, platform_account_id=None, lane="api",
                       expires_at=int(time.time()) + 60)
    with pytest.raises(Exception, match="already has a tenant context"):
        attack(shared, tenants.a, f"SELECT rtv.set_signed_context('{fresh}', NULL, NULL)")
    # the fresh token was not spent by the refusal: B itself could still use it
    with psycopg.connect(to_libpq_url(shared.url.replace("postgresql+psycopg", "postgresql"))) as conn:
        conn.execute("SELECT rtv.set_signed_context(%s, NULL, NULL)", (fresh,))
        assert [r[0] for r in conn.execute("SELECT name FROM brand_kits")] == ["Brand B"]


def test_a_token_set_as_a_plain_setting_is_ignored(target, tenants):
    token = mint_token(load_keys()[-1], tenant_id=tenants.b, platform_account_id=None, lane="api",
                       expires_at=int(time.time()) + 60)
    with psycopg.connect(to_libpq_url(target.runtime_url)) as conn:
        conn.execute("SELECT set_config('app.tenant_token', %s, true)", (token,))
        assert conn.execute("SELECT rtv.current_tenant_id()").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM brand_kits").fetchone()[0] == 0


# -- finding 6: audit labels ----------------------------------------------------------------------


def test_audit_labels_come_from_the_signed_context(db, tenants):
    from rtv_db import TenantContext

    ctx = TenantContext(tenants.a, user_id="alice", correlation_id="real-corr")
    scope = with_tenant_scope(db, ctx)
    with scope.scoped_transaction() as tx:
        kit_id = tx.connection.exec_driver_sql(
            "WITH ins AS (INSERT INTO brand_kits (client_id, name) VALUES (%s, 'labelled') RETURNING id) "
            "SELECT ins.id, set_config('app.current_user_id', 'someone-else', true), "
            "set_config('app.correlation_id', 'spoofed', true) FROM ins", (str(tenants.a),)).first()[0]
    [inserted] = read_audit_trail(scope, table="brand_kits", row_id=kit_id, action="INSERT").events
    assert (inserted.user_id, inserted.correlation_id) == ("alice", "real-corr")


# -- a rolled-back transaction spends its token too ---------------------------------------------------

_SETTER = "SELECT rtv.set_signed_context(%s, %s, %s)"


def _roll_back_a_request(db: Database, tenant: uuid.UUID) -> None:
    with pytest.raises(RuntimeError):
        with with_tenant_scope(db, tenant).scoped_transaction() as tx:
            assert [k.name for k in tx.scoped_query(brand_kits)] == ["Brand B"]
            raise RuntimeError("the request failed")


def test_a_token_whose_transaction_rolled_back_cannot_be_replayed(target, shared, tenants, tokens):
    _roll_back_a_request(shared, tenants.b)
    with psycopg.connect(to_libpq_url(target.runtime_url)) as thief:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification, match="replayed"):
            thief.execute(_SETTER, tokens[-1])
    # an error inside the transaction (the server aborts it) ends the same way
    with pytest.raises(Exception, match="division by zero"):
        attack(shared, tenants.b, "SELECT 1/0")
    with psycopg.connect(to_libpq_url(target.runtime_url)) as thief:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification, match="replayed"):
            thief.execute(_SETTER, tokens[-1])


def test_control_without_the_spend_at_rollback_the_token_is_good_once_more(target, shared, tenants, tokens, monkeypatch):
    monkeypatch.setattr(_transaction, "_SPEND_ROLLED_BACK", "SELECT %s::text, %s::text, %s::text")
    _roll_back_a_request(shared, tenants.b)
    with psycopg.connect(to_libpq_url(target.runtime_url)) as thief:
        thief.execute(_SETTER, tokens[-1])  # the rollback took the spent row with it
        assert [r[0] for r in thief.execute("SELECT name FROM brand_kits")] == ["Brand B"]


def test_the_spend_rides_with_the_rollback(target, tenants):
    from bench.wire import WireCounter

    counter = WireCounter(target.runtime_url)
    db = Database(counter.proxied_url(target.runtime_url), pool_pre_ping=False)
    try:
        with_tenant_scope(db, tenants.b).scoped_query(brand_kits)  # warm: connect, role check
        before = counter.snapshot()
        _roll_back_a_request(db, tenants.b)
        spent = counter.snapshot().minus(before)
        # BEGIN + clean + context, the SELECT, and ROLLBACK + the spend: three, like BEGIN/SELECT/ROLLBACK
        assert spent.round_trips == 3, spent.transcript
        sent = [sql for part in spent.transcript for sql in part]  # (the proxy may cut a pipeline in pieces)
        assert sent[-2] == "ROLLBACK" and "spend_rolled_back_token" in sent[-1], spent.transcript
    finally:
        db.close()
        counter.close()
