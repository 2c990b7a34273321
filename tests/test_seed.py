"""The demo seed: every tenant table has rows for every tenant, re-running changes nothing, and
the runtime role sees only its own tenant's seeded rows."""

from __future__ import annotations

import math
from collections import Counter

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from rtv_db import with_tenant_scope
from rtv_db.cli import cli
from rtv_db.seed import DEMO_TENANTS, seed_demo
from rtv_db.seed.demo_data import DATASET, demo_embedding, demo_rows
from rtv_db.verify import VerifyConfig, tenant_tables


def _tenant_tables(admin_conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(table, tenant column) for every tenant table the catalog knows (future ones included)."""
    out = []
    for t in tenant_tables(admin_conn, VerifyConfig()):
        out.append((t.relname, "id" if t.is_root else "client_id"))
    return out


def _snapshot(admin_conn: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """Row count and a checksum of every row's full text, per tenant table."""
    snap = {}
    for table, _ in _tenant_tables(admin_conn):
        count, digest = admin_conn.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
        ).fetchone()
        snap[table] = (count, digest)
    return snap


def test_every_tenant_table_has_rows_for_every_tenant(target, admin_conn):
    result = seed_demo(target.system_url)
    ids = {t.id for t in result.tenants}
    assert len(ids) >= 3
    assert set(DEMO_TENANTS.values()) == ids
    tables = _tenant_tables(admin_conn)
    assert {"clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks",
            "platform_actions"} <= {t for t, _ in tables}
    for table, column in tables:
        per_tenant = dict(admin_conn.execute(f"SELECT {column}, count(*) FROM {table} GROUP BY 1").fetchall())
        missing = [tid for tid in ids if per_tenant.get(tid, 0) == 0]
        assert not missing, f"{table} has no rows for {missing}"


def test_seed_is_realistic(target, admin_conn):
    seed_demo(target.system_url)
    platforms = {r[0] for r in admin_conn.execute("SELECT DISTINCT platform FROM platform_accounts")}
    assert len(platforms) >= 4
    assert admin_conn.execute("SELECT count(*) FROM platform_accounts WHERE cardinality(lanes) = 2").fetchone()[0] > 0
    assert {r[0] for r in admin_conn.execute("SELECT DISTINCT lane FROM platform_actions")} == {"api", "browser"}
    for tone, colors, logos in admin_conn.execute("SELECT tone, colors, logo_refs FROM brand_kits"):
        assert set(tone) == {"voice", "personality"} and tone["personality"] and colors and logos
    assert admin_conn.execute("SELECT count(*) FROM knowledge_chunks WHERE embedding IS NULL").fetchone()[0] == 0
    assert admin_conn.execute("SELECT vector_dims(embedding) FROM knowledge_chunks LIMIT 1").fetchone()[0] == 384


def test_running_twice_changes_nothing(target, admin_conn):
    first = seed_demo(target.system_url)
    assert first.changed and first.inserted == first.planned
    before = _snapshot(admin_conn)
    second = seed_demo(target.system_url)
    assert not second.changed and second.total_inserted == 0
    assert _snapshot(admin_conn) == before


def test_seed_leaves_other_tenants_alone(target, admin_conn, tenants):
    before = admin_conn.execute("SELECT count(*) FROM brand_kits WHERE client_id = ANY(%s)",
                                ([tenants.a, tenants.b],)).fetchone()[0]
    seed_demo(target.system_url)
    after = admin_conn.execute("SELECT count(*) FROM brand_kits WHERE client_id = ANY(%s)",
                               ([tenants.a, tenants.b],)).fetchone()[0]
    assert before == after == 2


def test_runtime_role_sees_only_its_seeded_rows(target, db):
    seed_demo(target.system_url)
    rows = demo_rows()
    for tenant in DATASET:
        expected = {table: sum(1 for r in table_rows if r.get("client_id", r.get("id")) == tenant.id)
                    for table, table_rows in rows.items()}
        with with_tenant_scope(db, tenant.id).scoped_transaction() as tx:
            for table in ("clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks"):
                column = "id" if table == "clients" else "client_id"
                seen = Counter(tx.connection.execute(text(f"SELECT {column} FROM {table}")).scalars())
                assert seen == Counter({tenant.id: expected[table]}), (tenant.slug, table)
        # platform_actions: visible per account and lane of the context.
        total = 0
        for account in tenant.accounts:
            for lane in account.lanes:
                scope = with_tenant_scope(db, tenant.id, platform_account_id=tenant.account_id(account), lane=lane)
                with scope.scoped_transaction() as tx:
                    seen_rows = tx.connection.execute(
                        text("SELECT client_id, platform_account_id, lane FROM platform_actions")).all()
                assert seen_rows and {tuple(r) for r in seen_rows} == {(tenant.id, tenant.account_id(account), lane)}
                total += len(seen_rows)
        assert total == expected["platform_actions"]
    with db.engine.begin() as conn:  # no tenant: nothing
        assert conn.execute(text("SELECT count(*) FROM knowledge_chunks")).scalar() == 0


def test_embeddings_are_deterministic_unit_vectors():
    a = demo_embedding("dark roast espresso with cocoa notes")
    assert a == demo_embedding("dark roast espresso with cocoa notes")
    assert len(a) == 384 and math.isclose(sum(v * v for v in a), 1.0, rel_tol=1e-9)
    related = demo_embedding("an espresso, dark roast")
    unrelated = demo_embedding("membership can be paused for three months")

    def cos(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y))

    assert cos(a, related) > cos(a, unrelated)
    assert math.isclose(sum(v * v for v in demo_embedding("")), 1.0)


# -- the command line -----------------------------------------------------------------------------


def test_cli_seed_demo(target, admin_conn):
    runner = CliRunner()
    first = runner.invoke(cli, ["seed", "--database-url", target.require_admin()])
    assert first.exit_code == 0, first.output
    assert admin_conn.execute("SELECT count(*) FROM clients").fetchone()[0] == len(DATASET)
    second = runner.invoke(cli, ["seed", "--database-url", target.require_admin()])
    assert second.exit_code == 0 and "nothing new" in second.output


def test_cli_seed_synthetic_calls_the_bulk_loader(target, monkeypatch):
    calls = []

    def fake_loader(system_url, tenants, rows, *, progress=True, **kwargs):
        calls.append((system_url, tenants, rows, progress))
        return "ok"

    monkeypatch.setattr("rtv_db.cli._load_synthetic", lambda: fake_loader)
    result = CliRunner().invoke(cli, ["seed", "--tenants", "7", "--rows", "11", "--database-url", target.require_admin()])
    assert result.exit_code == 0, result.output
    assert calls == [(target.system_url, 7, 11, True)]


@pytest.mark.parametrize("args", [["--tenants", "3"], ["--rows", "3"], ["--tenants", "0", "--rows", "1"]])
def test_cli_seed_rejects_half_options(target, args):
    result = CliRunner().invoke(cli, ["seed", *args, "--database-url", target.require_admin()])
    assert result.exit_code == 2


def test_cli_seed_needs_a_migrated_database(empty_target):
    result = CliRunner().invoke(cli, ["seed", "--database-url", empty_target.require_admin()])
    assert result.exit_code == 1 and "not migrated" in result.output
