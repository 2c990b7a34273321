"""rtv-db: RTV's multi-tenant PostgreSQL data layer.

A tenant can never read, change or detect another tenant's data: PostgreSQL enforces it with
Row-Level Security (forced, on a runtime role that owns nothing), and the tenant-scoped API on
top denies by default.

    from rtv_db import Database, with_tenant_scope, brand_kits

    db = Database(os.environ["DATABASE_URL"])          # the runtime role, never a superuser
    scope = with_tenant_scope(db, tenant_id)
    kits = scope.scoped_query(brand_kits)              # this tenant's rows, and only those
"""

from .audit import AuditEvent, AuditPage, purge_audit_events, read_audit_trail, read_audit_trail_async
from .config import Settings
from .connection import (
    AsyncDatabase,
    ConnectionInfo,
    Database,
    EngineOptions,
    PoolStats,
    check_runtime_role,
    close_connection,
    get_database,
    get_pool_stats,
    test_connection,
)
from .errors import (
    AuditError,
    ConfigurationError,
    ConstraintViolationError,
    CrossTenantWriteError,
    DatabaseConnectionError,
    DuplicateError,
    ExpiredJobPayloadError,
    InvalidCursorError,
    InvalidJobPayloadError,
    InvalidInputError,
    InvalidTenantContextError,
    MigrationError,
    MissingTenantContextError,
    ReferenceNotFoundError,
    RtvDbError,
    RuntimeRoleSettingsError,
    ServerError,
    StillReferencedError,
    TamperedJobPayloadError,
    TenantAccessError,
    TenantContextRefusedError,
    TenantError,
    UnsafeRuntimeRoleError,
    UnscopedWriteError,
)
from .migrate import current_revision, downgrade, migrate
from .rls import clear_tenant_context, get_current_tenant, is_rls_enabled, set_tenant_context, with_rls_context
from .schema import (
    BrandKit,
    Client,
    KnowledgeBase,
    KnowledgeChunk,
    PlatformAccount,
    PlatformAction,
    audit_events,
    brand_kits,
    clients,
    knowledge_bases,
    knowledge_chunks,
    platform_accounts,
    platform_actions,
)
from .server import EmbeddedServer
from .targets import Target, resolve_target
from .tenant import (
    AsyncTenantScope,
    Page,
    SystemScope,
    TenantContext,
    TenantScope,
    TenantScopedDb,
    assert_tenant_ownership,
    async_tenant_session,
    current_tenant_context,
    paginate,
    paginate_async,
    require_tenant_context,
    run_with_tenant_context,
    tenant_session,
    use_tenant_context,
    with_tenant_scope,
)
from .tenant.search import SimilarChunk, async_similar_chunk_models, similar_chunk_models

__version__ = "0.1.0"

__all__ = [
    # connection
    "Database",
    "AsyncDatabase",
    "EngineOptions",
    "PoolStats",
    "ConnectionInfo",
    "check_runtime_role",
    "get_database",
    "test_connection",
    "get_pool_stats",
    "close_connection",
    "Settings",
    "Target",
    "resolve_target",
    "EmbeddedServer",
    # migrations
    "migrate",
    "downgrade",
    "current_revision",
    # tenant scope
    "TenantContext",
    "with_tenant_scope",
    "TenantScope",
    "AsyncTenantScope",
    "TenantScopedDb",
    "tenant_session",
    "async_tenant_session",
    "assert_tenant_ownership",
    "Page",
    "paginate",
    "paginate_async",
    "use_tenant_context",
    "current_tenant_context",
    "require_tenant_context",
    "run_with_tenant_context",
    "SystemScope",
    # similarity search (per-tenant indexes: rtv_db.search_index)
    "SimilarChunk",
    "similar_chunk_models",
    "async_similar_chunk_models",
    # RLS helpers
    "set_tenant_context",
    "clear_tenant_context",
    "get_current_tenant",
    "with_rls_context",
    "is_rls_enabled",
    # schema
    "Client",
    "PlatformAccount",
    "BrandKit",
    "KnowledgeBase",
    "KnowledgeChunk",
    "PlatformAction",
    "clients",
    "platform_accounts",
    "brand_kits",
    "knowledge_bases",
    "knowledge_chunks",
    "platform_actions",
    # audit trail
    "AuditEvent",
    "AuditPage",
    "read_audit_trail",
    "read_audit_trail_async",
    "purge_audit_events",
    "audit_events",
    # errors
    "RtvDbError",
    "ConfigurationError",
    "DatabaseConnectionError",
    "UnsafeRuntimeRoleError",
    "RuntimeRoleSettingsError",
    "ServerError",
    "MigrationError",
    "TenantError",
    "InvalidTenantContextError",
    "MissingTenantContextError",
    "TenantAccessError",
    "TenantContextRefusedError",
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
]
