"""Checks for what an owner-level mistake or attacker would plant (issue 16): look-alike context
functions, readers that no longer verify, triggers and rules on tenant tables, readable tables
without a tenant, LEAKPROOF and privileged SECURITY DEFINER functions, shared sequences, the
secret schema and its keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from psycopg import Connection

from ._model import (
    _USER_SCHEMA,
    Finding,
    VerifyConfig,
    _role_oid,
    _scalar,
    register_check,
    tenant_tables,
)
from .policies import _tenant_col


# -- what an owner-level mistake or attacker would plant (issue 16) ------------------------------

# The readers the policies and the audit trigger call, as revision 0005 defines them (signed mode).
_SIGNED_READERS = {
    "current_tenant_id": "tenant_id",
    "current_platform_account_id": "platform_account_id",
    "current_lane": "lane",
    "current_user_id": "user_id",
    "current_correlation_id": "correlation_id",
}


def _norm_sql(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip().rstrip(";").strip()


@register_check
def check_policy_functions(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Functions a policy on a tenant table calls must be PostgreSQL's or rtv's own (by schema oid)."""
    for t in tenant_tables(conn, config):
        for policy, function, schema in conn.execute(
            """
            SELECT pol.polname, p.oid::regprocedure::text, n.nspname
            FROM pg_policy pol
            JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = pol.oid
                            AND d.refclassid = 'pg_proc'::regclass
            JOIN pg_proc p ON p.oid = d.refobjid JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE pol.polrelid = %s AND n.nspname NOT IN ('pg_catalog', %s)
            ORDER BY 1, 2
            """,
            (t.oid, config.tenant_schema),
        ):
            yield Finding(
                "POLICY_FOREIGN_FUNCTION", "error", f"{t.name}: policy {policy}",
                f"policy {policy} on {t.name} calls {function} (schema {schema}), not a function of "
                f"{config.tenant_schema} or pg_catalog",
                "A function with the name of a context reader in another schema can return any tenant "
                "(or read a plain setting any SQL can change): the policy looks right by name and "
                "isolates nothing.",
                f"ALTER POLICY {policy} ON {t.name} USING ({_tenant_col(conn, t)} = (SELECT "
                f"{config.tenant_schema}.current_tenant_id())) WITH CHECK (same); then DROP FUNCTION {function};",
            )


