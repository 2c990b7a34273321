"""Connection helpers (S0-B1) and the runtime-role guard."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url

from rtv_db import AsyncDatabase, Database, DatabaseConnectionError, UnsafeRuntimeRoleError
from rtv_db.config import runtime_role_settings, to_libpq_url


def test_test_connection_reports_the_runtime_role(db):
    info = db.test_connection()
    assert info.user == "rtv_app"
    assert info.server_version.split(".")[0].isdigit()
    assert info.latency_ms >= 0


async def test_async_test_connection(target):
    adb = AsyncDatabase(target.runtime_url)
    try:
        info = await adb.test_connection()
        assert info.user == "rtv_app"
        assert adb.get_pool_stats().checked_out == 0
    finally:
        await adb.close()


def test_pool_stats_follow_checkouts(db):
    assert db.get_pool_stats().checked_out == 0
    with db.engine.connect() as c1, db.engine.connect() as c2:
        c1.execute(text("select 1"))
        c2.execute(text("select 1"))
        stats = db.get_pool_stats()
        assert stats.checked_out == 2
        assert stats.size == 5
    stats = db.get_pool_stats()
    assert stats.checked_out == 0
    assert stats.checked_in == 2


def test_close_connection_empties_the_pool_and_reconnects(db):
    db.test_connection()
    assert db.get_pool_stats().checked_in == 1
    db.close_connection()
    assert db.get_pool_stats().checked_in == 0
    assert db.test_connection().user == "rtv_app"


def test_failed_connection_names_host_and_database_never_the_password(target):
    secret = "pw-" + uuid.uuid4().hex
    url = make_url(target.runtime_url).set(database="no_such_database", password=secret)
    bad = Database(url.render_as_string(hide_password=False))
    with pytest.raises(DatabaseConnectionError) as excinfo:
        bad.test_connection()
    message = str(excinfo.value)
    assert "no_such_database" in message
    assert "host" in message
    assert secret not in message
    assert secret not in repr(excinfo.value)


def test_failed_tcp_connection_names_the_host(target):
    secret = "pw-" + uuid.uuid4().hex
    bad = Database(f"postgresql+psycopg://rtv_app:{secret}@127.0.0.1:1/rtv", options=None)
    with pytest.raises(DatabaseConnectionError) as excinfo:
        with bad.engine.connect():
            pass
    assert "127.0.0.1" in str(excinfo.value)
    assert "'rtv'" in str(excinfo.value)
    assert secret not in str(excinfo.value)


def test_engine_refuses_a_superuser(target):
    with pytest.raises(UnsafeRuntimeRoleError, match="superuser"):
        Database(target.require_admin()).test_connection()


def test_engine_refuses_the_system_role(target):
    with pytest.raises(UnsafeRuntimeRoleError, match="BYPASSRLS"):
        Database(target.system_url).test_connection()


@pytest.fixture()
def throwaway_role(target, admin_conn):
    """A plain login role with the settings `rtv-db migrate` gives the runtime role in this database."""
    name = f"rtv_test_role_{uuid.uuid4().hex[:8]}"
    admin_conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    database = admin_conn.execute("SELECT current_database()").fetchone()[0]
    for key, value in runtime_role_settings().items():
        admin_conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
            sql.Identifier(name), sql.Identifier(database), sql.Identifier(key), sql.Literal(value)))
    yield name
    admin_conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    admin_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _url_as(target, role):
    return make_url(target.runtime_url).set(username=role).render_as_string(hide_password=False)


def test_engine_refuses_a_bypassrls_role(target, admin_conn, throwaway_role):
    admin_conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(throwaway_role)))
    with pytest.raises(UnsafeRuntimeRoleError, match="BYPASSRLS"):
        Database(_url_as(target, throwaway_role)).test_connection()


def test_engine_refuses_a_role_that_owns_a_table(target, admin_conn, throwaway_role):
    admin_conn.execute(sql.SQL("CREATE TABLE public.owned_by_app (x int)"))
    admin_conn.execute(sql.SQL("ALTER TABLE public.owned_by_app OWNER TO {}").format(sql.Identifier(throwaway_role)))
    with pytest.raises(UnsafeRuntimeRoleError, match="owns 1 table"):
        Database(_url_as(target, throwaway_role)).test_connection()


def test_engine_refuses_a_member_of_the_owner_role(target, admin_conn, throwaway_role):
    admin_conn.execute(sql.SQL("GRANT rtv_owner TO {}").format(sql.Identifier(throwaway_role)))
    with pytest.raises(UnsafeRuntimeRoleError, match="member of rtv_owner"):
        Database(_url_as(target, throwaway_role)).test_connection()


def test_plain_role_is_accepted(target, throwaway_role):
    assert Database(_url_as(target, throwaway_role)).test_connection().user == throwaway_role


def test_statement_timeout_is_set_on_runtime_connections(db):
    with db.engine.connect() as conn:
        assert conn.execute(text("show statement_timeout")).scalar() == "30s"
        assert conn.execute(text("show application_name")).scalar() == "rtv-db"


def test_libpq_url_round_trip(target):
    with psycopg.connect(to_libpq_url(target.runtime_url)) as conn:
        assert conn.execute("select current_user").fetchone()[0] == "rtv_app"


def test_module_level_helpers_use_database_url(target, monkeypatch):
    import rtv_db.connection as connection

    monkeypatch.setenv("DATABASE_URL", target.runtime_url)
    monkeypatch.setattr(connection, "_default", None)
    assert connection.test_connection().user == "rtv_app"
    assert connection.get_pool_stats().checked_in == 1
    connection.close_connection()
    assert connection.get_pool_stats().checked_in == 0
    connection.close_connection()
