"""Issue 24, items 1, 10, 11 and 12: what tenant A's injected SQL could still learn or erase (revision 0009).

Every attack runs as the runtime role inside tenant A's own transaction (the scoped API's
connection), first against the schema before revision 0009 (``rtv-db downgrade`` to 0008, or a
planted index), where it works, then against the head, where it is blocked:

* item 1: listing every tenant's slug by bisection, from ``Rows Removed by Filter`` of an index
  scan of the global slug index (``EXPLAIN ANALYZE``); the same oracle on any index of a tenant
  table not led by ``client_id`` (a planted ``brand_kits(created_at)``), which verify reports;
* item 12: listing every tenant's id by bisection, from plain ``EXPLAIN`` row estimates of
  ``client_id < X``;
* item 10: audit events stripped of their labels by ``rtv.release_signed_context()`` called
  inside the writing statement;
* item 11: a second column smuggled through ``rtv-db revision --tenant-table --column``.

The statement counts of each bisection are printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from rtv_db import Database, SystemScope, TenantContext, brand_kits, downgrade, migrate, with_tenant_scope
from rtv_db.cli import cli
from rtv_db.errors import DuplicateError, InvalidInputError
from rtv_db.migrations.tenant_table import parse_column, tenant_table_sql
from rtv_db.schema import clients, knowledge_bases, knowledge_chunks
from rtv_db.targets import Target
from rtv_db.verify import CHECKS, check_index_tenant_led, check_tenant_statistics, verify

from conftest import make_tenants

# -- helpers --------------------------------------------------------------------------------------


@dataclass
class Probe:
    """SQL injected into one of A's requests: every statement runs in A's transaction, counted."""

    connection: Any
    statements: int = 0
    plans: list[Any] = field(default_factory=list)

    def explain(self, sql: str, *, analyze: bool) -> dict[str, Any]:
        self.statements += 1
        options = "ANALYZE, TIMING OFF, SUMMARY OFF, BUFFERS OFF, FORMAT JSON" if analyze else "FORMAT JSON"
        raw = self.connection.exec_driver_sql(f"EXPLAIN ({options}) {sql}").scalar_one()
        plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
        self.plans.append(plan)
        return plan


def _probing(db: Database, tenant: uuid.UUID, attack: Callable[[Probe], Any]) -> tuple[Any, Probe]:
    """Run ``attack`` inside one transaction of ``tenant`` (runtime role, signed context)."""
    with with_tenant_scope(db, tenant).scoped_transaction() as tx:
        # Planner switches are settable by any role: the attacker forces index scans.
        tx.connection.exec_driver_sql("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;"
                                      " SET LOCAL enable_sort = off")
        probe = Probe(tx.connection)
        return attack(probe), probe


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- item 1: slugs through EXPLAIN ANALYZE ---------------------------------------------------------

ALPHABET = "-0123456789abcdefghijklmnopqrstuvwxyz"  # a slug's characters, in byte order (C collation)


def _scanned_slugs(probe: Probe, condition: str) -> int:
    """How many clients rows the slug index returned for ``condition``: the rows A sees plus the
    rows the policy removed, when the index condition is the slug condition. Any other plan
    tells A about its own row only."""
    plan = probe.explain(f"SELECT * FROM clients WHERE {condition} ORDER BY slug", analyze=True)
    count = 0
    for node in _nodes(plan):
        if node.get("Relation Name") != "clients":
            continue
        count += round(node.get("Actual Rows", 0))
        if "slug" in node.get("Index Cond", ""):
            count += round(node.get("Rows Removed by Filter", 0))
    return count


def _bisect_slugs(probe: Probe) -> list[str]:
    """Every slug the oracle shows, halving the alphabet per character."""
    found: list[str] = []

    def between(prefix: str, i: int, j: int) -> int:  # slugs starting with prefix + one of ALPHABET[i:j]
        upper = prefix + ALPHABET[j] if j < len(ALPHABET) else prefix + "~"
        return _scanned_slugs(probe, f"slug >= {_literal(prefix + ALPHABET[i])} AND slug < {_literal(upper)}")

    def walk(prefix: str, i: int, j: int, n: int) -> None:
        if n <= 0:
            return
        if j - i == 1:
            explore(prefix + ALPHABET[i], n)
            return
        middle = (i + j) // 2
        left = between(prefix, i, middle)
        walk(prefix, i, middle, left)
        walk(prefix, middle, j, n - left)

    def explore(prefix: str, n: int) -> None:  # n slugs start with prefix
        whole = min(1, _scanned_slugs(probe, f"slug = {_literal(prefix)}"))
        if whole:
            found.append(prefix)
        if len(prefix) < 63:
            walk(prefix, 0, len(ALPHABET), n - whole)

    walk("", 0, len(ALPHABET), between("", 0, len(ALPHABET)))
    return found


@pytest.fixture()
def c_collation(admin_conn: psycopg.Connection) -> None:
    collation = admin_conn.execute("SELECT datcollate FROM pg_database WHERE datname = current_database()").fetchone()[0]
    if collation not in ("C", "C.UTF-8", "C.utf8", "POSIX"):
        pytest.skip(f"the bisection assumes byte order (database collation {collation})")


def _slug_tenants(system: SystemScope) -> dict[uuid.UUID, str]:
    """25 tenants: 23 with guessable slugs, two random (unguessable) ones."""
    slugs = [f"t-{w}" for w in ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell",
                                "cyberdyne", "soylent", "oceanic", "aperture", "monarch", "vandelay", "dunder",
                                "gringotts", "nakatomi", "pied-piper", "massive", "prestige", "sterling", "krusty")]
    slugs += [secrets.token_hex(6), "r" + secrets.token_hex(5)]
    tenants = {uuid.uuid4(): slug for slug in slugs}
    with system.transaction() as conn:
        conn.execute(clients.insert(), [{"id": t, "name": f"Client {s}", "slug": s} for t, s in tenants.items()])
    return tenants


def test_slugs_listed_by_bisection_before_0009_and_not_now(target, db, system, admin_conn, c_collation):
    downgrade(target.require_admin(), target.settings, revision="0008")
    try:
        tenants = _slug_tenants(system)
        a = next(iter(tenants))
        found, probe = _probing(db, a, _bisect_slugs)
        print(f"\nbefore 0009: {len(found)} slugs of {len(tenants)} in {probe.statements} statements")
        assert sorted(found) == sorted(tenants.values())  # every other tenant's slug, the random ones too
        assert probe.statements < 2000
    finally:
        migrate(target.require_admin(), target.settings)

    found, probe = _probing(db, a, _bisect_slugs)
    print(f"after 0009: {found} in {probe.statements} statements")
    assert found == [tenants[a]]  # its own slug, which it may read anyway
    assert probe.statements < 100
    for plan in probe.plans:  # no probe scanned an index by slug
        assert not any("slug" in node.get("Index Cond", "") for node in _nodes(plan)), plan
    # Nor can A write the index's expression: the function's schema is not A's to name.
    with pytest.raises(DBAPIError, match="permission denied for schema rtv_secret"):
        _probing(db, a, lambda p: p.explain("SELECT * FROM clients WHERE rtv_secret.slug_key(slug) > 'm'", analyze=True))


def test_a_tenant_reads_and_renames_itself_and_slugs_stay_unique(target, db, system, tenants):
    scope = with_tenant_scope(db, tenants.a)
    (row,) = scope.scoped_query(clients)
    assert row.slug.startswith("client-a-")
    # Updates too large for HOT add entries to the slug index: its expression is evaluated as A
    # (EXECUTE on rtv_secret.slug_key, no USAGE on its schema).
    with scope.scoped_transaction() as tx:
        for i in range(30):
            updated = tx.scoped_update(clients, {"name": f"Client A {i}", "settings": {"pad": "x" * 1500}},
                                       all_rows=True)
        updates, hot = tx.connection.execute(text(
            "SELECT pg_stat_get_xact_tuples_updated('clients'::regclass),"
            " pg_stat_get_xact_tuples_hot_updated('clients'::regclass)")).one()
    assert updated[0].slug == row.slug and updates == 30 and hot < updates, (updates, hot)
    # The system scope creates tenants: a taken slug is reported by the same constraint name.
    with pytest.raises(DuplicateError, match="clients_slug_key") as caught, system.transaction() as conn:
        conn.execute(clients.insert().values(name="Copy", slug=row.slug))
    assert caught.value.table == "clients" and caught.value.columns == ("slug",)


# -- item 1, the class: any index of a tenant table not led by client_id ---------------------------

def _window_counts(probe: Probe, windows: list[tuple[str, str]]) -> list[int]:
    counts = []
    for start, end in windows:
        plan = probe.explain(f"SELECT * FROM brand_kits WHERE created_at >= {_literal(start)}::timestamptz"
                             f" AND created_at < {_literal(end)}::timestamptz ORDER BY created_at", analyze=True)
        counts.append(sum(round(n.get("Rows Removed by Filter", 0)) for n in _nodes(plan)
                          if n.get("Relation Name") == "brand_kits" and "created_at" in n.get("Index Cond", "")))
    return counts


def test_an_index_not_led_by_client_id_counts_other_tenants_rows_and_verify_reports_it(
        target, db, system, admin_conn, tenants):
    # B writes 5 kits on Monday, 3 on Tuesday (as the admin sets their times).
    with system.transaction() as conn:
        conn.execute(brand_kits.insert(), [{"client_id": tenants.b, "name": f"B kit {i}"} for i in range(8)])
    admin_conn.execute("UPDATE brand_kits SET created_at = CASE WHEN name < 'B kit 5' THEN timestamptz '2026-01-05 10:00Z'"
                       " ELSE timestamptz '2026-01-06 10:00Z' END WHERE client_id = %s AND name LIKE 'B kit %%'", (tenants.b,))
    windows = [("2026-01-05", "2026-01-06"), ("2026-01-06", "2026-01-07"), ("2026-01-07", "2026-01-08")]

    admin_conn.execute("CREATE INDEX brand_kits_created_at_idx ON brand_kits (created_at)")  # the planted index
    counts, _ = _probing(db, tenants.a, lambda p: _window_counts(p, windows))
    assert counts == [5, 3, 0]  # B's activity per day, seen from A
    found = {(f.code, f.object) for f in verify(target.require_admin())}
    assert found == {("INDEX_NOT_TENANT_LED", "brand_kits: index brand_kits_created_at_idx")}
    assert ("INDEX_NOT_TENANT_LED", "brand_kits: index brand_kits_created_at_idx") in {
        (f.code, f.object) for f in verify(target.runtime_url)}

    # Led by client_id, the same index is safe: the policy's equality is an index condition too.
    admin_conn.execute("DROP INDEX brand_kits_created_at_idx;"
                       "CREATE INDEX brand_kits_client_id_created_at_idx ON brand_kits (client_id, created_at);"
                       "ALTER TABLE brand_kits ALTER COLUMN created_at SET STATISTICS 0")
    (counts, probe) = _probing(db, tenants.a, lambda p: _window_counts(p, windows))
    conds = [n.get("Index Cond", "") for plan in probe.plans for n in _nodes(plan) if n.get("Relation Name") == "brand_kits"]
    assert counts == [0, 0, 0] and all("client_id = (InitPlan" in c for c in conds), conds
    assert verify(target.require_admin()) == []


def test_the_real_schema_has_no_index_and_no_statistics_a_tenant_reaches(target):
    for url in (target.require_admin(), target.runtime_url):
        assert verify(url, checks=[check_index_tenant_led, check_tenant_statistics]) == []
    assert check_index_tenant_led in CHECKS and check_tenant_statistics in CHECKS


PLANTED = {
    # an expression index is safe only if the runtime role cannot write the expression...
    "an SQL identity function in a schema the runtime role cannot use (inlined: no cover)": (
        "CREATE SCHEMA hidden AUTHORIZATION rtv_owner;"
        "CREATE FUNCTION hidden.ident(s text) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT s';"
        "GRANT EXECUTE ON FUNCTION hidden.ident(text) TO rtv_app, rtv_system;"
        "CREATE INDEX clients_ident_idx ON clients (hidden.ident(slug));"
        "ALTER INDEX clients_ident_idx ALTER COLUMN 1 SET STATISTICS 0",
        {("INDEX_NOT_TENANT_LED", "clients: index clients_ident_idx")}),
    "a PL/pgSQL identity function there (the slug index's form)": (
        "CREATE SCHEMA hidden AUTHORIZATION rtv_owner;"
        "CREATE FUNCTION hidden.ident(s text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS 'BEGIN RETURN s; END';"
        "GRANT EXECUTE ON FUNCTION hidden.ident(text) TO rtv_app, rtv_system;"
        "CREATE INDEX clients_ident_idx ON clients (hidden.ident(slug));"
        "ALTER INDEX clients_ident_idx ALTER COLUMN 1 SET STATISTICS 0",
        set()),
    "the same function in a schema the runtime role can use": (
        "CREATE FUNCTION public.ident(s text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS 'BEGIN RETURN s; END';"
        "CREATE INDEX clients_ident_idx ON clients (public.ident(slug));"
        "ALTER INDEX clients_ident_idx ALTER COLUMN 1 SET STATISTICS 0",
        {("INDEX_NOT_TENANT_LED", "clients: index clients_ident_idx")}),
    "a hidden expression first, a plain column second (a skip scan uses the second)": (
        "CREATE SCHEMA hidden AUTHORIZATION rtv_owner;"
        "CREATE FUNCTION hidden.ident(s text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS 'BEGIN RETURN s; END';"
        "CREATE INDEX clients_ident_idx ON clients (hidden.ident(slug), name);"
        "ALTER INDEX clients_ident_idx ALTER COLUMN 1 SET STATISTICS 0",
        {("INDEX_NOT_TENANT_LED", "clients: index clients_ident_idx")}),
    "an index led by id on clients": ("CREATE INDEX clients_id_name_idx ON clients (id, name)", set()),
    "an index led by client_id, partial": (
        "CREATE INDEX brand_kits_recent_idx ON brand_kits (client_id, name) WHERE name > 'm'", set()),
    "an index on a table the runtime role cannot read": (
        "CREATE TABLE private_notes (client_id uuid, body text); ALTER TABLE private_notes ENABLE ROW LEVEL SECURITY;"
        "ALTER TABLE private_notes FORCE ROW LEVEL SECURITY; CREATE INDEX ON private_notes (body);"
        "CREATE POLICY tenant_isolation ON private_notes USING (client_id = (SELECT rtv.current_tenant_id()))",
        set()),
    # statistics (item 12)
    "client_id collecting statistics again": (
        "ALTER TABLE brand_kits ALTER COLUMN client_id SET STATISTICS -1",
        {("TENANT_COLUMN_STATISTICS", "brand_kits")}),
    "statistics collected, then the target put back to 0 (only the admin sees them)": (
        "ALTER TABLE knowledge_bases ALTER COLUMN client_id SET STATISTICS -1;"
        "INSERT INTO clients (id, name, slug) VALUES ('00000000-0000-4000-8000-000000000001', 'x', 'x-stat');"
        "INSERT INTO knowledge_bases (client_id, name) VALUES ('00000000-0000-4000-8000-000000000001', 'kb');"
        "ANALYZE knowledge_bases; ALTER TABLE knowledge_bases ALTER COLUMN client_id SET STATISTICS 0",
        {("TENANT_COLUMN_STATISTICS", "knowledge_bases")}),
    "an expression of a client_id-led index collecting statistics": (
        "CREATE INDEX brand_kits_lower_name_idx ON brand_kits (client_id, lower(name))",
        {("TENANT_COLUMN_STATISTICS", "brand_kits")}),
    "extended statistics": ("CREATE STATISTICS brand_kits_pair ON client_id, name FROM brand_kits",
                            {("TENANT_COLUMN_STATISTICS", "brand_kits")}),
}


@pytest.mark.parametrize("case", list(PLANTED), ids=list(PLANTED))
def test_planted_index_or_statistics_is_found(target, admin_conn, case):
    statement, expected = PLANTED[case]
    admin_conn.execute(statement)
    findings = verify(target.require_admin(), checks=[check_index_tenant_led, check_tenant_statistics])
    assert {(f.code, f.object) for f in findings} == expected, [f"{f.code} {f.object}: {f.message}" for f in findings]
    for f in findings:
        assert f.message and len(f.why) > 40 and f.fix, f


def test_the_inlined_sql_function_index_is_an_oracle_the_plpgsql_one_is_not(target, db, admin_conn, tenants):
    # Why verify treats the two differently: the planner inlines the SQL function into the index
    # expression it matches, so `slug > ...` scans that index; the PL/pgSQL one it cannot match.
    admin_conn.execute(PLANTED["an SQL identity function in a schema the runtime role cannot use (inlined: no cover)"][0])
    counts, _ = _probing(db, tenants.a, lambda p: _scanned_slugs(p, "slug > ''"))
    assert counts == 2  # A's and B's
    admin_conn.execute("DROP INDEX clients_ident_idx; CREATE OR REPLACE FUNCTION hidden.ident(s text) RETURNS text"
                       " LANGUAGE plpgsql IMMUTABLE AS 'BEGIN RETURN s; END';"
                       " CREATE INDEX clients_ident_idx ON clients (hidden.ident(slug))")
    counts, _ = _probing(db, tenants.a, lambda p: _scanned_slugs(p, "slug > ''"))
    assert counts == 1  # its own row only


def test_collected_statistics_are_seen_by_the_admin_only(target, admin_conn):
    admin_conn.execute(PLANTED["statistics collected, then the target put back to 0 (only the admin sees them)"][0])
    checks = [check_index_tenant_led, check_tenant_statistics]
    (finding,) = verify(target.require_admin(), checks=checks)
    assert "still in pg_statistic" in finding.message
    assert verify(target.runtime_url, checks=checks) == []  # it cannot read pg_statistic


# -- item 12: tenant ids from planner estimates ----------------------------------------------------

_TOP = 2**128 - 1  # ffffffff-...: no tenant's id


def _estimate(probe: Probe, bound: int) -> float:
    plan = probe.explain(f"SELECT * FROM brand_kits WHERE client_id < '{uuid.UUID(int=bound)}'", analyze=False)
    return float(plan["Plan Rows"])


def _bisect_ids(probe: Probe) -> list[uuid.UUID]:
    """Every uuid where the estimate of ``client_id < X`` steps up."""
    found: list[uuid.UUID] = []

    def walk(lo: int, hi: int, at_lo: float, at_hi: float) -> None:
        if at_hi == at_lo:
            return
        if hi - lo == 1:
            found.append(uuid.UUID(int=lo))
            return
        middle = (lo + hi) // 2
        at_middle = _estimate(probe, middle)
        walk(lo, middle, at_lo, at_middle)
        walk(middle, hi, at_middle, at_hi)

    walk(0, _TOP, _estimate(probe, 0), _estimate(probe, _TOP))
    return found


def _many_tenants(system: SystemScope, count: int, rows: Callable[[int], int]) -> list[uuid.UUID]:
    ids = make_tenants(system, *(f"T{i}" for i in range(count)))
    with system.transaction() as conn:
        conn.execute(brand_kits.insert(), [{"client_id": t, "name": f"kit {j}"} for i, t in enumerate(ids)
                                           for j in range(rows(i))])
    return ids


def test_tenant_ids_listed_from_estimates_before_0009_and_not_now(target, db, system, admin_conn):
    downgrade(target.require_admin(), target.settings, revision="0008")
    try:
        ids = _many_tenants(system, 23, lambda i: 40 + 3 * i)  # A and 22 others, each a frequent value
        admin_conn.execute("ANALYZE brand_kits")
        found, probe = _probing(db, ids[0], _bisect_ids)
        print(f"\nbefore 0009: {len(set(found) - {ids[0]})} of 22 other tenants' ids in {probe.statements} statements")
        assert set(found) == set(ids)
    finally:
        migrate(target.require_admin(), target.settings)  # 0009 clears what was collected

    found, probe = _probing(db, ids[0], _bisect_ids)
    print(f"after 0009: {len(found)} ids in {probe.statements} statements")
    assert found == [] and probe.statements == 2
    admin_conn.execute("ANALYZE brand_kits")  # collects nothing for any column now
    estimates, probe = _probing(db, ids[0], lambda p: {_estimate(p, random.getrandbits(128)) for _ in range(50)})
    assert len(estimates) == 1, estimates
    assert admin_conn.execute("SELECT count(*) FROM pg_stats WHERE tablename = 'brand_kits'").fetchone()[0] == 0


def test_what_remains_a_sequential_scan_counts_the_other_tenants_rows_together(db, system, tenants):
    """Stated in docs/statistics.md, not blocked: the table's total, never a tenant's share."""
    with system.transaction() as conn:
        conn.execute(brand_kits.insert(), [{"client_id": t, "name": f"kit {i}"} for t in (tenants.a, tenants.b)
                                           for i in range(7 if t == tenants.a else 12)])

    def scan(probe: Probe) -> tuple[int, int]:
        probe.connection.exec_driver_sql("SET LOCAL enable_seqscan = on; SET LOCAL enable_indexscan = off")
        (node,) = [n for n in _nodes(probe.explain("SELECT * FROM brand_kits", analyze=True))
                   if n.get("Relation Name") == "brand_kits"]
        return round(node["Actual Rows"]), round(node["Rows Removed by Filter"])

    (mine, removed), _ = _probing(db, tenants.a, scan)
    assert (mine, removed) == (8, 13)  # A's 8 kits; B's 13, counted, not named


def _text_plan(probe: Probe, sql: str, params: dict[str, Any]) -> str:
    probe.statements += 1
    return "\n".join(r[0] for r in probe.connection.execute(text("EXPLAIN (COSTS OFF) " + sql), params))


def test_the_plans_still_use_the_client_id_indexes_without_statistics(target, db, system, admin_conn):
    """Point reads, lists and the exact search, with many tenants and no statistics at all."""
    from rtv_db.tenant.search import similar_chunks_statement

    ids = _many_tenants(system, 60, lambda i: 30)
    rng = random.Random(24)
    with system.transaction() as conn:
        conn.execute(knowledge_bases.insert(), [{"client_id": t, "id": t, "name": "kb"} for t in ids])
        conn.execute(knowledge_chunks.insert(), [
            {"client_id": t, "knowledge_base_id": t, "content": f"c{j}", "embedding": [rng.random() for _ in range(384)]}
            for t in ids for j in range(40)])
    admin_conn.execute("VACUUM ANALYZE brand_kits, knowledge_chunks, knowledge_bases, clients")
    a = ids[0]
    (kit,) = admin_conn.execute("SELECT id FROM brand_kits WHERE client_id = %s LIMIT 1", (a,)).fetchone()
    query = [rng.random() for _ in range(384)]
    context = TenantContext(a)
    stmt, params, _ = similar_chunks_statement(context, query, 10, knowledge_base_id=None, metric="cosine",
                                               max_distance=None, with_embedding=False)
    cases = {
        "point read": ("SELECT * FROM brand_kits WHERE client_id = :a AND id = :id", {"a": a, "id": kit},
                       "brand_kits_pkey"),
        "list": ("SELECT * FROM brand_kits WHERE client_id = :a ORDER BY name LIMIT 50", {"a": a},
                 "brand_kits_client_id_name_key"),
        "exact search": (stmt.text, params, "knowledge_chunks_"),
    }
    with with_tenant_scope(db, a).scoped_transaction() as tx:  # the planner's own choices
        probe = Probe(tx.connection)
        for name, (sql, values, index) in cases.items():
            plan = _text_plan(probe, sql, values)
            print(f"\n{name}:\n" + re.sub(r"'\[[^]]*\]'", "'[...]'", plan))  # the query vector, elided
            assert "Seq Scan" not in plan and index in plan, plan


# -- item 10: audit events stripped of their labels ------------------------------------------------

STRIPPING = {  # each writes one row of A; :tag keeps the phases' rows apart
    "a CTE": "WITH r AS (SELECT rtv.release_signed_context()) INSERT INTO brand_kits (client_id, name) "
             "SELECT CAST(:a AS uuid), 'cte ' || :tag FROM r",
    "VALUES": "INSERT INTO brand_kits (client_id, name) VALUES (CAST(:a AS uuid), "
              "(SELECT 'values ' || :tag FROM rtv.release_signed_context()))",
    "an UPDATE": "UPDATE brand_kits SET updated_at = now() WHERE name = 'Brand A' "
                 "AND (SELECT true FROM rtv.release_signed_context())",
    "a DELETE": "WITH r AS (SELECT rtv.release_signed_context()) DELETE FROM brand_kits WHERE name = 'doomed ' || :tag "
                "AND EXISTS (SELECT FROM r)",
    "released after the write, in the same statement": (
        "WITH w AS (INSERT INTO brand_kits (client_id, name) VALUES (CAST(:a AS uuid), 'late ' || :tag) RETURNING id) "
        "SELECT rtv.release_signed_context() FROM w"),
}
LABELLED = dict(user_id="alice", correlation_id="req-24-10", lane="api")


def _events(admin_conn: psycopg.Connection, tenant: uuid.UUID) -> list[tuple[Any, ...]]:
    return admin_conn.execute(
        "SELECT action, user_id, correlation_id, lane FROM audit_events WHERE client_id = %s AND table_name = 'brand_kits' "
        "ORDER BY occurred_at", (tenant,)).fetchall()


def _strip(db: Database, tenant: uuid.UUID, sql: str, tag: str = "") -> None:
    with with_tenant_scope(db, TenantContext(tenant, **LABELLED)).scoped_transaction() as tx:
        tx.connection.execute(text(sql), {"a": tenant, "tag": tag})


def _kits(admin_conn: psycopg.Connection, tenant: uuid.UUID) -> list[tuple[Any, ...]]:
    return admin_conn.execute("SELECT name, updated_at FROM brand_kits WHERE client_id = %s ORDER BY name",
                              (tenant,)).fetchall()


def test_labels_stripped_before_0009_and_not_now(target, db, system, admin_conn, tenants):
    downgrade(target.require_admin(), target.settings, revision="0008")
    try:
        with system.transaction() as conn:
            conn.execute(brand_kits.insert().values(client_id=tenants.a, name="doomed before"))
        before = len(_events(admin_conn, tenants.a))
        for sql in STRIPPING.values():
            _strip(db, tenants.a, sql, "before")
        new = _events(admin_conn, tenants.a)[before:]
        assert [e[0] for e in new] == ["INSERT", "INSERT", "UPDATE", "DELETE", "INSERT"], new
        assert all(e[1:] == (None, None, None) for e in new)  # written by A, recorded as nobody's
    finally:
        migrate(target.require_admin(), target.settings)

    with system.transaction() as conn:
        conn.execute(brand_kits.insert().values(client_id=tenants.a, name="doomed after"))
    events, kits = _events(admin_conn, tenants.a), _kits(admin_conn, tenants.a)
    for name, sql in STRIPPING.items():
        with pytest.raises(DBAPIError, match="without a tenant context when it is recorded"):
            _strip(db, tenants.a, sql, "after")
    # Nothing written, nothing recorded: A's write is recorded with its context or not at all.
    assert _events(admin_conn, tenants.a) == events and _kits(admin_conn, tenants.a) == kits


def test_ordinary_writes_are_still_recorded_with_their_labels(db, system, admin_conn, tenants):
    _strip(db, tenants.a, "INSERT INTO brand_kits (client_id, name) VALUES (CAST(:a AS uuid), 'labelled')")
    assert _events(admin_conn, tenants.a)[-1] == ("INSERT", "alice", "req-24-10", "api")
    # Releasing the context in a statement of its own still works (rtv_db.clear_tenant_context),
    # and a write after it is refused by the policy, as before.
    with with_tenant_scope(db, TenantContext(tenants.a, **LABELLED)).scoped_transaction() as tx:
        tx.connection.execute(text("SELECT rtv.clear_tenant_context()"))
        assert tx.connection.execute(text("SELECT count(*) FROM brand_kits")).scalar_one() == 0
    with pytest.raises(DBAPIError, match="row-level security"):
        with with_tenant_scope(db, tenants.a).scoped_transaction() as tx:
            tx.connection.execute(text("SELECT rtv.clear_tenant_context()"))
            tx.connection.execute(text("INSERT INTO brand_kits (client_id, name) VALUES (CAST(:a AS uuid), 'late')"),
                                  {"a": tenants.a})
    # The system role and the admin write without a context, as before; their events name no user.
    with system.transaction() as conn:
        conn.execute(brand_kits.insert().values(client_id=tenants.b, name="by the system"))
    admin_conn.execute("INSERT INTO brand_kits (client_id, name) VALUES (%s, 'by the admin')", (tenants.b,))
    assert [e[:2] for e in _events(admin_conn, tenants.b)[-2:]] == [("INSERT", None), ("INSERT", None)]


def test_unsigned_mode_a_context_without_labels_writes_and_a_cleared_one_does_not(target, admin_conn, tenants,
                                                                                  monkeypatch):
    """Unsigned mode (debugging only): the context is plain settings. A context with no labels still
    writes (the trigger's check reads the tenant); one cleared inside the statement does not: before
    the policy's check, the policy refuses the row; after it, the trigger refuses the event."""
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    migrate(target.require_admin(), target.settings)
    set_context = "SELECT rtv.set_tenant_context(%s)"  # no lane, user or correlation id
    try:
        with psycopg.connect(_libpq(target.runtime_url)) as conn:
            conn.execute(set_context, (tenants.a,))
            conn.execute("INSERT INTO brand_kits (client_id, name) VALUES (%s, 'unlabelled')", (tenants.a,))
            conn.commit()
        assert _events(admin_conn, tenants.a)[-1] == ("INSERT", None, None, None)
        events = _events(admin_conn, tenants.a)
        for statement, error in (
                ("INSERT INTO brand_kits (client_id, name) VALUES (%s, (SELECT 'cleared' FROM rtv.clear_tenant_context()))",
                 "row-level security"),
                ("WITH w AS (INSERT INTO brand_kits (client_id, name) VALUES (%s, 'cleared after') RETURNING id)"
                 " SELECT rtv.clear_tenant_context() FROM w", "without a tenant context when it is recorded")):
            with psycopg.connect(_libpq(target.runtime_url)) as conn, \
                    pytest.raises(psycopg.errors.InsufficientPrivilege, match=error):
                conn.execute(set_context, (tenants.a,))
                conn.execute(statement, (tenants.a,))
        assert _events(admin_conn, tenants.a) == events
    finally:
        monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "signed")
        migrate(target.require_admin(), target.settings)