@register_check
def check_signed_readers(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """In signed mode the context readers must be revision 0005's: SECURITY DEFINER, fixed
    search_path, reading rtv_secret.verified_context() and nothing else."""
    from ..signing import check_context_mode as context_mode_findings

    if not _scalar(conn, "SELECT EXISTS (SELECT FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                         "WHERE n.nspname = 'rtv_secret' AND p.proname = 'verified_context')"):
        return  # before revision 0004/0005: CONTEXT_UNSIGNED or the older readers
    if context_mode_findings(conn):
        return  # unsigned mode: plain readers are expected (CONTEXT_UNSIGNED says it)
    for name, field_name in _SIGNED_READERS.items():
        row = conn.execute(
            """
            SELECT p.oid::regprocedure::text, p.prosecdef, l.lanname, p.prosrc, p.proconfig
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
            WHERE n.nspname = %s AND p.proname = %s AND p.pronargs = 0
            """,
            (config.tenant_schema, name),
        ).fetchone()
        if row is None:
            continue
        signature, secdef, language, source, proconfig = row
        expected = f"SELECT c.{field_name} FROM rtv_secret.verified_context() c"
        problems = []
        if not secdef:
            problems.append("not SECURITY DEFINER")
        if language != "sql" or _norm_sql(source) != expected:
            problems.append(f"its body is not `{expected}`")
        if "search_path=pg_catalog, pg_temp" not in (proconfig or []):
            problems.append("no search_path = pg_catalog, pg_temp")
        if problems:
            yield Finding(
                "READER_NOT_SIGNED", "error", f"function {signature}",
                f"context reader {signature} is not the signed reader: {'; '.join(problems)}",
                "The policies trust what this function returns. In signed mode it must return the "
                "tenant of the verified token spent by this transaction; a reader of a plain setting "
                "(or anything else) lets injected SQL choose the tenant.",
                "Run `rtv-db migrate` after restoring revision 0005's definition (rtv-db downgrade to "
                "0004 and migrate again re-creates it), and find out who replaced it.",
            )


@register_check
def check_tenant_table_triggers(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """No trigger on a tenant table but rtv's own (audit, and the search key of revision 0007); no rule at all."""
    for t in tenant_tables(conn, config):
        for trigger, function in conn.execute(
            """
            SELECT tg.tgname, tg.tgfoid::regprocedure::text
            FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE tg.tgrelid = %s AND NOT tg.tgisinternal
              AND NOT (n.nspname = %s AND (tg.tgname, p.proname) IN (('audit_row_change', 'audit_row_change'),
                                                                     ('assign_search_key', 'assign_search_key')))
            ORDER BY 1
            """,
            (t.oid, config.tenant_schema),
        ):
            yield Finding(
                "TRIGGER_ON_TENANT_TABLE", "error", f"{t.name}: trigger {trigger}",
                f"trigger {trigger} on {t.name} runs {function} (rtv installs only its audit and search-key triggers)",
                "A trigger runs on every tenant's rows, with its function owner's rights when SECURITY "
                "DEFINER: it can copy each row into a table the runtime role reads, or change rows "
                "RLS would not let the writer touch.",
                f"DROP TRIGGER {trigger} ON {t.name};",
            )
        for (rule,) in conn.execute("SELECT rulename FROM pg_rewrite WHERE ev_class = %s ORDER BY 1", (t.oid,)):
            yield Finding(
                "RULE_ON_TENANT_TABLE", "error", f"{t.name}: rule {rule}",
                f"rule {rule} on {t.name} rewrites statements on a tenant table",
                "A rule (CREATE RULE ... DO ALSO / INSTEAD) runs its actions with the table owner's "
                "rights: it can copy every tenant's new rows into a table anyone reads.",
                f"DROP RULE {rule} ON {t.name};",
            )


@register_check
def check_readable_untenanted_tables(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role (or PUBLIC) may SELECT no table without the tenant column but the root."""
    role_oid = _role_oid(conn, config.runtime_role)
    for name, public in conn.execute(
        f"""
        SELECT c.oid::regclass::text,
               EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0 AND a.privilege_type = 'SELECT')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'f', 'm') AND {_USER_SCHEMA}
          AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = %(col)s
                          AND NOT a.attisdropped)
          AND NOT (c.relname = %(root)s AND n.nspname = %(schema)s)
          AND NOT c.oid::regclass::text = ANY (%(shared)s)
          AND (EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0 AND a.privilege_type = 'SELECT')
               OR (%(role)s::oid IS NOT NULL AND has_table_privilege(%(role)s::oid, c.oid, 'SELECT')))
        ORDER BY 1
        """,
        {"col": config.tenant_column, "root": config.tenant_root, "schema": config.schema,
         "shared": list(config.shared_tables), "role": role_oid},
    ):
        grantee = "PUBLIC" if public else config.runtime_role
        yield Finding(
            "UNTENANTED_TABLE_READABLE", "error", name,
            f"{grantee} may SELECT {name}, which has no {config.tenant_column} column",
            "A table without the tenant column has no tenant policy: every tenant reads all of it. "
            "Whatever a trigger, a rule or a job copies into it is readable across tenants.",
            f"REVOKE SELECT ON {name} FROM PUBLIC, {config.runtime_role}; or give it {config.tenant_column} "
            "and a tenant policy (or list it in VerifyConfig.shared_tables if it holds no tenant data).",
        )


@register_check
def check_leakproof_functions(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """LEAKPROOF only on PostgreSQL's own functions."""
    for (signature,) in conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "WHERE p.proleakproof AND p.pronamespace <> 'pg_catalog'::regnamespace ORDER BY 1"
    ):
        yield Finding(
            "LEAKPROOF_FUNCTION", "error", f"function {signature}",
            f"{signature} is LEAKPROOF but not one of PostgreSQL's own functions",
            "The planner runs LEAKPROOF functions before the RLS policy filters rows: one that raises, "
            "logs or stores its argument sees other tenants' values.",
            f"ALTER FUNCTION {signature} NOT LEAKPROOF;",
        )


