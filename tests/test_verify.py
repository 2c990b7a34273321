"""`rtv-db verify`: the migrated schema is clean, and each deliberate breakage is caught.

Each case breaks one thing in the test's own database (as the superuser ``admin_conn``) and
checks the exact set of finding codes. Roles are cluster-wide, so role cases use a throw-away
role with a unique name as the "runtime role" and drop it afterwards.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from rtv_db.cli import cli
from rtv_db.config import runtime_role_settings
from rtv_db.verify import CHECKS, Finding, VerifyConfig, register_check, verify

ALL_CODES = {
    "FUNCTION_ALTERED", "FUNCTION_MISSING", "FUNCTION_UNEXPECTED",
    "RLS_NOT_ENABLED", "RLS_NOT_FORCED", "POLICY_MISSING", "POLICY_ALWAYS_TRUE", "POLICY_PER_ROW_CONTEXT",
    "ROLE_MISSING", "ROLE_SUPERUSER", "ROLE_BYPASSRLS", "ROLE_OWNS_TABLE", "ROLE_TRUNCATE", "ROLE_CAN_CREATE",
    "ROLE_CAN_CREATE_TEMP", "ROLE_MEMBER_OF_PRIVILEGED", "KEY_WITHOUT_TENANT", "FK_NOT_TENANT_COMPOSITE",
    "INDEX_NO_TENANT_LEAD", "VIEW_NOT_SECURITY_INVOKER", "MATVIEW_OVER_TENANT", "SECDEF_NO_SEARCH_PATH",
    "CONTEXT_UNSIGNED", "ROLE_SETTINGS_UNEXPECTED", "ROLE_TIMEOUTS_MISSING", "ROLE_LOGS_PARAMETERS",
    "ROLE_TEMP_FILES_UNBOUNDED",  # issue 24 (item 5)
    "ROLE_CAN_SIGNAL_SESSIONS", "ROLE_CAN_LOCK_ADVISORY", "ROLE_CAN_USE_LARGE_OBJECTS", "ROLE_CAN_READ_QUERY_TEXT",
    # issue 16
    "POLICY_FOREIGN_FUNCTION", "READER_NOT_SIGNED", "TRIGGER_ON_TENANT_TABLE", "RULE_ON_TENANT_TABLE",
    "UNTENANTED_TABLE_READABLE", "LEAKPROOF_FUNCTION", "SECDEF_PRIVILEGED_OWNER", "SEQUENCE_SHARED",
    "SECRET_SCHEMA_USABLE", "SIGNING_KEY_UNEXPECTED",
    # issue 14
    "VECTOR_INDEX_SHARED", "SEARCH_KEY_TRIGGER_MISSING", "SEARCH_INDEX_MIXED",
    # issue 24 (item 8)
    "SEARCH_INDEX_WALKABLE",
    # issue 24 (items 1, 11, 12)
    "INDEX_NOT_TENANT_LED", "TENANT_COLUMN_STATISTICS",
}


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


@pytest.fixture()
def role_factory(admin_conn: psycopg.Connection) -> Iterator:
    """Create uniquely named throw-away roles; drop them (and what they own here) at the end.

    Each gets the settings `rtv-db migrate` gives the runtime role in this database (timeouts,
    log parameters), so that a fresh one is clean.
    """
    made: list[str] = []
    database = admin_conn.execute("SELECT current_database()").fetchone()[0]

    def make(attributes: str = "LOGIN") -> str:
        name = f"rtv_vt_{uuid.uuid4().hex[:10]}"
        admin_conn.execute(sql.SQL("CREATE ROLE {} " + attributes).format(sql.Identifier(name)))
        made.append(name)
        for key, value in runtime_role_settings().items():
            admin_conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier(database), sql.Identifier(key), sql.Literal(value)))
        return name

    yield make
    for name in reversed(made):
        admin_conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        admin_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def run(target, **kwargs) -> list[Finding]:
    return verify(target.require_admin(), **kwargs)


# -- the real schema ------------------------------------------------------------------------------


def test_migrated_schema_is_clean(target):
    findings = run(target)
    assert findings == [], [f"{f.code} {f.object}: {f.message}" for f in findings]


def test_clean_also_when_run_as_the_runtime_role(target):
    assert verify(target.runtime_url) == []


def test_every_finding_explains_itself(target, admin_conn):
    admin_conn.execute("ALTER TABLE brand_kits NO FORCE ROW LEVEL SECURITY")
    (finding,) = run(target)
    assert finding.code == "RLS_NOT_FORCED" and finding.severity == "error" and finding.object == "brand_kits"
    assert finding.message and finding.why and "FORCE ROW LEVEL SECURITY" in finding.fix


# -- tables and policies --------------------------------------------------------------------------

# A well-formed extra tenant table: each case below changes one thing about it.
GOOD_TABLE = """
CREATE TABLE notes (client_id uuid NOT NULL REFERENCES clients (id), id uuid NOT NULL, body text,
                    PRIMARY KEY (client_id, id));
