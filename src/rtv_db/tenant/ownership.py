"""``assert_tenant_ownership``: a last check on a record read by hand."""

from __future__ import annotations

import logging
import uuid
from typing import Any, TypeVar

from ..errors import TenantAccessError
from .context import parse_uuid

__all__ = ["assert_tenant_ownership"]

_log = logging.getLogger("rtv_db.tenant")
_R = TypeVar("_R")


def _owner_of(record: Any) -> Any:
    if isinstance(record, dict):
        return record.get("client_id")
    mapping = getattr(record, "_mapping", None)  # a Core Row
    if mapping is not None:
        return mapping.get("client_id")
    return getattr(record, "client_id", None)


def assert_tenant_ownership(record: _R | None, tenant_id: uuid.UUID | str, resource_type: str) -> _R:
    """Return ``record`` if it belongs to ``tenant_id``; else raise :class:`TenantAccessError`.

    The caller sees the same message for "not found" and "belongs to another tenant", so an
    error response cannot reveal that another tenant's row exists. The log tells them apart.
    """
    expected = parse_uuid(tenant_id, "tenant_id")
    message = f"{resource_type} not found"
    if record is None:
        _log.info("tenant access check: %s not found for tenant %s", resource_type, expected)
        raise TenantAccessError(message)
    owner = _owner_of(record)
    try:
        owner_id = uuid.UUID(str(owner)) if owner is not None else None
    except ValueError:
        owner_id = None
    if owner_id != expected:
        _log.warning(
            "tenant access check: %s owned by %s requested by tenant %s (reported as not found)",
            resource_type, owner_id, expected,
        )
        raise TenantAccessError(message)
    return record
