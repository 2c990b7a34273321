"""``rtv-db verify``: a linter for a live database's tenant isolation.

:func:`verify` connects (any role that can read the catalog will do; an admin URL sees all),
runs every check in :data:`CHECKS` and returns :class:`Finding` objects, each saying what is
wrong, why it matters and how to fix it. An empty list means the database is clean.

A *tenant table* is a table (or partitioned table, or partition) in the configured schema with
a ``client_id`` column, or the ``clients`` table itself (whose ``id`` is the tenant).

Other modules add checks by appending to :data:`CHECKS` (or decorating with
:func:`register_check`); a check is any callable ``(conn, config) -> Iterable[Finding]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import Connection

from .config import to_libpq_url
from .connection import connect_error

__all__ = [
    "Finding",
    "VerifyConfig",
    "Check",
    "CHECKS",
    "register_check",
    "verify",
    "run_checks",
    "findings_to_json",
    "render_report",
    "TenantTable",
    "tenant_tables",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: a stable ``code``, the ``object`` it is about, and what/why/how to fix."""

    code: str
    severity: Severity
    object: str
    message: str
    why: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyConfig:
    """What :func:`verify` checks against: the runtime role and where the tenant tables live."""

    runtime_role: str = "rtv_app"
    schema: str = "public"
    tenant_column: str = "client_id"
    tenant_root: str = "clients"
    # SQL functions that read the tenant context; a policy should call them once per statement.
    context_functions: tuple[str, ...] = (
        "current_tenant_id",
        "current_platform_account_id",
        "current_lane",
        "get_current_tenant",
        "current_user_id",
        "current_correlation_id",
    )
    # What a policy must mention to be about the tenant: one of these functions, or the setting.
    tenant_functions: tuple[str, ...] = ("current_tenant_id",)
    # The schema of rtv's own functions (the context readers, the audit trigger).
    tenant_schema: str = "rtv"
    # Tables without the tenant column the runtime role may read (besides the tenant root).
    shared_tables: tuple[str, ...] = ()
    # The signing key ids the application is configured with (None: from load_keys()).
    key_ids: tuple[str, ...] | None = None
    tenant_setting: str = "app.current_tenant_id"
    # The runtime role's settings in the database as `rtv-db migrate` installs them (key -> value,
    # see rtv_db.config.runtime_role_settings); None: with the timeouts of the environment.
    role_settings: dict[str, str] | None = None
    # Free-form options for checks added by other modules.
    extra: dict[str, Any] = field(default_factory=dict)


Check = Callable[[Connection, VerifyConfig], Iterable[Finding]]

CHECKS: list[Check] = []
"""The checks :func:`verify` runs, in order. Append to add one."""


def register_check(check: Check) -> Check:
    """Add ``check`` to :data:`CHECKS` (usable as a decorator); adding it twice is a no-op."""
    if check not in CHECKS:
        CHECKS.append(check)
    return check


# -- catalog helpers ------------------------------------------------------------------------------

_SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema')"
# Schemas the checks look at beyond the tenant schema: everything that is not PostgreSQL's own.
_USER_SCHEMA = f"n.nspname NOT IN {_SYSTEM_SCHEMAS} AND n.nspname !~ '^pg_(toast|temp)'"


@dataclass(frozen=True)
class TenantTable:
    """A table whose rows belong to one tenant."""

    oid: int
    name: str  # schema-qualified, quoted as needed (regclass text)
    relname: str
    rls_enabled: bool
    rls_forced: bool
    owner: str
    tenant_attnum: int  # the column that names the tenant: client_id, or clients.id
    is_root: bool  # the tenants' own table (clients): its keys are global by design
    is_partition: bool  # queried directly, a partition applies its own policies, not its parent's


def tenant_tables(conn: Connection, config: VerifyConfig) -> list[TenantTable]:
    """The tenant tables: in ``config.schema``, and any table with the tenant column in any other
    non-system schema (a copy of a tenant table elsewhere is one too)."""
    rows = conn.execute(
        f"""
        SELECT c.oid, c.oid::regclass::text, c.relname, c.relrowsecurity, c.relforcerowsecurity,
               pg_get_userbyid(c.relowner),
               COALESCE(tc.attnum, CASE WHEN c.relname = %(root)s THEN rc.attnum END),
               c.relname = %(root)s AND tc.attnum IS NULL AND n.nspname = %(schema)s, c.relispartition
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attribute tc ON tc.attrelid = c.oid AND tc.attname = %(col)s AND NOT tc.attisdropped
        LEFT JOIN pg_attribute rc ON rc.attrelid = c.oid AND rc.attname = 'id' AND NOT rc.attisdropped
        WHERE c.relkind IN ('r', 'p')
          AND ((n.nspname = %(schema)s AND (tc.attnum IS NOT NULL OR c.relname = %(root)s))
               OR (tc.attnum IS NOT NULL AND {_USER_SCHEMA}))
        ORDER BY c.relname
        """,
        {"schema": config.schema, "col": config.tenant_column, "root": config.tenant_root},
    ).fetchall()
    return [TenantTable(*r) for r in rows if r[6]]


