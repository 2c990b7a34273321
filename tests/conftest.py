"""Test fixtures: one embedded server per run, one fresh migrated database per test.

The server is the embedded one in a temporary folder, stopped and deleted at the end of the run
(no server is left behind). ``RTV_DB_TEST_ADMIN_URL`` points the suite at another server
instead (a superuser URL; the suite creates and drops its own databases there).

Each test that asks for ``target`` gets its own database, cloned from a template migrated once
per run, so tests never see each other's rows. Isolation tests use ``db`` (the runtime role);
setup uses ``system`` (the system scope) or ``admin_conn``, never the code under test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from rtv_db import Database, EngineOptions, SystemScope, migrate, with_tenant_scope
from rtv_db.config import Settings, to_libpq_url, to_sqlalchemy_url
from rtv_db.schema import brand_kits, clients
from rtv_db.server import EmbeddedServer
from rtv_db.signing import generate_key
from rtv_db.targets import Target

TEMPLATE = "rtv_test_template"


@dataclass(frozen=True)
class Cluster:
    """A PostgreSQL server the tests may create databases on."""

    admin_url: str  # superuser, database "postgres"
    settings: Settings

    def url_for(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def target(self, database: str) -> Target:
        admin = self.url_for(database)
        return Target(admin, self.settings.derived_runtime_url(admin), self.settings.derived_system_url(admin), self.settings)

    def execute(self, statement: sql.Composable | str) -> None:
        with psycopg.connect(to_libpq_url(self.admin_url), autocommit=True) as conn:
            conn.execute(statement)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    # One tenant context signing key for the run: `migrate` installs it, every Database signs with it.
    key = generate_key()
    os.environ.setdefault("RTV_DB_CONTEXT_KEY", f"{key.key_id}:{key.hex}")
    settings = Settings(admin_url=None, runtime_url=None)
    external = os.environ.get("RTV_DB_TEST_ADMIN_URL")
    if external:
        yield Cluster(make_url(to_sqlalchemy_url(external)).set(database="postgres").render_as_string(hide_password=False), settings)
        return
    # Not under pytest's tmp_path: pytest deletes old numbered tmp folders when another pytest
    # process starts, which would pull the data directory from under a running server.
    data_dir = Path(tempfile.mkdtemp(prefix="rtv-db-test-server-"))
    server = EmbeddedServer(data_dir, database="postgres")
    server.start()
    try:
        yield Cluster(to_sqlalchemy_url(server.url("postgres")), Settings(data_dir=data_dir))
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _drop(cluster: Cluster, name: str) -> None:
    cluster.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template(cluster: Cluster) -> Iterator[str]:
    _drop(cluster, TEMPLATE)
    cluster.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    migrate(cluster.url_for(TEMPLATE), cluster.settings)
    yield TEMPLATE
    _drop(cluster, TEMPLATE)


@pytest.fixture()
def empty_target(cluster: Cluster) -> Iterator[Target]:
    """A new database with nothing in it (for migration tests)."""
    name = f"rtv_test_{uuid.uuid4().hex[:12]}"
    cluster.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield cluster.target(name)
    finally:
        _drop(cluster, name)


@contextmanager
def migrated_database(cluster: Cluster, template: str, prefix: str = "rtv_test") -> Iterator[Target]:
    """A new database cloned from the migrated template, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    cluster.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    try:
        t = cluster.target(name)
        migrate(t.require_admin(), cluster.settings)  # database-level grants are not copied from a template
        yield t
    finally:
        _drop(cluster, name)


@contextmanager
def database_at(cluster: Cluster, template: str, revision: str) -> Iterator[tuple[Target, Tenants]]:
    """A migrated database downgraded to ``revision`` (the code before a fix, for the attack tests'
    controls), with tenants A and B (a brand kit each), dropped afterwards."""
    from rtv_db.migrate import downgrade

    with migrated_database(cluster, template) as t:
        downgrade(t.require_admin(), cluster.settings, revision)
        a, b = uuid.uuid4(), uuid.uuid4()
        with psycopg.connect(to_libpq_url(t.require_admin()), autocommit=True) as admin:
            for tenant, name in ((a, "A"), (b, "B")):
                admin.execute("INSERT INTO clients (id, name, slug) VALUES (%s, %s, %s)",
                              (tenant, f"Client {name}", f"c-{tenant.hex[:8]}"))
                admin.execute("INSERT INTO brand_kits (client_id, name) VALUES (%s, %s)", (tenant, f"Brand {name}"))
        yield t, Tenants(a, b)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--citus-url", default=None,
        help="run the tests that use `target` against this Citus coordinator database (an admin URL),"
             " migrated in unsigned mode; meant for tests/test_isolation.py (make test-citus)")


