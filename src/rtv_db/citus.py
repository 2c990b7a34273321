"""Citus (distributed PostgreSQL): the same schema and isolation, distributed by ``client_id``.

What this module does, and only on a server where the ``citus`` extension exists:

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
  ``citus.enable_unsafe_triggers`` is set for the distribution transaction only (Citus checks
  it when a table with triggers is distributed, and for trigger DDL on Citus tables).
* :func:`apply_distribution` carries the plan out, idempotently (a table that is already a
  Citus table is skipped), in the caller's transaction. ``rtv-db migrate`` calls
  :func:`distribute` in its own transaction right after the Alembic upgrade.
* :func:`check_citus` is the ``rtv-db verify`` part: findings when a tenant table is not
  distributed by ``client_id``, not co-located, or ``clients`` is not a reference table.
* :func:`unshard_message` and :func:`install_error_mapping` turn shard names in error
  messages (``brand_kits_102033``) back into table names, so callers never see them.

Three Citus facts shape this (see docs/citus.md for the sources):

* Citus refuses a policy whose expression contains a subquery ("cannot create policy"). The
  migrations wrap the context functions in a scalar subselect, ``(SELECT
  rtv.current_tenant_id())``, so that plain PostgreSQL evaluates them once per statement. On
  Citus those policies are rewritten to call the function directly: same value (the function
  is STABLE), no subquery.
* The tenant context must reach the workers. ``SET LOCAL`` (which ``rtv.set_tenant_context``
  runs) is sent to them when ``citus.propagate_set_commands = 'local'``; ``set_config()``
  never is. The runtime role gets that setting with ``ALTER ROLE ... IN DATABASE ... SET``.
* The policies call ``rtv.*`` functions on the workers, so every function of the ``rtv``
  schema is distributed (``create_distributed_function``, without a distribution argument:
  ``rtv.set_tenant_context`` must run on the coordinator, never be delegated to a worker).

The signed tenant context (migration 0004, the default) is **refused** on Citus
(:class:`~rtv_db.errors.CitusSignedContextError`, before anything changes): its readers cannot
verify a token on a worker the way they do on PostgreSQL (the keys would have to be read from a
Citus table inside a shard query, which Citus forbids; the pid and transaction checks have no
sound worker-side equivalent that could be tested here). In unsigned mode the distribution
replaces the three readers the policies call with the plain, table-free readers of revision 0002
(:data:`PLAIN_CONTEXT_READERS`), so that the workers need nothing from ``rtv_secret``. See
docs/citus.md, "The signed tenant context on Citus".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event, text

from .config import ROLE_NAME
from .errors import CitusSignedContextError, CitusUnsupportedStatementError, MigrationError

__all__ = [
    "TENANT_COLUMN",
    "TableKind",
    "PlannedTable",
    "PolicyRewrite",
    "AuditTrigger",
    "AUDIT_TRIGGER_FUNCTION",
    "AUDIT_REFERENCE_GUARD",
    "DistributionPlan",
    "CitusFinding",
    "is_citus",
    "has_distributed_tables",
    "plan_distribution",
    "rewrite_policy_expression",
    "apply_policy_rewrites",
    "apply_audit_triggers",
    "relabelled_definition",
    "apply_distribution",
    "distribute",
    "plan_findings",
    "check_citus",
    "unshard_message",
    "install_error_mapping",
    "SUPERSEDED_VERIFY_CODES",
    "PLAIN_CONTEXT_READERS",
    "database_context_mode",
    "refuse_signed_context",
    "apply_context_readers",
    "harden_workers",
    "worker_exposure",
]

_log = logging.getLogger("rtv_db.citus")

TENANT_COLUMN = "client_id"
# Alembic's bookkeeping stays a plain coordinator table: nothing joins it, only migrate reads it.
_IGNORED_TABLES = frozenset({"alembic_version"})
# Functions distributed to the workers: the ones the policies call live here.
_FUNCTION_SCHEMA = "rtv"
_PROPAGATE_SETTING = "citus.propagate_set_commands"
_UNSAFE_TRIGGERS_SETTING = "citus.enable_unsafe_triggers"
# rtv-db's own audit trigger function (migration 0003), recognised by its qualified name; any
# other trigger stays a problem. It reads the logical table name from its second argument.
AUDIT_TRIGGER_FUNCTION = "rtv.audit_row_change"
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
_AUDIT_INSERT = "INSERT INTO public.audit_events"

# The readers the policies call, in the plain form of revision 0002 (read app.* settings, no
# table, SECURITY INVOKER): what a worker can evaluate inside a shard query. Installed by the
# distribution in unsigned mode only; signed mode is refused on Citus (refuse_signed_context).
PLAIN_CONTEXT_READERS: dict[str, str] = {
    "rtv.current_tenant_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_tenant_id() RETURNS uuid
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_tenant_id', true)) $$""",
    "rtv.current_platform_account_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_platform_account_id() RETURNS uuid
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT rtv.to_uuid_or_null(current_setting('app.current_platform_account_id', true)) $$""",
    "rtv.current_lane()": """
        CREATE OR REPLACE FUNCTION rtv.current_lane() RETURNS text
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$
            SELECT CASE WHEN lane IN ('api', 'browser') THEN lane END
            FROM current_setting('app.current_lane', true) AS lane
        $$""",
    # The audit labels (migration 0005 made them read the spent token's row, on the coordinator).
    "rtv.current_user_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_user_id() RETURNS text
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT NULLIF(current_setting('app.current_user_id', true), '') $$""",
    "rtv.current_correlation_id()": """
        CREATE OR REPLACE FUNCTION rtv.current_correlation_id() RETURNS text
            LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
        AS $$ SELECT NULLIF(current_setting('app.correlation_id', true), '') $$""",
}
_SECRET_SCHEMA = "rtv_secret"

