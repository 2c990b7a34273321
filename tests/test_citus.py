"""Citus: the distribution plan, its checks, shard-name mapping, and the isolation suite on Citus.

Two kinds of tests live here.

* Tests that run everywhere (the embedded PostgreSQL): the plan computed from the real migrated
  schema, the problems it reports, the verify findings it implies, the shard-name mapping, and
  that ``migrate`` on plain PostgreSQL does not try to distribute anything.
* The isolation suite, parametrised over two backends: ``postgres`` is the embedded server with
  the policies rewritten to the form Citus accepts (so the rewrite is proven to keep isolation
  here), ``citus`` is a real Citus coordinator given by ``CITUS_URL`` (an admin/superuser URL),
  skipped when that variable is not set. Citus-only tests (distribution metadata, EXPLAIN
  routing, functions on the workers) are marked ``citus`` and skipped the same way.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import NullPool

from conftest import make_tenants
from rtv_db import Database, SystemScope, brand_kits, citus, read_audit_trail, with_tenant_scope
from rtv_db.config import Settings, to_libpq_url, to_sqlalchemy_url
from rtv_db.errors import CitusSignedContextError, CitusUnsupportedStatementError, MigrationError
from rtv_db.migrate import current_revision, head_revision, migrate
from rtv_db.targets import Target

CITUS_URL = os.environ.get("CITUS_URL")
needs_citus = pytest.mark.skipif(not CITUS_URL, reason="no Citus coordinator: set CITUS_URL (an admin URL) to run")
SHARD_SUFFIX = re.compile(r"[a-z_]+_\d{5,}")
TENANT_TABLES = {"platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions"}
# The audit trail (migration 0003) is a tenant table too: distributed by client_id, co-located.
DISTRIBUTED_TABLES = TENANT_TABLES | {"audit_events"}
WORKER_FUNCTIONS = {"rtv.current_tenant_id()", "rtv.current_platform_account_id()", "rtv.current_lane()",
                    "rtv.current_user_id()", "rtv.current_correlation_id()", "rtv.to_uuid_or_null(text)",
                    "rtv.audit_row_change()", "rtv.audit_purge_cutoff()"}
READERS = {"rtv.current_tenant_id()", "rtv.current_platform_account_id()", "rtv.current_lane()",
           "rtv.current_user_id()", "rtv.current_correlation_id()"}


def _admin_engine(url: str):  # noqa: ANN202
    return create_engine(to_sqlalchemy_url(url), poolclass=NullPool)


# -- the plan, on the real migrated schema ---------------------------------------------------------


@pytest.fixture()
def admin_sa(target: Target) -> Iterator[Connection]:
    engine = _admin_engine(target.require_admin())
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def test_plan_of_the_migrated_schema(admin_sa: Connection) -> None:
    plan = citus.plan_distribution(admin_sa)
    assert plan.schema == "public"
    assert not plan.citus
    assert plan.problems == ()
    # rtv's search-key trigger (revision 0007, created off Citus only) is dropped, not refused.
    assert plan.search_key_triggers == (("knowledge_chunks", "assign_search_key"),)
    assert [t.name for t in plan.reference_tables] == ["clients"]
    dist = [t.name for t in plan.distributed_tables]
    assert set(dist) == DISTRIBUTED_TABLES
    # Parents before children: a composite foreign key needs its parent distributed first.
    assert dist.index("knowledge_bases") < dist.index("knowledge_chunks")
    assert dist.index("platform_accounts") < dist.index("platform_actions")
    anchor = plan.anchor
    for t in plan.distributed_tables:
        assert t.distribution_column == "client_id"
        assert t.colocate_with == (None if t.name == anchor else anchor)
        assert t.state == "local" and not t.done
    assert "clients" in plan.table("brand_kits").parents
    assert plan.table("knowledge_chunks").parents == ("knowledge_bases",)
    assert plan.table("audit_events").parents == ()  # no foreign key: events outlive their tenant
    # Every policy wraps the context functions in a subselect; each gets a Citus form.
    assert {rw.table for rw in plan.policy_rewrites} == TENANT_TABLES | {"clients", "audit_events"}
    for rw in plan.policy_rewrites:
        assert "SELECT" in (rw.old_using or "") + (rw.old_with_check or "")
        assert "SELECT" not in (rw.using or "") + (rw.with_check or "")
        if rw.policy == "tenant_isolation":
            assert "rtv.current_tenant_id()" in (rw.using or "")
    by_name = {(rw.table, rw.policy): rw for rw in plan.policy_rewrites}
    assert by_name["audit_events", "audit_events_trigger_insert"].with_check == \
        "(client_id = COALESCE(rtv.current_tenant_id(), client_id))"
    # rtv-db's audit triggers are planned, not refused: kept (with the table's name as second
    # argument) on every distributed tenant table; on the reference table clients with a third,
    # 'reference' (the Citus form of the function writes its event on one node only).
    audit = {t.table: t for t in plan.audit_triggers}
    assert set(audit) == TENANT_TABLES | {"clients"}
    assert audit["clients"].kind == "relabel" and audit["clients"].args == ("id",)
    assert audit["clients"].wanted_args == ("id", "clients", "reference")
    assert plan.audit_guard  # the function has no guard yet
    for name in TENANT_TABLES:
        t = audit[name]
        assert (t.trigger, t.kind, t.args, t.wanted_args) == ("audit_row_change", "relabel", ("client_id",), ("client_id", name))
    assert citus.relabelled_definition(audit["brand_kits"]) == (
        "CREATE TRIGGER audit_row_change AFTER INSERT OR DELETE OR UPDATE ON public.brand_kits"
        " FOR EACH ROW EXECUTE FUNCTION rtv.audit_row_change('client_id', 'brand_kits')")
    # Only what the workers evaluate (policies, the audit trigger, their callees) is distributed;
    # the setters, the purge and the token functions (which read rtv_secret) stay on the coordinator.
    assert set(plan.functions) == WORKER_FUNCTIONS
    # Signed mode (the default), whose readers verify tokens against rtv_secret.
    assert plan.context_mode == "signed"
    assert set(plan.context_readers) == READERS


def test_rewrite_policy_expression() -> None:
    rw = citus.rewrite_policy_expression
    assert rw("(client_id = ( SELECT rtv.current_tenant_id() AS current_tenant_id))") == "(client_id = rtv.current_tenant_id())"
    assert rw("((SELECT rtv.current_tenant_id() AS current_tenant_id) IS NULL OR (client_id = ( SELECT "
              "rtv.current_tenant_id() AS current_tenant_id)))") == \
        "(rtv.current_tenant_id() IS NULL OR (client_id = rtv.current_tenant_id()))"
    assert rw(None) is None
    assert rw("(client_id = rtv.current_tenant_id())") == "(client_id = rtv.current_tenant_id())"
    with pytest.raises(ValueError):
        rw("(client_id IN ( SELECT clients.id FROM clients))")


def test_plan_reports_what_citus_refuses(target: Target, admin_conn: psycopg.Connection) -> None:
    admin_conn.execute("""
        CREATE TABLE widgets (client_id uuid NOT NULL, id uuid NOT NULL, code text,
                              PRIMARY KEY (client_id, id), UNIQUE (id, client_id), UNIQUE (code));
        CREATE TABLE gadgets (client_id uuid NOT NULL, id uuid NOT NULL, widget_id uuid,
                              PRIMARY KEY (client_id, id),
                              CONSTRAINT gadgets_swapped_fkey FOREIGN KEY (client_id, widget_id)
                                  REFERENCES widgets (id, client_id));
        CREATE TABLE loose (client_id uuid, note text);
        CREATE TABLE gizmos (client_id uuid NOT NULL, id uuid NOT NULL, widget_id uuid, PRIMARY KEY (id, client_id),
                             CONSTRAINT gizmos_setnull_fkey FOREIGN KEY (client_id, widget_id)
                                 REFERENCES widgets (client_id, id) ON DELETE SET NULL);
        CREATE TABLE notes (id int PRIMARY KEY, w_client uuid, w_id uuid,
                            CONSTRAINT notes_to_tenant_fkey FOREIGN KEY (w_client, w_id) REFERENCES widgets (client_id, id));
        ALTER TABLE widgets ENABLE ROW LEVEL SECURITY;
        CREATE POLICY by_client_list ON widgets USING (client_id IN (SELECT id FROM clients));
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER widgets_touch BEFORE UPDATE ON widgets FOR EACH ROW EXECUTE FUNCTION touch();
        -- Same name as rtv-db's audit trigger and function, but another schema's function: foreign.
        CREATE FUNCTION public.audit_row_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
        CREATE TRIGGER audit_row_change AFTER INSERT ON gizmos FOR EACH ROW EXECUTE FUNCTION public.audit_row_change();
        -- Unsigned mode: the one mode Citus accepts; the schema problems are what is tested here.
        UPDATE rtv_secret.context_settings SET mode = 'unsigned';
    """)
    subselect_policies = admin_conn.execute(
        "SELECT count(*) FROM pg_policies WHERE strpos(qual, 'SELECT rtv.current_tenant_id()') > 0").fetchone()[0]
    engine = _admin_engine(target.require_admin())
    with engine.connect() as conn:
        plan = citus.plan_distribution(conn)
        problems = "\n".join(plan.problems)
        assert "widgets: unique index widgets_code_key (code) lacks client_id" in problems
        assert "gadgets: foreign key gadgets_swapped_fkey to widgets does not pair client_id" in problems
        assert "gizmos: foreign key gizmos_setnull_fkey has ON DELETE SET NULL" in problems
        assert "loose: client_id is nullable" in problems
        assert "notes: foreign key notes_to_tenant_fkey from a reference table to the distributed table widgets" in problems
        assert "widgets: policy by_client_list has a subquery" in problems
        assert "widgets: trigger widgets_touch" in problems
        assert "gizmos: trigger audit_row_change" in problems
        assert not any("audit_row_change" in p and not p.startswith("gizmos:") for p in plan.problems)
        assert {t.table for t in plan.audit_triggers} == TENANT_TABLES | {"clients"}
        assert "notes" in [t.name for t in plan.reference_tables]
        # Nothing is attempted while problems remain (the migrated tables stay as they were).
        conn.rollback()
        with conn.begin():
            with pytest.raises(MigrationError, match="cannot distribute this schema"):
                citus.apply_distribution(conn, plan, runtime_role="rtv_app")
        relaxed = citus.plan_distribution(conn, allow_triggers=True).problems
        assert not any("trigger" in p for p in relaxed) and len(relaxed) == len(plan.problems) - 2
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM pg_policies WHERE strpos(qual, 'SELECT rtv.current_tenant_id()') > 0"
        ).scalar() == subselect_policies >= 7
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'audit_row_change' AND tgnargs = 1").scalar() == 6
    engine.dispose()


# -- the audit trail on Citus ------------------------------------------------------------------------


def _audit_events(system: SystemScope, row_id: uuid.UUID) -> list[tuple[str, str]]:
    with system.transaction() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            text("SELECT action, table_name FROM audit_events WHERE row_id = :r ORDER BY occurred_at"), {"r": row_id})]


def test_audit_triggers_in_their_citus_form_on_postgres(admin_sa: Connection, db: Database, system: SystemScope) -> None:
    # What the distribution step does to the audit triggers, run here on plain tables: each
    # tenant table's trigger passes its own name, the one on clients also 'reference'.
    with admin_sa.begin():
        actions = citus.apply_audit_triggers(admin_sa, citus.plan_distribution(admin_sa))
    assert len(actions) == 6 and any("clients: audit trigger audit_row_change passes the table name (id, clients,"
                                     " reference)" in a for a in actions)
    plan = citus.plan_distribution(admin_sa)
    assert plan.problems == () and plan.pending_audit_triggers == []
    assert {(t.table, t.kind) for t in plan.audit_triggers} == {(n, "keep") for n in TENANT_TABLES | {"clients"}}
    assert citus.apply_audit_triggers(admin_sa, plan) == []
    admin_sa.rollback()
    # Each audited write still leaves exactly one event, named by the logical table.
    (a,) = make_tenants(system, f"T{uuid.uuid4().hex[:6]}")
    scope = with_tenant_scope(db, a)
    kit = scope.scoped_insert(brand_kits, {"name": "citus-form kit"})[0]
    scope.scoped_update(brand_kits, {"tone": {"voice": "calm"}}, brand_kits.c.id == kit.id)
    scope.scoped_delete(brand_kits, brand_kits.c.id == kit.id)
    assert _audit_events(system, kit.id) == [("INSERT", "brand_kits"), ("UPDATE", "brand_kits"), ("DELETE", "brand_kits")]
    # clients rows are audited too (on PostgreSQL the 'reference' argument changes nothing).
    with system.transaction() as conn:
        conn.execute(text("UPDATE clients SET name = 'renamed' WHERE id = :a"), {"a": a})
    assert _audit_events(system, a) == [("INSERT", "clients"), ("UPDATE", "clients")]


def test_the_trigger_on_a_shard_records_the_logical_table_name(admin_sa: Connection, system: SystemScope) -> None:
    # Citus copies a table's triggers to its shards with the shard's name ("brand_kits_102008")
    # as the relation and the same arguments; TG_TABLE_NAME is then the shard's name. A table
    # of that name stands in for the shard here.
    plan = citus.plan_distribution(admin_sa)
    kits = next(t for t in plan.audit_triggers if t.table == "brand_kits")
    shard_form = citus.relabelled_definition(kits).replace("ON public.brand_kits ", "ON public.brand_kits_102008 ")
    admin_sa.rollback()
    with admin_sa.begin():
        admin_sa.exec_driver_sql("CREATE TABLE brand_kits_102008 (LIKE brand_kits INCLUDING DEFAULTS)")
        admin_sa.exec_driver_sql(shard_form)
        admin_sa.exec_driver_sql(  # the trigger as Citus would copy it without the name argument
            "CREATE TABLE brand_kits_102009 (LIKE brand_kits INCLUDING DEFAULTS);"
            " CREATE TRIGGER audit_row_change AFTER INSERT ON brand_kits_102009"
            " FOR EACH ROW EXECUTE FUNCTION rtv.audit_row_change('client_id')")
        ids = {}
        for shard in ("brand_kits_102008", "brand_kits_102009"):
            ids[shard] = admin_sa.execute(text(
                f"INSERT INTO {shard} (client_id, name) VALUES (gen_random_uuid(), 'k') RETURNING id")).scalar_one()
    assert _audit_events(system, ids["brand_kits_102008"]) == [("INSERT", "brand_kits")]
    assert _audit_events(system, ids["brand_kits_102009"]) == [("INSERT", "brand_kits_102009")]


def test_an_audit_function_without_the_name_argument_is_a_problem(admin_sa: Connection) -> None:
    with admin_sa.begin():
        admin_sa.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION rtv.audit_row_change() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN NULL; END $$")
    problems = citus.plan_distribution(admin_sa).problems
    assert any("rtv.audit_row_change does not read the table's logical name" in p for p in problems), problems


# -- verify findings -------------------------------------------------------------------------------


def test_check_citus_is_silent_on_plain_postgres(admin_sa: Connection) -> None:
    assert list(citus.check_citus(admin_sa, None)) == []


def test_findings_of_an_undistributed_schema(admin_sa: Connection) -> None:
    plan = citus.plan_distribution(admin_sa)
    findings = list(citus.plan_findings(plan, propagation_set=False, runtime_role="rtv_app"))
    codes = {(f.code, f.object) for f in findings}
    assert ("CITUS_NOT_REFERENCE", "public.clients") in codes
    for t in DISTRIBUTED_TABLES:
        assert ("CITUS_NOT_DISTRIBUTED", f"public.{t}") in codes
    for t in TENANT_TABLES | {"clients"}:
        assert ("CITUS_AUDIT_TRIGGER", f"public.{t}: trigger audit_row_change") in codes
    assert ("CITUS_SET_NOT_PROPAGATED", "role rtv_app") in codes
    assert ("CITUS_FUNCTION_NOT_DISTRIBUTED", "function rtv.current_tenant_id()") in codes
    assert all(f.why and f.fix and f.message for f in findings)


def _done(name: str, column: str | None, colocation: int, kind: str = "distributed") -> citus.PlannedTable:
    return citus.PlannedTable(name, kind, "client_id" if kind == "distributed" else None, None, (),  # type: ignore[arg-type]
                              state=kind, current_column=column, colocation_id=colocation)  # type: ignore[arg-type]


def test_findings_of_a_distributed_schema() -> None:
    good = citus.DistributionPlan("public", (
        _done("clients", None, 1, "reference"), _done("brand_kits", "client_id", 2), _done("knowledge_bases", "client_id", 2)),
        citus=True)
    assert list(citus.plan_findings(good, propagation_set=True, runtime_role="rtv_app")) == []
    bad = citus.DistributionPlan("public", (
        _done("clients", "id", 3), _done("brand_kits", "client_id", 2), _done("knowledge_bases", "client_id", 4),
        _done("knowledge_chunks", "id", 2), _done("countries", None, 5, "reference")), citus=True)
    codes = {(f.code, f.object) for f in citus.plan_findings(bad, propagation_set=True, runtime_role="rtv_app")}
    assert ("CITUS_NOT_COLOCATED", "public.knowledge_bases") in codes
    assert ("CITUS_WRONG_DISTRIBUTION_COLUMN", "public.knowledge_chunks") in codes
    assert ("CITUS_WRONG_DISTRIBUTION_COLUMN", "public.clients") in codes
    assert ("CITUS_NOT_COLOCATED", "public.brand_kits") not in codes


def test_audit_trigger_findings_and_the_anchor() -> None:
    kept = citus.AuditTrigger("brand_kits", "audit_row_change", "keep", ("client_id", "brand_kits"), "")
    dropped = citus.AuditTrigger("clients", "audit_row_change", "drop", ("id",), "")
    tables = (_done("clients", None, 1, "reference"), _done("brand_kits", "client_id", 2))
    good = citus.DistributionPlan("public", tables, citus=True, audit_triggers=(kept,))
    assert list(citus.plan_findings(good, propagation_set=True, runtime_role="rtv_app")) == []
    left = citus.DistributionPlan("public", tables, citus=True, audit_triggers=(kept, dropped))
    assert [(f.code, f.object) for f in citus.plan_findings(left, propagation_set=True, runtime_role="rtv_app")] == \
        [("CITUS_AUDIT_TRIGGER", "public.clients: trigger audit_row_change")]
    # A tenant table added later (audit_events onto a distributed schema) joins the existing
    # colocation group: the anchor is the first table already distributed, not the first by name.
    late = citus.PlannedTable("audit_events", "distributed", "client_id", "brand_kits", ())
    assert citus.DistributionPlan("public", (tables[0], late, tables[1])).anchor == "brand_kits"


# -- shard names in error messages -----------------------------------------------------------------

KNOWN = {"brand_kits", "brand_kits_client_id_name_key", "knowledge_chunks", "knowledge_bases",
         "knowledge_chunks_knowledge_base_fkey", "audit_events_202611"}


@pytest.mark.parametrize(("message", "expected"), [
    ('new row violates row-level security policy for table "brand_kits_102033"\n'
     "CONTEXT:  while executing command on localhost:9701",
     'new row violates row-level security policy for table "brand_kits"'),
    ('duplicate key value violates unique constraint "brand_kits_client_id_name_key_102041"\n'
     "DETAIL:  Key (client_id, name)=(7f6c…, Brand A) already exists.\n"
     "CONTEXT:  while executing command on 10.0.0.12:5432",
     'duplicate key value violates unique constraint "brand_kits_client_id_name_key"\n'
     "DETAIL:  Key (client_id, name)=(7f6c…, Brand A) already exists."),
    ('insert or update on table "knowledge_chunks_102072" violates foreign key constraint '
     '"knowledge_chunks_knowledge_base_fkey_102072"\nDETAIL:  Key is not present in table "knowledge_bases_102040".',
     'insert or update on table "knowledge_chunks" violates foreign key constraint '
     '"knowledge_chunks_knowledge_base_fkey"\nDETAIL:  Key is not present in table "knowledge_bases".'),
    # A real name that ends in digits stays; a shard of it loses only the shard id.
    ('relation "audit_events_202611" is busy', 'relation "audit_events_202611" is busy'),
    ('relation "audit_events_202611_102090" is busy', 'relation "audit_events_202611" is busy'),
    # Unknown short suffixes are left alone.
    ('column "slot_2" of relation "brand_kits" does not exist', 'column "slot_2" of relation "brand_kits" does not exist'),
])
def test_unshard_message(message: str, expected: str) -> None:
    assert citus.unshard_message(message, KNOWN) == expected


def test_unshard_message_generic_rule() -> None:
    # No names known: a six-digit (or longer) suffix is a shard id, a shorter one is not.
    assert citus.unshard_message('for table "invoices_102033"') == 'for table "invoices"'
    assert citus.unshard_message('for table "invoices_2024"') == 'for table "invoices_2024"'


def test_error_mapping_hook_rewrites_raised_errors(target: Target, admin_conn: psycopg.Connection) -> None:
    # A table that carries a shard-style name, as a worker's shard does; the hook is forced on
    # (this server is no Citus) and must turn the raised exception's text back to logical names.
    admin_conn.execute('CREATE TABLE "widgets_102033" (code text CONSTRAINT "widgets_code_key_102033" UNIQUE)')
    admin_conn.execute("INSERT INTO widgets_102033 VALUES ('a')")
    mapped = _admin_engine(target.require_admin())
    citus.install_error_mapping(mapped, known_names={"widgets", "widgets_code_key"}, force=True)
    with pytest.raises(IntegrityError) as caught, mapped.begin() as conn:
        conn.exec_driver_sql("INSERT INTO widgets_102033 VALUES ('a')")
    # The message (not the SQL text, which names the table as written) loses the shard suffix.
    assert str(caught.value).splitlines()[0] == \
        '(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "widgets_code_key"'
    assert "102033" not in str(caught.value.orig)
    assert isinstance(caught.value.orig, psycopg.errors.UniqueViolation)
    mapped.dispose()
    # Installed but not forced: on plain PostgreSQL the message passes through untouched.
    plain = _admin_engine(target.require_admin())
    citus.install_error_mapping(plain)
    with pytest.raises(IntegrityError) as caught, plain.begin() as conn:
        conn.exec_driver_sql("INSERT INTO widgets_102033 VALUES ('a')")
    assert '"widgets_code_key_102033"' in str(caught.value)
    plain.dispose()


# -- migrate ---------------------------------------------------------------------------------------


def test_migrate_on_plain_postgres_does_not_distribute(empty_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    looked: list[bool] = []
    real_is_citus = citus.is_citus

    def spy_is_citus(conn: Connection) -> bool:
        looked.append(real_is_citus(conn))
        return looked[-1]

    def no_distribute(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("distribute() must not run on plain PostgreSQL")

    monkeypatch.setattr(citus, "is_citus", spy_is_citus)
    monkeypatch.setattr(citus, "distribute", no_distribute)
    result = migrate(empty_target.require_admin(), empty_target.settings)
    assert result.after == head_revision()
    assert result.citus_actions == ()
    assert looked == [False]


def test_migrate_distributes_after_the_upgrade_when_citus(empty_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_distribute(conn: Connection, *, runtime_role: str) -> list[str]:
        # Runs in its own transaction, after the Alembic one committed, under the migration lock.
        seen["revision"] = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        seen["locked"] = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()").scalar()
        seen["role"] = runtime_role
        return ["brand_kits: distributed by client_id"]

    monkeypatch.setattr(citus, "is_citus", lambda conn: True)
    monkeypatch.setattr(citus, "distribute", fake_distribute)
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")  # signed mode is refused on Citus
    result = migrate(empty_target.require_admin(), empty_target.settings)
    assert result.citus_actions == ("brand_kits: distributed by client_id",)
    assert seen == {"revision": head_revision(), "locked": 1, "role": "rtv_app"}


# -- the tenant context on Citus: signed refused, unsigned with plain readers ----------------------


def _readers(conn: Connection) -> dict[str, tuple[str, bool]]:
    rows = conn.exec_driver_sql(
        "SELECT p.oid::regprocedure::text, p.prosrc, p.prosecdef FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'rtv'"
        " AND p.proname IN ('current_tenant_id', 'current_platform_account_id', 'current_lane', 'current_user_id',"
        " 'current_correlation_id')")
    return {r[0]: (r[1], r[2]) for r in rows}


def test_signed_mode_is_refused_before_anything_changes(admin_sa: Connection) -> None:
    plan = citus.plan_distribution(admin_sa)
    readers_before = _readers(admin_sa)
    assert all(secdef and "rtv_secret" in src for src, secdef in readers_before.values())
    admin_sa.rollback()
    with admin_sa.begin():
        with pytest.raises(CitusSignedContextError, match="not supported on Citus") as caught:
            citus.apply_distribution(admin_sa, plan, runtime_role="rtv_app")
        assert "RTV_DB_CONTEXT_MODE=unsigned" in str(caught.value)
        with pytest.raises(CitusSignedContextError):
            citus.apply_context_readers(admin_sa, plan)
    # Nothing changed: the readers still verify tokens, the policies keep their subselects.
    assert _readers(admin_sa) == readers_before
    assert admin_sa.exec_driver_sql("SELECT count(*) FROM pg_policies WHERE qual ~* 'select'").scalar() >= 7
    codes = {f.code for f in citus.plan_findings(plan, propagation_set=True, runtime_role="rtv_app")}
    assert "CITUS_SIGNED_CONTEXT" in codes and "CITUS_CONTEXT_READERS" not in codes
    assert isinstance(caught.value, MigrationError)  # callers catching migrate's errors see it too


def test_migrate_on_citus_refuses_signed_mode_before_anything(empty_target: Target,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_distribute(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("nothing may be distributed in signed mode")

    monkeypatch.setattr(citus, "is_citus", lambda conn: True)
    monkeypatch.setattr(citus, "distribute", no_distribute)
    monkeypatch.delenv("RTV_DB_CONTEXT_MODE", raising=False)  # the default: signed
    with pytest.raises(CitusSignedContextError):
        migrate(empty_target.require_admin(), empty_target.settings)
    # Refused in the first transaction, before the bootstrap and the revisions: nothing is there.
    assert current_revision(empty_target.require_admin()) is None
    with psycopg.connect(to_libpq_url(empty_target.require_admin())) as conn:
        assert conn.execute("SELECT to_regnamespace('rtv') IS NULL").fetchone()[0]


def test_plain_postgres_keeps_the_signed_readers(empty_target: Target) -> None:
    # Without citus, migrate never replaces the readers: signed mode is exactly the revisions' own.
    engine = _admin_engine(empty_target.require_admin())
    with engine.connect() as conn:
        assert citus.database_context_mode(conn) is None  # before revision 0004: no mode at all
    migrate(empty_target.require_admin(), empty_target.settings)
    with engine.connect() as conn:
        # A role without EXECUTE on rtv.context_mode() cannot tell (None), and is not failed.
        conn.exec_driver_sql("SET ROLE pg_monitor")
        assert citus.database_context_mode(conn) is None
        conn.exec_driver_sql("RESET ROLE")
        readers = _readers(conn)
        assert set(readers) == READERS
        assert all(secdef and "rtv_secret.verified_context()" in src for src, secdef in readers.values())
        assert citus.database_context_mode(conn) == "signed"
    engine.dispose()


def test_unsigned_mode_gets_plain_readers_and_keeps_isolation(target: Target, admin_sa: Connection,
                                                              system: SystemScope,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # What the distribution does in unsigned mode, run here on plain tables: the policies in
    # their Citus form and the readers replaced by the plain ones, which need no rtv_secret.
    with admin_sa.begin():
        admin_sa.exec_driver_sql("UPDATE rtv_secret.context_settings SET mode = 'unsigned'")
        plan = citus.plan_distribution(admin_sa)
        assert plan.context_mode == "unsigned" and set(plan.context_readers) == READERS
        codes = {f.code for f in citus.plan_findings(plan, propagation_set=True, runtime_role="rtv_app")}
        assert "CITUS_CONTEXT_READERS" in codes and "CITUS_SIGNED_CONTEXT" not in codes
        citus.apply_policy_rewrites(admin_sa, plan)
        citus.apply_audit_triggers(admin_sa, plan)
        actions = citus.apply_context_readers(admin_sa, plan)
    assert len(actions) == len(READERS)
    readers = _readers(admin_sa)
    assert all(not secdef and "rtv_secret" not in src and "current_setting('app." in src for src, secdef in readers.values())
    again = citus.plan_distribution(admin_sa)
    assert again.context_readers == ()
    assert citus.apply_context_readers(admin_sa, again) == []
    admin_sa.rollback()

    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    db = Database(target.runtime_url)
    try:
        a, b = make_tenants(system, f"A{uuid.uuid4().hex[:6]}", f"B{uuid.uuid4().hex[:6]}")
        assert [r.client_id for r in with_tenant_scope(db, a).scoped_query(brand_kits)] == [a]
        assert [r.client_id for r in with_tenant_scope(db, b).scoped_query(brand_kits)] == [b]
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM brand_kits")).scalar() == 0
        with pytest.raises(DBAPIError, match="row-level security"):
            with with_tenant_scope(db, a).scoped_transaction() as scope:
                scope.connection.execute(text("INSERT INTO brand_kits (client_id, name) VALUES (:b, 'x')"), {"b": b})
        # The price of unsigned mode, stated as a test: a forged SET LOCAL is believed.
        with db.engine.begin() as conn:
            conn.execute(text("SELECT set_config('app.current_tenant_id', :b, true)"), {"b": str(b)})
            assert conn.execute(text("SELECT count(*) FROM brand_kits")).scalar() == 1
    finally:
        db.close()


# -- the isolation suite, on both backends ---------------------------------------------------------


@dataclass
class Backend:
    name: str
    db: Database
    system: SystemScope
    admin_url: str


@pytest.fixture(scope="module")
def citus_target() -> Iterator[Target]:
    """The Citus coordinator of CITUS_URL, migrated (and so distributed) once for the module."""
    if not CITUS_URL:
        pytest.skip("no Citus coordinator: set CITUS_URL (an admin URL) to run")
    settings = Settings.from_env()
    admin = to_sqlalchemy_url(CITUS_URL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RTV_DB_CONTEXT_MODE", "unsigned")  # the one mode rtv-db supports on Citus
        migrate(admin, settings)
    yield Target(admin, settings.derived_runtime_url(admin), settings.derived_system_url(admin), settings)


@pytest.fixture(params=["postgres", "citus"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "citus":
        t: Target = request.getfixturevalue("citus_target")
        # The engines resolve the mode at their first transaction: unsigned, as migrated.
        request.getfixturevalue("monkeypatch").setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    else:
        # The embedded server, with the policies in the form migrate gives them on Citus.
        t = request.getfixturevalue("target")
        engine = _admin_engine(t.require_admin())
        with engine.begin() as conn:
            plan = citus.plan_distribution(conn)
            citus.apply_policy_rewrites(conn, plan)
            citus.apply_audit_triggers(conn, plan)
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_policies WHERE qual ~* 'select'").scalar() == 0
        engine.dispose()
    db = Database(t.runtime_url)
    system = SystemScope(t.system_url, reason="citus isolation tests")  # type: ignore[arg-type]
    yield Backend(request.param, db, system, t.require_admin())
    db.close()
    system.close()


@pytest.fixture()
def two(backend: Backend) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    ids = make_tenants(backend.system, f"A{uuid.uuid4().hex[:6]}", f"B{uuid.uuid4().hex[:6]}")
    yield ids[0], ids[1]
    with backend.system.transaction() as conn:  # the Citus database is shared between runs
        conn.execute(text("DELETE FROM clients WHERE id = ANY(:ids)"), {"ids": list(ids)})


def test_scoped_query_sees_only_own_rows(backend: Backend, two: tuple[uuid.UUID, uuid.UUID]) -> None:
    a, b = two
    rows_a = with_tenant_scope(backend.db, a).scoped_query(brand_kits)
    rows_b = with_tenant_scope(backend.db, b).scoped_query(brand_kits)
    assert [r.client_id for r in rows_a] == [a]
    assert [r.client_id for r in rows_b] == [b]


def test_no_context_sees_zero_rows(backend: Backend, two: tuple[uuid.UUID, uuid.UUID]) -> None:
    with backend.db.engine.connect() as conn:
        for table in ("clients", "brand_kits", "platform_accounts", "knowledge_bases"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0


def test_context_reaches_every_shard(backend: Backend, two: tuple[uuid.UUID, uuid.UUID]) -> None:
    # No client_id predicate: on Citus this fans out to every shard, and RLS on each worker
    # must see the tenant (SET LOCAL propagated). Zero rows here means the context was lost.
    a, _ = two
    with with_tenant_scope(backend.db, a).scoped_transaction() as scope:
        assert scope.connection.execute(text("SELECT count(*) FROM brand_kits")).scalar() == 1
        assert scope.connection.execute(text("SELECT client_id FROM brand_kits")).scalar() == a
        # The same through a server-side prepared statement.
        driver = scope.connection.connection.driver_connection
        for _ in range(3):
            assert driver.execute("SELECT count(*) FROM brand_kits", prepare=True).fetchone()[0] == 1  # type: ignore[union-attr]


def test_cross_tenant_insert_refused(backend: Backend, two: tuple[uuid.UUID, uuid.UUID]) -> None:
    a, b = two
    with pytest.raises(DBAPIError) as caught:
        with with_tenant_scope(backend.db, a).scoped_transaction() as scope:
            scope.connection.execute(
                text("INSERT INTO brand_kits (client_id, name) VALUES (:b, 'planted')"), {"b": b})
    assert "row-level security" in str(caught.value)
    assert not SHARD_SUFFIX.search(str(caught.value)), str(caught.value)
    assert "planted" not in [r.name for r in with_tenant_scope(backend.db, b).scoped_query(brand_kits)]


def test_moving_a_row_to_another_tenant_refused(backend: Backend, two: tuple[uuid.UUID, uuid.UUID]) -> None:
    a, b = two
    with pytest.raises(DBAPIError) as caught:
        with with_tenant_scope(backend.db, a).scoped_transaction() as scope:
            scope.connection.execute(text("UPDATE brand_kits SET client_id = :b WHERE client_id = :a"), {"a": a, "b": b})
    assert not SHARD_SUFFIX.search(str(caught.value)), str(caught.value)
    assert len(with_tenant_scope(backend.db, a).scoped_query(brand_kits)) == 1


def test_constraint_errors_name_tables_not_shards(backend: Backend, two: tuple[uuid.UUID, uuid.UUID]) -> None:
    a, _ = two
    scope = with_tenant_scope(backend.db, a)
    name = scope.scoped_query(brand_kits)[0].name
    with pytest.raises(IntegrityError) as caught:
        scope.scoped_insert(brand_kits, {"name": name})
    assert '"brand_kits_client_id_name_key"' in str(caught.value)
    assert not SHARD_SUFFIX.search(str(caught.value)), str(caught.value)


# -- Citus only --------------------------------------------------------------------------------------


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_migrate_distributed_every_tenant_table(citus_target: Target) -> None:
    engine = _admin_engine(citus_target.require_admin())
    with engine.connect() as conn:
        rows = {r[0]: r[1:] for r in conn.exec_driver_sql("""
            SELECT logicalrelid::regclass::text, partmethod::text, repmodel::text,
                   column_to_column_name(logicalrelid, partkey), colocationid
            FROM pg_dist_partition""")}
        assert rows["clients"][0] == "n" and rows["clients"][1] == "t"  # a reference table
        colocations = set()
        for table in DISTRIBUTED_TABLES:
            method, _, column, colocation = rows[table]
            assert (method, column) == ("h", "client_id"), table
            colocations.add(colocation)
        assert len(colocations) == 1
        assert list(citus.check_citus(conn, None)) == []
        plan = citus.plan_distribution(conn)
        assert plan.citus and plan.pending == [] and plan.functions == () and plan.policy_rewrites == ()
        assert {(t.table, t.kind) for t in plan.audit_triggers} == {(n, "keep") for n in TENANT_TABLES | {"clients"}}
        assert not plan.audit_guard
        # The audit trigger is on every shard of the tenant tables and on every copy of clients.
        # Placements on the workers (the coordinator, group 0, is not asked); the workers also
        # hold shell tables with the trigger, hence only relations named like a shard are counted.
        placements = conn.execute(text("""
            SELECT count(*) FROM pg_dist_placement p JOIN pg_dist_shard s USING (shardid)
            WHERE p.groupid <> 0 AND s.logicalrelid::regclass::text = ANY(:tables)"""),
            {"tables": sorted(TENANT_TABLES | {"clients"})}).scalar()
        on_workers = conn.exec_driver_sql(
            "SELECT result FROM run_command_on_workers($$SELECT count(*) FROM pg_trigger"
            " WHERE left(tgname, 16) = 'audit_row_change' AND NOT tgisinternal"
            " AND tgrelid::regclass::text ~ '_[0-9]+$'$$)").scalars().all()
        assert placements and sum(int(r) for r in on_workers) == placements, (on_workers, placements)
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'clients'::regclass AND tgname = 'audit_row_change'").scalar() == 1
        # The policy functions exist on every worker.
        results = conn.exec_driver_sql(
            "SELECT success, result FROM run_command_on_workers($$SELECT rtv.current_tenant_id() IS NULL$$)").all()
        assert results and all(ok and res == "t" for ok, res in results)
    engine.dispose()
    assert migrate(citus_target.require_admin(), citus_target.settings).citus_actions == ()


@pytest.fixture()
def unsigned_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines made in the test resolve the context mode at their first transaction: unsigned."""
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")


