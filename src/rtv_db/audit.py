"""The audit trail: reading a tenant's events, and the owner-level retention command.

The events themselves are written by the database (migration 0003: a trigger on every tenant
table), in the transaction of the change, whoever makes it. This module only reads them, through
a tenant scope (the runtime role, so RLS shows a tenant its own events and nothing else), and
purges old ones with the admin URL.

    page = read_audit_trail(scope, table="brand_kits", limit=20)
    while page.next_cursor:
        page = read_audit_trail(scope, table="brand_kits", limit=20, cursor=page.next_cursor)

Pages are newest first and use keyset pagination: the cursor is the position (time, id) of the
last event of a page, so walking the pages never repeats or skips an event, however many are
added meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, Table, create_engine, select, text, tuple_
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from .config import redact_url, to_sqlalchemy_url
from .errors import AuditError, InvalidInputError, InvalidTenantContextError
from .schema import audit_events, tenant_tables
from .tenant.context import parse_uuid
from .tenant.scope import AsyncTenantScope, TenantScope

__all__ = [
    "AuditEvent",
    "AuditPage",
    "AUDIT_ACTIONS",
    "MAX_PAGE_SIZE",
    "read_audit_trail",
    "read_audit_trail_async",
    "build_audit_query",
    "purge_audit_events",
    "parse_age",
]

AUDIT_ACTIONS = ("INSERT", "UPDATE", "DELETE")
MAX_PAGE_SIZE = 1000
_CURSOR_VERSION = "1"  # bump when the cursor's content changes; old cursors are then refused


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One recorded change. ``changed_columns`` holds names only (UPDATE), None for INSERT/DELETE."""

    id: uuid.UUID
    client_id: uuid.UUID
    occurred_at: datetime
    action: str
    table_name: str
    row_id: uuid.UUID
    changed_columns: tuple[str, ...] | None
    platform_account_id: uuid.UUID | None
    lane: str | None
    user_id: str | None
    correlation_id: str | None
    db_role: str

    @classmethod
    def from_row(cls, row: Row[Any]) -> "AuditEvent":
        m = row._mapping
        changed = m["changed_columns"]
        return cls(
            id=m["id"],
            client_id=m["client_id"],
            occurred_at=m["occurred_at"],
            action=m["action"],
            table_name=m["table_name"],
            row_id=m["row_id"],
            changed_columns=tuple(changed) if changed is not None else None,
            platform_account_id=m["platform_account_id"],
            lane=m["lane"],
            user_id=m["user_id"],
            correlation_id=m["correlation_id"],
            db_role=m["db_role"],
        )


@dataclass(frozen=True, slots=True)
class AuditPage:
    """A page of events, newest first; ``next_cursor`` is None on the last page."""

    events: list[AuditEvent]
    next_cursor: str | None


# -- the cursor -------------------------------------------------------------------------------


def _encode_cursor(event: AuditEvent) -> str:
    raw = f"{_CURSOR_VERSION}|{event.occurred_at.isoformat()}|{event.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    invalid = InvalidInputError("invalid audit trail cursor: pass the next_cursor of a previous page unchanged")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 200:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, when, event_id = raw.split("|")
        occurred_at = datetime.fromisoformat(when)
        position = (occurred_at, uuid.UUID(event_id))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid from None
    if version != _CURSOR_VERSION or occurred_at.tzinfo is None:
        raise invalid
    return position


# -- the statement (shared by the sync and async readers) ---------------------------------------


def _table_name(table: str | Table | type | None) -> str | None:
    if table is None:
        return None
    name = getattr(getattr(table, "__table__", table), "name", table)
    if not isinstance(name, str) or name not in tenant_tables():
        raise InvalidInputError(f"{str(name)[:60]!r} is not an audited table; one of {', '.join(sorted(tenant_tables()))}")
    return name