# verify codes (src/rtv_db/verify/) that do not apply on Citus: Citus forbids the scalar
# subselect that check recommends, so the per-row call is the only form a policy can take.
SUPERSEDED_VERIFY_CODES = frozenset({"POLICY_PER_ROW_CONTEXT"})

TableKind = Literal["reference", "distributed"]
CitusState = Literal["local", "reference", "distributed"]


# -- detection -------------------------------------------------------------------------------------


def is_citus(conn: Connection) -> bool:
    """True when the ``citus`` extension is installed in this database (one catalog lookup)."""
    return bool(
        conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')").scalar()
    )


def has_distributed_tables(conn: Connection) -> bool:
    """True when some table of this database is already a Citus table."""
    if conn.exec_driver_sql("SELECT to_regclass('pg_catalog.pg_dist_partition')").scalar() is None:
        return False
    return bool(conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition)").scalar())


# -- the plan ----------------------------------------------------------------------------------------


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


_READERS_SQL = text(
    """
    SELECT p.oid::regprocedure::text, p.prosrc, p.prosecdef
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname || '.' || p.proname || '()' = ANY(:names) AND p.pronargs = 0
    ORDER BY 1
    """
)


def database_context_mode(conn: Connection) -> str | None:
    """The tenant context mode the database enforces (``signed``/``unsigned``), None before 0004."""
    # A role without EXECUTE on it (verify may run as any catalog reader) cannot tell: None.
    if not conn.exec_driver_sql(
        "SELECT CASE WHEN to_regnamespace('rtv') IS NULL THEN false"
        " WHEN NOT has_schema_privilege(to_regnamespace('rtv'), 'USAGE') THEN false"
        " WHEN to_regprocedure('rtv.context_mode()') IS NULL THEN false"
        " ELSE has_function_privilege(to_regprocedure('rtv.context_mode()'), 'EXECUTE') END"
    ).scalar():
        return None
    mode = conn.exec_driver_sql("SELECT rtv.context_mode()").scalar()
    return None if mode is None else str(mode)


def _signed_readers(conn: Connection) -> tuple[str, ...]:
    """Readers the policies call whose definition is not the plain one (they verify a token)."""
    rows = conn.execute(_READERS_SQL, {"names": list(PLAIN_CONTEXT_READERS)})
    return tuple(sig for sig, source, secdef in rows if secdef or _SECRET_SCHEMA in (source or ""))


def refuse_signed_context(mode: str | None) -> None:
    """Raise :class:`CitusSignedContextError` when ``mode`` is the signed tenant context."""
    if mode == "signed":
        raise CitusSignedContextError(
            "the signed tenant context (the default) is not supported on Citus: its readers cannot verify the"
            " token on the workers (no keys there, and Citus forbids reading a reference table from a shard"
            " query), so every tenant query would fail. Nothing was changed. To run on Citus, set"
            " RTV_DB_CONTEXT_MODE=unsigned and run rtv-db migrate again; this reopens the forged-context hole"
            " (rtv-db verify reports it). See docs/citus.md, 'The signed tenant context on Citus'."
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
                            tuple(audit), database_context_mode(conn), _signed_readers(conn), audit_guard)


