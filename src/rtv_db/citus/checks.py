"""``rtv-db verify``'s Citus checks.

* :func:`check_citus` is the ``rtv-db verify`` part: findings when a tenant table is not
  distributed by ``client_id``, not co-located, or ``clients`` is not a reference table.
  :func:`plan_findings` is its pure part: the findings a plan implies, without the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection

from .apply import _PROPAGATE_SETTING, _role_has_propagation
from .detect import is_citus
from .plan import AUDIT_TRIGGER_FUNCTION, TENANT_COLUMN, DistributionPlan, plan_distribution
from .workers import worker_exposure

# One logger for the package, named as the module was before the split: log output is unchanged.
_log = logging.getLogger("rtv_db.citus")

# verify codes (src/rtv_db/verify/) that do not apply on Citus: Citus forbids the scalar
# subselect that check recommends, so the per-row call is the only form a policy can take.
SUPERSEDED_VERIFY_CODES = frozenset({"POLICY_PER_ROW_CONTEXT"})


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