@register_check
def check_secdef_owners(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """SECURITY DEFINER functions must not run as a superuser or a BYPASSRLS role."""
    for signature, owner, why in conn.execute(
        f"""
        SELECT p.oid::regprocedure::text, r.rolname,
               concat_ws(' and ', CASE WHEN r.rolsuper THEN 'a superuser' END,
                                  CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_roles r ON r.oid = p.proowner
        WHERE p.prosecdef AND (r.rolsuper OR r.rolbypassrls) AND {_USER_SCHEMA}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
        ORDER BY 1
        """
    ):
        yield Finding(
            "SECDEF_PRIVILEGED_OWNER", "error", f"function {signature}",
            f"SECURITY DEFINER function {signature} is owned by {owner} ({why})",
            "It runs as its owner, and a superuser or BYPASSRLS owner is not bound by RLS: whoever may "
            "call it reads or writes every tenant's rows through it.",
            f"ALTER FUNCTION {signature} OWNER TO rtv_owner;  (the owner role, bound by forced RLS)",
        )


@register_check
def check_sequences(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role may use no sequence: one counter shared by all tenants leaks their activity."""
    role_oid = _role_oid(conn, config.runtime_role)
    if role_oid is None:
        return
    for (name,) in conn.execute(
        f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND {_USER_SCHEMA}
          AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(%s, c.oid, 'USAGE, SELECT, UPDATE') END
        ORDER BY 1
        """,
        (role_oid,),
    ):
        yield Finding(
            "SEQUENCE_SHARED", "error", name,
            f"the runtime role {config.runtime_role} may use sequence {name}",
            "A sequence is one counter for all tenants: each tenant sees from the numbers it gets how "
            "many rows the others created, and when (a serial or identity column is such a sequence).",
            f"REVOKE ALL ON SEQUENCE {name} FROM PUBLIC, {config.runtime_role}; use uuid keys "
            "(gen_random_uuid()), as rtv's tables do.",
        )


@register_check
def check_secret_schema(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role must not reach into rtv_secret (keys, spent tokens, verified contexts)."""
    role_oid = _role_oid(conn, config.runtime_role)
    if role_oid is None or not _scalar(conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'rtv_secret')"):
        return
    if _scalar(conn, "SELECT has_schema_privilege(%s, 'rtv_secret', 'USAGE')", (role_oid,)):
        yield Finding(
            "SECRET_SCHEMA_USABLE", "error", "schema rtv_secret",
            f"the runtime role {config.runtime_role} has USAGE on schema rtv_secret",
            "rtv_secret holds the signing keys and the verified contexts; with USAGE, any grant on its "
            "objects (or one to PUBLIC) lets injected SQL read the keys and mint any tenant's token, "
            "or call the verifier directly.",
            f"REVOKE ALL ON SCHEMA rtv_secret FROM PUBLIC, {config.runtime_role};",
        )


@register_check
def check_signing_keys(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The database accepts only the signing keys the application is configured with.

    Needs a role that reads rtv_secret.context_keys (the admin URL); skipped otherwise, and when
    no key configuration is available here.
    """
    keys_oid = _scalar(conn, "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE n.nspname = 'rtv_secret' AND c.relname = 'context_keys'")
    if keys_oid is None or not _scalar(conn, "SELECT has_schema_privilege('rtv_secret', 'USAGE') AND "
                                             "has_table_privilege(%s, 'SELECT')", (keys_oid,)):
        return
    configured = config.key_ids
    if configured is None:
        from ..signing import load_keys

        try:
            configured = tuple(k.key_id for k in load_keys())
        except Exception:  # no key configured where verify runs: nothing to compare with
            return
        if not configured:
            return
    for key_id, created in conn.execute("SELECT key_id, created_at FROM rtv_secret.context_keys ORDER BY 1"):
        if key_id in configured:
            continue
        yield Finding(
            "SIGNING_KEY_UNEXPECTED", "error", f"key {key_id}",
            f"the database accepts signing key {key_id} (installed {created}), which the application's "
            f"configuration does not have ({', '.join(configured)})",
            "Whoever knows an accepted key's secret mints a valid token for any tenant: an extra key "
            "(a known secret, a test key) is a master key to every tenant's rows.",
            f"`rtv-db key retire {key_id}` (or DELETE FROM rtv_secret.context_keys WHERE key_id = "
            f"'{key_id}' as the owner), unless it is a rotation in progress: then configure it.",
        )
