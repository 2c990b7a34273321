"""Checks of the tenant tables' shape: keys and foreign keys led by the tenant column, a tenant
index, views that run as the invoker, SECURITY DEFINER functions with a fixed search path, the
context mode; and what EXPLAIN would show a tenant about the others (every index led by the tenant
column, no planner statistics).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from psycopg import Connection

from ._model import (
    _USER_SCHEMA,
    Finding,
    TenantTable,
    VerifyConfig,
    _role_oid,
    _scalar,
    register_check,
    tenant_tables,
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
    from ..signing import check_context_mode as context_mode_findings

    for item in context_mode_findings(conn):
        yield Finding("CONTEXT_UNSIGNED", "error", item["object"], item["message"], item["why"].capitalize() + ".", item["fix"])


# -- what EXPLAIN shows a tenant about the others (issue 24, items 1 and 12) ------------------------


def _readable_tenant_tables(conn: Connection, config: VerifyConfig) -> list[TenantTable]:
    """The tenant tables the runtime role may read (a column of it, or of a partitioned ancestor):
    the ones it can EXPLAIN. Empty when the role does not exist (ROLE_MISSING says so)."""
    role_oid = _role_oid(conn, config.runtime_role)
    tables = tenant_tables(conn, config)
    if role_oid is None or not tables:
        return []
    readable = {oid for (oid,) in conn.execute(
        """
        SELECT c.oid FROM pg_class c
        WHERE c.oid = ANY (%(oids)s)
          AND (has_any_column_privilege(%(role)s, c.oid, 'SELECT')
               OR EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a
                          WHERE has_any_column_privilege(%(role)s, a.relid, 'SELECT')))
        """,
        {"oids": [t.oid for t in tables], "role": role_oid},
    )}
    return [t for t in tables if t.oid in readable]


def _node_list(tree: str | None) -> list[str]:
    """The top-level nodes of a pg_node_tree list (``({FUNCEXPR ...} {VAR ...})``), as text."""
    items: list[str] = []
    depth, start, escaped = 0, 0, False
    for i, ch in enumerate(tree or ""):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                items.append((tree or "")[start:i + 1])
    return items


# A function call written by name (funcformat 0, COERCE_EXPLICIT_CALL): not a cast or SQL syntax.
_NAMED_CALL = re.compile(r"\{FUNCEXPR :funcid (\d+)[^{]*?:funcformat 0\b")


def _unwritable(conn: Connection, role_oid: int, expressions: Sequence[str]) -> bool:
    """Whether the runtime role can write none of ``expressions`` (index columns, as node trees):
    each calls, by name, a function in a schema the role has no USAGE on, in a language the
    planner does not inline (an SQL function's body replaces the call in the index expression the
    planner matches, so a hidden SQL identity function hides nothing)."""
    for expression in expressions:
        calls = [int(f) for f in _NAMED_CALL.findall(expression)]
        if not calls or not _scalar(
            conn,
            """
            SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
                           WHERE p.oid = ANY (%s) AND l.lanname NOT IN ('sql')
                             AND NOT has_schema_privilege(%s, p.pronamespace, 'USAGE'))
            """,
            (calls, role_oid),
        ):
            return False
    return bool(expressions)


@register_check
def check_index_tenant_led(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Every index of a tenant table the runtime role reads leads with the tenant column (or is
    made only of expressions that role cannot write)."""
    from .search import _VECTOR_METHODS  # vector indexes: VECTOR_INDEX_SHARED and SEARCH_INDEX_MIXED

    role_oid = _role_oid(conn, config.runtime_role)
    for t in _readable_tenant_tables(conn, config):
        for name, method, keys, nkeys, expressions, partial in conn.execute(
            """
            SELECT i.indexrelid::regclass::text, am.amname, i.indkey::int2[], i.indnkeyatts, i.indexprs::text,
                   i.indpred IS NOT NULL
            FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
            WHERE i.indrelid = %s ORDER BY 1
            """,
            (t.oid,),
        ):
            keys = list(keys)[:nkeys]
            if method in _VECTOR_METHODS or (keys and keys[0] == t.tenant_attnum):
                continue
            key_expressions = _node_list(expressions)[:sum(1 for k in keys if k == 0)]
            if (role_oid is not None and not partial and all(k == 0 for k in keys)
                    and _unwritable(conn, role_oid, key_expressions)):
                continue
            column = _tenant_column_name(conn, t)
            yield Finding(
                "INDEX_NOT_TENANT_LED", "error", f"{t.name}: index {name}",
                f"index {name} on {t.name} does not lead with {column}",
                "A condition on its columns is an index condition, applied before the tenant policy "
                "filters rows, and EXPLAIN ANALYZE reports how many rows the policy removed: the "
                "runtime role counts other tenants' rows per range of values (the planner switches "
                "that force such a plan are settable by anyone), and bisecting lists the values.",
                f"DROP INDEX {name}; recreate it led by {column}: CREATE INDEX ON {t.name} ({column}, ...). "
                "A global unique key that must stay global: a unique index on an expression the runtime "
                "role cannot write (a PL/pgSQL function in a schema it has no USAGE on, as clients_slug_key).",
            )


