"""Tenant context and the tenant-scoped API."""

from .context import (
    LANES,
    Lane,
    TenantContext,
    current_tenant_context,
    require_tenant_context,
    run_with_tenant_context,
    use_tenant_context,
)
from .ownership import assert_tenant_ownership
from .pagination import Page, paginate, paginate_async
from .orm import async_tenant_session, tenant_session
from .scope import AsyncTenantScope, TenantScope, TenantScopedDb, with_tenant_scope
from .system import SystemScope

__all__ = [
    "LANES",
    "Lane",
    "TenantContext",
    "current_tenant_context",
    "require_tenant_context",
    "run_with_tenant_context",
    "use_tenant_context",
    "assert_tenant_ownership",
    "Page",
    "paginate",
    "paginate_async",
    "tenant_session",
    "async_tenant_session",
    "TenantScope",
    "AsyncTenantScope",
    "TenantScopedDb",
    "with_tenant_scope",
    "SystemScope",
]
