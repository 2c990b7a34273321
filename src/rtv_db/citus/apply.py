"""Carrying a plan out: policies, audit triggers, context readers, functions, tables, the role.

* :func:`apply_distribution` carries the plan out, idempotently (a table that is already a
  Citus table is skipped), in the caller's transaction. ``rtv-db migrate`` calls
  :func:`distribute` in its own transaction right after the Alembic upgrade.
* ``citus.enable_unsafe_triggers`` is set for the distribution transaction only (Citus checks
  it when a table with triggers is distributed, and for trigger DDL on Citus tables).

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
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import Connection, text

from ..config import ROLE_NAME
from ..errors import MigrationError
from .context import apply_context_readers, refuse_signed_context
from .plan import (
    AUDIT_REFERENCE_GUARD,
    AUDIT_TRIGGER_FUNCTION,
    AuditTrigger,
    DistributionPlan,
    plan_distribution,
)

# One logger for the package, named as the module was before the split: log output is unchanged.
_log = logging.getLogger("rtv_db.citus")

_PROPAGATE_SETTING = "citus.propagate_set_commands"
_UNSAFE_TRIGGERS_SETTING = "citus.enable_unsafe_triggers"


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


def drop_search_key_triggers(conn: Connection, plan: DistributionPlan) -> list[str]:
    """Drop rtv's search-key triggers (revision 0007), and retire the per-tenant search indexes:
    without the trigger new rows would miss their tenant's key, and its searches those rows."""
    done = []
    for table, trigger in plan.search_key_triggers:
        conn.exec_driver_sql(f"DROP TRIGGER {_ident(trigger)} ON {_qualified(plan.schema, table)}")
        done.append(f"{table}: search-key trigger {trigger} dropped (searches on Citus are exact within the shard)")
    if done:
        conn.exec_driver_sql("UPDATE rtv_secret.search_indexes SET state = 'dropped', changed_at = now()")
    return done


_AUDIT_INSERT = "INSERT INTO public.audit_events"


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
    if (allow_triggers or any(t.kind != "drop" for t in plan.audit_triggers) or plan.pending_audit_triggers
            or plan.search_key_triggers):
        # Citus refuses to distribute a table with triggers, and trigger DDL on Citus tables,
        # unless this is on. For this transaction only: it is not needed to run the triggers,
        # and it stays off for everything else (a foreign trigger is still refused).
        conn.exec_driver_sql(f"SET LOCAL {_UNSAFE_TRIGGERS_SETTING} TO on")
    actions += apply_policy_rewrites(conn, plan)
    actions += _apply_audit_guard(conn, plan)
    actions += apply_audit_triggers(conn, plan)
    actions += drop_search_key_triggers(conn, plan)
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


def distribute(conn: Connection, *, runtime_role: str, schema: str | None = None,
               allow_triggers: bool = False) -> list[str]:
    """Plan and apply on ``conn`` (a Citus coordinator, in a transaction); [] when nothing was left."""
    plan = plan_distribution(conn, schema, allow_triggers=allow_triggers)
    if not plan.citus:
        raise MigrationError("the citus extension is not installed in this database")
    return apply_distribution(conn, plan, runtime_role=runtime_role, allow_triggers=allow_triggers)