# -- applying it -------------------------------------------------------------------------------------


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _qualified(schema: str, name: str) -> str:
    return f"{_ident(schema)}.{_ident(name)}"


def apply_policy_rewrites(conn: Connection, plan: DistributionPlan) -> list[str]:
    """Re-state each policy of ``plan.policy_rewrites`` without its subselects (ALTER POLICY).

    Roles and command are untouched; only the expressions change, to an equivalent form.
    """
    done = []
    for rw in plan.policy_rewrites:
        clauses = []
        if rw.using is not None:
            clauses.append(f"USING ({rw.using})")
        if rw.with_check is not None:
            clauses.append(f"WITH CHECK ({rw.with_check})")
        conn.exec_driver_sql(
            f"ALTER POLICY {_ident(rw.policy)} ON {_qualified(plan.schema, rw.table)} {' '.join(clauses)}",
            execution_options={"no_parameters": True},
        )
        done.append(f"policy {rw.policy} on {rw.table} without subselects")
    return done


_EXECUTE_ARGS = re.compile(r"(EXECUTE (?:FUNCTION|PROCEDURE) [^(]+)\((.*)\)\s*$", re.DOTALL)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def relabelled_definition(trigger: AuditTrigger) -> str:
    """``trigger``'s CREATE TRIGGER statement with the arguments (tenant column, logical table name)."""
    match = _EXECUTE_ARGS.search(trigger.definition)
    if match is None:
        raise MigrationError(f"cannot read the trigger definition of {trigger.trigger} on {trigger.table}")
    args = ", ".join(_literal(a) for a in trigger.wanted_args)
    return trigger.definition[: match.start()] + f"{match.group(1)}({args})"


def apply_audit_triggers(conn: Connection, plan: DistributionPlan) -> list[str]:
    """Re-create or drop the audit triggers of ``plan.pending_audit_triggers``.

    Run before the tables are distributed (then it is plain DDL); on a table that is already a
    Citus table it needs ``citus.enable_unsafe_triggers``, which :func:`apply_distribution` sets.
    """
    done = []
    for t in plan.pending_audit_triggers:
        table = _qualified(plan.schema, t.table)
        conn.exec_driver_sql(f"DROP TRIGGER {_ident(t.trigger)} ON {table}")
        if t.kind == "relabel":
            conn.exec_driver_sql(relabelled_definition(t), execution_options={"no_parameters": True})
            done.append(f"{t.table}: audit trigger {t.trigger} passes the table name ({', '.join(t.wanted_args)})")
        else:
            done.append(f"{t.table}: audit trigger {t.trigger} dropped (a reference table: it would fire on every node)")
    return done


def _apply_audit_guard(conn: Connection, plan: DistributionPlan) -> list[str]:
    """Install the Citus form of the audit function (:data:`AUDIT_REFERENCE_GUARD`) when needed."""
    if not plan.audit_guard:
        return []
    definition = conn.exec_driver_sql(
        f"SELECT pg_catalog.pg_get_functiondef(to_regprocedure('{AUDIT_TRIGGER_FUNCTION}()'))").scalar()
    if not definition or definition.count(_AUDIT_INSERT) != 1:
        raise MigrationError(f"cannot find the audit insert in {AUDIT_TRIGGER_FUNCTION}() to guard it for reference tables")
    conn.exec_driver_sql(definition.replace(_AUDIT_INSERT, AUDIT_REFERENCE_GUARD + _AUDIT_INSERT),
                         execution_options={"no_parameters": True})
    return [f"function {AUDIT_TRIGGER_FUNCTION}(): on a reference table, the event is written on the node of the"
            " tenant's audit_events shard only"]


def apply_context_readers(conn: Connection, plan: DistributionPlan) -> list[str]:
    """Replace ``plan.context_readers`` by :data:`PLAIN_CONTEXT_READERS` (unsigned mode only).

    Raises :class:`CitusSignedContextError` in signed mode: the plain readers would trust any
    ``SET LOCAL``, which is what signed mode exists to prevent.
    """
    refuse_signed_context(plan.context_mode)
    done = []
    for signature in plan.context_readers:
        conn.exec_driver_sql(PLAIN_CONTEXT_READERS[signature], execution_options={"no_parameters": True})
        done.append(f"function {signature}: the plain reader (unsigned mode; no rtv_secret on the workers)")
    return done