def _scalar(conn: Connection, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _role_oid(conn: Connection, role: str) -> int | None:
    row = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row[0] if row else None


# -- the checks -----------------------------------------------------------------------------------

_COMMANDS = {"SELECT": "r", "INSERT": "a", "UPDATE": "w", "DELETE": "d"}
_CMD_NAMES = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}


@register_check
def check_rls_enabled(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Tenant tables must have Row-Level Security enabled and forced.

    A partition is read through its parent's policies; only when the runtime role may also
    use the partition directly (where the parent's policies do not apply) must it have its own.
    """
    role_oid = _role_oid(conn, config.runtime_role)
    for t in tenant_tables(conn, config):
        if t.is_partition and role_oid is not None and not _scalar(
            conn, "SELECT has_table_privilege(%(r)s, %(t)s, 'SELECT, INSERT, UPDATE, DELETE')",
            {"r": role_oid, "t": t.oid},
        ):
            continue
        if not t.rls_enabled:
            yield Finding(
                "RLS_NOT_ENABLED", "error", t.name,
                f"row-level security is not enabled on tenant table {t.name}",
                "Without RLS every role with SELECT sees every tenant's rows: isolation rests on "
                "the application never forgetting a WHERE clause.",
                f"ALTER TABLE {t.name} ENABLE ROW LEVEL SECURITY; then add a tenant policy.",
            )
        if not t.rls_forced:
            yield Finding(
                "RLS_NOT_FORCED", "error", t.name,
                f"row-level security is not forced on tenant table {t.name}",
                "Without FORCE the table owner (and anything running as it: migrations, SECURITY "
                "DEFINER functions, a misconfigured application) bypasses every policy.",
                f"ALTER TABLE {t.name} FORCE ROW LEVEL SECURITY;",
            )


def _policies(conn: Connection, table_oid: int) -> list[tuple[str, str, bool, list[int], str | None, str | None]]:
    return conn.execute(
        """
        SELECT polname, polcmd::text, polpermissive, polroles,
               pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
        FROM pg_policy WHERE polrelid = %s ORDER BY polname
        """,
        (table_oid,),
    ).fetchall()


def _applies_to(conn: Connection, roles: list[int], role_oid: int | None) -> bool:
    """Whether a policy's role list covers the runtime role (PUBLIC, it, or a role it belongs to).

    Without a runtime role (ROLE_MISSING), only PUBLIC policies are known to apply.
    """
    if 0 in roles:
        return True
    if role_oid is None:
        return False
    return bool(_scalar(
        conn, "SELECT bool_or(pg_has_role(%s, r, 'USAGE')) FROM unnest(%s::oid[]) AS r", (role_oid, roles)
    ))


@register_check
def check_policy_coverage(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Each command the runtime role may run on a tenant table needs a permissive policy."""
    role_oid = _role_oid(conn, config.runtime_role)
    if role_oid is None:
        return  # ROLE_MISSING says it: which commands it may run is unknowable
    for t in tenant_tables(conn, config):
        if not t.rls_enabled:
            continue  # reported as RLS_NOT_ENABLED; policies do nothing yet
        policies = [p for p in _policies(conn, t.oid) if _applies_to(conn, p[3], role_oid)]
        for command, letter in _COMMANDS.items():
            if not _scalar(conn, "SELECT has_table_privilege(%s, %s, %s)", (role_oid, t.oid, command)):
                continue  # the role cannot run it at all: no policy needed
            relevant = [p for p in policies if p[1] in (letter, "*")]
            if any(p[2] for p in relevant):
                continue
            restrictive = [p[0] for p in relevant if not p[2]]
            detail = (f" (only RESTRICTIVE policies {', '.join(restrictive)}, which alone grant nothing)"
                      if restrictive else "")
            yield Finding(
                "POLICY_MISSING", "warning", t.name,
                f"no permissive policy for {command} on {t.name} applies to {config.runtime_role}{detail}",
                f"With RLS on and no permissive policy, every {command} by the runtime role silently "
                "matches zero rows (or fails): either the grant is wrong or the policy set is "
                "incomplete, and someone will 'fix' it with a policy that is too broad.",
                f"CREATE POLICY tenant_isolation ON {t.name} USING ({_tenant_col(conn, t)} = "
                "(SELECT rtv.current_tenant_id())) WITH CHECK (same); or revoke "
                f"{command} from {config.runtime_role} if it is not meant to run it.",
            )


def _tenant_col(conn: Connection, t: TenantTable) -> str:
    return str(_scalar(
        conn, "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = %s AND attnum = %s", (t.oid, t.tenant_attnum)
    ))


def _split_top(expr: str, keyword: str) -> list[str]:
    """``expr`` split on ``keyword`` (OR, AND) where it is outside parentheses and string literals."""
    parts, depth, start, i, quoted = [], 0, 0, 0, False
    token = f" {keyword} "
    while i < len(expr):
        ch = expr[i]
        if ch == "'":
            quoted = not quoted  # '' inside a literal toggles twice: still right
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and expr.startswith(token, i):
            parts.append(expr[start:i])
            i += len(token)
            start = i
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def _strip_parens(expr: str) -> str:
    """``expr`` without parentheses that wrap all of it."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for i, ch in enumerate(expr):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(expr) - 1:
                return expr  # the first "(" closes before the end: not one wrapping pair
        expr = expr[1:-1].strip()
    return expr


def _leaf_mentions_tenant(expr: str, column: str, config: VerifyConfig) -> bool:
    """Whether one leaf is exactly ``<tenant column> = <the verified tenant>``: a whitelist of forms.

    Accepted: ``col = (SELECT rtv.current_tenant_id())`` (as pg_get_expr prints it, with its
    ``AS`` alias) and the per-row ``col = rtv.current_tenant_id()`` (which POLICY_PER_ROW_CONTEXT
    reports). Anything else is not the tenant test: ``<>``, ``NOT``, ``COALESCE``, ``CASE``, a
    plain setting (forgeable by any SQL in signed mode), a function of another schema.
    """
    col = rf'(?:{re.escape(column)}|"{re.escape(column)}")'
    funcs = "|".join(re.escape(f) for f in config.tenant_functions)
    call = rf"{re.escape(config.tenant_schema)}\.(?:{funcs})\(\)"
    forms = (rf"^{col}\s*=\s*\(\s*SELECT\s+{call}(?:\s+AS\s+\"?\w+\"?)?\s*\)$", rf"^{col}\s*=\s*{call}$")
    return any(re.match(form, expr.strip(), re.IGNORECASE) for form in forms)


def _mentions_tenant(expr: str, column: str, config: VerifyConfig) -> bool:
    """Whether a policy expression restricts rows to the tenant column = the tenant context.

    Textual, on pg_get_expr's output: every branch of a top-level OR must restrict (any one of
    them grants rows), one conjunct of a top-level AND is enough.
    """
    expr = _strip_parens(expr)
    branches = _split_top(expr, "OR")
    if len(branches) > 1:
        return all(_mentions_tenant(b, column, config) for b in branches)
    conjuncts = _split_top(expr, "AND")
    if len(conjuncts) > 1:
        return any(_mentions_tenant(c, column, config) for c in conjuncts)
    return _leaf_mentions_tenant(expr, column, config)


@register_check
def check_policy_always_true(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """A permissive policy for the runtime role whose condition does not restrict rows to the tenant.

    Policies for other roles only (say, the owner's retention policy) are not the runtime role's
    concern; a runtime role that is a member of such a role is reported by the role checks.
    """
    role_oid = _role_oid(conn, config.runtime_role)
    for t in tenant_tables(conn, config):
        column = _tenant_col(conn, t).strip('"')
        for name, cmd, permissive, roles, qual, check in _policies(conn, t.oid):
            if not permissive:
                continue  # a restrictive policy only ever removes rows
            if not _applies_to(conn, roles, role_oid):
                continue
            exprs: list[tuple[str, str | None]] = []
            if cmd in ("r", "w", "d", "*"):
                exprs.append(("USING", qual))
            if cmd in ("a", "w", "*"):
                # UPDATE and ALL fall back to USING when WITH CHECK is absent.
                exprs.append(("WITH CHECK", check if check is not None or cmd == "a" else qual))
            for clause, expr in exprs:
                if expr is not None and _mentions_tenant(expr, column, config):
                    continue
                shown = "absent (true)" if expr is None else expr
                yield Finding(
                    "POLICY_ALWAYS_TRUE", "error", f"{t.name}: policy {name}",
                    f"{_CMD_NAMES.get(cmd, cmd)} policy {name} on {t.name}: {clause} {shown} does not "
                    f"compare {column} with the current tenant",
                    "Permissive policies are OR-ed: one that does not restrict to the current tenant "
                    "lets every tenant read or write every other tenant's rows, whatever the other "
                    "policies say.",
                    f"Make the condition {column} = (SELECT rtv.current_tenant_id()) (USING and WITH "
                    "CHECK), or make the policy RESTRICTIVE if it only narrows further.",
                )


# A call, optionally schema-qualified, and whether "(SELECT " comes right before it.
_PER_ROW_TEMPLATE = r"(?P<pre>\(\s*SELECT\s+(?:\(\s*)*)?(?<![\w.])(?P<name>(?:\w+\.)?{name})\s*\("


@register_check
def check_policy_per_row_context(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Context functions in policies must be wrapped in a scalar subselect (evaluated once)."""
    setting = re.compile(r"(?P<pre>\(\s*SELECT\s+(?:\(\s*)*)?(?<![\w.])(?P<name>(?:pg_catalog\.)?current_setting)\s*\(\s*'app\.")
    patterns = [re.compile(_PER_ROW_TEMPLATE.format(name=re.escape(f)), re.IGNORECASE) for f in config.context_functions]
    for t in tenant_tables(conn, config):
        for name, _cmd, _perm, _roles, qual, check in _policies(conn, t.oid):
            bare: set[str] = set()
            for expr in (qual, check):
                if expr is None:
                    continue
                for pattern in [*patterns, setting]:
                    for m in pattern.finditer(expr):
                        if not m.group("pre"):
                            bare.add(m.group("name"))
            if bare:
                calls = ", ".join(sorted(bare))
                yield Finding(
                    "POLICY_PER_ROW_CONTEXT", "warning", f"{t.name}: policy {name}",
                    f"policy {name} on {t.name} calls {calls}() per row instead of once per statement",
                    "A bare function call in a policy is evaluated for every row scanned and can keep "
                    "the planner from using the client_id index; wrapped in a scalar subselect it is "
                    "an InitPlan, computed once and used as an index key.",
                    f"Write (SELECT {calls.split(', ')[0]}()) instead of {calls.split(', ')[0]}() in the policy "
                    "(DROP POLICY and CREATE POLICY again, or ALTER POLICY ... USING (...)).",
                )


@register_check
def check_runtime_role_privileges(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role must be bound by RLS: no superuser, no BYPASSRLS, no ownership, no DDL."""
    role = config.runtime_role
    row = conn.execute(
        "SELECT oid, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (role,)
    ).fetchone()
    if row is None:
        yield Finding(
            "ROLE_MISSING", "error", f"role {role}",
            f"the runtime role {role} does not exist",
            "Nothing can be verified about the role the application connects as; the application "
            "is probably connecting as another, possibly privileged, role.",
            "Run `rtv-db migrate` (it creates the roles), or pass --runtime-role with the role "
            "in DATABASE_URL.",
        )
        return
    oid, is_super, bypass = row
    if is_super:
        yield Finding(
            "ROLE_SUPERUSER", "error", f"role {role}", f"the runtime role {role} is a superuser",
            "Superusers bypass Row-Level Security entirely, FORCE or not: every tenant sees every row.",
            f"ALTER ROLE {role} NOSUPERUSER;",
        )
    if bypass:
        yield Finding(
            "ROLE_BYPASSRLS", "error", f"role {role}", f"the runtime role {role} has BYPASSRLS",
            "A BYPASSRLS role ignores every policy: isolation is gone for the application.",
            f"ALTER ROLE {role} NOBYPASSRLS; (cross-tenant jobs use the separate system role).",
        )
    for (name,) in conn.execute(
        f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relowner = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {_USER_SCHEMA}
        ORDER BY 1
        """,
        (oid,),
    ):
        yield Finding(
            "ROLE_OWNS_TABLE", "error", name, f"the runtime role {role} owns {name}",
            "A table's owner can disable or drop its policies, and without FORCE is not bound by "
            "them; the runtime role must own nothing.",
            f"ALTER TABLE {name} OWNER TO rtv_owner;  (the owner role)",
        )
    for (name,) in conn.execute(
        f"""
        SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMA} AND c.relowner <> %(oid)s
          AND has_table_privilege(%(oid)s, c.oid, 'TRUNCATE')
        ORDER BY 1
        """,
        {"oid": oid},
    ):
        yield Finding(
            "ROLE_TRUNCATE", "error", name, f"the runtime role {role} may TRUNCATE {name}",
            "TRUNCATE is not subject to Row-Level Security: one tenant's request could empty the "
            "table for every tenant.",
            f"REVOKE TRUNCATE ON {name} FROM {role};  (and from PUBLIC, if granted there)",
        )
    for (schema,) in conn.execute(
        f"""
        SELECT n.nspname FROM pg_namespace n
        WHERE {_USER_SCHEMA} AND has_schema_privilege(%s, n.oid, 'CREATE') ORDER BY 1
        """,
        (oid,),
    ):
        yield Finding(
            "ROLE_CAN_CREATE", "error", f"schema {schema}", f"the runtime role {role} may CREATE in schema {schema}",
            "A role that creates objects owns them: it can create a table or function that shadows "
            "one on the search_path, or a view without RLS, and run code as whoever uses it.",
            f"REVOKE CREATE ON SCHEMA {schema} FROM {role}, PUBLIC;",
        )
    if _scalar(conn, "SELECT has_database_privilege(%s, current_database(), 'TEMPORARY')", (oid,)):
        yield Finding(
            "ROLE_CAN_CREATE_TEMP", "warning", "database", f"the runtime role {role} may create temporary objects",
            "pg_temp is searched first for relations: a temporary table or view can shadow a tenant "
            "table in unqualified SQL, and a pg_temp function can hijack a SECURITY DEFINER "
            "function without a safe search_path.",
            f"REVOKE TEMPORARY ON DATABASE {_scalar(conn, 'SELECT quote_ident(current_database())')} "
            f"FROM PUBLIC, {role};",
        )
    for member_of, why in conn.execute(
        f"""
        SELECT m.rolname,
               concat_ws(', ',
                   CASE WHEN m.rolsuper THEN 'superuser' END,
                   CASE WHEN m.rolbypassrls THEN 'BYPASSRLS' END,
                   CASE WHEN EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                     WHERE c.relowner = m.oid AND c.relkind IN ('r', 'p') AND {_USER_SCHEMA})
                        THEN 'owns tables' END)
        FROM pg_roles m
        WHERE m.oid <> %(oid)s AND pg_has_role(%(oid)s, m.oid, 'MEMBER')
          AND (m.rolsuper OR m.rolbypassrls OR EXISTS (
                SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relowner = m.oid AND c.relkind IN ('r', 'p') AND {_USER_SCHEMA}))
        ORDER BY 1
        """,
        {"oid": oid},
    ):
        yield Finding(
            "ROLE_MEMBER_OF_PRIVILEGED", "error", f"role {role}",
            f"the runtime role {role} is a member of {member_of} ({why})",
            "A member can SET ROLE to it (or inherits its rights): one SQL statement turns the "
            "application into a role that bypasses or owns the policies.",
            f"REVOKE {member_of} FROM {role};",
        )


# -- the runtime role's settings and what its sessions may do to each other ----------------------

_TIMEOUT_KEYS = ("statement_timeout", "idle_in_transaction_session_timeout")
_LOG_KEYS = ("log_parameter_max_length", "log_parameter_max_length_on_error")


@register_check
def check_runtime_role_settings(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The runtime role's settings must be exactly what `rtv-db migrate` installs.

    The role can change its own (ALTER ROLE current_user SET ...), and every connection of every
    tenant inherits them: a planted search_path breaks them all, statement_timeout = 0 unbounds
    them. The application refuses such a role at connect (RuntimeRoleSettingsError).
    """
    from .config import diff_role_settings, runtime_role_settings_from_env

    role = config.runtime_role
    row = conn.execute(
        """
        SELECT (SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole = r.oid AND s.setdatabase = 0),
               (SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole = r.oid
                  AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())),
               quote_ident(current_database())
        FROM pg_roles r WHERE r.rolname = %s
        """,
        (role,),
    ).fetchone()
    if row is None:
        return  # ROLE_MISSING
    global_settings, database_settings, database = row
    expected = config.role_settings if config.role_settings is not None else runtime_role_settings_from_env()
    diff = diff_role_settings(global_settings, database_settings, expected)
    unexpected = diff.describe(missing=False)
    if unexpected:
        resets = []
        if diff.for_every_database:
            resets.append(f"ALTER ROLE {role} RESET ALL;")
        if diff.unexpected or diff.wrong:
            resets.append(f"ALTER ROLE {role} IN DATABASE {database} RESET ALL;")
        yield Finding(
            "ROLE_SETTINGS_UNEXPECTED", "error", f"role {role}",
            f"the runtime role {role} has settings rtv-db does not install: {'; '.join(unexpected)}",
            "Every connection of every tenant inherits the role's settings, and the runtime role can "
            "change its own (ALTER ROLE current_user SET ...): a search_path breaks every tenant's "
            "next connection, statement_timeout = 0 lets one tenant's statement run for ever. The "
            "application refuses to connect as a role with such settings.",
            "Run `rtv-db migrate` (it resets every setting of the runtime role and installs its "
            f"own), or {' '.join(resets)} then migrate; and find out who changed them.",
        )
    missing_timeouts = [k for k in _TIMEOUT_KEYS if k in diff.missing]
    if missing_timeouts:
        yield Finding(
            "ROLE_TIMEOUTS_MISSING", "warning", f"role {role}",
            f"the runtime role {role} has no {' and no '.join(missing_timeouts)} in this database",
            "Without them one tenant's slow statement or abandoned open transaction holds a pooled "
            "connection, and its locks, for ever. They are role settings so that they hold behind a "
            "pooler (PgBouncer refuses or drops startup options).",
            "Run `rtv-db migrate` (RTV_DB_STATEMENT_TIMEOUT_MS, RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS; "
            f"30 s and 60 s by default), or ALTER ROLE {role} IN DATABASE {database} SET "
            "statement_timeout = 30000 (and idle_in_transaction_session_timeout = 60000).",
        )
    missing_logs = [k for k in _LOG_KEYS if k in diff.missing]
    if missing_logs:
        yield Finding(
            "ROLE_LOGS_PARAMETERS", "warning", f"role {role}",
            f"{' and '.join(missing_logs)} not set to 0 for the runtime role {role} in this database",
            "The signed tenant-context token travels as a bind parameter: with statement logging, or "
            "in the log line of a failed statement, the server writes bind parameters to its log, "
            "where whoever reads the log sees every tenant's tokens.",
            "Run `rtv-db migrate` as a superuser, or ALTER ROLE "
            f"{role} IN DATABASE {database} SET log_parameter_max_length = 0 (and "
            "log_parameter_max_length_on_error = 0).",
        )


# What `rtv-db migrate` revokes from PUBLIC in the database (keep in step with bootstrap.sql):
# (code, severity, what it lets a session do to others, SQL condition on pg_proc p).
_SESSION_FUNCTIONS = (
    ("ROLE_CAN_SIGNAL_SESSIONS", "error",
     "A session may cancel or terminate any other session of the same role: all tenants share the "
     "runtime role, so one tenant's request can end another tenant's transaction (and its work).",
     "p.proname IN ('pg_terminate_backend', 'pg_cancel_backend')"),
    ("ROLE_CAN_LOCK_ADVISORY", "error",
     "An advisory lock is session state that RLS does not scope: a session-level lock outlives the "
     "transaction on a pooled connection, tenants can signal each other through lock ids, and a "
     "tenant holding `rtv-db migrate`'s lock id makes every migration wait.",
     r"(p.proname LIKE 'pg\_advisory\_%%' OR p.proname LIKE 'pg\_try\_advisory\_%%')"),
    ("ROLE_CAN_USE_LARGE_OBJECTS", "error",
     "Large objects are not rows of a tenant table: RLS does not cover them, and an object one "
     "tenant creates is readable and writable by every session of the same role, that is, by every "
     "other tenant.",
     r"(p.proname LIKE 'lo\_%%' OR p.proname IN ('loread', 'lowrite'))"),
    ("ROLE_CAN_READ_QUERY_TEXT", "error",
     "A role sees the query text of its own other sessions in pg_stat_activity: all tenants share "
     "the runtime role, so one tenant reads another's statements, literals included.",
     r"(p.proname = 'pg_stat_get_activity' OR p.proname LIKE 'pg\_stat\_get\_backend\_%%')"),
)


def _session_objects(conn: Connection, role_oid: int, condition: str, code: str) -> list[tuple[str, bool, bool]]:
    """(object, PUBLIC may use it, the runtime role may use it) for one category."""
    rows = conn.execute(
        f"""
        SELECT 'function ' || p.oid::regprocedure::text,
               p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                          WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
               has_function_privilege(%(oid)s, p.oid, 'EXECUTE')
        FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace AND {condition}
        ORDER BY 1
        """,
        {"oid": role_oid},
    ).fetchall()
    if code == "ROLE_CAN_READ_QUERY_TEXT":
        # The views over those functions, and pg_stat_statements when it is installed.
        rows += conn.execute(
            r"""
            SELECT 'view ' || c.oid::regclass::text,
                   EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0 AND a.privilege_type = 'SELECT'),
                   has_table_privilege(%(oid)s, c.oid, 'SELECT')
            FROM pg_class c
            WHERE c.relkind = 'v'
              AND ((c.relnamespace = 'pg_catalog'::regnamespace
                    AND pg_get_viewdef(c.oid) ~ 'pg_stat_get_activity|pg_stat_get_backend_')
                   OR c.oid IN (SELECT d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                                WHERE e.extname = 'pg_stat_statements' AND d.deptype = 'e'
                                  AND d.classid = 'pg_class'::regclass))
            UNION ALL
            SELECT 'function ' || p.oid::regprocedure::text,
                   p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                                              WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'),
                   has_function_privilege(%(oid)s, p.oid, 'EXECUTE')
            FROM pg_proc p
            JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
            JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_stat_statements'
            WHERE p.proname = 'pg_stat_statements'
            ORDER BY 1
            """,
            {"oid": role_oid},
        ).fetchall()
    return [(name, bool(public), bool(held)) for name, public, held in rows]


def _names(objects: list[str], limit: int = 8) -> str:
    shown = ", ".join(o.split(" ", 1)[1] for o in objects[:limit])
    return shown + (f" and {len(objects) - limit} more" if len(objects) > limit else "")


@register_check
def check_runtime_role_sessions(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Sessions of the runtime role must not act on each other: `rtv-db migrate` revokes from PUBLIC
    the functions that signal other backends, take advisory locks, use large objects, or read
    other sessions' query text; neither PUBLIC nor the runtime role may use them."""
    role = config.runtime_role
    row = conn.execute("SELECT oid, rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if row is None:
        return  # ROLE_MISSING
    role_oid, is_super = row
    for code, severity, why, condition in _SESSION_FUNCTIONS:
        objects = _session_objects(conn, role_oid, condition, code)
        public = [name for name, by_public, _held in objects if by_public]
        direct = [name for name, by_public, held in objects if held and not by_public]
        what = {
            "ROLE_CAN_SIGNAL_SESSIONS": "signal other sessions",
            "ROLE_CAN_LOCK_ADVISORY": "take advisory locks",
            "ROLE_CAN_USE_LARGE_OBJECTS": "use large objects",
            "ROLE_CAN_READ_QUERY_TEXT": "read other sessions' query text",
        }[code]
        for grantee, names in (("PUBLIC", public), (f"role {role}", direct if not is_super else [])):
            if not names:
                continue
            functions = [n[len("function "):] for n in names if n.startswith("function ")]
            views = [n[len("view "):] for n in names if n.startswith("view ")]
            grantees = "PUBLIC" if grantee == "PUBLIC" else role
            revokes = []
            if functions:
                listed = ", ".join(functions) if len(functions) <= 4 else "<each function above>"
                revokes.append(f"REVOKE EXECUTE ON FUNCTION {listed} FROM {grantees};")
            if views:
                revokes.append(f"REVOKE SELECT ON {', '.join(views)} FROM {grantees};")
            who = (f"PUBLIC (every role, {role} included)" if grantee == "PUBLIC"
                   else f"the runtime role {role} (not through PUBLIC)")
            yield Finding(
                code, severity, grantee,
                f"{who} may {what} in this database: {_names(names, limit=len(names))}",
                why,
                "Run `rtv-db migrate` as a superuser (it revokes these from PUBLIC and the runtime role "
                "in this database; rtv-db's own roles need none of them), or " + " ".join(revokes),
            )


@register_check
def check_keys(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Keys and foreign keys of tenant tables must include the tenant column."""
    tables = {t.oid: t for t in tenant_tables(conn, config)}
    for t in tables.values():
        if t.is_root:
            continue  # the tenants' own table: its keys are global by design
        for name, kind in conn.execute(
            """
            SELECT ic.relname, CASE WHEN con.contype = 'p' THEN 'primary key'
                                    WHEN con.contype = 'u' THEN 'unique constraint'
                                    ELSE 'unique index' END
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
            WHERE i.indrelid = %s AND i.indisunique AND NOT (%s = ANY (i.indkey::int2[]))
            ORDER BY 1
            """,
            (t.oid, t.tenant_attnum),
        ):
            yield Finding(
                "KEY_WITHOUT_TENANT", "error", f"{t.name}: {name}",
                f"{kind} {name} on {t.name} does not include client_id",
                "A key that is unique across tenants is an oracle: inserting a value another tenant "
                "already uses fails, which tells one tenant what another has (and RLS cannot hide "
                "a unique violation).",
                f"Make it ({config.tenant_column}, ...): drop {name} and recreate it with "
                f"{config.tenant_column} as its first column.",
            )
    for name, src, ref, pairs in conn.execute(
        """
        SELECT con.conname, con.conrelid, con.confrelid,
               array(SELECT ARRAY[k.a, k.b] FROM unnest(con.conkey, con.confkey) AS k(a, b))
        FROM pg_constraint con
        WHERE con.contype = 'f' AND con.conrelid = ANY (%s) AND con.confrelid = ANY (%s)
        ORDER BY con.conrelid, con.conname
        """,
        (list(tables), list(tables)),
    ):
        source, target = tables[src], tables[ref]
        if source.is_root:
            continue
        wanted = [source.tenant_attnum, target.tenant_attnum]
        if wanted in [list(p) for p in pairs]:
            continue
        yield Finding(
            "FK_NOT_TENANT_COMPOSITE", "error", f"{source.name}: {name}",
            f"foreign key {name} from {source.name} to {target.name} does not match "
            f"{config.tenant_column} on both sides",
            "A single-column foreign key lets a row point at another tenant's row (the check runs "
            "without RLS), and its errors reveal whether another tenant's id exists.",
            f"Reference ({config.tenant_column}, id) of {target.name}: FOREIGN KEY "
            f"({config.tenant_column}, <col>) REFERENCES {target.name} ({config.tenant_column}, id).",
        )


@register_check
def check_tenant_index(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Every tenant table needs an index whose first column is the tenant column."""
    for t in tenant_tables(conn, config):
        if t.is_root:
            continue
        has = _scalar(
            conn, "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = %s AND indkey[0] = %s)",
            (t.oid, t.tenant_attnum),
        )
        if not has:
            yield Finding(
                "INDEX_NO_TENANT_LEAD", "warning", t.name,
                f"no index on {t.name} starts with {config.tenant_column}",
                "Every query filters on the tenant; without such an index each one scans the whole "
                "table, across all tenants: one big tenant slows every other.",
                f"CREATE INDEX ON {t.name} ({config.tenant_column}, ...); usually the primary key "
                f"({config.tenant_column}, id) is enough.",
            )


def _reloption(options: Sequence[str] | None, key: str) -> bool:
    for option in options or ():
        name, _, value = option.partition("=")
        if name == key:
            return value.lower() in ("true", "on", "1", "yes")
    return False


@register_check
def check_views(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Views over tenant tables must be security_invoker (else they run as their owner)."""
    tenant = {t.oid for t in tenant_tables(conn, config)}
    views: dict[int, tuple[str, str, list[str] | None]] = {}
    deps: dict[int, set[int]] = {}
    for oid, name, kind, options, ref in conn.execute(
        f"""
        SELECT v.oid, v.oid::regclass::text, v.relkind::text, v.reloptions, d.refobjid
        FROM pg_class v
        JOIN pg_namespace n ON n.oid = v.relnamespace
        JOIN pg_rewrite r ON r.ev_class = v.oid
        JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                        AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> v.oid
        WHERE v.relkind IN ('v', 'm') AND {_USER_SCHEMA}
        """
    ):
        views[oid] = (name, kind, options)
        deps.setdefault(oid, set()).add(ref)

    over_tenant: set[int] = set()
    changed = True
    while changed:  # views over views over tenant tables count too
        changed = False
        for oid, refs in deps.items():
            if oid not in over_tenant and refs & (tenant | over_tenant):
                over_tenant.add(oid)
                changed = True
    for oid in sorted(over_tenant, key=lambda o: views[o][0]):
        name, kind, options = views[oid]
        if kind == "m":
            yield Finding(
                "MATVIEW_OVER_TENANT", "error", name,
                f"materialized view {name} stores rows of tenant tables",
                "A materialized view is a copy made once by its owner; RLS does not apply to reading "
                "it, so whoever may SELECT it sees every tenant's copied rows.",
                f"DROP MATERIALIZED VIEW {name}; use a security_invoker view, or a tenant table with "
                "client_id and its own policies.",
            )
        elif not _reloption(options, "security_invoker"):
            yield Finding(
                "VIEW_NOT_SECURITY_INVOKER", "error", name,
                f"view {name} reads tenant tables without security_invoker",
                "A view runs with its owner's rights; the owner is not bound by RLS (or is bound "
                "with no tenant context), so the view can return every tenant's rows.",
                f"ALTER VIEW {name} SET (security_invoker = true);",
            )


@register_check
def check_security_definer(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """SECURITY DEFINER functions must fix their search_path."""
    for (signature,) in conn.execute(
        f"""
        SELECT p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef AND {_USER_SCHEMA}
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
          AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search\\_path=%')
        ORDER BY 1
        """
    ):
        yield Finding(
            "SECDEF_NO_SEARCH_PATH", "error", f"function {signature}",
            f"SECURITY DEFINER function {signature} has no fixed search_path",
            "It runs with its owner's rights but resolves names through the caller's search_path: "
            "the caller can put its own function or table (e.g. in pg_temp) first and run code "
            "as the owner.",
            f"ALTER FUNCTION {signature} SET search_path = pg_catalog, rtv, public, pg_temp;",
        )


@register_check
def check_context_mode(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The tenant context must be signed (an unsigned one can be forged by injected SQL)."""
    from .signing import check_context_mode as context_mode_findings

    for item in context_mode_findings(conn):
        yield Finding("CONTEXT_UNSIGNED", "error", item["object"], item["message"], item["why"].capitalize() + ".", item["fix"])


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
    from .signing import check_context_mode as context_mode_findings

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
    """No trigger on a tenant table but rtv's audit trigger; no rule at all."""
    for t in tenant_tables(conn, config):
        for trigger, function in conn.execute(
            """
            SELECT tg.tgname, tg.tgfoid::regprocedure::text
            FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE tg.tgrelid = %s AND NOT tg.tgisinternal
              AND NOT (tg.tgname = 'audit_row_change' AND n.nspname = %s AND p.proname = 'audit_row_change')
            ORDER BY 1
            """,
            (t.oid, config.tenant_schema),
        ):
            yield Finding(
                "TRIGGER_ON_TENANT_TABLE", "error", f"{t.name}: trigger {trigger}",
                f"trigger {trigger} on {t.name} runs {function} (rtv installs only its audit trigger)",
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
        from .signing import load_keys

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


# -- running --------------------------------------------------------------------------------------

_SEVERITY_ORDER = {"error": 0, "warning": 1}


def run_checks(conn: Connection, config: VerifyConfig, checks: Iterable[Check] | None = None) -> list[Finding]:
    """Run ``checks`` (default: :data:`CHECKS`) on an open connection; errors first."""
    findings: list[Finding] = []
    for check in list(CHECKS if checks is None else checks):
        findings.extend(check(conn, config))
    return sorted(findings, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.code, f.object))


def verify(
    url: str,
    *,
    runtime_role: str = "rtv_app",
    schema: str = "public",
    checks: Iterable[Check] | None = None,
    config: VerifyConfig | None = None,
) -> list[Finding]:
    """Lint the database at ``url``; an empty list means clean.

    ``url`` may be the admin URL or any role that can read the catalog. Raises
    :class:`~rtv_db.DatabaseConnectionError` when the database cannot be reached.
    """
    config = config or VerifyConfig(runtime_role=runtime_role, schema=schema)
    libpq = to_libpq_url(url)
    try:
        conn = psycopg.connect(libpq, autocommit=True)
    except psycopg.OperationalError as exc:
        raise connect_error(url, exc) from exc
    with conn:
        # Read-only by construction: the linter never changes what it inspects.
        conn.execute("SET default_transaction_read_only = on")
        findings = run_checks(conn, config, checks)
        on_citus = conn.execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus'").fetchone()
    if on_citus and checks is None:
        findings = _with_citus_findings(url, config, findings)
    return findings


def _with_citus_findings(url: str, config: VerifyConfig, findings: list[Finding]) -> list[Finding]:
    """On Citus: add the distribution checks, and drop the findings Citus makes moot."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from . import citus
    from .config import to_sqlalchemy_url

    engine = create_engine(to_sqlalchemy_url(url), poolclass=NullPool)
    try:
        with engine.connect() as sa_conn:
            extra = [Finding(**asdict(f)) for f in citus.check_citus(sa_conn, config)]
    finally:
        engine.dispose()
    kept = [f for f in findings if f.code not in citus.SUPERSEDED_VERIFY_CODES]
    return sorted(kept + extra, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.code, f.object))


def findings_to_json(findings: Iterable[Finding]) -> str:
    """The machine-readable report: ``{"clean": bool, "findings": [...]}``."""
    items = [f.to_dict() for f in findings]
    return json.dumps({"clean": not items, "count": len(items), "findings": items}, indent=2)


def render_report(findings: Sequence[Finding], *, title: str = "rtv-db verify") -> Any:
    """A rich renderable of the report (fits 80 columns): one row per finding, why and fix below it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if not findings:
        return Text.assemble(("clean: ", "bold green"), "no findings (RLS, roles, keys, indexes, views, functions)")
    table = Table(title=f"{title}: {len(findings)} finding(s)", title_justify="left", show_lines=True, expand=False)
    table.add_column("code", style="bold", overflow="fold", max_width=26)
    table.add_column("finding", overflow="fold", ratio=1)
    for f in findings:
        colour = "red" if f.severity == "error" else "yellow"
        detail = Text()
        detail.append(f.message + "\n")
        detail.append("why: ", style="bold")
        detail.append(f.why + "\n", style="dim")
        detail.append("fix: ", style="bold")
        detail.append(f.fix, style="cyan")
        table.add_row(Text.assemble((f.code, colour), "\n", (f.severity, colour), "\n", (f.object, "dim")), detail)
    return Group(table)
