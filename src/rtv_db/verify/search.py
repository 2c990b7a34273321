"""Checks for similarity search (issue 14, revisions 0007 and 0011): no vector index holds more
than one tenant's embeddings, no per-tenant index can be walked by another tenant, and the
per-tenant indexes' keys stay their tenants' own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from psycopg import Connection

from ._model import Finding, VerifyConfig, _scalar, register_check, tenant_tables

_VECTOR_METHODS = ("hnsw", "ivfflat")
# The predicate of a per-tenant index (revision 0011): one key, through rtv_secret's function,
# which the runtime role cannot name. pg_get_expr leaves the schema out when it is on the
# reader's search_path, so the index must also depend on that very function (a look-alike in
# another schema prints the same).
_PER_TENANT = re.compile(r"\((?:rtv_secret\.)?search_partition\(search_key\) = (\d+)\)")
# The form of revisions 0007-0010, which any role can write in a query of its own.
_WALKABLE = re.compile(r"\(search_key = (\d+)\)")
_LOOK_ALIKE = re.compile(r"\((?:[A-Za-z_][A-Za-z0-9_$]*\.)?search_partition\(search_key\) = (\d+)\)")


def _vector_indexes(conn: Connection, config: VerifyConfig) -> Iterator[tuple[str, str, str, str | None, bool]]:
    """(table, index, access method, predicate, whether the predicate calls rtv_secret.search_partition)
    of every vector index on a tenant table."""
    # By oid, not by name: the runtime role may not resolve names in rtv_secret.
    partition = _scalar(conn, "SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                              "WHERE n.nspname = 'rtv_secret' AND p.proname = 'search_partition' "
                              "AND p.proargtypes = '23'::oidvector")
    for t in tenant_tables(conn, config):
        for name, method, predicate, calls in conn.execute(
            "SELECT i.indexrelid::regclass::text, am.amname, pg_get_expr(i.indpred, i.indrelid), "
            "EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid "
            "        AND d.refclassid = 'pg_proc'::regclass AND d.refobjid = %s) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
            "WHERE i.indrelid = %s AND am.amname = ANY (%s) ORDER BY 1",
            (partition, t.oid, list(_VECTOR_METHODS)),
        ):
            yield t.name, name, method, predicate, bool(calls)


def _key(predicate: str | None, calls: bool) -> tuple[int, bool] | None:
    """The key of a per-tenant index, and whether no other tenant can walk it; None for any other index.

    Walkable: the form of revisions 0007-0010, or the current one through a look-alike function
    (one the predicate does not depend on: another schema's, which the runtime role may name)."""
    if predicate is None:
        return None
    if match := _PER_TENANT.fullmatch(predicate):
        return int(match.group(1)), calls
    if (match := _WALKABLE.fullmatch(predicate)) or (match := _LOOK_ALIKE.fullmatch(predicate)):
        return int(match.group(1)), False
    return None


@register_check
def check_vector_indexes(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """Every vector index on a tenant table is partial on one search key (one tenant's vectors),
    in the form no other tenant can walk."""
    for table, name, method, predicate, calls in _vector_indexes(conn, config):
        if (key := _key(predicate, calls)) is not None:
            if not key[1]:
                yield Finding(
                    "SEARCH_INDEX_WALKABLE", "error", f"{table}: index {name}",
                    f"{method} index {name} on {table} is partial on `{predicate}`, which the runtime role can write "
                    "(rtv-db's is on rtv_secret.search_partition, which it cannot name)",
                    "Another tenant's statement with the same condition walks it: the policy drops every row "
                    "and EXPLAIN ANALYZE's Rows Removed by Filter counts the owning tenant's live rows, in "
                    "real time.",
                    f"DROP INDEX {name}; `rtv-db search index --tenant ID` builds it again on "
                    "rtv_secret.search_partition(search_key) (revision 0011; `rtv-db migrate` first).",
                )
            continue
        yield Finding(
            "VECTOR_INDEX_SHARED", "error", f"{table}: index {name}",
            f"{method} index {name} on {table} holds {'every' if predicate is None else 'more than one'} "
            f"tenant's vectors (predicate: {predicate or 'none'})",
            "A tenant's search that walks it visits other tenants' vectors and drops them under RLS: "
            "EXPLAIN ANALYZE reports how many it dropped, which maps where other tenants' embeddings "
            "lie, and a small tenant gets fewer than k results.",
            f"DROP INDEX {name}; give large tenants their own index with `rtv-db search index --tenant ID`.",
        )


@register_check
def check_search_keys(conn: Connection, config: VerifyConfig) -> Iterator[Finding]:
    """The search-key trigger is in place, and each per-tenant index's rows are its tenant's only."""
    # By oid, not by name: the runtime role may not resolve names in rtv_secret.
    registry = _scalar(conn, "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE n.nspname = 'rtv_secret' AND c.relname = 'search_indexes'")
    if registry is None:
        return  # before revision 0007
    citus = _scalar(conn, "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    for t in tenant_tables(conn, config):
        has_key = _scalar(conn, "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = %s "
                                "AND attname = 'search_key' AND NOT attisdropped)", (t.oid,))
        if not has_key or citus:
            continue
        trigger = _scalar(
            conn,
            "SELECT EXISTS (SELECT 1 FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE tg.tgrelid = %s AND tg.tgname = 'assign_search_key' "
            "AND p.proname = 'assign_search_key' AND n.nspname = %s AND tg.tgenabled <> 'D')",
            (t.oid, config.tenant_schema),
        )
        if not trigger:
            yield Finding(
                "SEARCH_KEY_TRIGGER_MISSING", "error", f"{t.name}: trigger assign_search_key",
                f"{t.name} has search_key but not rtv's trigger assign_search_key that sets it",
                "Without it the writer chooses search_key: SQL injected in one tenant's transaction can "
                "give its rows another tenant's key and put them into that tenant's own index.",
                "Run `rtv-db migrate` after `rtv-db downgrade --revision 0006` (revision 0007 creates it), "
                "then `rtv-db verify` again.",
            )
    # Which tenant a key is is readable by the owner only: this part needs the admin URL.
    if not _scalar(conn, "SELECT has_schema_privilege('rtv_secret', 'USAGE') AND has_table_privilege(%s, 'SELECT')",
                   (registry,)):
        return
    owners = dict(conn.execute("SELECT search_key, tenant_id FROM rtv_secret.search_indexes").fetchall())
    for table, name, _, predicate, calls in _vector_indexes(conn, config):
        if (found := _key(predicate, calls)) is None:
            continue
        key = found[0]
        tenant = owners.get(key)
        foreign = _scalar(conn, f"SELECT count(*) FROM {table} WHERE search_key = %s "  # noqa: S608 - a regclass name
                                f"AND client_id IS DISTINCT FROM %s", (key, tenant))
        if tenant is None or foreign:
            yield Finding(
                "SEARCH_INDEX_MIXED", "error", f"{table}: index {name}",
                f"index {name} is " + (f"keyed by {key}, which is no tenant's" if tenant is None
                                       else f"tenant {tenant}'s, and holds {foreign} row(s) of other tenants"),
                "A per-tenant index must hold one tenant's vectors: that tenant's searches walk the rows "
                "of the others and report how many they dropped.",
                f"DROP INDEX {name}; restore the trigger (SEARCH_KEY_TRIGGER_MISSING), then "
                "`rtv-db search index --tenant ID` rebuilds it and re-keys the rows.",
            )