def _role_has_propagation(conn: Connection, role: str) -> bool:
    row = conn.execute(
        text(
            """
            SELECT EXISTS (
                SELECT 1 FROM pg_catalog.pg_db_role_setting s
                JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
                CROSS JOIN LATERAL unnest(s.setconfig) AS c(setting)
                WHERE r.rolname = :role
                  AND s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))
                  AND c.setting = :setting)
            """
        ),
        {"role": role, "setting": f"{_PROPAGATE_SETTING}=local"},
    ).scalar()
    return bool(row)


# On Citus rtv.to_uuid_or_null is PL/pgSQL: the SQL form is inlined into its callers, and in a
# modification of a distributed table (the audit trigger's INSERT on a worker) Citus evaluates
# the stable sub-expression current_setting(...)::uuid by itself, ahead of the CASE guard:
# `invalid input syntax for type uuid: ""` for every write without a platform account.
_CITUS_TO_UUID = """
    CREATE OR REPLACE FUNCTION rtv.to_uuid_or_null(value text) RETURNS uuid
        LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
    BEGIN
        IF value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
            RETURN value::uuid;
        END IF;
        RETURN NULL;
    END
    $$"""


def _apply_citus_to_uuid(conn: Connection) -> list[str]:
    lang = conn.exec_driver_sql(
        "SELECT l.lanname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang"
        " WHERE p.oid = to_regprocedure('rtv.to_uuid_or_null(text)')").scalar()
    if lang is None or lang == "plpgsql":
        return []
    conn.exec_driver_sql(_CITUS_TO_UUID, execution_options={"no_parameters": True})
    return ["function rtv.to_uuid_or_null(text): PL/pgSQL (not inlined: Citus would evaluate its cast unguarded)"]


_PENDING_FKS_SQL = text(
    """
    SELECT con.conrelid::regclass::text, con.conname, pg_catalog.pg_get_constraintdef(con.oid)
    FROM pg_catalog.pg_constraint con
    WHERE con.contype = 'f' AND con.conrelid = ANY(CAST(:oids AS oid[])) AND con.confrelid = ANY(CAST(:oids AS oid[]))
      AND (con.conrelid = ANY(CAST(:pending AS oid[])) OR con.confrelid = ANY(CAST(:pending AS oid[])))
    ORDER BY 1, 2
    """
)


def _drop_pending_foreign_keys(conn: Connection, plan: DistributionPlan) -> list[tuple[str, str, str]]:
    """Drop the foreign keys between the plan's tables that touch a table still to distribute;
    return (table, name, definition) of each, to add back afterwards."""
    if not plan.pending:
        return []
    oid_of = {r[0]: int(r[1]) for r in conn.execute(
        text("SELECT c.relname, c.oid FROM pg_catalog.pg_class c WHERE c.relnamespace = CAST(:s AS regnamespace)"),
        {"s": plan.schema})}
    oids = [oid_of[t.name] for t in plan.tables if t.name in oid_of]
    pending = [oid_of[t.name] for t in plan.pending if t.name in oid_of]
    keys = [(r[0], r[1], r[2]) for r in conn.execute(_PENDING_FKS_SQL, {"oids": oids, "pending": pending})]
    for table, name, _definition in keys:
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT {_ident(name)}")
    return keys


