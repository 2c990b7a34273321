"""Checks of the tenant tables' shape: keys and foreign keys led by the tenant column, a tenant
index, views that run as the invoker, SECURITY DEFINER functions with a fixed search path, the
context mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from psycopg import Connection

from ._model import (
    _USER_SCHEMA,
    Finding,
    VerifyConfig,
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
