"""Issue 17: a new tenant table in one migration step, with every guarantee.

A ``posts`` table made with the helper is applied to a test database as the owner, as a revision
would be; then, as the runtime role: isolation, composite foreign keys, the audit trail, `rtv-db
verify` clean, and the ORM picking up a new TenantModel subclass with no registration code (in a
subprocess, so that the model does not join this process's metadata). The CLI writes the same
SQL into a revision file after the current head.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, ProgrammingError

from rtv_db import Database, brand_kits, with_tenant_scope
from rtv_db.audit import read_audit_trail
from rtv_db.cli import cli
from rtv_db.config import to_libpq_url, to_sqlalchemy_url
from rtv_db.errors import InvalidInputError
from rtv_db.migrate import head_revision
from rtv_db.migrations.tenant_table import Parent, drop_tenant_table_sql, tenant_table_sql
from rtv_db.targets import Target
from rtv_db.verify import verify

POSTS = dict(
    name="posts",
    columns=["title text NOT NULL", "body text NOT NULL DEFAULT ''"],
    parents=[Parent("brand_kits", "brand_kit_id")],
    unique=[("title",)],
)


def _as_owner(target: Target, sql: str) -> None:
    rendered = sql.replace("@owner@", '"rtv_owner"').replace("@runtime@", '"rtv_app"').replace("@system@", '"rtv_system"')
    with psycopg.connect(to_libpq_url(target.require_admin())) as conn:
        conn.execute('SET ROLE "rtv_owner"')
        conn.execute(rendered)


@pytest.fixture()
def posts(target: Target) -> Iterator[Target]:
    _as_owner(target, tenant_table_sql(**POSTS))  # type: ignore[arg-type]
    yield target


def _kit(db: Database, tenant: uuid.UUID) -> uuid.UUID:
    return with_tenant_scope(db, tenant).scoped_query(brand_kits)[0].id


def _insert_post(db: Database, tenant: uuid.UUID, kit: uuid.UUID, title: str, *, client_id: uuid.UUID | None = None) -> None:
    with with_tenant_scope(db, tenant).scoped_transaction() as tx:
        tx.connection.execute(
            text("INSERT INTO posts (client_id, brand_kit_id, title) VALUES (:c, :k, :t)"),
            {"c": client_id or tenant, "k": kit, "t": title},
        )


def _titles(db: Database, tenant: uuid.UUID) -> list[str]:
    with with_tenant_scope(db, tenant).scoped_transaction() as tx:
        return list(tx.connection.execute(text("SELECT title FROM posts ORDER BY title")).scalars())


def test_a_helper_table_isolates_like_the_core_tables(posts, db, tenants):
    kit_a, kit_b = _kit(db, tenants.a), _kit(db, tenants.b)
    _insert_post(db, tenants.a, kit_a, "hello from A")
    _insert_post(db, tenants.b, kit_b, "hello from B")
    assert _titles(db, tenants.a) == ["hello from A"]
    assert _titles(db, tenants.b) == ["hello from B"]
    with db.engine.connect() as conn:  # no context: nothing
        assert conn.execute(text("SELECT count(*) FROM posts")).scalar_one() == 0
    # another tenant's client_id: refused by the policy
    with pytest.raises(ProgrammingError, match="row-level security"):
        _insert_post(db, tenants.a, kit_a, "forged", client_id=tenants.b)
    # another tenant's brand kit: the composite foreign key, the same error as a missing one
    for kit in (kit_b, uuid.uuid4()):
        with pytest.raises(IntegrityError, match="posts_brand_kit_fkey"):
            _insert_post(db, tenants.a, kit, "cross")
    # a title B already uses is no oracle: unique per tenant
    _insert_post(db, tenants.a, kit_a, "hello from B")
    # TRUNCATE is not granted
    with pytest.raises(ProgrammingError, match="permission denied"):
        with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
            tx.connection.execute(text("TRUNCATE posts"))


def test_a_helper_table_is_audited_with_the_signed_labels(posts, db, tenants):
    from rtv_db import TenantContext

    _insert_post(db, tenants.a, _kit(db, tenants.a), "audited")  # a context of its own, no user id
    scope = with_tenant_scope(db, TenantContext(tenants.a, user_id="alice", correlation_id="c-17"))
    with scope.scoped_transaction() as tx:
        tx.connection.execute(text("UPDATE posts SET body = 'x' WHERE title = 'audited'"))
    events = read_audit_trail(scope, table="brand_kits").events  # the table-name check knows the models only
    assert all(e.table_name == "brand_kits" for e in events)
    with scope.scoped_transaction() as tx:
        rows = tx.connection.execute(text(
            "SELECT action, changed_columns, user_id, correlation_id FROM audit_events "
            "WHERE table_name = 'posts' ORDER BY occurred_at")).all()
    assert [r[0] for r in rows] == ["INSERT", "UPDATE"]
    assert rows[1][1:] == (["body"], "alice", "c-17")


def test_verify_is_clean_with_a_helper_table(posts):
    findings = verify(posts.require_admin())
    assert findings == [], [f"{f.code} {f.object}: {f.message}" for f in findings]


def test_verify_sees_a_hand_made_table_that_skipped_a_rule(target):
    sql = tenant_table_sql(**POSTS).replace("ALTER TABLE posts FORCE ROW LEVEL SECURITY;\n", "")  # type: ignore[arg-type]
    _as_owner(target, sql)
    assert "RLS_NOT_FORCED" in {f.code for f in verify(target.require_admin())}


def test_drop_removes_the_table_and_its_rules(posts, admin_conn):
    _as_owner(posts, drop_tenant_table_sql("posts"))
    assert admin_conn.execute("SELECT to_regclass('public.posts')").fetchone()[0] is None
    assert admin_conn.execute("SELECT count(*) FROM pg_policy WHERE polname = 'tenant_isolation' "
                              "AND polrelid::regclass::text = 'posts'").fetchone()[0] == 0


_ORM_SCRIPT = textwrap.dedent('''
    import json, sys, uuid
    from datetime import datetime
    from sqlalchemy import ForeignKeyConstraint, Index, PrimaryKeyConstraint, Text, UniqueConstraint, select, text
    from sqlalchemy.orm import Mapped, mapped_column
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine
    from rtv_db import Database, TenantContext, tenant_session
    from rtv_db.schema.models import TenantModel, _created, _updated, metadata

    class Post(TenantModel):          # the pattern of docs/tenant-tables.md: no registration code
        __tablename__ = "posts"
        __table_args__ = (
            PrimaryKeyConstraint("client_id", "id", name="posts_pkey"),
            UniqueConstraint("client_id", "title", name="posts_client_id_title_key"),
            ForeignKeyConstraint(["client_id", "brand_kit_id"], ["brand_kits.client_id", "brand_kits.id"],
                                 name="posts_brand_kit_fkey", ondelete="CASCADE"),
            Index("posts_client_id_brand_kit_id_idx", "client_id", "brand_kit_id"),
        )
        title: Mapped[str] = mapped_column(Text)
        body: Mapped[str] = mapped_column(Text, server_default=text("''"))
        brand_kit_id: Mapped[uuid.UUID]
        created_at: Mapped[datetime] = _created()
        updated_at: Mapped[datetime] = _updated()

    runtime_url, admin_url, a, b, kit_a = sys.argv[1:6]
    db = Database(runtime_url)
    with tenant_session(db, TenantContext(a)) as session:
        session.add(Post(title="orm post", brand_kit_id=uuid.UUID(kit_a)))
        session.commit()
        mine = session.scalars(select(Post.title).order_by(Post.title)).all()
    with tenant_session(db, TenantContext(b)) as session:
        theirs = session.scalars(select(Post.title)).all()
    engine = create_engine(admin_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    skip = ("alembic_version",)
    diff = [str(d) for d in diff if not any(s in str(d) for s in skip)]
    print(json.dumps({"mine": mine, "theirs": theirs, "diff": diff}))
''')


def test_the_orm_picks_up_a_new_tenant_model_and_autogenerate_finds_no_drift(posts, db, tenants, tmp_path):
    script = tmp_path / "orm_posts.py"
    script.write_text(_ORM_SCRIPT)
    _insert_post(db, tenants.b, _kit(db, tenants.b), "B's post")
    out = subprocess.run(
        [sys.executable, str(script), posts.runtime_url, posts.require_admin(), str(tenants.a), str(tenants.b),
         str(_kit(db, tenants.a))],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mine"] == ["orm post"]  # A's session: A's post only, client_id stamped
    assert result["theirs"] == ["B's post"]  # B's: B's only
    assert result["diff"] == [], result["diff"]


def test_the_cli_writes_a_revision_after_the_head(tmp_path):
    versions = tmp_path / "versions"
    versions.mkdir()
    for path in (Path(__file__).parents[1] / "src" / "rtv_db" / "migrations" / "versions").glob("0*.py"):
        (versions / path.name).write_text("")  # the real revisions' names: the new one goes after them
    result = CliRunner().invoke(cli, [
        "revision", "--tenant-table", "posts", "--column", "title text NOT NULL",
        "--column", "body text NOT NULL DEFAULT ''", "--parent", "brand_kits:brand_kit_id",
        "--unique", "title", "--dir", str(versions)])
    assert result.exit_code == 0, result.output
    (written,) = [p for p in versions.glob("*_posts.py")]
    spec = importlib.util.spec_from_file_location("posts_revision", written)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.down_revision == head_revision() and int(module.revision) == int(head_revision()) + 1
    source = written.read_text()
    for line in tenant_table_sql(**POSTS).splitlines():  # type: ignore[arg-type]
        assert line.strip() in source  # every statement spelled out for the reviewer
    again = CliRunner().invoke(cli, ["revision", "--tenant-table", "posts", "--dir", str(versions)])
    assert again.exit_code != 0 and "adds posts already" in again.output


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="Posts", columns=[]), "lower-case identifier"),
    (dict(name="posts", columns=["id uuid"]), "already"),
    (dict(name="posts", columns=["title text; DROP TABLE clients"]), "one column"),
    (dict(name="clients", columns=[]), "rtv-db's own"),
    (dict(name="posts", columns=["title text"], unique=[("nope",)]), "does not have"),
    (dict(name="posts", columns=["title text"], parents=[Parent("brand_kits", "kit_id", on_delete="SET NULL")]), "on_delete"),
])
def test_bad_definitions_are_refused(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        tenant_table_sql(**kwargs)


def test_a_helper_table_keeps_no_statistics_on_tenant_content(posts, admin_conn):
    rows = dict(admin_conn.execute(
        "SELECT attname, attstattarget FROM pg_attribute WHERE attrelid = 'posts'::regclass AND attnum > 0 "
        "AND NOT attisdropped").fetchall())
    assert {c for c, target in rows.items() if target == 0} == set(rows), rows  # client_id and id too (0009)


# -- Citus: the same revision on a database that is distributed already -----------------------------

CITUS_URL = os.environ.get("CITUS_URL")


@pytest.fixture()
def fresh_citus_database() -> Iterator[str]:
    """A new database on every node of the cluster of CITUS_URL, set up as cluster.sh does."""
    if not CITUS_URL:
        pytest.skip("no Citus coordinator: set CITUS_URL (an admin URL) to run")
    base = make_url(to_sqlalchemy_url(CITUS_URL))
    with psycopg.connect(to_libpq_url(CITUS_URL), autocommit=True) as coordinator:
        workers = coordinator.execute(
            "SELECT nodename, nodeport FROM pg_dist_node WHERE groupid <> 0 ORDER BY nodeid").fetchall()
    name = f"rtv_tt_{uuid.uuid4().hex[:8]}"
    nodes = [(base.host, base.port), *workers]

    def on(host: str, port: int, database: str) -> psycopg.Connection:
        return psycopg.connect(host=host, port=port, user=base.username, dbname=database, autocommit=True)

    for host, port in nodes:
        with on(host, port, "postgres") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        with on(host, port, name) as conn:
            conn.execute("CREATE EXTENSION citus")
            conn.execute("CREATE EXTENSION vector")
    with on(base.host, base.port, name) as conn:
        conn.execute("SELECT citus_set_coordinator_host(%s, %s)", (base.host, base.port))
        for host, port in workers:
            conn.execute("SELECT citus_add_node(%s, %s)", (host, port))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        for host, port in reversed(nodes):
            with on(host, port, "postgres") as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.citus
def test_a_helper_revision_applies_to_a_distributed_citus_database(fresh_citus_database, tmp_path, monkeypatch):
    import importlib
    import shutil

    from rtv_db import SystemScope, migrate
    from rtv_db.config import Settings

    from conftest import make_tenants

    migrate_module = importlib.import_module("rtv_db.migrate")  # (rtv_db.migrate is also the function)
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")  # the one mode rtv-db supports on Citus
    settings = Settings.from_env()
    admin = fresh_citus_database
    migrate(admin, settings)  # head, distributed
    migrations = tmp_path / "migrations"
    shutil.copytree(migrate_module._MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    result = CliRunner().invoke(cli, [
        "revision", "--tenant-table", "posts", "--column", "title text NOT NULL",
        "--parent", "brand_kits:brand_kit_id", "--unique", "title", "--dir", str(migrations / "versions")])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(migrate_module, "_MIGRATIONS", migrations)
    upgraded = migrate(admin, settings)
    assert int(upgraded.after) == int(upgraded.before) + 1
    assert any("posts" in action for action in upgraded.citus_actions), upgraded.citus_actions
    with psycopg.connect(to_libpq_url(admin)) as conn:
        colocated = conn.execute(
            "SELECT p.colocationid = b.colocationid FROM pg_dist_partition p, pg_dist_partition b "
            "WHERE p.logicalrelid = 'posts'::regclass AND b.logicalrelid = 'brand_kits'::regclass").fetchone()
    assert colocated == (True,)  # distributed, co-located with its parent

    target_runtime = settings.derived_runtime_url(to_sqlalchemy_url(admin))
    system = SystemScope(settings.derived_system_url(to_sqlalchemy_url(admin)), reason="citus tenant table test")
    db = Database(target_runtime)
    try:
        a, b = make_tenants(system, "A", "B")
        kit_a, kit_b = _kit(db, a), _kit(db, b)
        _insert_post(db, a, kit_a, "distributed post")
        assert _titles(db, a) == ["distributed post"] and _titles(db, b) == []
        with pytest.raises(IntegrityError):
            _insert_post(db, a, kit_b, "cross")  # B's brand kit: the composite key, on the shards
        with system.transaction() as conn:  # the audit trigger fires on the shard, with the logical name
            assert conn.execute(text("SELECT count(*) FROM audit_events WHERE table_name = 'posts' AND client_id = :a"),
                                {"a": a}).scalar_one() == 1
        assert migrate(admin, settings).after == upgraded.after  # and again: nothing to do
    finally:
        db.close()
        system.close()