def _aware(value: datetime | None, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInputError(f"{what} must be a timezone-aware datetime")
    return value


def build_audit_query(
    tenant_id: uuid.UUID,
    *,
    table: str | Table | type | None = None,
    row_id: uuid.UUID | str | None = None,
    correlation_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Select[Any]:
    """The SELECT of one page (``limit + 1`` rows, to tell whether another page follows).

    ``since`` is inclusive, ``until`` exclusive. The tenant predicate is literal as well as
    enforced by RLS, so the primary key ``(client_id, occurred_at, id)`` serves the order.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
    t = audit_events
    where: list[ColumnElement[bool]] = [t.c.client_id == tenant_id]
    name = _table_name(table)
    if name is not None:
        where.append(t.c.table_name == name)
    if row_id is not None:
        try:
            where.append(t.c.row_id == parse_uuid(row_id, "row_id"))
        except InvalidTenantContextError as exc:  # a filter, not a context: report it as bad input
            raise InvalidInputError(str(exc)) from None
    if correlation_id is not None:
        if not isinstance(correlation_id, str) or not correlation_id or len(correlation_id) > 200:
            raise InvalidInputError("correlation_id must be a non-empty string of at most 200 characters")
        where.append(t.c.correlation_id == correlation_id)
    if action is not None:
        if action not in AUDIT_ACTIONS:
            raise InvalidInputError(f"action must be one of {', '.join(AUDIT_ACTIONS)}")
        where.append(t.c.action == action)
    if (start := _aware(since, "since")) is not None:
        where.append(t.c.occurred_at >= start)
    if (end := _aware(until, "until")) is not None:
        where.append(t.c.occurred_at < end)
    if cursor is not None:
        where.append(tuple_(t.c.occurred_at, t.c.id) < tuple_(*_decode_cursor(cursor)))
    return select(t).where(*where).order_by(t.c.occurred_at.desc(), t.c.id.desc()).limit(limit + 1)


def _page(rows: list[Row[Any]], limit: int) -> AuditPage:
    events = [AuditEvent.from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    return AuditPage(events, _encode_cursor(events[-1]) if more and events else None)


def read_audit_trail(
    scope: TenantScope,
    *,
    table: str | Table | type | None = None,
    row_id: uuid.UUID | str | None = None,
    correlation_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> AuditPage:
    """One page of the scope's tenant's audit trail, newest first, filtered as asked.

    Runs on the scope's connection (inside ``scoped_transaction`` it is part of that
    transaction, so it sees the events of the changes made so far in it).
    """
    if not isinstance(scope, TenantScope):
        raise TypeError(f"read_audit_trail needs a TenantScope (use read_audit_trail_async for {type(scope).__name__})")
    stmt = build_audit_query(scope.tenant_id, table=table, row_id=row_id, correlation_id=correlation_id,
                             action=action, since=since, until=until, limit=limit, cursor=cursor)
    with scope.scoped_transaction() as tx:
        rows = list(tx.connection.execute(stmt))
    return _page(rows, limit)


async def read_audit_trail_async(
    scope: AsyncTenantScope,
    *,
    table: str | Table | type | None = None,
    row_id: uuid.UUID | str | None = None,
    correlation_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> AuditPage:
    """The asyncio twin of :func:`read_audit_trail`."""
    if not isinstance(scope, AsyncTenantScope):
        raise TypeError(f"read_audit_trail_async needs an AsyncTenantScope, not {type(scope).__name__}")
    stmt = build_audit_query(scope.tenant_id, table=table, row_id=row_id, correlation_id=correlation_id,
                             action=action, since=since, until=until, limit=limit, cursor=cursor)
    async with scope.scoped_transaction() as tx:
        rows = list(await tx.connection.execute(stmt))
    return _page(rows, limit)


# -- retention ------------------------------------------------------------------------------------

_AGE = re.compile(r"^\s*(\d{1,6})\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(value: str | timedelta) -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` (or a timedelta) as a non-negative timedelta."""
    if isinstance(value, timedelta):
        age = value
    else:
        match = _AGE.match(value) if isinstance(value, str) else None
        if match is None:
            raise InvalidInputError(f"not an age: {str(value)[:40]!r}; write a number and a unit (s, m, h, d, w), e.g. 90d")
        age = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    if age < timedelta(0):
        raise InvalidInputError("the age must not be negative")
    return age


def _purge_on_citus(conn: Any, age: timedelta) -> int:
    """The purge on a Citus coordinator, as the admin login itself.

    ``rtv.purge_audit_events`` cannot run there: as a SECURITY DEFINER function its multi-shard
    DELETE would open connections to the workers as the owner role, which is NOLOGIN, and its
    ``set_config`` cutoff is not propagated to the workers, where the retention policies run.
    Here the admin login (checked as the function checks it: a member of the owner role) deletes
    with the cutoff as a literal, and also sets it with a propagated ``SET LOCAL`` for the
    retention policies of a non-superuser admin.
    """
    from .config import Settings

    owner = Settings.from_env().owner_role
    allowed = conn.execute(text("SELECT pg_has_role(session_user, CAST(:o AS regrole), 'USAGE')"), {"o": owner}).scalar()
    if not allowed:
        raise AuditError("only the owner role or an admin may purge audit events")
    cutoff = conn.execute(text("SELECT clock_timestamp() - CAST(:age AS interval)"), {"age": age}).scalar_one()
    conn.exec_driver_sql("SET LOCAL citus.propagate_set_commands TO 'local'")
    conn.exec_driver_sql(f"SET LOCAL rtv.audit_purge_cutoff = '{cutoff.isoformat()}'")
    result = conn.execute(text("DELETE FROM public.audit_events WHERE occurred_at < :cutoff"), {"cutoff": cutoff})
    return int(result.rowcount)


def purge_audit_events(admin_url: str, older_than: str | timedelta) -> int:
    """Delete every tenant's audit events older than ``older_than``; return how many.

    Needs the admin URL (a superuser, or a login that is a member of the owner role): the
    database function refuses the runtime and system roles.
    """
    age = parse_age(older_than)
    url = to_sqlalchemy_url(admin_url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            from .citus import is_citus

            if is_citus(conn):
                return _purge_on_citus(conn, age)
            return int(conn.execute(text("SELECT rtv.purge_audit_events(:age)"), {"age": age}).scalar_one())
    except DBAPIError as exc:
        from .connection import connect_error

        if exc.connection_invalidated or type(exc.orig).__name__ == "OperationalError":
            raise connect_error(url, exc) from exc
        raise AuditError(f"purging audit events on {redact_url(url)} failed: {str(exc.orig).splitlines()[0]}") from exc
    except SQLAlchemyError as exc:
        raise AuditError(f"purging audit events on {redact_url(url)} failed: {exc}") from exc
    finally:
        engine.dispose()