@needs_citus
@pytest.mark.citus
def test_workers_run_the_plain_readers(citus_target: Target) -> None:
    engine = _admin_engine(citus_target.require_admin())
    with engine.connect() as conn:
        assert citus.database_context_mode(conn) == "unsigned"
        plan = citus.plan_distribution(conn)
        assert plan.context_mode == "unsigned" and plan.context_readers == ()
        # On every worker the readers the policies call read app.* settings, no rtv_secret table.
        for reader in READERS:
            results = conn.exec_driver_sql(
                "SELECT success, result FROM run_command_on_workers($$SELECT prosecdef::text || ':' ||"
                f" (strpos(prosrc, 'rtv_secret') > 0)::text FROM pg_proc WHERE oid = '{reader}'::regprocedure$$)").all()
            assert results and all(ok and res == "false:false" for ok, res in results), (reader, results)
    engine.dispose()


@needs_citus
@pytest.mark.citus
def test_signed_mode_is_refused_on_a_citus_coordinator(citus_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTV_DB_CONTEXT_MODE", raising=False)  # the default: signed
    with pytest.raises(CitusSignedContextError):
        migrate(citus_target.require_admin(), citus_target.settings)
    engine = _admin_engine(citus_target.require_admin())
    with engine.connect() as conn:
        assert citus.database_context_mode(conn) == "unsigned"  # nothing was changed
        assert list(citus.check_citus(conn, None)) == []
    engine.dispose()
    # verify reports the unsigned mode as a finding: the forged-context hole is open on Citus.
    from rtv_db.signing import check_context_mode
    with psycopg.connect(to_libpq_url(citus_target.require_admin())) as conn:
        assert [f["code"] for f in check_context_mode(conn)] == ["context-unsigned"]


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_runtime_role_propagates_set_local(citus_target: Target) -> None:
    with Database(citus_target.runtime_url).engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW citus.propagate_set_commands").scalar() == "local"


def _explain(conn: Connection, stmt: object) -> str:
    compiled = stmt.compile(dialect=conn.dialect)  # type: ignore[attr-defined]
    return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params))


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_scoped_point_query_is_routed_to_one_shard(citus_target: Target) -> None:
    from rtv_db.tenant._statements import build_select

    system = SystemScope(citus_target.system_url, reason="citus routing test")  # type: ignore[arg-type]
    db = Database(citus_target.runtime_url)
    (a,) = make_tenants(system, f"R{uuid.uuid4().hex[:6]}")
    try:
        scope = with_tenant_scope(db, a)
        kit = scope.scoped_query(brand_kits)[0]
        with scope.scoped_transaction() as tx:
            point = _explain(tx.connection, build_select(brand_kits, scope.context, [brand_kits.c.id == kit.id]))
            listing = _explain(tx.connection, build_select(brand_kits, scope.context))
            fan_out = "\n".join(r[0] for r in tx.connection.exec_driver_sql("EXPLAIN SELECT * FROM brand_kits"))
        assert "Task Count: 1" in point, point
        assert "Task Count: 1" in listing, listing
        # RLS alone is not a routing predicate: without client_id the query goes to every shard.
        count = int(re.search(r"Task Count: (\d+)", fan_out).group(1))  # type: ignore[union-attr]
        assert count > 1, fan_out
    finally:
        with system.transaction() as conn:
            conn.execute(text("DELETE FROM clients WHERE id = :a"), {"a": a})
        db.close()
        system.close()


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_an_audited_write_on_citus_leaves_exactly_one_event(citus_target: Target) -> None:
    system = SystemScope(citus_target.system_url, reason="citus audit test")  # type: ignore[arg-type]
    db = Database(citus_target.runtime_url)
    (a,) = make_tenants(system, f"U{uuid.uuid4().hex[:6]}")
    try:
        scope = with_tenant_scope(db, a, correlation_id=f"citus-{a.hex[:8]}")
        kit = scope.scoped_insert(brand_kits, {"name": "audited on citus"})[0]
        scope.scoped_update(brand_kits, {"tone": {"voice": "calm"}}, brand_kits.c.id == kit.id)
        # A multi-row statement through the runtime role: one event per row, no more.
        with scope.scoped_transaction() as tx:
            tx.connection.execute(text(
                "INSERT INTO brand_kits (client_id, name) VALUES"
                + ", ".join(f" (:a, 'bulk {g}')" for g in range(1, 6))), {"a": a})
        # INSERT ... SELECT is sent to the shards as COPY, which RLS refuses: a typed error.
        with pytest.raises(CitusUnsupportedStatementError, match="row-level security") as caught:
            with scope.scoped_transaction() as tx:
                tx.connection.execute(text(
                    "INSERT INTO brand_kits (client_id, name) SELECT :a, 'copied ' || g FROM generate_series(1, 2) g"),
                    {"a": a})
        assert isinstance(caught.value.__cause__, psycopg.errors.FeatureNotSupported)
        scope.scoped_delete(brand_kits, brand_kits.c.id == kit.id)
        # Exactly one event per change (not one per node), named by the table, never by a shard.
        assert _audit_events(system, kit.id) == [("INSERT", "brand_kits"), ("UPDATE", "brand_kits"), ("DELETE", "brand_kits")]
        with system.transaction() as conn:
            bulk = conn.execute(text(
                "SELECT count(*), count(DISTINCT row_id), bool_and(table_name = 'brand_kits') FROM audit_events"
                " WHERE client_id = :a AND action = 'INSERT' AND row_id IN"
                " (SELECT id FROM brand_kits WHERE client_id = :a AND name LIKE 'bulk %')"), {"a": a}).one()
            assert tuple(bulk) == (5, 5, True)
        # The tenant reads the same events through RLS on the workers, with its context.
        page = read_audit_trail(scope, row_id=kit.id)
        assert [(e.action, e.table_name, e.correlation_id) for e in reversed(page.events)] == \
            [(act, "brand_kits", f"citus-{a.hex[:8]}") for act in ("INSERT", "UPDATE", "DELETE")]
        # clients is a reference table: its trigger fires on every node's copy, and the event is
        # written once, on the node of the tenant's audit_events shard.
        with system.transaction() as conn:
            conn.execute(text("UPDATE clients SET name = name || ' (renamed)' WHERE id = :a"), {"a": a})
        assert _audit_events(system, a) == [("INSERT", "clients"), ("UPDATE", "clients")]
    finally:
        with system.transaction() as conn:  # cascades to the tenant tables: one DELETE event per row
            conn.execute(text("DELETE FROM clients WHERE id = :a"), {"a": a})
            deleted = conn.execute(text(
                "SELECT count(*) FROM audit_events WHERE client_id = :a AND action = 'DELETE' AND table_name = 'brand_kits'"),
                {"a": a}).scalar()
        db.close()
        system.close()
    assert deleted == 1 + 1 + 5  # the scoped delete, then the cascade: the seed kit and the five bulk kits


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_audit_purge_on_citus(citus_target: Target) -> None:
    from rtv_db.audit import purge_audit_events
    from rtv_db.errors import AuditError

    system = SystemScope(citus_target.system_url, reason="citus purge test")  # type: ignore[arg-type]
    db = Database(citus_target.runtime_url)
    (a,) = make_tenants(system, f"P{uuid.uuid4().hex[:6]}")
    try:
        with_tenant_scope(db, a).scoped_insert(brand_kits, {"name": "to be purged"})
        with system.transaction() as conn:
            before = conn.execute(text("SELECT count(*) FROM audit_events WHERE client_id = :a"), {"a": a}).scalar()
        assert before >= 2  # the seed kit and this one (events on the workers' shards)
        # Nothing is that old; then everything up to now goes, on every shard.
        assert purge_audit_events(citus_target.require_admin(), "30d") >= 0
        with system.transaction() as conn:
            assert conn.execute(text("SELECT count(*) FROM audit_events WHERE client_id = :a"), {"a": a}).scalar() == before
        assert purge_audit_events(citus_target.require_admin(), "0s") >= before
        with system.transaction() as conn:
            assert conn.execute(text("SELECT count(*) FROM audit_events WHERE client_id = :a"), {"a": a}).scalar() == 0
        # Only the admin (a member of the owner role) may purge; the system role may not.
        with pytest.raises(AuditError, match="only the owner role or an admin"):
            purge_audit_events(citus_target.system_url, "0s")  # type: ignore[arg-type]
    finally:
        with system.transaction() as conn:
            conn.execute(text("DELETE FROM clients WHERE id = :a"), {"a": a})
        db.close()
        system.close()


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_the_runtime_role_cannot_reach_the_workers_directly(citus_target: Target) -> None:
    # Function grants are per node: migrate revokes on every worker what the bootstrap revokes on
    # the coordinator, and Citus's run_command_* (PUBLIC by default: any SQL on every worker).
    engine = _admin_engine(citus_target.require_admin())
    with engine.connect() as conn:
        assert citus.worker_exposure(conn, "rtv_app") == []
    engine.dispose()
    with Database(citus_target.runtime_url).engine.connect() as conn:
        for call in ("SELECT * FROM run_command_on_workers('SELECT 1')",
                     "SELECT * FROM run_command_on_all_nodes('SELECT 1')",
                     "SELECT * FROM run_command_on_shards('brand_kits', 'SELECT 1')"):
            with pytest.raises(DBAPIError, match="permission denied"):
                with conn.begin():
                    conn.exec_driver_sql(call)


