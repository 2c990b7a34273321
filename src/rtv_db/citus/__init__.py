"""Citus (distributed PostgreSQL): the same schema and isolation, distributed by ``client_id``.

What this package does, and only on a server where the ``citus`` extension exists, one file a part:

* :mod:`.detect`: whether the server is Citus (:func:`is_citus`, :func:`has_distributed_tables`).
* :mod:`.plan`: :func:`plan_distribution` reads the migrated schema and says what Citus needs
  (reference and distributed tables, policy rewrites, audit triggers, functions for the
  workers) and what Citus would refuse.
* :mod:`.context`: the tenant context on Citus: signed mode refused, unsigned mode with the
  plain readers (:data:`PLAIN_CONTEXT_READERS`).
* :mod:`.apply`: :func:`apply_distribution` carries the plan out; :func:`distribute` plans and
  applies, for ``rtv-db migrate``.
* :mod:`.workers`: the runtime role's privileges on the workers (:func:`worker_exposure`,
  :func:`harden_workers`).
* :mod:`.checks`: :func:`check_citus`, the ``rtv-db verify`` part.
* :mod:`.shard_names`: :func:`unshard_message` and :func:`install_error_mapping`, shard names
  out of error messages.

See docs/citus.md for the Citus facts behind each part and their sources.
"""

from __future__ import annotations

# Callers outside the package (migrate, verify, audit) look these names up on the package
# (``citus.is_citus(conn)``, or an import inside the calling function), so a test that patches a
# package attribute is seen there. Inside the package each file imports from the file that
# defines the name: patching ``citus.is_citus`` does not reach plan_distribution's own call.
from .apply import (
    apply_audit_triggers,
    apply_distribution,
    apply_policy_rewrites,
    distribute,
    relabelled_definition,
)
from .checks import SUPERSEDED_VERIFY_CODES, CitusFinding, check_citus, plan_findings
from .context import (
    PLAIN_CONTEXT_READERS,
    apply_context_readers,
    database_context_mode,
    refuse_signed_context,
)
from .detect import has_distributed_tables, is_citus
from .plan import (
    AUDIT_REFERENCE_GUARD,
    AUDIT_TRIGGER_FUNCTION,
    TENANT_COLUMN,
    AuditTrigger,
    DistributionPlan,
    PlannedTable,
    PolicyRewrite,
    TableKind,
    plan_distribution,
    rewrite_policy_expression,
)
from .shard_names import install_error_mapping, unshard_message
from .workers import harden_workers, worker_exposure

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