def _libpq(url: str) -> str:
    from rtv_db.config import to_libpq_url

    return to_libpq_url(url)


# -- item 11: a column smuggled through the tenant-table generator --------------------------------

def _as_owner(target: Target, sql: str) -> None:
    rendered = sql.replace("@owner@", '"rtv_owner"').replace("@runtime@", '"rtv_app"').replace("@system@", '"rtv_system"')
    with psycopg.connect(_libpq(target.require_admin())) as conn:
        conn.execute('SET ROLE "rtv_owner"')
        conn.execute(rendered)


def test_the_old_generator_let_a_smuggled_column_past_verify_which_reports_it_now(target):
    # What the generator wrote before this change for --column "title text, notes text": the text
    # pasted as it was. `notes` is a second column, without STATISTICS 0.
    sql = tenant_table_sql("posts", ["title text"]).replace("    title text,\n", "    title text, notes text,\n")
    assert "title text, notes text" in sql and "notes SET STATISTICS 0" not in sql
    _as_owner(target, sql)
    older_checks = [c for c in CHECKS if c is not check_tenant_statistics]
    assert verify(target.require_admin(), checks=older_checks) == []  # verify before this change: nothing
    found = verify(target.require_admin())
    assert [(f.code, f.object) for f in found] == [("TENANT_COLUMN_STATISTICS", "posts")]
    assert "notes" in found[0].message and "title" not in found[0].message