# -- the signed context on Citus: each obstacle of docs/citus.md, tried on the cluster -------------


@pytest.fixture()
def probe_schema(citus_target: Target) -> Iterator[str]:
    """A scratch schema on the coordinator: a distributed table, a reference table, a plain table
    on every node (not a Citus table), and functions reading each from inside a shard query."""
    engine = _admin_engine(citus_target.require_admin())
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
        conn.exec_driver_sql("""
            CREATE SCHEMA citus_probe;
            CREATE TABLE citus_probe.dist (k int NOT NULL);
            SELECT create_distributed_table('citus_probe.dist', 'k', shard_count => 4);
            INSERT INTO citus_probe.dist SELECT g FROM generate_series(1, 16) g;
            CREATE TABLE citus_probe.ref_keys (id int PRIMARY KEY, secret text);
            SELECT create_reference_table('citus_probe.ref_keys');
            INSERT INTO citus_probe.ref_keys VALUES (1, 'ref');
            CREATE FUNCTION citus_probe.ref_key(x int) RETURNS text LANGUAGE sql STABLE
                AS $$ SELECT secret FROM citus_probe.ref_keys WHERE id = 1 $$;
            CREATE FUNCTION citus_probe.now_of(x int) RETURNS timestamptz LANGUAGE sql STABLE AS $$ SELECT now() $$;
            CREATE FUNCTION citus_probe.xid_of(x int) RETURNS text LANGUAGE sql STABLE
                AS $$ SELECT (get_current_transaction_id()).transaction_number::text $$;
            GRANT USAGE ON SCHEMA citus_probe TO rtv_app;
            GRANT SELECT ON citus_probe.dist TO rtv_app;
            GRANT EXECUTE ON FUNCTION citus_probe.xid_of(int) TO rtv_app;
        """)
    with engine.connect() as conn:  # run_command_on_all_nodes uses its own connections: after the commit
        conn.exec_driver_sql(
            "SELECT run_command_on_all_nodes($$BEGIN; SET LOCAL citus.enable_ddl_propagation TO off;"
            " CREATE TABLE citus_probe.node_keys (id int PRIMARY KEY, secret text);"
            " INSERT INTO citus_probe.node_keys VALUES (1, 'node ' || current_setting('port')); COMMIT$$)")
        conn.commit()
    with engine.begin() as conn:  # created on every node, where node_keys now exists
        conn.exec_driver_sql("CREATE FUNCTION citus_probe.node_key(x int) RETURNS text LANGUAGE sql STABLE"
                             " AS $$ SELECT secret FROM citus_probe.node_keys WHERE id = 1 $$")
    yield "citus_probe"
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA citus_probe CASCADE")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT run_command_on_workers($$DROP SCHEMA IF EXISTS citus_probe CASCADE$$)")
        conn.commit()
    engine.dispose()


