"""Checks of row-level security itself: enabled and forced, a policy for every command, the
projects's tenant test and nothing looser, the context read once per statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from psycopg import Connection

from ._model import (
    Finding,
    TenantTable,
    VerifyConfig,
    _role_oid,
    _scalar,
    register_check,
    tenant_tables,
)

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