ALTER TABLE notes ALTER COLUMN client_id SET STATISTICS 0, ALTER COLUMN id SET STATISTICS 0,
    ALTER COLUMN body SET STATISTICS 0;
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE notes FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON notes USING (client_id = (SELECT rtv.current_tenant_id()))
    WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO rtv_app;
"""

TABLE_CASES = {
    "a correct extra table": ("", set()),
    "RLS disabled": ("ALTER TABLE notes NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY",
                     {"RLS_NOT_ENABLED", "RLS_NOT_FORCED"}),
    "RLS not forced": ("ALTER TABLE notes NO FORCE ROW LEVEL SECURITY", {"RLS_NOT_FORCED"}),
    "a command without policy": (
        "DROP POLICY tenant_isolation ON notes;"
        "CREATE POLICY sel ON notes FOR SELECT USING (client_id = (SELECT rtv.current_tenant_id()));"
        "CREATE POLICY ins ON notes FOR INSERT WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));"
        "CREATE POLICY upd ON notes FOR UPDATE USING (client_id = (SELECT rtv.current_tenant_id()));",
        {"POLICY_MISSING"},  # DELETE
    ),
    "per-command policies covering all": (
        "DROP POLICY tenant_isolation ON notes;"
        "CREATE POLICY sel ON notes FOR SELECT USING (client_id = (SELECT rtv.current_tenant_id()));"
        "CREATE POLICY ins ON notes FOR INSERT WITH CHECK (client_id = (SELECT rtv.current_tenant_id()));"
        "CREATE POLICY upd ON notes FOR UPDATE USING (client_id = (SELECT rtv.current_tenant_id()));"
        "CREATE POLICY del ON notes FOR DELETE USING (client_id = (SELECT rtv.current_tenant_id()));",
        set(),
    ),
    "a command the runtime role may not run needs no policy": (
        "DROP POLICY tenant_isolation ON notes; REVOKE INSERT, UPDATE, DELETE ON notes FROM rtv_app;"
        "CREATE POLICY sel ON notes FOR SELECT USING (client_id = (SELECT rtv.current_tenant_id()));",
        set(),
    ),
    "only a restrictive policy": (
        "DROP POLICY tenant_isolation ON notes;"
        "CREATE POLICY r ON notes AS RESTRICTIVE USING (client_id = (SELECT rtv.current_tenant_id()));",
        {"POLICY_MISSING"},
    ),
    "policy for another role only": (
        "DROP POLICY tenant_isolation ON notes;"
        "CREATE POLICY other ON notes TO rtv_system USING (client_id = (SELECT rtv.current_tenant_id()));",
        {"POLICY_MISSING"},
    ),
    "USING (true)": ("CREATE POLICY leak ON notes FOR SELECT USING (true)", {"POLICY_ALWAYS_TRUE"}),
    "a policy not about the tenant": ("CREATE POLICY leak ON notes FOR SELECT USING (body IS NOT NULL)",
                                      {"POLICY_ALWAYS_TRUE"}),
    "INSERT policy without check": ("CREATE POLICY leak ON notes FOR INSERT WITH CHECK (1 = 1)",
                                    {"POLICY_ALWAYS_TRUE"}),
    "an untenanted policy for another role only": (
        "CREATE POLICY maintenance ON notes FOR SELECT TO rtv_owner USING (body IS NOT NULL)", set()),
    "an untenanted policy for PUBLIC": ("CREATE POLICY leak ON notes FOR SELECT TO PUBLIC USING (body IS NOT NULL)",
                                        {"POLICY_ALWAYS_TRUE"}),
    "an untenanted policy for the runtime role": ("CREATE POLICY leak ON notes FOR DELETE TO rtv_app USING (true)",
                                                  {"POLICY_ALWAYS_TRUE"}),
    "tenant condition OR true": (
        "CREATE POLICY leak ON notes FOR SELECT USING (client_id = (SELECT rtv.current_tenant_id()) OR body = 'x')",
        {"POLICY_ALWAYS_TRUE"}),
    "open when no tenant is set": (
        "CREATE POLICY leak ON notes FOR SELECT"
        " USING ((SELECT rtv.current_tenant_id()) IS NULL OR client_id = (SELECT rtv.current_tenant_id()))",
        {"POLICY_ALWAYS_TRUE"}),
    "tenant condition AND more": (
        "ALTER POLICY tenant_isolation ON notes USING (body <> 'x' AND (client_id = (SELECT rtv.current_tenant_id())"
        " OR client_id = (SELECT rtv.current_tenant_id())))",
        set()),
    "a restrictive always-true policy is harmless": ("CREATE POLICY narrow ON notes AS RESTRICTIVE USING (true)",
                                                     set()),
    "context function per row": (
        "ALTER POLICY tenant_isolation ON notes USING (client_id = rtv.current_tenant_id())"
        " WITH CHECK (client_id = rtv.current_tenant_id())",
        {"POLICY_PER_ROW_CONTEXT"},
    ),
    "current_setting per row": (
        "ALTER POLICY tenant_isolation ON notes"
        " USING (client_id = current_setting('app.current_tenant_id')::uuid)"
        " WITH CHECK (client_id = (SELECT current_setting('app.current_tenant_id')::uuid))",
        {"POLICY_PER_ROW_CONTEXT", "POLICY_ALWAYS_TRUE"},  # a plain setting: forgeable in signed mode
    ),
    # (An index not led by client_id is also an EXPLAIN ANALYZE oracle: INDEX_NOT_TENANT_LED.)
    "primary key without client_id": (
        "ALTER TABLE notes DROP CONSTRAINT notes_pkey, ADD PRIMARY KEY (id);"
        "CREATE INDEX ON notes (client_id)",
        {"KEY_WITHOUT_TENANT", "INDEX_NOT_TENANT_LED"},
    ),
    "unique constraint without client_id": ("ALTER TABLE notes ADD CONSTRAINT notes_body_key UNIQUE (body)",
                                            {"KEY_WITHOUT_TENANT", "INDEX_NOT_TENANT_LED"}),
    "unique index without client_id": ("CREATE UNIQUE INDEX notes_body_idx ON notes (body)",
                                       {"KEY_WITHOUT_TENANT", "INDEX_NOT_TENANT_LED"}),
    "no index leading with client_id": (
        "ALTER TABLE notes DROP CONSTRAINT notes_pkey, ADD PRIMARY KEY (id, client_id)",
        {"INDEX_NO_TENANT_LEAD", "INDEX_NOT_TENANT_LED"},
    ),
    "foreign key to another tenant table on id only": (
        "ALTER TABLE notes ADD COLUMN brand_kit_id uuid; ALTER TABLE notes ALTER COLUMN brand_kit_id SET STATISTICS 0;"
        "CREATE UNIQUE INDEX brand_kits_id_idx ON brand_kits (id);"
        "ALTER TABLE notes ADD CONSTRAINT notes_brand_kit_fkey FOREIGN KEY (brand_kit_id) REFERENCES brand_kits (id)",
        {"FK_NOT_TENANT_COMPOSITE", "KEY_WITHOUT_TENANT", "INDEX_NOT_TENANT_LED"},  # the index on brand_kits(id) too
    ),
    "foreign key to clients on another column": (
        "ALTER TABLE notes ADD COLUMN partner_id uuid REFERENCES clients (id);"
        "ALTER TABLE notes ALTER COLUMN partner_id SET STATISTICS 0",
        {"FK_NOT_TENANT_COMPOSITE"},
    ),
    "composite foreign key": (
        "ALTER TABLE notes ADD COLUMN brand_kit_id uuid,"
        " ADD FOREIGN KEY (client_id, brand_kit_id) REFERENCES brand_kits (client_id, id);"
        "ALTER TABLE notes ALTER COLUMN brand_kit_id SET STATISTICS 0",
        set(),
    ),
    "a column that collects statistics": ("ALTER TABLE notes ADD COLUMN title text", {"TENANT_COLUMN_STATISTICS"}),
    "view without security_invoker": ("CREATE VIEW all_notes AS SELECT * FROM notes", {"VIEW_NOT_SECURITY_INVOKER"}),
    "view with security_invoker": ("CREATE VIEW my_notes WITH (security_invoker = true) AS SELECT * FROM notes",
                                   set()),
    "a view over a view over a tenant table": (
        "CREATE VIEW my_notes WITH (security_invoker) AS SELECT * FROM notes;"
        "CREATE VIEW note_bodies AS SELECT body FROM my_notes",
        {"VIEW_NOT_SECURITY_INVOKER"},
    ),
    "a view over no tenant table": ("CREATE VIEW answer AS SELECT 42 AS n", set()),
    "materialized view": ("CREATE MATERIALIZED VIEW note_copy AS SELECT * FROM notes", {"MATVIEW_OVER_TENANT"}),
    "SECURITY DEFINER without search_path": (
        "CREATE FUNCTION public.note_count() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " AS 'SELECT count(*) FROM public.notes'; ALTER FUNCTION public.note_count() OWNER TO rtv_owner",
        {"SECDEF_NO_SEARCH_PATH"},
    ),
    "SECURITY DEFINER with search_path": (
        "CREATE FUNCTION public.note_count() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp AS 'SELECT count(*) FROM public.notes';"
        "ALTER FUNCTION public.note_count() OWNER TO rtv_owner",
        set(),
    ),
}


@pytest.mark.parametrize("case", list(TABLE_CASES), ids=list(TABLE_CASES))
def test_table_breakage_is_caught(target, admin_conn, case):
    breakage, expected = TABLE_CASES[case]
    admin_conn.execute(GOOD_TABLE)
    if breakage:
        admin_conn.execute(breakage)
    findings = run(target)
    assert codes(findings) == expected, [f"{f.code} {f.object}: {f.message}" for f in findings]


PARTITIONED = """
CREATE TABLE events (client_id uuid NOT NULL, id uuid NOT NULL, PRIMARY KEY (client_id, id))
    PARTITION BY HASH (client_id);