@pytest.fixture(scope="session")
def citus_database(request: pytest.FixtureRequest) -> Iterator[Target | None]:
    """With --citus-url: that coordinator database, migrated (and distributed) once, unsigned."""
    url = request.config.getoption("--citus-url")
    if not url:
        yield None
        return
    settings = Settings.from_env()
    admin = to_sqlalchemy_url(url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RTV_DB_CONTEXT_MODE", "unsigned")  # the one mode rtv-db supports on Citus
        migrate(admin, settings)
    yield Target(admin, settings.derived_runtime_url(admin), settings.derived_system_url(admin), settings)


@pytest.fixture()
def target(request: pytest.FixtureRequest, citus_database: Target | None,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    """A fresh, migrated database of this test's own (with --citus-url: the shared Citus one,
    whose tests tell their rows apart by their random tenants)."""
    if citus_database is not None:
        monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")  # engines resolve it at first use
        yield citus_database
        return
    cluster: Cluster = request.getfixturevalue("cluster")
    template: str = request.getfixturevalue("template")
    with migrated_database(cluster, template) as t:
        yield t


@pytest.fixture()
def db(target: Target) -> Iterator[Database]:
    """The application's database handle: the runtime role, bound by RLS."""
    database = Database(target.runtime_url)
    yield database
    database.close()


@pytest.fixture()
def system(target: Target) -> Iterator[SystemScope]:
    """The cross-tenant system scope, for test setup."""
    scope = SystemScope(target.system_url, reason="test setup")  # type: ignore[arg-type]
    yield scope
    scope.close()


@pytest.fixture()
def admin_conn(target: Target) -> Iterator[psycopg.Connection]:
    """A superuser psycopg connection to the test database, for catalog checks and setup only."""
    with psycopg.connect(to_libpq_url(target.require_admin()), autocommit=True) as conn:
        yield conn


@dataclass(frozen=True)
class Tenants:
    a: uuid.UUID
    b: uuid.UUID


def make_tenants(system: SystemScope, *names: str) -> list[uuid.UUID]:
    """Create tenants (one brand kit each, named "Brand <name>") through the system scope."""
    ids = [uuid.uuid4() for _ in names]
    with system.transaction() as conn:
        conn.execute(clients.insert(), [
            {"id": tid, "name": f"Client {n}", "slug": f"client-{n.lower()}-{tid.hex[:8]}"} for tid, n in zip(ids, names)
        ])
        conn.execute(brand_kits.insert(), [
            {"client_id": tid, "name": f"Brand {n}", "tone": {"voice": "professional" if i == 0 else "casual", "personality": []},
             "colors": {"primary": "#ff0000"}, "logo_refs": []}
            for i, (tid, n) in enumerate(zip(ids, names))
        ])
    return ids


@pytest.fixture()
def tenants(system: SystemScope) -> Tenants:
    """The spec's setup: Client A and Client B, each with one brand kit."""
    a, b = make_tenants(system, "A", "B")
    return Tenants(a, b)


# -- shared by the attack tests --------------------------------------------------------------------


def one_backend(url: str, **options: Any) -> Database:
    """A pool of one connection: every transaction on it runs on one backend, as an attacker's
    and a victim's do in production."""
    return Database(url, options=EngineOptions(pool_size=1, max_overflow=0, **options))


def attack(db: Database, tenant: uuid.UUID, *statements: str) -> list[Any]:
    """SQL injected into one of ``tenant``'s requests: run inside its transaction, on its connection."""
    results = []
    with with_tenant_scope(db, tenant).scoped_transaction() as tx:
        for statement in statements:
            result = tx.connection.exec_driver_sql(statement)
            results.append(result.fetchall() if result.returns_rows else None)
    return results


@pytest.fixture(scope="session")
def bouncers(cluster: Cluster) -> Iterator[Any]:
    """PgBouncer instances in front of the test server (tests/pgbouncer.py), installed if missing."""
    from pgbouncer import Bouncers, PgBouncerUnavailable, backend_of, ensure_pgbouncer

    try:
        binary = ensure_pgbouncer()
    except PgBouncerUnavailable as exc:
        pytest.skip(f"PgBouncer unavailable: {exc}")
    running = Bouncers(binary, backend_of(cluster.admin_url))
    yield running
    running.stop_all()
