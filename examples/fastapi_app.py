"""A small multi-tenant FastAPI app on rtv-db: brand kits and knowledge chunks, per tenant.

    pip install "rtv-db[fastapi]"
    DATABASE_URL=postgresql://rtv_app:...@host/rtv uvicorn --app-dir examples fastapi_app:app

The tenant comes from the ``X-Tenant-Id`` header, which is only safe behind a gateway that
authenticates the caller and sets (overwrites) that header. Without one, resolve the tenant from
a verified token instead: ``Tenancy(db, jwt_claim_tenant(verify_jwt, claim="tenant_id"))``.
"""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from rtv_db import AsyncDatabase, AsyncTenantScope, BrandKit, KnowledgeChunk, assert_tenant_ownership, brand_kits
from rtv_db.fastapi import Tenancy, header_tenant, install_exception_handlers

db = AsyncDatabase.from_settings()  # DATABASE_URL: the runtime role; connects on first use
tenancy = Tenancy(db, header_tenant("X-Tenant-Id", user_header="X-User-Id"))


@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    yield
    await db.close()


app = FastAPI(title="rtv-db example", lifespan=lifespan)
install_exception_handlers(app)  # 400 / 401 / 404 / 409 / 422 from rtv-db's errors


class BrandKitIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    tone: dict[str, Any] = {"voice": "neutral", "personality": []}


class BrandKitOut(BaseModel):
    id: uuid.UUID
    name: str
    tone: dict[str, Any]


class ChunkIn(BaseModel):
    knowledge_base_id: uuid.UUID
    content: str = Field(min_length=1)


def _kit(row: Any) -> BrandKitOut:
    return BrandKitOut(id=row.id, name=row.name, tone=row.tone)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/brand-kits")
async def list_brand_kits(limit: int = 50, after: str | None = None,
                          scope: AsyncTenantScope = Depends(tenancy.scope)) -> dict[str, Any]:
    """One page of this tenant's kits by name; pass ``next`` back as ``after`` for the next page
    (a changed cursor: InvalidCursorError -> 422)."""
    page = await scope.scoped_query(brand_kits, order_by=[brand_kits.c.name], page_size=min(max(limit, 1), 200),
                                    after=after)
    return {"items": [_kit(r) for r in page.rows], "next": page.next_cursor}


@app.post("/brand-kits", status_code=201)
async def create_brand_kit(kit: BrandKitIn, session: AsyncSession = Depends(tenancy.session)) -> BrandKitOut:
    new = BrandKit(name=kit.name, tone=kit.tone)  # client_id: stamped by the tenant session
    session.add(new)
    await session.commit()  # a taken name: DuplicateError -> 409
    return _kit(new)


@app.get("/brand-kits/{kit_id}")
async def get_brand_kit(kit_id: uuid.UUID, session: AsyncSession = Depends(tenancy.session)) -> BrandKitOut:
    kit = await session.get(BrandKit, kit_id)  # another tenant's id: None, like a random one
    tenant_id = session.info["rtv_tenant_context"].tenant_id
    return _kit(assert_tenant_ownership(kit, tenant_id, "brand kit"))  # None: TenantAccessError -> 404


@app.delete("/brand-kits/{kit_id}", status_code=204)
async def delete_brand_kit(kit_id: uuid.UUID, scope: AsyncTenantScope = Depends(tenancy.scope)) -> None:
    deleted = await scope.scoped_delete(brand_kits, brand_kits.c.id == kit_id)
    assert_tenant_ownership(deleted[0] if deleted else None, scope.tenant_id, "brand kit")


@app.post("/chunks", status_code=201)
async def add_chunk(chunk: ChunkIn, session: AsyncSession = Depends(tenancy.session)) -> dict[str, uuid.UUID]:
    new = KnowledgeChunk(knowledge_base_id=chunk.knowledge_base_id, content=chunk.content)
    session.add(new)
    await session.commit()  # another tenant's knowledge base, or none: ReferenceNotFoundError -> 422
    return {"id": new.id}