def apply_distribution(conn: Connection, plan: DistributionPlan, *, runtime_role: str,
                       allow_triggers: bool = False) -> list[str]:
    """Carry ``plan`` out on ``conn`` (inside the caller's transaction); return what was done.

    Raises :class:`MigrationError` before changing anything when the plan has problems.
    Run as the admin login (superuser): it creates distributed objects and alters a role.
    """
    refuse_signed_context(plan.context_mode)  # first: nothing is changed in signed mode
    if plan.problems:
        raise MigrationError("Citus cannot distribute this schema as it is:\n  - " + "\n  - ".join(plan.problems))
    if not ROLE_NAME.match(runtime_role):
        raise MigrationError(f"refusing role name {runtime_role!r}")
    actions: list[str] = []
    # One connection per worker for everything below: distributing tables that reference a
    # reference table, and distributing functions, inside one transaction need it.
    conn.exec_driver_sql("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
    if allow_triggers or any(t.kind != "drop" for t in plan.audit_triggers) or plan.pending_audit_triggers:
        # Citus refuses to distribute a table with triggers, and trigger DDL on Citus tables,
        # unless this is on. For this transaction only: it is not needed to run the triggers,
        # and it stays off for everything else (a foreign trigger is still refused).
        conn.exec_driver_sql(f"SET LOCAL {_UNSAFE_TRIGGERS_SETTING} TO on")
    actions += apply_policy_rewrites(conn, plan)
    actions += _apply_audit_guard(conn, plan)
    actions += apply_audit_triggers(conn, plan)
    # Before the functions are distributed, so that the workers get the plain readers.
    actions += apply_context_readers(conn, plan)
    actions += _apply_citus_to_uuid(conn)
    for signature in plan.functions:
        # No distribution argument: the function is created on every node and never delegated.
        conn.execute(text("SELECT create_distributed_function(CAST(:f AS regprocedure))"), {"f": signature})
        actions.append(f"function {signature} distributed")
    # Citus refuses to distribute a table that a local table still references, and a foreign
    # key from a distributed table to a local one: whatever the order, a pair of pending tables
    # joined by a key cannot be distributed one at a time. The keys are dropped, the tables
    # distributed, and the keys added back (validated on the shards), in this transaction.
    held_keys = _drop_pending_foreign_keys(conn, plan)
    for t in plan.pending:
        table = _qualified(plan.schema, t.name)
        if t.kind == "reference":
            conn.execute(text("SELECT create_reference_table(CAST(:t AS regclass))"), {"t": table})
            actions.append(f"{t.name}: reference table")
        else:
            colocate = _qualified(plan.schema, t.colocate_with) if t.colocate_with else "none"
            conn.execute(
                text("SELECT create_distributed_table(CAST(:t AS regclass), :col, colocate_with => :co)"),
                {"t": table, "col": t.distribution_column, "co": colocate},
            )
            actions.append(f"{t.name}: distributed by {t.distribution_column}"
                           + (f", co-located with {t.colocate_with}" if t.colocate_with else ""))
    for table, name, definition in held_keys:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT {_ident(name)} {definition}",
                             execution_options={"no_parameters": True})
    if held_keys:
        actions.append(f"{len(held_keys)} foreign keys re-created on the distributed tables")
    if not _role_has_propagation(conn, runtime_role):
        database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
        conn.exec_driver_sql(
            f"ALTER ROLE {_ident(runtime_role)} IN DATABASE {_ident(database)} SET {_PROPAGATE_SETTING} = 'local'"
        )
        actions.append(f"role {runtime_role}: {_PROPAGATE_SETTING} = 'local' in database {database}")
    for a in actions:
        _log.info("citus: %s", a)
    return actions


# What the runtime role may still do on a worker that the bootstrap forbids on the coordinator:
# read other sessions' query text, signal them, take advisory locks; and, on the coordinator and
# the workers, run any SQL on the workers through Citus's run_command_* functions.
_WORKER_EXPOSURE_SQL = (
    "SELECT has_function_privilege(%(role)s, 'pg_catalog.pg_stat_get_activity(integer)', 'EXECUTE')"
    " OR has_function_privilege(%(role)s, 'pg_catalog.pg_terminate_backend(integer, bigint)', 'EXECUTE')"
    " OR has_function_privilege(%(role)s, 'pg_catalog.pg_advisory_lock(bigint)', 'EXECUTE')"
    " OR has_function_privilege(%(role)s, 'pg_catalog.run_command_on_workers(text, boolean)', 'EXECUTE')"
    " OR has_database_privilege('public', current_database(), 'TEMPORARY')"
)


def worker_exposure(conn: Connection, runtime_role: str) -> list[str]:
    """The workers (host:port) on which ``runtime_role`` keeps a privilege the bootstrap revokes."""
    if not ROLE_NAME.match(runtime_role):
        raise MigrationError(f"refusing role name {runtime_role!r}")
    command = _WORKER_EXPOSURE_SQL % {"role": _literal(runtime_role)}
    rows = conn.execute(text("SELECT nodename, nodeport, success, result FROM run_command_on_workers(:c)"),
                        {"c": command})
    return [f"{host}:{port}" for host, port, ok, result in rows if not ok or result != "f"]