@needs_citus
@pytest.mark.citus
def test_keys_in_a_reference_table_cannot_be_read_in_a_shard_query(citus_target: Target, probe_schema: str) -> None:
    engine = _admin_engine(citus_target.require_admin())
    with engine.connect() as conn:
        # A reader that looks the key up in a reference table fails in every shard query.
        for query in ("SELECT citus_probe.ref_key(k) FROM citus_probe.dist WHERE k = 1",
                      "SELECT count(*) FROM citus_probe.dist WHERE citus_probe.ref_key(k) = 'ref'"):
            with pytest.raises(DBAPIError, match="cannot execute a distributed query from a query on a shard"):
                conn.exec_driver_sql(query)
            conn.rollback()
        # A plain table on each node is readable there: per-node copies of the keys would work,
        # but they are outside Citus (rtv-db would have to keep every node's copy in step).
        values = {r[0] for r in conn.exec_driver_sql("SELECT citus_probe.node_key(k) FROM citus_probe.dist")}
        assert len(values) == 2 and all(v.startswith("node ") for v in values), values  # one per worker
    engine.dispose()


@needs_citus
@pytest.mark.citus
def test_now_on_the_workers_is_not_the_coordinators(citus_target: Target, probe_schema: str) -> None:
    engine = _admin_engine(citus_target.require_admin())
    with engine.begin() as conn:
        coordinator = conn.exec_driver_sql("SELECT now()").scalar_one()
        conn.exec_driver_sql("SELECT pg_sleep(0.3)")
        workers = [r[0] for r in conn.exec_driver_sql("SELECT DISTINCT citus_probe.now_of(k) FROM citus_probe.dist")]
    engine.dispose()
    # The workers' now() is the start of their remote transaction, opened at the first shard access.
    assert workers and all((w - coordinator).total_seconds() >= 0.3 for w in workers), (coordinator, workers)


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_the_runtime_role_can_claim_a_transaction_id_and_a_global_pid(citus_target: Target, probe_schema: str) -> None:
    # What both sides of a Citus transaction know (its distributed transaction id, the global
    # pid) is not a binding: the runtime role sets either to any value it likes.
    with Database(citus_target.runtime_url).engine.connect() as conn:
        with conn.begin():
            conn.exec_driver_sql("SELECT assign_distributed_transaction_id(1, 4242424242, now())")
            seen = {r[0] for r in conn.exec_driver_sql("SELECT DISTINCT citus_probe.xid_of(k) FROM citus_probe.dist")}
        assert seen == {"4242424242"}  # every worker believes the claimed id
        with conn.begin():
            own = conn.exec_driver_sql("SELECT citus_backend_gpid()").scalar_one()
            conn.exec_driver_sql("SET LOCAL application_name = 'citus_internal gpid=10000099999'")
            assert conn.exec_driver_sql("SELECT citus_backend_gpid()").scalar_one() == 10000099999 != own


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_a_forged_set_local_reaches_every_worker(citus_target: Target) -> None:
    # The price of the unsigned mode on Citus, shown on the cluster: SQL on the runtime role
    # names another tenant with SET LOCAL, and every worker believes it.
    system = SystemScope(citus_target.system_url, reason="citus forged context test")  # type: ignore[arg-type]
    db = Database(citus_target.runtime_url)
    a, b = make_tenants(system, f"F{uuid.uuid4().hex[:6]}", f"G{uuid.uuid4().hex[:6]}")
    try:
        with with_tenant_scope(db, a).scoped_transaction() as tx:
            tx.connection.exec_driver_sql(f"SET LOCAL app.current_tenant_id = '{b}'")
            rows = tx.connection.execute(text("SELECT client_id FROM brand_kits")).scalars().all()
        assert rows == [b]
    finally:
        with system.transaction() as conn:
            conn.execute(text("DELETE FROM clients WHERE id = ANY(:ids)"), {"ids": [a, b]})
        db.close()
        system.close()


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_upgrading_a_distributed_database_is_refused(citus_target: Target) -> None:
    before = current_revision(citus_target.require_admin())
    other = "0004" if before != "0004" else "0005"
    with pytest.raises(MigrationError, match="upgrading a distributed Citus database .* is not supported"):
        migrate(citus_target.require_admin(), citus_target.settings, other)
    assert current_revision(citus_target.require_admin()) == before


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_the_shards_keep_the_columns_statistics_targets(citus_target: Target) -> None:
    # Revision 0006's STATISTICS 0 (no planner statistics on tenant content) must hold where the
    # rows are: create_distributed_table copies each column's target to the shards. (Citus refuses
    # ALTER COLUMN ... SET STATISTICS on a distributed table, one reason why migrate refuses to
    # upgrade a distributed database.)
    engine = _admin_engine(citus_target.require_admin())
    with engine.connect() as conn:
        for table in sorted(DISTRIBUTED_TABLES):
            wanted = dict(conn.execute(text(
                "SELECT attname::text, attstattarget FROM pg_attribute WHERE attrelid = CAST(:t AS regclass)"
                " AND attnum > 0 AND NOT attisdropped"), {"t": table}).all())
            rows = conn.execute(text(
                "SELECT success, result FROM run_command_on_shards(CAST(:t AS regclass), $$SELECT string_agg("
                "attname || '=' || attstattarget, ',' ORDER BY attname) FROM pg_attribute WHERE attrelid = '%s'::regclass"
                " AND attnum > 0 AND NOT attisdropped$$)"), {"t": table}).all()
            assert rows
            for ok, result in rows:
                assert ok, result
                assert dict((k, int(v)) for k, v in (p.split("=") for p in result.split(","))) == wanted, (table, result)
    engine.dispose()


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_verify_reports_privileges_left_on_a_worker(citus_target: Target) -> None:
    engine = _admin_engine(citus_target.require_admin())
    grant = "GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO PUBLIC"
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT run_command_on_workers($${grant}$$)")
            conn.commit()
            codes = [f.code for f in citus.check_citus(conn, None)]
        assert codes == ["CITUS_WORKER_PRIVILEGES"]
    finally:  # migrate puts the revoke back on every worker
        assert any("revoked" in a for a in migrate(citus_target.require_admin(), citus_target.settings).citus_actions)
    with engine.connect() as conn:
        assert list(citus.check_citus(conn, None)) == []
    engine.dispose()


@needs_citus
@pytest.mark.citus
@pytest.mark.usefixtures("unsigned_env")
def test_verify_knows_the_citus_forms_of_rtv_functions(citus_target: Target) -> None:
    """Issue 24, item 7 on Citus: the functions the distribution rewrites (the audit trigger's guard,
    to_uuid_or_null, the plain readers of unsigned mode) are compared in their Citus form, and a
    weakened one is still found."""
    from rtv_db.verify import check_function_definitions, verify

    admin = citus_target.require_admin()
    assert verify(admin, checks=[check_function_definitions]) == []
    with psycopg.connect(to_libpq_url(admin), autocommit=True) as conn:
        (definition,) = conn.execute("SELECT pg_get_functiondef('rtv.current_lane()'::regprocedure)").fetchone()
        try:
            conn.execute("CREATE OR REPLACE FUNCTION rtv.current_lane() RETURNS text LANGUAGE sql STABLE"
                         " AS $$ SELECT 'api'::text $$")
            assert [f.code for f in verify(admin, checks=[check_function_definitions])] == ["FUNCTION_ALTERED"]
        finally:
            conn.execute(definition)
