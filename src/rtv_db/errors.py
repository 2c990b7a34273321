"""The exceptions rtv-db raises.

Every error derives from :class:`RtvDbError`. Tenant errors derive from
:class:`TenantError`; a caller that only wants to map "not yours / not found"
to a 404 catches :class:`TenantAccessError`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError as _IntegrityError

__all__ = [
    "RtvDbError",
    "ConfigurationError",
    "DatabaseConnectionError",
    "UnsafeRuntimeRoleError",
    "RuntimeRoleSettingsError",
    "ServerError",
    "MigrationError",
    "CitusSignedContextError",
    "CitusUnsupportedStatementError",
    "TenantError",
    "InvalidTenantContextError",
    "MissingTenantContextError",
    "TenantContextRefusedError",
    "TenantAccessError",
    "CrossTenantWriteError",
    "UnscopedWriteError",
    "InvalidInputError",
    "ConstraintViolationError",
    "DuplicateError",
    "ReferenceNotFoundError",
    "StillReferencedError",
    "InvalidJobPayloadError",
    "TamperedJobPayloadError",
    "ExpiredJobPayloadError",
    "InvalidCursorError",
    "AuditError",
    "SyntheticDataExistsError",
]


class RtvDbError(Exception):
    """Base class of every error rtv-db raises."""


class ConfigurationError(RtvDbError):
    """Settings are missing or contradict each other."""


class DatabaseConnectionError(RtvDbError):
    """The database could not be reached. The message names host and database, never a password."""


class UnsafeRuntimeRoleError(RtvDbError):
    """The application connection would bypass Row-Level Security.

    Raised when the runtime connection is a superuser, has BYPASSRLS, or owns a tenant table.
    """


class RuntimeRoleSettingsError(UnsafeRuntimeRoleError):
    """The runtime role's settings are not exactly the ones ``rtv-db migrate`` installs.

    The runtime role can change its own defaults (``ALTER ROLE current_user SET search_path =
    pg_catalog``, or ``... IN DATABASE db SET statement_timeout = 0``), and every later connection
    of every tenant inherits them. ``rtv-db migrate`` resets them; the message names the settings.
    """


class ServerError(RtvDbError):
    """The embedded PostgreSQL server could not be started, found or stopped."""


class MigrationError(RtvDbError):
    """Migrating the schema failed."""


class CitusSignedContextError(MigrationError):
    """The signed tenant context (the default) is not supported on Citus: nothing was changed.

    The readers that verify the token cannot do so on a Citus worker as they do on PostgreSQL
    (see docs/citus.md, "The signed tenant context on Citus"). ``rtv-db migrate`` refuses rather
    than distributing a database whose every tenant query would fail or see no rows. Running
    Citus needs ``RTV_DB_CONTEXT_MODE=unsigned``, which reopens the forged-context hole of
    docs/signed-context.md; ``rtv-db verify`` reports it.
    """


class CitusUnsupportedStatementError(RtvDbError):
    """Citus cannot run this statement under Row-Level Security; nothing was written.

    ``INSERT ... SELECT`` into a distributed table whose rows Citus computes on the coordinator
    is sent to the shards as ``COPY``, and PostgreSQL refuses ``COPY FROM`` into a table with
    RLS. Use ``INSERT ... VALUES`` (one statement, many rows: what ``scoped_insert`` sends).
    The original database error is ``__cause__``.
    """


class TenantError(RtvDbError):
    """Base class of the tenant-isolation errors."""


class InvalidTenantContextError(TenantError, ValueError):
    """A tenant context value is malformed: not a UUID, an unknown lane, the wrong type."""


class MissingTenantContextError(TenantError):
    """A tenant-scoped operation was attempted with no tenant context. Nothing was sent."""


class TenantContextRefusedError(TenantError):
    """The database refused the signed tenant context: unknown key, bad signature, expired token,
    or a tenant quarantined by ``rtv-db watchdog`` for repeated stalls.

    Almost always configuration: the application's context key is not installed in the database
    (run ``rtv-db migrate`` with the same key), or the clocks of the two differ by more than the
    token lifetime. See docs/signed-context.md. A quarantined tenant (the message says so) is
    refused until an operator runs ``rtv-db watchdog release <tenant>`` (docs/watchdog.md).
    """


class TenantAccessError(TenantError):
    """The record does not exist for this tenant.

    Deliberately the same for "not found" and "belongs to another tenant", so that the
    caller cannot learn whether another tenant's row exists.
    """


class CrossTenantWriteError(TenantError):
    """A write named a ``client_id`` (or a referenced row) of another tenant. Nothing was written."""


class UnscopedWriteError(TenantError):
    """An update or delete came without a condition. Nothing was written."""


class InvalidInputError(RtvDbError, ValueError):
    """Input that fails validation before reaching the database (unknown column, oversized value)."""


class ConstraintViolationError(RtvDbError, _IntegrityError):
    """PostgreSQL refused a write on a constraint; the transaction is rolled back.

    Also a :class:`sqlalchemy.exc.IntegrityError` (code written for the raw error keeps
    working), but its message is rtv-db's own: table, constraint and column *names*, never the
    key values of PostgreSQL's DETAIL line. ``table``, ``constraint`` and ``columns`` carry the
    names; ``orig`` is the driver's error (its DETAIL included: log it, never show it).
    """

    def __init__(self, message: str, *, table: str | None, constraint: str | None,
                 columns: tuple[str, ...] = (), statement: str | None = None, orig: BaseException | None = None) -> None:
        _IntegrityError.__init__(self, statement, None, orig or Exception(message), hide_parameters=True)
        self.args = (message,)
        self.message = message
        self.table = table
        self.constraint = constraint
        self.columns = columns

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.message, self.table, self.constraint, self.columns))


def _rebuild(cls: type[ConstraintViolationError], message: str, table: str | None, constraint: str | None,
             columns: tuple[str, ...]) -> ConstraintViolationError:
    return cls(message, table=table, constraint=constraint, columns=columns)


class DuplicateError(ConstraintViolationError):
    """A unique constraint (SQLSTATE 23505): this tenant already has a row with that key.

    Every unique key of a tenant table includes ``client_id``, so the clash is always with one
    of the tenant's own rows; the message names the columns, not their values.
    """


class ReferenceNotFoundError(ConstraintViolationError):
    """A foreign key (SQLSTATE 23503) names a row that does not exist for this tenant.

    Deliberately the same type and message for "no such row" and "another tenant's row": the
    composite keys make both the same miss, and the error cannot tell them apart either.
    """


class StillReferencedError(ConstraintViolationError):
    """A delete or key change left other rows of the tenant pointing at it (SQLSTATE 23503)."""


class InvalidJobPayloadError(InvalidTenantContextError):
    """A job payload from :meth:`TenantContext.to_dict` is malformed, tampered with, signed with
    an unknown key, or expired. The subclasses say which; none of them runs the job."""


class TamperedJobPayloadError(InvalidJobPayloadError):
    """A job payload's signature does not match its fields (or its key is not configured here)."""


class ExpiredJobPayloadError(InvalidJobPayloadError):
    """A job payload is past its expiry."""


class InvalidCursorError(InvalidInputError):
    """A pagination cursor is malformed, tampered with, or was issued for another query or tenant."""


class AuditError(RtvDbError):
    """An audit trail operation failed in the database (e.g. a purge by a role that may not purge)."""


class SyntheticDataExistsError(RtvDbError):
    """Synthetic tenants with the slugs a bulk load would create are already in the database."""