def harden_workers(conn: Connection, hardening_sql: str, *, runtime_role: str) -> list[str]:
    """Run the bootstrap's per-node hardening (``hardening_sql``) on every worker that needs it.

    Function grants and database privileges are per node: the bootstrap's revokes (session
    functions, run_command_*, TEMPORARY) hold on the coordinator only, yet a query pushed down
    to the shards runs its function calls on the workers as the runtime role.
    """
    if conn.exec_driver_sql("SELECT to_regprocedure('pg_catalog.run_command_on_workers(text, boolean)')").scalar() is None:
        return []  # not Citus
    exposed = worker_exposure(conn, runtime_role)
    if not exposed or not hardening_sql.strip():
        return []
    rows = conn.execute(text("SELECT nodename, nodeport, success, result FROM run_command_on_workers(:c)"),
                        {"c": hardening_sql}).all()
    failed = [f"{h}:{p}: {r}" for h, p, ok, r in rows if not ok]
    if failed:
        raise MigrationError("hardening the workers failed:\n  - " + "\n  - ".join(failed))
    left = worker_exposure(conn, runtime_role)
    if left:
        raise MigrationError(f"after hardening, {runtime_role} still holds revoked privileges on {', '.join(left)}")
    return [f"workers {', '.join(exposed)}: session functions, run_command_* and TEMPORARY revoked from {runtime_role}"]


def distribute(conn: Connection, *, runtime_role: str, schema: str | None = None,
               allow_triggers: bool = False) -> list[str]:
    """Plan and apply on ``conn`` (a Citus coordinator, in a transaction); [] when nothing was left."""
    plan = plan_distribution(conn, schema, allow_triggers=allow_triggers)
    if not plan.citus:
        raise MigrationError("the citus extension is not installed in this database")
    return apply_distribution(conn, plan, runtime_role=runtime_role, allow_triggers=allow_triggers)


# -- verify ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CitusFinding:
    """One Citus problem, in the shape of ``rtv_db.verify.Finding`` (same fields)."""

    code: str
    severity: Literal["error", "warning"]
    object: str
    message: str
    why: str
    fix: str


_FIX_MIGRATE = "run `rtv-db migrate` against the coordinator: it distributes what is missing"


def plan_findings(plan: DistributionPlan, *, propagation_set: bool, runtime_role: str) -> Iterator[CitusFinding]:
    """The findings a plan implies (pure: no database access)."""
    # Co-location is judged against the anchor, or the first tenant table already distributed right.
    settled = [t for t in plan.distributed_tables if t.done]
    anchor = plan.table(plan.anchor) if plan.anchor and plan.table(plan.anchor).done else (settled[0] if settled else None)
    for t in plan.tables:
        obj = f"{plan.schema}.{t.name}"
        if t.kind == "reference" and t.state != "reference":
            yield CitusFinding(
                "CITUS_NOT_REFERENCE", "error", obj, f"{t.name} has no {TENANT_COLUMN} and is not a reference table",
                "tenant tables reference it; on a worker the foreign keys and joins need a local copy",
                _FIX_MIGRATE)
        elif t.kind == "distributed" and t.state == "local":
            yield CitusFinding(
                "CITUS_NOT_DISTRIBUTED", "error", obj, f"{t.name} is a plain table on the coordinator",
                "every tenant table must be distributed by client_id, or it neither scales out nor co-locates",
                _FIX_MIGRATE)
        elif t.kind == "distributed" and t.current_column != t.distribution_column:
            yield CitusFinding(
                "CITUS_WRONG_DISTRIBUTION_COLUMN", "error", obj,
                f"{t.name} is a Citus {t.state} table" + (f" distributed by {t.current_column}" if t.current_column else ""),
                "scoped queries carry client_id = <tenant>; only distribution by client_id routes them to one shard",
                f"SELECT undistribute_table('{obj}'); then {_FIX_MIGRATE}")
        elif t.kind == "distributed" and anchor is not None and t.done and t.colocation_id != anchor.colocation_id:
            yield CitusFinding(
                "CITUS_NOT_COLOCATED", "error", obj,
                f"{t.name} is in colocation group {t.colocation_id}, {anchor.name} in {anchor.colocation_id}",
                "composite foreign keys and joins on client_id need one tenant's rows of every table on one node",
                f"SELECT update_distributed_table_colocation('{obj}', colocate_with => '{plan.schema}.{anchor.name}')")
    for rw in plan.policy_rewrites:
        yield CitusFinding(
            "CITUS_POLICY_SUBQUERY", "error", f"{plan.schema}.{rw.table}: policy {rw.policy}",
            f"policy {rw.policy} wraps a function call in a subquery", "Citus refuses subqueries in policies",
            _FIX_MIGRATE)
    for trig in plan.pending_audit_triggers:
        obj = f"{plan.schema}.{trig.table}: trigger {trig.trigger}"
        if trig.kind == "drop":
            yield CitusFinding(
                "CITUS_AUDIT_TRIGGER", "error", obj, f"{trig.table} (no {TENANT_COLUMN}) still has the audit trigger",
                "on a reference table the trigger fires on every node's copy, and its insert into the distributed"
                " audit_events is refused there: every write to the table would fail", _FIX_MIGRATE)
        else:
            yield CitusFinding(
                "CITUS_AUDIT_TRIGGER", "error", obj, f"the audit trigger on {trig.table} does not pass the table's name",
                "on Citus the trigger fires on a shard: its events would record the shard's name", _FIX_MIGRATE)
    if plan.audit_guard:
        yield CitusFinding(
            "CITUS_AUDIT_TRIGGER", "error", f"function {AUDIT_TRIGGER_FUNCTION}()",
            "the audit function does not write a reference table's events on one node only",
            "the trigger on a reference table fires on every node; without the guard its insert is refused on the"
            " nodes that do not hold the tenant's audit_events shard, and every write to the table fails",
            _FIX_MIGRATE)
    for signature in plan.functions:
        yield CitusFinding(
            "CITUS_FUNCTION_NOT_DISTRIBUTED", "error", f"function {signature}",
            f"{signature} is not distributed to the workers",
            "policies run on the workers and call the rtv functions there", _FIX_MIGRATE)
    if not propagation_set:
        yield CitusFinding(
            "CITUS_SET_NOT_PROPAGATED", "error", f"role {runtime_role}",
            f"{_PROPAGATE_SETTING} is not 'local' for {runtime_role}",
            "without it SET LOCAL stays on the coordinator: the workers see no tenant and return no rows",
            _FIX_MIGRATE)
    if plan.context_mode == "signed":
        yield CitusFinding(
            "CITUS_SIGNED_CONTEXT", "error", "rtv_secret.context_settings",
            "the tenant context is signed, which rtv-db does not support on Citus",
            "the readers verify the token against rtv_secret, which the workers cannot read inside a shard query:"
            " tenant queries fail on the workers (see docs/citus.md, 'The signed tenant context on Citus')",
            "set RTV_DB_CONTEXT_MODE=unsigned and run `rtv-db migrate` (this reopens the forged-context hole)")
    elif plan.context_readers:
        yield CitusFinding(
            "CITUS_CONTEXT_READERS", "error", ", ".join(plan.context_readers),
            "the context readers still verify a signed token (they read rtv_secret)",
            "the policies call them on the workers, where rtv_secret's tables do not exist: tenant queries fail",
            _FIX_MIGRATE)
    for p in plan.problems:
        yield CitusFinding("CITUS_UNSUPPORTED", "error", plan.schema, p,
                           "Citus refuses this schema object when distributing", "change the schema (a new revision)")


