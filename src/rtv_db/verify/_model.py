"""What ``rtv-db verify`` reports and how checks join: :class:`Finding`, :class:`VerifyConfig`, the
registry of checks, and the catalog helpers every check shares (which tables are tenant tables).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from psycopg import Connection

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: a stable ``code``, the ``object`` it is about, and what/why/how to fix."""

    code: str
    severity: Severity
    object: str
    message: str
    why: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyConfig:
    """What :func:`verify` checks against: the runtime role and where the tenant tables live."""

    runtime_role: str = "rtv_app"
    schema: str = "public"
    # The other two roles `rtv-db migrate` creates (function owners and bodies name them).
    owner_role: str = "rtv_owner"
    system_role: str = "rtv_system"
    tenant_column: str = "client_id"
    tenant_root: str = "clients"
    # SQL functions that read the tenant context; a policy should call them once per statement.
    context_functions: tuple[str, ...] = (
        "current_tenant_id",
        "current_platform_account_id",
        "current_lane",
        "get_current_tenant",
        "current_user_id",
        "current_correlation_id",
    )
    # What a policy must mention to be about the tenant: one of these functions, or the setting.
    tenant_functions: tuple[str, ...] = ("current_tenant_id",)
    # The schema of rtv's own functions (the context readers, the audit trigger).
    tenant_schema: str = "rtv"
    # Tables without the tenant column the runtime role may read (besides the tenant root).
    shared_tables: tuple[str, ...] = ()
    # The signing key ids the application is configured with (None: from load_keys()).
    key_ids: tuple[str, ...] | None = None
    tenant_setting: str = "app.current_tenant_id"
    # The runtime role's settings in the database as `rtv-db migrate` installs them (key -> value,
    # see rtv_db.config.runtime_role_settings); None: with the timeouts of the environment.
    role_settings: dict[str, str] | None = None
    # Free-form options for checks added by other modules.
    extra: dict[str, Any] = field(default_factory=dict)


Check = Callable[[Connection, VerifyConfig], Iterable[Finding]]

CHECKS: list[Check] = []
"""The checks :func:`verify` runs, in order. Append to add one."""


def register_check(check: Check) -> Check:
    """Add ``check`` to :data:`CHECKS` (usable as a decorator); adding it twice is a no-op."""
    if check not in CHECKS:
        CHECKS.append(check)
    return check


# -- catalog helpers ------------------------------------------------------------------------------

_SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema')"
# Schemas the checks look at beyond the tenant schema: everything that is not PostgreSQL's own.
_USER_SCHEMA = f"n.nspname NOT IN {_SYSTEM_SCHEMAS} AND n.nspname !~ '^pg_(toast|temp)'"


@dataclass(frozen=True)
class TenantTable:
    """A table whose rows belong to one tenant."""

    oid: int
    name: str  # schema-qualified, quoted as needed (regclass text)
    relname: str
    rls_enabled: bool
    rls_forced: bool
    owner: str
    tenant_attnum: int  # the column that names the tenant: client_id, or clients.id
    is_root: bool  # the tenants' own table (clients): its keys are global by design
    is_partition: bool  # queried directly, a partition applies its own policies, not its parent's


def tenant_tables(conn: Connection, config: VerifyConfig) -> list[TenantTable]:
    """The tenant tables: in ``config.schema``, and any table with the tenant column in any other
    non-system schema (a copy of a tenant table elsewhere is one too)."""
    rows = conn.execute(
        f"""
        SELECT c.oid, c.oid::regclass::text, c.relname, c.relrowsecurity, c.relforcerowsecurity,
               pg_get_userbyid(c.relowner),
               COALESCE(tc.attnum, CASE WHEN c.relname = %(root)s THEN rc.attnum END),
               c.relname = %(root)s AND tc.attnum IS NULL AND n.nspname = %(schema)s, c.relispartition
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attribute tc ON tc.attrelid = c.oid AND tc.attname = %(col)s AND NOT tc.attisdropped
        LEFT JOIN pg_attribute rc ON rc.attrelid = c.oid AND rc.attname = 'id' AND NOT rc.attisdropped
        WHERE c.relkind IN ('r', 'p')
          AND ((n.nspname = %(schema)s AND (tc.attnum IS NOT NULL OR c.relname = %(root)s))
               OR (tc.attnum IS NOT NULL AND {_USER_SCHEMA}))
        ORDER BY c.relname
        """,
        {"schema": config.schema, "col": config.tenant_column, "root": config.tenant_root},
    ).fetchall()
    return [TenantTable(*r) for r in rows if r[6]]


def _scalar(conn: Connection, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _role_oid(conn: Connection, role: str) -> int | None:
    row = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row[0] if row else None