def _tenant_column_name(conn: Connection, table: TenantTable) -> str:
    return str(_scalar(conn, "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum = %s",
                       (table.oid, table.tenant_attnum)))


@register_check
def check_tenant_statistics(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """No planner statistics on a tenant table the runtime role reads: every column (the tenant
    column too) and index expression has STATISTICS 0, no extended statistics, and (as a role that
    reads pg_statistic) nothing collected."""
    read_collected = _scalar(conn, "SELECT has_table_privilege('pg_catalog.pg_statistic', 'SELECT')")
    for t in _readable_tenant_tables(conn, config):
        problems: list[str] = []
        fixes: list[str] = []
        columns = [r[0] for r in conn.execute(
            "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "AND COALESCE(attstattarget, -1) <> 0 ORDER BY attnum", (t.oid,))]
        if columns:
            problems.append(f"column(s) {', '.join(columns)} collect statistics")
            fixes += [f"ALTER TABLE {t.name} ALTER COLUMN {c} SET STATISTICS 0;" for c in columns]
        for index, position in conn.execute(
            """
            SELECT i.indexrelid::regclass::text, a.attnum
            FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indexrelid AND a.attnum > 0
            WHERE i.indrelid = %s AND i.indkey[a.attnum - 1] = 0 AND COALESCE(a.attstattarget, -1) <> 0
            ORDER BY 1, 2
            """,
            (t.oid,),
        ):
            problems.append(f"expression {position} of index {index} collects statistics")
            fixes.append(f"ALTER INDEX {index} ALTER COLUMN {position} SET STATISTICS 0;")
        for (statistics,) in conn.execute(
            "SELECT oid::regclass::text FROM pg_statistic_ext WHERE stxrelid = %s "
            "AND COALESCE(stxstattarget, -1) <> 0 ORDER BY 1", (t.oid,)):
            problems.append(f"extended statistics {statistics}")
            fixes.append(f"DROP STATISTICS {statistics};")
        if read_collected:
            collected = [r[0] for r in conn.execute(
                """
                SELECT DISTINCT CASE WHEN s.starelid = %(t)s THEN quote_ident(a.attname)
                                     ELSE s.starelid::regclass::text || '.' || a.attnum END
                FROM pg_statistic s JOIN pg_attribute a ON a.attrelid = s.starelid AND a.attnum = s.staattnum
                WHERE s.starelid = %(t)s OR s.starelid IN (SELECT indexrelid FROM pg_index WHERE indrelid = %(t)s)
                ORDER BY 1
                """,
                {"t": t.oid},
            )]
            if collected:
                problems.append(f"statistics collected for {', '.join(collected)} are still in pg_statistic")
                fixes.append("then, as a superuser, `rtv-db migrate` (or on PostgreSQL 18, as the owner, "
                             "pg_clear_attribute_stats for each)")
        if problems:
            yield Finding(
                "TENANT_COLUMN_STATISTICS", "error", t.name,
                f"{t.name}: {'; '.join(problems)}",
                "Statistics are computed over every tenant's rows and RLS does not apply to them: the "
                "runtime role reads them back through EXPLAIN row estimates. A range on client_id whose "
                "estimate steps at each frequent tenant's id lists the tenants; a prefix on a content "
                "column tells another tenant's values.",
                " ".join(fixes),
            )