CREATE TABLE events_p0 PARTITION OF events FOR VALUES WITH (MODULUS 1, REMAINDER 0);
ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON events USING (client_id = (SELECT rtv.current_tenant_id()));
GRANT SELECT ON events TO rtv_app;
ALTER TABLE events ALTER COLUMN client_id SET STATISTICS 0, ALTER COLUMN id SET STATISTICS 0;
"""


def test_partition_reachable_only_through_its_parent_is_clean(target, admin_conn):
    admin_conn.execute(PARTITIONED)
    assert run(target) == []


def test_partition_granted_directly_needs_its_own_rls(target, admin_conn):
    admin_conn.execute(PARTITIONED + "GRANT SELECT ON events_p0 TO rtv_app")
    assert {(f.code, f.object) for f in run(target)} == {("RLS_NOT_ENABLED", "events_p0"), ("RLS_NOT_FORCED", "events_p0")}


def test_restrictive_only_says_why(target, admin_conn):
    admin_conn.execute(GOOD_TABLE + TABLE_CASES["only a restrictive policy"][0])
    messages = [f.message for f in run(target) if f.code == "POLICY_MISSING"]
    assert len(messages) == 4 and all("RESTRICTIVE" in m for m in messages)


def test_breaking_the_real_schema(target, admin_conn):
    admin_conn.execute("ALTER TABLE platform_actions DISABLE ROW LEVEL SECURITY;"
                       "CREATE POLICY open ON brand_kits FOR SELECT USING (true)")
    found = {(f.code, f.object) for f in run(target)}
    assert ("RLS_NOT_ENABLED", "platform_actions") in found
    assert ("POLICY_ALWAYS_TRUE", "brand_kits: policy open") in found


def test_a_tenant_table_in_another_schema_is_checked_too(target, admin_conn):
    admin_conn.execute("CREATE SCHEMA other; CREATE TABLE other.t (client_id uuid PRIMARY KEY)")
    assert {(f.code, f.object) for f in run(target)} == {("RLS_NOT_ENABLED", "other.t"), ("RLS_NOT_FORCED", "other.t")}
    assert {"RLS_NOT_ENABLED", "RLS_NOT_FORCED"} <= codes(run(target, schema="other"))


# -- the runtime role -----------------------------------------------------------------------------


def test_missing_runtime_role(target):
    assert codes(run(target, runtime_role=f"rtv_vt_missing_{uuid.uuid4().hex[:8]}")) == {"ROLE_MISSING"}


def test_fresh_role_is_clean(target, role_factory):
    assert run(target, runtime_role=role_factory()) == []


ROLE_CASES = {
    "BYPASSRLS": ("ALTER ROLE {role} BYPASSRLS", {"ROLE_BYPASSRLS"}),
    "owns a tenant table": ("ALTER TABLE brand_kits OWNER TO {role}", {"ROLE_OWNS_TABLE"}),
    "TRUNCATE": ("GRANT TRUNCATE ON brand_kits TO {role}", {"ROLE_TRUNCATE"}),
    "TRUNCATE through PUBLIC": ("GRANT TRUNCATE ON knowledge_bases TO PUBLIC", {"ROLE_TRUNCATE"}),
    "CREATE on public": ("GRANT CREATE ON SCHEMA public TO {role}", {"ROLE_CAN_CREATE"}),
    "CREATE on rtv": ("GRANT CREATE ON SCHEMA rtv TO {role}", {"ROLE_CAN_CREATE"}),
    "TEMPORARY": ("GRANT TEMPORARY ON DATABASE {database} TO {role}", {"ROLE_CAN_CREATE_TEMP"}),
    "member of a BYPASSRLS role": ("CREATE ROLE {other} NOLOGIN BYPASSRLS; GRANT {other} TO {role}",
                                   {"ROLE_MEMBER_OF_PRIVILEGED"}),
}


@pytest.mark.parametrize("case", list(ROLE_CASES), ids=list(ROLE_CASES))
def test_role_breakage_is_caught(target, admin_conn, role_factory, case):
    statement, expected = ROLE_CASES[case]
    role = role_factory()
    other = f"rtv_vt_{uuid.uuid4().hex[:10]}"
    database = admin_conn.execute("SELECT current_database()").fetchone()[0]
    try:
        admin_conn.execute(statement.format(role=role, other=other, database=f'"{database}"'))
        findings = run(target, runtime_role=role)
    finally:
        if "{other}" in statement:
            admin_conn.execute(f"REVOKE {other} FROM {role}; DROP ROLE {other}")
    assert codes(findings) == expected, [f"{f.code} {f.object}: {f.message}" for f in findings]


def test_superuser_runtime_role(target, role_factory):
    role = role_factory("LOGIN SUPERUSER")
    assert "ROLE_SUPERUSER" in codes(run(target, runtime_role=role))


def test_member_of_the_owner(target, admin_conn, role_factory):
    role = role_factory()
    admin_conn.execute(f"GRANT rtv_owner TO {role}")
    try:
        found = run(target, runtime_role=role)
    finally:
        admin_conn.execute(f"REVOKE rtv_owner FROM {role}")
    assert "ROLE_MEMBER_OF_PRIVILEGED" in codes(found)
    assert any("rtv_owner" in f.message for f in found if f.code == "ROLE_MEMBER_OF_PRIVILEGED")


def test_the_real_runtime_role_made_unsafe(target, admin_conn):
    admin_conn.execute("GRANT TRUNCATE ON platform_accounts TO rtv_app")
    assert {(f.code, f.object) for f in run(target)} == {("ROLE_TRUNCATE", "platform_accounts")}


# -- extension point ------------------------------------------------------------------------------


def test_other_modules_can_add_checks(target):
    def always(conn, config: VerifyConfig):
        assert config.runtime_role == "rtv_app"
        yield Finding("CUSTOM", "warning", "db", "m", "w", "f")

    assert register_check(always) is always
    try:
        assert codes(run(target)) == {"CUSTOM"}
    finally:
        CHECKS.remove(always)
    assert run(target) == []


def test_explicit_checks_only(target, admin_conn):
    from rtv_db.verify import check_views

    admin_conn.execute("ALTER TABLE brand_kits NO FORCE ROW LEVEL SECURITY")
    assert run(target, checks=[check_views]) == []


def test_verify_never_writes(target):
    # The connection is read-only: a check that tries to write fails instead of changing the database.
    def writer(conn, config):
        conn.execute("CREATE TABLE should_not_exist (x int)")
        return []

    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        run(target, checks=[writer])


# -- the command line -----------------------------------------------------------------------------


def test_cli_clean_exits_zero(target):
    result = CliRunner().invoke(cli, ["verify", "--database-url", target.require_admin()])
    assert result.exit_code == 0, result.output
    assert "clean" in result.output


def test_cli_findings_exit_one_with_table(target, admin_conn):
    admin_conn.execute("ALTER TABLE knowledge_chunks NO FORCE ROW LEVEL SECURITY")
    result = CliRunner().invoke(cli, ["verify", "--database-url", target.require_admin()])
    assert result.exit_code == 1, result.output
    assert "RLS_NOT_FORCED" in result.output and "knowledge_chunks" in result.output and "fix:" in result.output


def test_cli_json(target, admin_conn):
    result = CliRunner().invoke(cli, ["verify", "--json", "--database-url", target.require_admin()])
    assert result.exit_code == 0 and json.loads(result.output) == {"clean": True, "count": 0, "findings": []}
    admin_conn.execute("CREATE VIEW leaky AS SELECT * FROM brand_kits")
    result = CliRunner().invoke(cli, ["verify", "--json", "--database-url", target.require_admin()])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["clean"] is False and report["count"] == 1
    (item,) = report["findings"]
    assert item["code"] == "VIEW_NOT_SECURITY_INVOKER" and item["object"] == "leaky"
    assert set(item) == {"code", "severity", "object", "message", "why", "fix"}


def test_cli_runtime_role_option(target, role_factory):
    role = role_factory("LOGIN BYPASSRLS")
    result = CliRunner().invoke(cli, ["verify", "--json", "--runtime-role", role, "--database-url", target.require_admin()])
    assert result.exit_code == 1
    assert [f["code"] for f in json.loads(result.output)["findings"]] == ["ROLE_BYPASSRLS"]


def test_cli_unreachable_database_exits_two():
    result = CliRunner().invoke(cli, ["verify", "--database-url", "postgresql://nobody@127.0.0.1:1/nothing"])
    assert result.exit_code == 2
    assert "cannot connect" in result.output


def test_codes_are_documented():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "verify.md").read_text()
    missing = [c for c in sorted(ALL_CODES) if c not in doc]
    assert not missing, f"codes without documentation: {missing}"


def test_unsigned_context_mode_is_a_finding(target, cluster, monkeypatch):
    from rtv_db import migrate

    assert "CONTEXT_UNSIGNED" not in codes(verify(target.require_admin()))
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    migrate(target.require_admin(), cluster.settings)
    found = [f for f in verify(target.require_admin()) if f.code == "CONTEXT_UNSIGNED"]
    assert len(found) == 1 and found[0].severity == "error"


# -- issue 16: what an owner-level mistake or attacker would plant --------------------------------
# Each is planted as the admin (superuser) in the test's own database; the finding must name it,
# say why and how to fix. The exploits themselves were shown in the issue; here, the detection.

TENANT = "(SELECT rtv.current_tenant_id())"
PLANTED = {
    # extra permissive policies that do not imply the tenant test
    "negated tenant test": (f"CREATE POLICY leak ON brand_kits FOR SELECT USING (client_id <> {TENANT})",
                            {"POLICY_ALWAYS_TRUE"}),
    "NOT (...)": (f"CREATE POLICY leak ON brand_kits FOR SELECT USING (NOT (client_id = {TENANT}))", {"POLICY_ALWAYS_TRUE"}),
    "COALESCE": (f"CREATE POLICY leak ON brand_kits FOR SELECT USING (client_id = COALESCE({TENANT}, client_id))",
                 {"POLICY_ALWAYS_TRUE"}),
    "CASE true on every branch": (
        f"CREATE POLICY leak ON brand_kits FOR SELECT USING (CASE WHEN client_id = {TENANT} THEN true ELSE true END)",
        {"POLICY_ALWAYS_TRUE"}),
    "client_id = client_id": ("CREATE POLICY leak ON brand_kits FOR SELECT USING (client_id = client_id)",
                              {"POLICY_ALWAYS_TRUE"}),
    "OR-ed with the plain setting": (
        f"ALTER POLICY tenant_isolation ON brand_kits USING (client_id = {TENANT}"
        " OR client_id = (SELECT current_setting('app.current_tenant_id', true)::uuid))",
        {"POLICY_ALWAYS_TRUE"}),
    "the real policy AND-ed with more is fine": (
        f"CREATE POLICY narrow ON brand_kits FOR SELECT USING (client_id = {TENANT} AND name <> 'x')", set()),
    # look-alike context function in another schema
    "look-alike function": (
        "CREATE SCHEMA evil; CREATE FUNCTION evil.current_tenant_id() RETURNS uuid LANGUAGE sql STABLE"
        " AS 'SELECT client_id FROM public.brand_kits LIMIT 1';"
        "GRANT USAGE ON SCHEMA evil TO rtv_app; GRANT EXECUTE ON FUNCTION evil.current_tenant_id() TO rtv_app;"
        "ALTER FUNCTION evil.current_tenant_id() OWNER TO rtv_owner;"
        "ALTER POLICY tenant_isolation ON brand_kits USING (client_id = (SELECT evil.current_tenant_id()))"
        " WITH CHECK (client_id = (SELECT evil.current_tenant_id()))",
        {"POLICY_FOREIGN_FUNCTION", "POLICY_ALWAYS_TRUE"}),
    # the reader replaced by an unsigned one while the mode says signed
    "unsigned reader in signed mode": (
        "CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid LANGUAGE sql STABLE SECURITY DEFINER"
        " SET search_path = pg_catalog, pg_temp"
        " AS $$ SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid $$",
        {"READER_NOT_SIGNED", "FUNCTION_ALTERED"}),
    "reader made SECURITY INVOKER": ("ALTER FUNCTION rtv.current_lane() SECURITY INVOKER",
                                     {"READER_NOT_SIGNED", "FUNCTION_ALTERED"}),
    # triggers and rules that copy rows
    "copying trigger": (
        "CREATE TABLE public.loot (x jsonb); GRANT SELECT ON public.loot TO rtv_app;"
        "CREATE FUNCTION public.copy_row() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"
        " SET search_path = pg_catalog AS $$ BEGIN INSERT INTO public.loot VALUES (to_jsonb(NEW)); RETURN NEW; END $$;"
        "ALTER FUNCTION public.copy_row() OWNER TO rtv_owner; ALTER TABLE public.loot OWNER TO rtv_owner;"
        "CREATE TRIGGER copy AFTER INSERT ON brand_kits FOR EACH ROW EXECUTE FUNCTION public.copy_row()",
        {"TRIGGER_ON_TENANT_TABLE", "UNTENANTED_TABLE_READABLE"}),
    "DO ALSO rule": (
        "CREATE TABLE public.loot (name text); ALTER TABLE public.loot OWNER TO rtv_owner;"
        "GRANT SELECT ON public.loot TO PUBLIC;"
        "CREATE RULE copy AS ON INSERT TO brand_kits DO ALSO INSERT INTO public.loot VALUES (NEW.name)",
        {"RULE_ON_TENANT_TABLE", "UNTENANTED_TABLE_READABLE"}),
    "copy of a tenant table in another schema": (
        "CREATE SCHEMA backup; CREATE TABLE backup.brand_kits AS SELECT * FROM public.brand_kits;"
        "ALTER TABLE backup.brand_kits OWNER TO rtv_owner; GRANT USAGE ON SCHEMA backup TO rtv_app;"
        "GRANT SELECT ON backup.brand_kits TO rtv_app;"
        "CREATE INDEX ON backup.brand_kits (client_id)",
        {"RLS_NOT_ENABLED", "RLS_NOT_FORCED", "TENANT_COLUMN_STATISTICS"}),  # a copy's columns collect statistics
    "SELECT to PUBLIC on a table without client_id": (
        "CREATE TABLE public.names AS SELECT name FROM public.brand_kits; ALTER TABLE public.names OWNER TO rtv_owner;"
        "GRANT SELECT ON public.names TO PUBLIC",
        {"UNTENANTED_TABLE_READABLE"}),
    # functions
    "LEAKPROOF function": (
        "CREATE FUNCTION public.leaky(text) RETURNS boolean LANGUAGE plpgsql LEAKPROOF"
        " AS $$ BEGIN RAISE NOTICE '%', $1; RETURN true; END $$",
        {"LEAKPROOF_FUNCTION"}),
    "SECURITY DEFINER owned by a superuser": (
        "CREATE FUNCTION public.count_all() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " SET search_path = pg_catalog AS 'SELECT count(*) FROM public.brand_kits'",
        {"SECDEF_PRIVILEGED_OWNER"}),
    "SECURITY DEFINER owned by the BYPASSRLS system role": (
        "CREATE FUNCTION public.count_all() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " SET search_path = pg_catalog AS 'SELECT count(*) FROM public.brand_kits';"
        "ALTER FUNCTION public.count_all() OWNER TO rtv_system",
        {"SECDEF_PRIVILEGED_OWNER"}),
    # a sequence shared by all tenants
    "serial column": (
        "ALTER TABLE brand_kits ADD COLUMN seq serial; GRANT USAGE ON SEQUENCE brand_kits_seq_seq TO rtv_app;"
        "ALTER TABLE brand_kits ALTER COLUMN seq SET STATISTICS 0",
        {"SEQUENCE_SHARED"}),
    # the secret schema and the keys
    # (with USAGE the runtime role can write clients_slug_key's expression: the slug oracle is back)
    "USAGE on rtv_secret": ("GRANT USAGE ON SCHEMA rtv_secret TO rtv_app", {"SECRET_SCHEMA_USABLE", "INDEX_NOT_TENANT_LED"}),
    # similarity search (issue 14)
    "an HNSW index over every tenant": (
        "CREATE INDEX shared_hnsw ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)", {"VECTOR_INDEX_SHARED"}),
    "an IVFFlat index over two keys": (
        "CREATE INDEX two_keys ON knowledge_chunks USING ivfflat (embedding vector_l2_ops) WITH (lists = 1)"
        " WHERE search_key IN (1, 2)", {"VECTOR_INDEX_SHARED"}),
    "the search-key trigger dropped": ("DROP TRIGGER assign_search_key ON knowledge_chunks",
                                       {"SEARCH_KEY_TRIGGER_MISSING"}),
    "the search-key trigger disabled": ("ALTER TABLE knowledge_chunks DISABLE TRIGGER assign_search_key",
                                        {"SEARCH_KEY_TRIGGER_MISSING"}),
    "a per-tenant index of a key nobody has": (
        "CREATE INDEX orphan ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)"
        " WHERE rtv_secret.search_partition(search_key) = 7",
        {"SEARCH_INDEX_MIXED"}),
    "a per-tenant index any tenant can walk (the form of revisions 0007-0010)": (
        "CREATE INDEX walkable ON knowledge_chunks USING hnsw (embedding vector_cosine_ops) WHERE search_key = 7",
        {"SEARCH_INDEX_WALKABLE", "SEARCH_INDEX_MIXED"}),
    "a per-tenant index on a look-alike of rtv_secret.search_partition": (
        "CREATE FUNCTION public.search_partition(integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE"
        " AS $$ BEGIN RETURN $1; END $$;"
        "CREATE INDEX look_alike ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)"
        " WHERE public.search_partition(search_key) = 7",
        {"SEARCH_INDEX_WALKABLE", "SEARCH_INDEX_MIXED"}),
    "an extra signing key": (
        "INSERT INTO rtv_secret.context_keys (key_id, secret) VALUES ('known', decode(repeat('00', 32), 'hex'))",
        {"SIGNING_KEY_UNEXPECTED"}),
}


@pytest.mark.parametrize("case", list(PLANTED), ids=list(PLANTED))
def test_planted_hole_is_found(target, admin_conn, case):
    statement, expected = PLANTED[case]
    admin_conn.execute(statement)
    findings = run(target)
    assert codes(findings) == expected, [f"{f.code} {f.object}: {f.message}" for f in findings]
    for f in findings:
        assert f.message and len(f.why) > 40 and f.fix, f


def test_planted_holes_seen_by_the_runtime_role_too(target, admin_conn):
    """verify as the runtime role sees the catalog classes (not the keys: it cannot read them)."""
    admin_conn.execute(PLANTED["look-alike function"][0])
    admin_conn.execute(PLANTED["unsigned reader in signed mode"][0])
    assert {"POLICY_FOREIGN_FUNCTION", "READER_NOT_SIGNED"} <= codes(verify(target.runtime_url))


def test_configured_key_ids_are_compared(target):
    from rtv_db.signing import load_keys

    mine = tuple(k.key_id for k in load_keys())
    assert run(target, config=VerifyConfig(key_ids=mine)) == []
    found = run(target, config=VerifyConfig(key_ids=("another",)))
    assert {(f.code, f.object) for f in found} == {("SIGNING_KEY_UNEXPECTED", f"key {k}") for k in mine}