SMUGGLED = ["title text, notes text", "title text,notes text", "title text NOT NULL, secret text",
            "title text DEFAULT 'x', notes text", "title text); CREATE TABLE loot (x text", "title text -- comment",
            "title text /* c */", 'title "text"', "title text CHECK (title <> '')", "title text REFERENCES clients (id)",
            "title text COLLATE \"C\"", "title text DEFAULT current_setting('app.x')", "title text DEFAULT $$x$$",
            "title text DEFAULT 'a' || (SELECT 'b')", "title text GENERATED ALWAYS AS ('x') STORED", "title tsvector",
            "title text UNIQUE", "title text PRIMARY KEY", "title text NOT NULL NOT NULL", "title varchar(10, 2)",
            "title text DEFAULT E'\\x41'", "title text DEFAULT 'a\nb'", "title text DEFAULT '\"\"\"'", "", "   "]


@pytest.mark.parametrize("definition", SMUGGLED)
def test_the_generator_refuses_anything_but_one_plain_column(definition):
    with pytest.raises(InvalidInputError, match="expected one column"):
        tenant_table_sql("posts", [definition])


def test_the_cli_writes_nothing_for_a_smuggled_column(tmp_path: Path):
    result = CliRunner().invoke(cli, ["revision", "--tenant-table", "posts", "--column", "title text, notes text",
                                      "--dir", str(tmp_path)])
    assert result.exit_code != 0 and "expected one column" in " ".join(result.output.split()), result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("definition,rendered", [
    ("title text NOT NULL", "title text NOT NULL"),
    ("body text not null default ''", "body text NOT NULL DEFAULT ''"),
    ("price numeric(10,2) DEFAULT 0", "price numeric(10, 2) DEFAULT 0"),
    ("tags text[] NOT NULL DEFAULT '{}'::text[]", "tags text[] NOT NULL DEFAULT '{}'::text[]"),
    ("due timestamp with time zone DEFAULT now()", "due timestamp with time zone DEFAULT now()"),
    ("ref uuid DEFAULT gen_random_uuid()", "ref uuid DEFAULT gen_random_uuid()"),
    ("meta jsonb NOT NULL DEFAULT '{\"a\": 1}'::jsonb", "meta jsonb NOT NULL DEFAULT '{\"a\": 1}'::jsonb"),
    ("note text DEFAULT 'it''s'", "note text DEFAULT 'it''s'"),
    ("score double precision NULL", "score double precision"),
    ("embedding vector(384)", "embedding vector(384)"),
    ("active boolean NOT NULL DEFAULT TRUE", "active boolean NOT NULL DEFAULT true"),
])
def test_plain_columns_are_parsed_and_rendered(definition, rendered):
    assert parse_column(definition).sql() == rendered
    assert f"    {rendered},\n" in tenant_table_sql("posts", [definition])


def test_a_generated_table_keeps_no_statistics_and_verify_is_clean(target):
    _as_owner(target, tenant_table_sql("posts", ["title text NOT NULL", "price numeric(10, 2) DEFAULT 0"],
                                       indexes=[("title",)]))
    assert verify(target.require_admin(), checks=[check_index_tenant_led, check_tenant_statistics]) == []
