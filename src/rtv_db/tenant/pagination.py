"""Keyset pagination with opaque, signed cursors: the scoped API and the ORM.

A page is ordered by the given columns plus ``id`` (unique per tenant), so the order is total
and stable while rows are added or removed. The cursor holds the last row's values of those
columns and is signed (HMAC-SHA256, a key derived from the tenant context key) over them, the
table, the order and the tenant: an edited cursor, or one of another tenant, table or order, is
refused with :class:`~rtv_db.InvalidCursorError`. It is opaque, not secret: it carries the
values of *this* tenant's last row, base64-encoded.

    page = scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=50)
    more = scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=50, after=page.next_cursor)

    page = paginate(session, BrandKit, order_by=[BrandKit.name], page_size=50)           # ORM
    page = await paginate_async(session, BrandKit, order_by=[BrandKit.name], page_size=50)
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import hashlib
import hmac
import json
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Column, ColumnElement, Select, Table, and_, false, or_, select, tuple_
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression

from ..errors import InvalidCursorError, InvalidInputError, MissingTenantContextError
from .context import TenantContext

__all__ = ["Page", "MAX_PAGE_SIZE", "paginate", "paginate_async", "keyset_select", "page_from_rows"]

MAX_PAGE_SIZE = 1000
_LABEL = b"rtv-db cursor v1"
_TAG_HEX = 32  # 128-bit tag
_MAX_CURSOR = 4096
_log = logging.getLogger("rtv_db.pagination")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Page(Generic[_R]):
    """One page: its rows and the cursor of the next page (None on the last page)."""

    rows: list[_R]
    next_cursor: str | None = None
    page_size: int = field(default=0, repr=False)

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


_process_key: bytes | None = None


def _keys() -> list[tuple[str, bytes]]:
    """(key id, cursor key) pairs; the last signs. Without any context key (unsigned debugging
    mode), a random per-process key: cursors then work only within this process."""
    global _process_key
    from .. import signing

    keys = [(k.key_id, hmac.new(k.secret, _LABEL, hashlib.sha256).digest()) for k in signing.load_keys()]
    if keys:
        return keys
    if _process_key is None:
        _log.warning("no tenant context key configured: pagination cursors are signed with a per-process key")
        _process_key = secrets.token_bytes(32)
    return [("process", _process_key)]


def _order_spec(table: Table, order_by: Sequence[Any]) -> list[tuple[Column[Any], bool]]:
    """(column, descending) pairs, ending with ``id``; only NOT NULL columns of ``table``."""
    spec: list[tuple[Column[Any], bool]] = []
    for item in order_by:
        desc = False
        element = getattr(item, "__clause_element__", lambda: item)()
        if isinstance(element, UnaryExpression) and element.modifier in (operators.desc_op, operators.asc_op):
            desc = element.modifier is operators.desc_op
            element = element.element
        element = getattr(element, "__clause_element__", lambda: element)()
        column = table.c.get(getattr(element, "key", "")) if isinstance(element, Column) else None
        if column is None or column is not element and not column.compare(element):
            raise InvalidInputError(f"page order_by takes columns of {table.name} (optionally .desc()), not {item!r}"[:200])
        if column.nullable and not column.primary_key:
            raise InvalidInputError(f"cannot page on {table.name}.{column.key}: it may be NULL (use NOT NULL columns)")
        spec.append((column, desc))
    if "id" not in table.c:
        raise InvalidInputError(f"{table.name} has no id column to page on")
    if not any(c.key == "id" for c, _ in spec):
        spec.append((table.c.id, spec[-1][1] if spec else False))
    return spec


def _scope_of(table: Table, ctx: TenantContext, spec: list[tuple[Column[Any], bool]]) -> str:
    order = ",".join(f"{c.key}{' desc' if d else ''}" for c, d in spec)
    return f"{ctx.tenant_id}|{table.name}|{order}"


def _encode(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return {"u": str(value)}
    if isinstance(value, dt.datetime):
        return {"t": value.isoformat()}
    if isinstance(value, dt.date):
        return {"d": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"n": str(value)}
    if isinstance(value, (str, int, float, bool)):
        return value
    raise InvalidInputError(f"cannot page on a value of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        ((tag, raw),) = value.items()
        if isinstance(raw, str):
            return {"u": uuid.UUID, "t": dt.datetime.fromisoformat, "d": dt.date.fromisoformat,
                    "n": decimal.Decimal}[tag](raw)
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError("bad value")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_cursor(scope: str, values: list[Any]) -> str:
    key_id, key = _keys()[-1]
    body = _b64(json.dumps({"k": key_id, "v": [_encode(v) for v in values]}, separators=(",", ":")).encode())
    tag = hmac.new(key, f"{scope}\n{body}".encode(), hashlib.sha256).hexdigest()[:_TAG_HEX]
    return f"{body}.{tag}"


def read_cursor(scope: str, cursor: Any, count: int) -> list[Any]:
    """The values a cursor holds, after checking its signature; :class:`InvalidCursorError` else."""
    if not isinstance(cursor, str) or len(cursor) > _MAX_CURSOR or cursor.count(".") != 1:
        raise InvalidCursorError("the cursor is malformed")
    body, tag = cursor.split(".")
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidCursorError("the cursor is malformed") from None
    if not isinstance(data, dict) or not isinstance(data.get("k"), str) or not isinstance(data.get("v"), list):
        raise InvalidCursorError("the cursor is malformed")
    key = dict(_keys()).get(data["k"])
    expected = hmac.new(key, f"{scope}\n{body}".encode(), hashlib.sha256).hexdigest()[:_TAG_HEX] if key else ""
    if not key or not hmac.compare_digest(expected, tag):
        raise InvalidCursorError("the cursor was changed, or belongs to another query or tenant")
    if len(data["v"]) != count:
        raise InvalidCursorError("the cursor is malformed")
    try:
        return [_decode(v) for v in data["v"]]
    except (ValueError, KeyError, TypeError):
        raise InvalidCursorError("the cursor is malformed") from None


def _after(spec: list[tuple[Column[Any], bool]], values: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order of ``spec``."""
    if all(d == spec[0][1] for _, d in spec):
        cols, vals = tuple_(*(c for c, _ in spec)), tuple_(*values)
        return cols < vals if spec[0][1] else cols > vals
    branches = []
    for i, (column, desc) in enumerate(spec):
        equal = [c == v for (c, _), v in zip(spec[:i], values[:i])]
        branches.append(and_(*equal, column < values[i] if desc else column > values[i]))
    return or_(false(), *branches)


