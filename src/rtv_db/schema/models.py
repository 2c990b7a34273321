"""SQLAlchemy models that mirror the migrations (a test proves autogenerate finds no difference).

The migrations are the source of truth; these models are how Python code reads and writes the
tables. Every tenant model inherits :class:`TenantModel`: ``client_id`` is part of its primary
key, and relationships between tenant models join on ``client_id`` too.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    ARRAY,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "TenantModel",
    "Client",
    "PlatformAccount",
    "BrandKit",
    "KnowledgeBase",
    "KnowledgeChunk",
    "PlatformAction",
    "AuditEventRecord",
    "metadata",
    "EMBEDDING_DIM",
    "PLATFORMS",
    "ACTION_STATUSES",
    "tenant_tables",
]

EMBEDDING_DIM = 384
PLATFORMS = ("instagram", "x", "linkedin", "tiktok", "facebook", "youtube", "threads")
ACTION_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    # Foreign keys named as PostgreSQL names them, so autogenerate compares like with like.
    metadata = MetaData(naming_convention={"fk": "%(table_name)s_%(column_0_name)s_fkey"})
    type_annotation_map = {uuid.UUID: UUID(as_uuid=True), dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


metadata = Base.metadata


def _uuid_pk() -> Any:
    return mapped_column(UUID(as_uuid=True), server_default=func.gen_random_uuid(), sort_order=-1)


def _created() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


def _updated() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=func.now())


class Client(Base):
    """A tenant. Its ``id`` is every tenant row's ``client_id``."""

    __tablename__ = "clients"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="clients_pkey"),
    )
    # The tenant predicate for this table is on ``id``.
    __rtv_tenant_column__: ClassVar[str] = "id"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(Text)
    slug: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


# Unique slugs through an expression the runtime role cannot write (revision 0009): no query of a
# tenant can use this index, so EXPLAIN ANALYZE cannot count other tenants' slugs through it.
Index("clients_slug_key", func.rtv_secret.slug_key(Client.__table__.c.slug), unique=True)


class TenantModel(Base):
    """Base of every model whose rows belong to one client."""

    __abstract__ = True
    __rtv_tenant_column__: ClassVar[str] = "client_id"

    client_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("clients.id", ondelete="CASCADE"), sort_order=-2
    )
    id: Mapped[uuid.UUID] = _uuid_pk()


class PlatformAccount(TenantModel):
    __tablename__ = "platform_accounts"
    __table_args__ = (
        PrimaryKeyConstraint("client_id", "id", name="platform_accounts_pkey"),
        UniqueConstraint("client_id", "platform", "handle", name="platform_accounts_client_id_platform_handle_key"),
    )

    platform: Mapped[str] = mapped_column(Text)
    handle: Mapped[str] = mapped_column(Text)
    display_name: Mapped[str | None] = mapped_column(Text)
    lanes: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("ARRAY['api'::text]"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    actions: Mapped[list["PlatformAction"]] = relationship(back_populates="platform_account", passive_deletes=True)


class BrandKit(TenantModel):
    __tablename__ = "brand_kits"
    __table_args__ = (
        PrimaryKeyConstraint("client_id", "id", name="brand_kits_pkey"),
        UniqueConstraint("client_id", "name", name="brand_kits_client_id_name_key"),
    )

    name: Mapped[str] = mapped_column(Text)
    tone: Mapped[dict[str, Any]] = mapped_column(
        JSONB, server_default=text("""'{"voice": "neutral", "personality": []}'::jsonb""")
    )
    colors: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    logo_refs: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class KnowledgeBase(TenantModel):
    __tablename__ = "knowledge_bases"
    __table_args__ = (
        PrimaryKeyConstraint("client_id", "id", name="knowledge_bases_pkey"),
        UniqueConstraint("client_id", "name", name="knowledge_bases_client_id_name_key"),
    )

    name: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    chunks: Mapped[list["KnowledgeChunk"]] = relationship(back_populates="knowledge_base", passive_deletes=True)


class KnowledgeChunk(TenantModel):
    __tablename__ = "knowledge_chunks"
    __table_args__ = (
        PrimaryKeyConstraint("client_id", "id", name="knowledge_chunks_pkey"),
        ForeignKeyConstraint(
            ["client_id", "knowledge_base_id"],
            ["knowledge_bases.client_id", "knowledge_bases.id"],
            name="knowledge_chunks_knowledge_base_fkey",
            ondelete="CASCADE",
        ),
        # No HNSW index over every tenant (revision 0007): a large tenant gets its own, partial on
        # search_key (rtv_db.search_index), created at run time and not part of this model.
        Index("knowledge_chunks_client_id_knowledge_base_id_idx", "client_id", "knowledge_base_id"),
    )

    # Only the composite foreign key: the column-level one to clients belongs to other tables.
    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), sort_order=-2)
    knowledge_base_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    content: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIM))
    created_at: Mapped[datetime] = _created()
    # The tenant's opaque search key once it has its own index; set by the database's trigger
    # from rtv_secret.search_indexes whatever a writer sends (revision 0007).
    search_key: Mapped[int | None] = mapped_column(Integer)

    knowledge_base: Mapped[KnowledgeBase] = relationship(back_populates="chunks")


class PlatformAction(TenantModel):
    __tablename__ = "platform_actions"
    __table_args__ = (
        PrimaryKeyConstraint("client_id", "id", name="platform_actions_pkey"),
        ForeignKeyConstraint(
            ["client_id", "platform_account_id"],
            ["platform_accounts.client_id", "platform_accounts.id"],
            name="platform_actions_platform_account_fkey",
            ondelete="CASCADE",
        ),
        Index(
            "platform_actions_client_id_account_status_idx",
            "client_id",
            "platform_account_id",
            "status",
            "scheduled_at",
        ),
    )

    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), sort_order=-2)
    platform_account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    kind: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    lane: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'::text"))
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()

    platform_account: Mapped[PlatformAccount] = relationship(back_populates="actions")


class AuditEventRecord(Base):
    """One row of the append-only audit trail (migration 0003); written only by the audit trigger.

    Not a :class:`TenantModel`: the application never inserts or updates it (the runtime role
    may only SELECT, and RLS shows it its own tenant's events). Read it with
    :func:`rtv_db.audit.read_audit_trail`.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        PrimaryKeyConstraint("client_id", "occurred_at", "id", name="audit_events_pkey"),
        Index("audit_events_client_id_row_id_idx", "client_id", "row_id"),
        {"comment": "Append-only audit trail of tenant tables: names of changed columns, never values"},
    )

    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), server_default=func.gen_random_uuid())
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.clock_timestamp())
    action: Mapped[str] = mapped_column(Text)
    table_name: Mapped[str] = mapped_column(Text)
    row_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    changed_columns: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    platform_account_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lane: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str | None] = mapped_column(Text)
    correlation_id: Mapped[str | None] = mapped_column(Text)
    db_role: Mapped[str] = mapped_column(Text, server_default=text("SESSION_USER"))


def tenant_tables() -> list[str]:
    """Names of the tables whose rows belong to one tenant (``clients`` included)."""
    return [mapper.local_table.name for mapper in Base.registry.mappers if hasattr(mapper.class_, "__rtv_tenant_column__")]
