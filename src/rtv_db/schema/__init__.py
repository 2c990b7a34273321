"""The tables, as SQLAlchemy models (ORM) and tables (Core)."""

from .models import (
    ACTION_STATUSES,
    EMBEDDING_DIM,
    PLATFORMS,
    AuditEventRecord,
    Base,
    BrandKit,
    Client,
    KnowledgeBase,
    KnowledgeChunk,
    PlatformAccount,
    PlatformAction,
    TenantModel,
    metadata,
    tenant_tables,
)

clients = Client.__table__
platform_accounts = PlatformAccount.__table__
brand_kits = BrandKit.__table__
knowledge_bases = KnowledgeBase.__table__
knowledge_chunks = KnowledgeChunk.__table__
platform_actions = PlatformAction.__table__
audit_events = AuditEventRecord.__table__

__all__ = [
    "ACTION_STATUSES",
    "EMBEDDING_DIM",
    "PLATFORMS",
    "AuditEventRecord",
    "Base",
    "BrandKit",
    "Client",
    "KnowledgeBase",
    "KnowledgeChunk",
    "PlatformAccount",
    "PlatformAction",
    "TenantModel",
    "metadata",
    "tenant_tables",
    "clients",
    "platform_accounts",
    "brand_kits",
    "knowledge_bases",
    "knowledge_chunks",
    "platform_actions",
    "audit_events",
]