def check_citus(conn: Connection, config: Any = None) -> Iterator[CitusFinding]:
    """``rtv-db verify``'s Citus checks; nothing at all on plain PostgreSQL.

    ``config`` is verify's config object (``schema``, ``runtime_role``, ``tenant_column`` are read
    when present).
    """
    if not is_citus(conn):
        return
    schema = getattr(config, "schema", None)
    runtime_role = getattr(config, "runtime_role", "rtv_app")
    tenant_column = getattr(config, "tenant_column", TENANT_COLUMN)
    plan = plan_distribution(conn, schema, tenant_column=tenant_column)
    yield from plan_findings(plan, propagation_set=_role_has_propagation(conn, runtime_role), runtime_role=runtime_role)
    try:  # asks every worker (run_command_on_workers): an admin's verify only
        with conn.begin_nested():
            exposed = worker_exposure(conn, runtime_role)
    except Exception:  # noqa: BLE001  (a role that may not run commands on the workers cannot tell)
        _log.debug("citus: worker privileges not checked", exc_info=True)
        return
    if exposed:
        yield CitusFinding(
            "CITUS_WORKER_PRIVILEGES", "error", f"role {runtime_role}",
            f"on {', '.join(exposed)} {runtime_role} keeps privileges the bootstrap revokes on the coordinator",
            "function grants are per node: a query pushed down to the shards runs its function calls on the workers"
            " as the runtime role (other sessions' query text, signalling backends, advisory locks), and"
            " run_command_* runs any SQL on every worker",
            _FIX_MIGRATE)


# -- shard names in error messages -------------------------------------------------------------------

# A quoted identifier ending in _<shard id>: "brand_kits_102033", "brand_kits_pkey_102033".
_SHARD_NAME = re.compile(r'"([A-Za-z_][A-Za-z0-9_$]*?)_(\d+)"')
# Shard ids start at 102008 by default; a long-enough suffix tells a shard from a name like t_2.
_GENERIC_MIN_DIGITS = 6
_WORKER_CONTEXT = re.compile(r"\n?CONTEXT:\s+while executing command on [^\n]*")