def _check_size(page_size: Any) -> int:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"page_size must be an integer from 1 to {MAX_PAGE_SIZE}")
    return page_size


def keyset_select(stmt: Select[Any], table: Table, ctx: TenantContext, order_by: Sequence[Any], page_size: Any,
                  after: str | None) -> tuple[Select[Any], list[tuple[Column[Any], bool]], str]:
    """``stmt`` ordered for paging, resumed after the cursor, limited to one row past the page."""
    size = _check_size(page_size)
    spec = _order_spec(table, order_by)
    scope = _scope_of(table, ctx, spec)
    if after is not None:
        stmt = stmt.where(_after(spec, read_cursor(scope, after, len(spec))))
    stmt = stmt.order_by(None).order_by(*(c.desc() if d else c.asc() for c, d in spec)).limit(size + 1)
    return stmt, spec, scope


def page_from_rows(rows: list[Any], spec: list[tuple[Column[Any], bool]], scope: str, page_size: int) -> Page[Any]:
    """The page of ``rows`` (fetched with one extra row); the cursor from the last row shown."""
    if len(rows) <= page_size:
        return Page(rows, None, page_size)
    rows = rows[:page_size]
    last = rows[-1]
    values = [getattr(last, c.key) for c, _ in spec]
    return Page(rows, make_cursor(scope, values), page_size)


# -- ORM -----------------------------------------------------------------------------------------


def _orm_select(session: Any, model: Any, where: Sequence[Any], order_by: Sequence[Any], page_size: Any,
                after: str | None) -> tuple[Select[Any], list[tuple[Column[Any], bool]], str]:
    from .orm import _session_context

    table = getattr(model, "__table__", None)
    if not isinstance(table, Table):
        raise InvalidInputError(f"paginate needs a mapped model class, not {model!r}"[:120])
    sync = getattr(session, "sync_session", session)
    ctx = _session_context(sync)
    if ctx is None:
        raise MissingTenantContextError("paginate needs a tenant session; nothing was sent")
    stmt = select(model).where(*where)
    return keyset_select(stmt, table, ctx, order_by, page_size, after)


def paginate(session: Any, model: Any, *where: ColumnElement[bool], order_by: Sequence[Any] = (),
             page_size: int = 50, after: str | None = None) -> Page[Any]:
    """One page of ``model`` objects in a tenant session (the session scopes it to the tenant)."""
    stmt, spec, scope = _orm_select(session, model, where, order_by, page_size, after)
    return page_from_rows(list(session.scalars(stmt)), spec, scope, page_size)


async def paginate_async(session: Any, model: Any, *where: ColumnElement[bool], order_by: Sequence[Any] = (),
                         page_size: int = 50, after: str | None = None) -> Page[Any]:
    """:func:`paginate` for an async tenant session."""
    stmt, spec, scope = _orm_select(session, model, where, order_by, page_size, after)
    return page_from_rows(list(await session.scalars(stmt)), spec, scope, page_size)
