"""The distribution plan: what Citus needs for the migrated schema, read from the catalog.

* :func:`plan_distribution` reads the migrated schema and says what Citus needs: ``clients``
  and every other table without ``client_id`` become *reference* tables (a copy on every
  node); every tenant table is *distributed* by ``client_id`` and co-located with the first
  one, parents before children so that each composite foreign key finds its parent already
  distributed. It also lists what Citus would refuse (a unique key without ``client_id``, a
  foreign key Citus cannot enforce, a policy with a subquery it cannot rewrite, a trigger that
  is not rtv-db's own audit trigger).
* rtv-db's audit triggers (function ``rtv.audit_row_change``, migration 0003) are planned, not
  refused: on a distributed tenant table the trigger is kept (Citus runs it on the shard, and
  its insert goes to the co-located ``audit_events`` shard on the same node) and re-created
  with the table's logical name as second argument, since on a shard ``TG_TABLE_NAME`` is the
  shard's name; on a reference table (``clients``) it is dropped, since it would fire on every
  node's copy and its insert into the distributed ``audit_events`` would be refused there.

Planning only reads the catalog; :mod:`rtv_db.citus.apply` carries the plan out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, text

from .context import PLAIN_CONTEXT_READERS, _signed_readers, database_context_mode
from .detect import is_citus

TENANT_COLUMN = "client_id"
# Alembic's bookkeeping stays a plain coordinator table: nothing joins it, only migrate reads it.
_IGNORED_TABLES = frozenset({"alembic_version"})
# Functions distributed to the workers: the ones the policies call live here.
_FUNCTION_SCHEMA = "rtv"
# rtv-db's own audit trigger function (migration 0003), recognised by its qualified name; any
# other trigger stays a problem. It reads the logical table name from its second argument.
AUDIT_TRIGGER_FUNCTION = "rtv.audit_row_change"
# rtv-db's search-key trigger (revision 0007, per-tenant search indexes): Citus does not run it
# (migrate never creates it on Citus), so a schema that has it is distributed without it.
SEARCH_KEY_TRIGGER_FUNCTION = "rtv.assign_search_key"
_AUDIT_NAME_ARGUMENT = "COALESCE(TG_ARGV[1], TG_TABLE_NAME)"  # what 0003's function records
# The Citus form of the audit function: on a reference table's placement, write the event only on
# the node that holds the tenant's audit_events shard (the one insert Citus runs locally there);
# the other placements skip it. pg_dist_* are each node's local metadata (synced to the workers).
_AUDIT_GUARD_MARK = "-- citus: reference-table guard"
AUDIT_REFERENCE_GUARD = f"""{_AUDIT_GUARD_MARK}
        IF TG_ARGV[2] = 'reference' AND NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_dist_placement p
               WHERE p.shardid = pg_catalog.get_shard_id_for_distribution_column('public.audit_events', tenant)
                 AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)) THEN
            RETURN NULL;
        END IF;
        """

TableKind = Literal["reference", "distributed"]
CitusState = Literal["local", "reference", "distributed"]


@dataclass(frozen=True)
class PlannedTable:
    """One table of the plan: what it should be on Citus, and what it is now."""

    name: str  # table name, in the plan's schema
    kind: TableKind
    distribution_column: str | None  # client_id for distributed tables, None for reference tables
    colocate_with: str | None  # the anchor table for distributed tables (None for the anchor itself)
    parents: tuple[str, ...]  # tables this one has a foreign key to
    state: CitusState = "local"
    current_column: str | None = None
    colocation_id: int | None = None

    @property
    def done(self) -> bool:
        """Already what the plan wants (a re-run skips it)."""
        if self.kind == "reference":
            return self.state == "reference"
        return self.state == "distributed" and self.current_column == self.distribution_column


@dataclass(frozen=True)
class PolicyRewrite:
    """A policy whose expressions wrap a function call in a scalar subselect, and the Citus form."""

    table: str
    policy: str
    using: str | None
    with_check: str | None
    old_using: str | None
    old_with_check: str | None


AuditTriggerKind = Literal["keep", "relabel", "drop"]


@dataclass(frozen=True)
class AuditTrigger:
    """One of rtv-db's audit triggers, and what the distribution does with it.

    ``keep``: already passing (tenant column, logical table name[, ``'reference'``]).
    ``relabel``: re-created with those arguments.
    On a table without ``client_id`` (``clients``, a reference table) the third argument
    ``'reference'`` makes the Citus form of the function (:data:`AUDIT_REFERENCE_GUARD`) write the
    event only on the node that holds the tenant's ``audit_events`` shard: the trigger fires on
    every node's copy, and only there is the insert local (elsewhere Citus refuses it).
    ``drop`` is no longer planned (before issue 12 the trigger on ``clients`` was dropped).
    """

    table: str
    trigger: str
    kind: AuditTriggerKind
    args: tuple[str, ...]  # the trigger's current arguments
    definition: str  # pg_get_triggerdef: re-created from it, with new arguments, on relabel
    reference: bool = False  # on a reference table (no client_id)

    @property
    def wanted_args(self) -> tuple[str, ...]:
        base = ((self.args[0] if self.args else TENANT_COLUMN), self.table)
        return base + ("reference",) if self.reference else base


@dataclass(frozen=True)
class DistributionPlan:
    """What Citus needs for one schema; computed by :func:`plan_distribution`."""

    schema: str
    tables: tuple[PlannedTable, ...]
    policy_rewrites: tuple[PolicyRewrite, ...] = ()
    functions: tuple[str, ...] = ()  # rtv functions (regprocedure text) not yet distributed
    problems: tuple[str, ...] = ()  # what Citus would refuse; nothing is applied while any exists
    citus: bool = False
    audit_triggers: tuple[AuditTrigger, ...] = ()  # rtv-db's audit triggers, each with its disposition
    # The database's tenant context mode (rtv.context_mode(): signed/unsigned), None before 0004.
    context_mode: str | None = None
    # Readers the policies call that still verify a signed token (read rtv_secret): replaced by
    # PLAIN_CONTEXT_READERS in unsigned mode; refused in signed mode.
    context_readers: tuple[str, ...] = ()
    # The audit function lacks AUDIT_REFERENCE_GUARD while a reference table has the trigger.
    audit_guard: bool = False
    # (table, trigger) of rtv's search-key triggers, which the distribution drops: on Citus every
    # search is exact within the tenant's shard (docs/search.md).
    search_key_triggers: tuple[tuple[str, str], ...] = ()

    @property
    def reference_tables(self) -> list[PlannedTable]:
        return [t for t in self.tables if t.kind == "reference"]

    @property
    def distributed_tables(self) -> list[PlannedTable]:
        return [t for t in self.tables if t.kind == "distributed"]

    @property
    def anchor(self) -> str | None:
        """The table every tenant table is co-located with.

        The first tenant table already distributed by ``client_id`` (so that a table added by a
        later revision joins the existing colocation group), else the first tenant table.
        """
        dist = self.distributed_tables
        done = [t for t in dist if t.done]
        return done[0].name if done else (dist[0].name if dist else None)

    @property
    def pending_audit_triggers(self) -> list[AuditTrigger]:
        """Audit triggers the distribution still has to re-create or drop."""
        return [t for t in self.audit_triggers if t.kind != "keep"]

    @property
    def pending(self) -> list[PlannedTable]:
        return [t for t in self.tables if not t.done]

    def table(self, name: str) -> PlannedTable:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)


_TABLES_SQL = text(
    """
    SELECT c.oid, c.relname,
           (SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attname = :col AND NOT a.attisdropped) AS tenant_type,
           (SELECT a.attnotnull FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attname = :col AND NOT a.attisdropped) AS tenant_not_null
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = :schema AND c.relkind IN ('r', 'p') AND NOT c.relispartition
    ORDER BY c.relname
    """
)

# Key columns by name, in key order (NULL for an expression column).
_FKS_SQL = text(
    """
    SELECT con.conname, src.relname, tgt.relname, tn.nspname,
           ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                 ORDER BY k.ord)::text[],
           ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
                 ORDER BY k.ord)::text[],
           con.confdeltype::text, con.confupdtype::text
    FROM pg_catalog.pg_constraint con
    JOIN pg_catalog.pg_class src ON src.oid = con.conrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = src.relnamespace
    JOIN pg_catalog.pg_class tgt ON tgt.oid = con.confrelid
    JOIN pg_catalog.pg_namespace tn ON tn.oid = tgt.relnamespace
    WHERE con.contype = 'f' AND n.nspname = :schema AND NOT src.relispartition
    ORDER BY src.relname, con.conname
    """
)

_UNIQUE_SQL = text(
    """
    SELECT c.relname, i.relname,
           ARRAY(SELECT a.attname FROM unnest(x.indkey[0:x.indnkeyatts - 1]) k(attnum)
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum)::text[]
    FROM pg_catalog.pg_index x
    JOIN pg_catalog.pg_class c ON c.oid = x.indrelid
    JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE x.indisunique AND n.nspname = :schema AND NOT c.relispartition
    ORDER BY c.relname, i.relname
    """
)

_POLICIES_SQL = text(
    """
    SELECT c.relname, p.polname, pg_catalog.pg_get_expr(p.polqual, p.polrelid),
           pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid)
    FROM pg_catalog.pg_policy p
    JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = :schema
    ORDER BY c.relname, p.polname
    """
)

_TRIGGERS_SQL = text(
    """
    SELECT c.relname, t.tgname, fn.nspname || '.' || f.proname, t.tgnargs, t.tgargs,
           pg_catalog.pg_get_triggerdef(t.oid)
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_catalog.pg_proc f ON f.oid = t.tgfoid
    JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
    WHERE NOT t.tgisinternal AND n.nspname = :schema
    ORDER BY c.relname, t.tgname
    """
)

_FUNCTION_SOURCE_SQL = text(
    """
    SELECT p.prosrc FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname || '.' || p.proname = :name
    """
)


def _trigger_args(raw: bytes | memoryview | None, nargs: int) -> tuple[str, ...]:
    """pg_trigger.tgargs (each argument followed by a NUL byte) as strings."""
    if not raw or not nargs:
        return ()
    return tuple(a.decode() for a in bytes(raw).split(b"\0")[:nargs])


_FUNCTIONS_SQL = text(
    """
    SELECT p.oid, p.oid::regprocedure::text
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = :schema AND p.prokind IN ('f', 'p')
    ORDER BY 2
    """
)

# partkey NULL + repmodel 't' is a reference table; partkey NULL otherwise a Citus local table
# (the same rule as Citus's own citus_tables view).
_CITUS_TABLES_SQL = text(
    """
    SELECT p.logicalrelid::oid,
           CASE WHEN p.partkey IS NOT NULL THEN 'distributed'
                WHEN p.repmodel = 't' THEN 'reference'
                ELSE 'local' END,
           CASE WHEN p.partkey IS NOT NULL THEN column_to_column_name(p.logicalrelid, p.partkey) END,
           p.colocationid
    FROM pg_catalog.pg_dist_partition p
    """
)


def _distributed_function_oids(conn: Connection) -> set[int]:
    # pg_dist_object moved from the citus schema to pg_catalog in Citus 11.0.
    rel = conn.exec_driver_sql(
        "SELECT COALESCE(to_regclass('pg_catalog.pg_dist_object'), to_regclass('citus.pg_dist_object'))::text"
    ).scalar()
    if rel is None:
        return set()
    rows = conn.exec_driver_sql(
        f"SELECT objid FROM {rel} WHERE classid = 'pg_catalog.pg_proc'::regclass"  # rel is a catalog name
    )
    return {int(r[0]) for r in rows}


_FUNCTION_CALL = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\s*\(")

_SOURCES_SQL = text(
    """
    SELECT n.nspname || '.' || p.proname, p.prosrc
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = :schema
    """
)


def _worker_function_names(conn: Connection, schema: str, function_schema: str, audited: bool) -> set[str]:
    """The ``rtv`` functions the workers evaluate: those the policies call, the audit trigger
    function, and what they call (transitively), by qualified name.

    Only these are distributed. The others (the setters, ``rtv.context_mode()``, the purge, the
    token functions) run on the coordinator, and several read ``rtv_secret``, which exists on
    the coordinator only: creating them on a worker fails there (issue 12).
    """
    sources: dict[str, str] = {}
    for name, source in conn.execute(_SOURCES_SQL, {"schema": function_schema}):
        sources[name] = (sources.get(name, "") + "\n" + (source or ""))
    for signature, definition in PLAIN_CONTEXT_READERS.items():  # what the workers will get
        name = signature.split("(", 1)[0]
        if name in sources:
            sources[name] = definition
    roots: set[str] = set()
    for _table, _policy, using, check in conn.execute(_POLICIES_SQL, {"schema": schema}):
        for expr in (using, check):
            roots.update(f"{a}.{b}" for a, b in _FUNCTION_CALL.findall(expr or ""))
    if audited:
        roots.add(AUDIT_TRIGGER_FUNCTION)
    needed: set[str] = set()
    todo = [r for r in roots if r in sources]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo.extend(f"{a}.{b}" for a, b in _FUNCTION_CALL.findall(sources[name]) if f"{a}.{b}" in sources)
    return needed


# ( SELECT rtv.current_tenant_id() AS current_tenant_id) -> rtv.current_tenant_id()
_SCALAR_SUBSELECT = re.compile(
    r"\(\s*SELECT\s+((?:[A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*\(\))(?:\s+AS\s+[A-Za-z_][A-Za-z0-9_]*)?\s*\)",
    re.IGNORECASE,
)
_SUBQUERY = re.compile(r"\bSELECT\b", re.IGNORECASE)


def rewrite_policy_expression(expression: str | None) -> str | None:
    """``expression`` with every ``(SELECT schema.fn())`` replaced by ``schema.fn()``.

    Raises ValueError when a subquery remains (one that is not a bare zero-argument function
    call cannot be rewritten mechanically; Citus would refuse the policy).
    """
    if expression is None:
        return None
    rewritten = _SCALAR_SUBSELECT.sub(r"\1", expression)
    if _SUBQUERY.search(rewritten):
        raise ValueError(f"subquery left in policy expression: {rewritten}")
    return rewritten


def _toposort(names: Sequence[str], edges: Mapping[str, set[str]]) -> list[str]:
    """``names`` with every table after the tables it references (by name otherwise)."""
    pending = {n: {p for p in edges.get(n, set()) if p in names and p != n} for n in names}
    order: list[str] = []
    while pending:
        ready = sorted(n for n, deps in pending.items() if not deps)
        if not ready:  # a cycle: keep the rest in name order; Citus reports it if it matters
            ready = sorted(pending)
        for n in ready:
            order.append(n)
            del pending[n]
        for deps in pending.values():
            deps.difference_update(ready)
    return order


def plan_distribution(
    conn: Connection,
    schema: str | None = None,
    *,
    tenant_column: str = TENANT_COLUMN,
    function_schema: str = _FUNCTION_SCHEMA,
    allow_triggers: bool = False,
) -> DistributionPlan:
    """The distribution plan of ``schema`` (the current schema by default), from the catalog.

    Works on plain PostgreSQL too (every table is then ``local``): the plan is the same.
    """
    schema = schema or conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    citus = is_citus(conn)
    tables = [r for r in conn.execute(_TABLES_SQL, {"schema": schema, "col": tenant_column}) if r[1] not in _IGNORED_TABLES]
    names = [r[1] for r in tables]
    tenant = {r[1] for r in tables if r[2] is not None}
    oid_of = {r[1]: int(r[0]) for r in tables}
    problems: list[str] = []

    fks = list(conn.execute(_FKS_SQL, {"schema": schema}))
    edges: dict[str, set[str]] = {}
    for conname, src, tgt, tgt_schema, cols, ref_cols, on_delete, on_update in fks:
        if src not in oid_of:
            continue
        if tgt_schema != schema or tgt not in oid_of:
            problems.append(f"{src}: foreign key {conname} references {tgt_schema}.{tgt}, outside the distributed schema")
            continue
        edges.setdefault(src, set()).add(tgt)
        if src not in tenant:
            if tgt in tenant:
                problems.append(
                    f"{src}: foreign key {conname} from a reference table to the distributed table {tgt}"
                    " (Citus supports foreign keys from distributed to reference tables, not the reverse)"
                )
            continue
        if tgt not in tenant:
            continue  # distributed -> reference: supported
        if tenant_column not in cols or tenant_column not in ref_cols or cols.index(tenant_column) != ref_cols.index(tenant_column):
            problems.append(
                f"{src}: foreign key {conname} to {tgt} does not pair {tenant_column} with {tenant_column}"
                " (Citus needs the distribution column at the same position on both sides)"
            )
            continue
        if on_delete in ("n", "d"):
            problems.append(f"{src}: foreign key {conname} has ON DELETE SET NULL/SET DEFAULT on the distribution column")
        if on_update in ("n", "d", "c"):
            problems.append(f"{src}: foreign key {conname} has ON UPDATE SET NULL/SET DEFAULT/CASCADE on the distribution column")

    for table, index, cols in conn.execute(_UNIQUE_SQL, {"schema": schema}):
        if table in tenant and tenant_column not in cols:
            problems.append(f"{table}: unique index {index} ({', '.join(c or '<expr>' for c in cols)}) lacks {tenant_column}")

    types = {r[2] for r in tables if r[2] is not None}
    if len(types) > 1:
        problems.append(f"{tenant_column} has different types across tables ({', '.join(sorted(types))}); co-location needs one type")
    for r in tables:
        if r[2] is not None and not r[3]:
            problems.append(f"{r[1]}: {tenant_column} is nullable (a distribution column value cannot be NULL)")

    state: dict[int, tuple[str, str | None, int | None]] = {}
    if citus:
        state = {int(r[0]): (r[1], r[2], r[3]) for r in conn.execute(_CITUS_TABLES_SQL)}

    rewrites: list[PolicyRewrite] = []
    for table, policy, using, check in conn.execute(_POLICIES_SQL, {"schema": schema}):
        if table not in oid_of or state.get(oid_of[table], ("local",))[0] != "local":
            continue  # a Citus table already carries a Citus-compatible policy
        if not (_SUBQUERY.search(using or "") or _SUBQUERY.search(check or "")):
            continue
        try:
            rewrites.append(PolicyRewrite(table, policy, rewrite_policy_expression(using),
                                          rewrite_policy_expression(check), using, check))
        except ValueError as exc:
            problems.append(f"{table}: policy {policy} has a subquery Citus refuses and rtv-db cannot rewrite ({exc})")

    audit: list[AuditTrigger] = []
    search_key: list[tuple[str, str]] = []
    for table, trigger, function, nargs, raw_args, definition in conn.execute(_TRIGGERS_SQL, {"schema": schema}):
        if table not in oid_of:
            continue
        if function == AUDIT_TRIGGER_FUNCTION:
            args = _trigger_args(raw_args, nargs)
            if table in tenant:
                item = AuditTrigger(table, trigger, "keep", args, definition)
                if args != item.wanted_args:
                    item = AuditTrigger(table, trigger, "relabel", args, definition)
            else:
                item = AuditTrigger(table, trigger, "keep", args, definition, reference=True)
                if args != item.wanted_args:
                    item = AuditTrigger(table, trigger, "relabel", args, definition, reference=True)
            audit.append(item)
        elif function == SEARCH_KEY_TRIGGER_FUNCTION:
            search_key.append((table, trigger))
        elif not allow_triggers and state.get(oid_of[table], ("local",))[0] == "local":
            problems.append(
                f"{table}: trigger {trigger} (Citus runs triggers on the shards only with"
                " citus.enable_unsafe_triggers; this path is not verified for rtv-db)"
            )
    audit_guard = False
    if any(t.kind != "drop" for t in audit):
        source = conn.execute(_FUNCTION_SOURCE_SQL, {"name": AUDIT_TRIGGER_FUNCTION}).scalar()
        audit_guard = any(t.reference for t in audit) and _AUDIT_GUARD_MARK not in (source or "")
        if source is None or _AUDIT_NAME_ARGUMENT not in source:
            problems.append(
                f"{AUDIT_TRIGGER_FUNCTION} does not read the table's logical name from its second argument"
                f" ({_AUDIT_NAME_ARGUMENT})"
                " (on Citus the trigger fires on a shard, and its events would name the shard)"
            )

    functions: list[str] = []
    distributed_functions = _distributed_function_oids(conn) if citus else set()
    needed = _worker_function_names(conn, schema, function_schema, bool(audit))
    for oid, signature in conn.execute(_FUNCTIONS_SQL, {"schema": function_schema}):
        if signature.split("(", 1)[0] in needed and int(oid) not in distributed_functions:
            functions.append(signature)

    reference = _toposort([n for n in names if n not in tenant], edges)
    distributed = _toposort([n for n in names if n in tenant], edges)
    # The first tenant table already distributed by client_id, else the first one (see
    # DistributionPlan.anchor): a table added later must join the existing colocation group.
    settled = [n for n in distributed
               if state.get(oid_of[n], ("local", None))[:2] == ("distributed", tenant_column)]
    anchor = settled[0] if settled else (distributed[0] if distributed else None)
    planned: list[PlannedTable] = []
    for n in reference + distributed:
        kind: TableKind = "distributed" if n in tenant else "reference"
        current = state.get(oid_of[n], ("local", None, None))
        planned.append(PlannedTable(
            name=n,
            kind=kind,
            distribution_column=tenant_column if kind == "distributed" else None,
            colocate_with=None if kind == "reference" or n == anchor else anchor,
            parents=tuple(sorted(p for p in edges.get(n, set()) if p != n)),
            state=current[0],  # type: ignore[arg-type]
            current_column=current[1],
            colocation_id=current[2],
        ))
    for t in planned:
        if t.state != "local" and not t.done:
            problems.append(f"{t.name}: already a Citus {t.state} table"
                            + (f" distributed by {t.current_column}" if t.current_column else "")
                            + f", but the plan wants a {t.kind} table (undistribute_table() first)")
    done_dist = [t for t in planned if t.kind == "distributed" and t.done]
    if len({t.colocation_id for t in done_dist}) > 1:
        problems.append("the distributed tenant tables are in different colocation groups: "
                        + ", ".join(f"{t.name}={t.colocation_id}" for t in done_dist))
    return DistributionPlan(schema, tuple(planned), tuple(rewrites), tuple(functions), tuple(problems), citus,
                            tuple(audit), database_context_mode(conn), _signed_readers(conn), audit_guard,
                            tuple(search_key))