def unshard_message(message: str, known_names: Iterable[str] | None = None, *, generic: bool | None = None) -> str:
    """``message`` with shard names replaced by the logical names and worker addresses removed.

    A quoted name ``"<name>_<digits>"`` becomes ``"<name>"`` when ``<name>`` is one of
    ``known_names`` (tables, constraints, indexes) and ``<name>_<digits>`` itself is not. With
    ``generic`` (the default when no names are given), an unknown ``<name>`` is mapped too when
    the suffix has at least six digits, as Citus shard ids do.
    """
    known = frozenset(known_names or ())
    generic = not known if generic is None else generic

    def replace(match: re.Match[str]) -> str:
        base, digits = match.group(1), match.group(2)
        if f"{base}_{digits}" in known:  # a real name that happens to end in digits
            return match.group(0)
        if base in known or (generic and len(digits) >= _GENERIC_MIN_DIGITS):
            return f'"{base}"'
        return match.group(0)

    return _WORKER_CONTEXT.sub("", _SHARD_NAME.sub(replace, message))


_KNOWN_NAMES_SQL = """
SELECT c.relname FROM pg_catalog.pg_dist_partition p JOIN pg_catalog.pg_class c ON c.oid = p.logicalrelid
UNION SELECT con.conname FROM pg_catalog.pg_constraint con
      JOIN pg_catalog.pg_dist_partition p ON p.logicalrelid = con.conrelid
UNION SELECT i.relname FROM pg_catalog.pg_index x
      JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
      JOIN pg_catalog.pg_dist_partition p ON p.logicalrelid = x.indrelid
"""


def _static_names() -> set[str]:
    """Table, constraint and index names of the models: known even before any catalog lookup."""
    from .schema import metadata

    names: set[str] = set()
    for table in metadata.tables.values():
        names.add(table.name)
        names.update(str(c.name) for c in table.constraints if c.name)
        names.update(str(i.name) for i in table.indexes if i.name)
    return names


@dataclass
class _MappingState:
    detected: bool = False
    citus: bool = False
    names: set[str] = field(default_factory=set)


def _detect(dbapi_connection: Any, state: _MappingState) -> None:
    # The pool's DBAPI connection: psycopg's, or SQLAlchemy's sync adapter of the async one.
    cur = dbapi_connection.cursor()
    try:
        cur.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')")
        state.citus = bool(cur.fetchone()[0])
        if state.citus:
            try:
                cur.execute(_KNOWN_NAMES_SQL)
                state.names.update(r[0] for r in cur.fetchall())
            except Exception:  # not readable by this role: the static names and the generic rule remain
                _log.debug("citus: shard-name lookup unavailable", exc_info=True)
    finally:
        cur.close()
    dbapi_connection.rollback()
    state.detected = True


def install_error_mapping(engine: Engine, *, known_names: Iterable[str] | None = None, force: bool = False) -> None:
    """Rewrite shard names out of the errors ``engine`` raises, when the server is Citus.

    Detection runs once per engine, on its first connection (one catalog query). ``force``
    (with ``known_names``) turns the mapping on without detection, for tests.
    """
    state = _MappingState(detected=force, citus=force, names=set(known_names or ()))
    state.names |= _static_names()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if not state.detected:
            _detect(dbapi_connection, state)

    @event.listens_for(engine, "handle_error")
    def _unshard(context: Any) -> BaseException | None:
        if not state.citus:
            return None
        for exc in (context.original_exception, context.sqlalchemy_exception):
            if exc is None or len(getattr(exc, "args", ())) != 1 or not isinstance(exc.args[0], str):
                continue
            exc.args = (unshard_message(exc.args[0], state.names, generic=True),)
        if _RLS_COPY in str(context.original_exception):
            # INSERT ... SELECT pulled to the coordinator and sent to the shards as COPY.
            typed = CitusUnsupportedStatementError(
                "Citus runs this INSERT ... SELECT into a distributed table as COPY to the shards, and PostgreSQL"
                " refuses COPY FROM into a table with row-level security; nothing was written. Use INSERT ..."
                " VALUES with the rows (scoped_insert does), or select the rows first and insert them.")
            typed.__cause__ = context.sqlalchemy_exception or context.original_exception
            return typed
        return None


_RLS_COPY = "COPY FROM not supported with row-level security"
