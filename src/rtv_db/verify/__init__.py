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

# The check modules register their checks when imported, in this order (the order of CHECKS).
from ._model import (  # noqa: I001
    CHECKS,
    Check,
    Finding,
    TenantTable,
    VerifyConfig,
    register_check,
    tenant_tables,
)
from .policies import (  # noqa: I001
    check_policy_always_true,
    check_policy_coverage,
    check_policy_per_row_context,
    check_rls_enabled,
)
from .roles import (  # noqa: I001
    check_runtime_role_privileges,
    check_runtime_role_sessions,
    check_runtime_role_settings,
)
from .schema import (  # noqa: I001
    check_context_mode,
    check_index_tenant_led,
    check_keys,
    check_security_definer,
    check_tenant_index,
    check_tenant_statistics,
    check_views,
)
from .planted import (  # noqa: I001
    check_leakproof_functions,
    check_policy_functions,
    check_readable_untenanted_tables,
    check_secdef_owners,
    check_secret_schema,
    check_sequences,
    check_signed_readers,
    check_signing_keys,
    check_tenant_table_triggers,
)
from .search import (  # noqa: I001
    check_search_keys,
    check_vector_indexes,
)
from .functions import check_function_definitions  # noqa: I001
from .report import (  # noqa: I001
    findings_to_json,
    render_report,
    run_checks,
    verify,
)

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
    "check_context_mode",
    "check_function_definitions",
    "check_search_keys",
    "check_vector_indexes",
    "check_keys",
    "check_leakproof_functions",
    "check_policy_always_true",
    "check_policy_coverage",
    "check_policy_functions",
    "check_policy_per_row_context",
    "check_readable_untenanted_tables",
    "check_rls_enabled",
    "check_runtime_role_privileges",
    "check_runtime_role_sessions",
    "check_runtime_role_settings",
    "check_secdef_owners",
    "check_secret_schema",
    "check_security_definer",
    "check_sequences",
    "check_signed_readers",
    "check_signing_keys",
    "check_tenant_index",
    "check_index_tenant_led",
    "check_tenant_statistics",
    "check_tenant_table_triggers",
    "check_views",
]
