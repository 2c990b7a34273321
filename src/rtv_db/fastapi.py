"""FastAPI integration: the tenant of each request, a scope or ORM session for it, and HTTP errors.

Install with ``pip install "rtv-db[fastapi]"``::

    from fastapi import Depends, FastAPI
    from rtv_db import AsyncDatabase
    from rtv_db.fastapi import Tenancy, header_tenant, install_exception_handlers

    db = AsyncDatabase(DATABASE_URL)
    tenancy = Tenancy(db, header_tenant("X-Tenant-Id"))   # or jwt_claim_tenant(...), path_tenant(...)
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/brand-kits")
    async def list_kits(scope=Depends(tenancy.scope)):
        return [dict(r._mapping) for r in await scope.scoped_query(brand_kits)]

The **resolver** is the app's: it decides which tenant a request is for. It gets the
:class:`starlette.requests.Request` and returns a tenant id, a :class:`~rtv_db.TenantContext`,
or None (no tenant: 401); it may be a coroutine function. A bare header is only as trustworthy
as whatever sets it: use :func:`header_tenant` only behind a gateway that authenticates the
caller and overwrites the header; otherwise resolve from a verified token
(:func:`jwt_claim_tenant`, with the app's own verification).

Errors (:func:`install_exception_handlers`), each a JSON body ``{"detail": ..., "error": <type>}``:

=============================================  ======  ===========================================
``InvalidTenantContextError`` (and job payload) 400    malformed tenant id, lane, payload
``MissingTenantContextError``                   401    no tenant for the request
``TenantAccessError``                           404    not found, or another tenant's: the same body
``DuplicateError``, ``StillReferencedError``    409
``InvalidInputError``, ``ReferenceNotFoundError``  422  bad values, a parent that is not found
``CrossTenantWriteError``                       422    a write naming another tenant
=============================================  ======  ===========================================
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError('rtv_db.fastapi needs FastAPI: pip install "rtv-db[fastapi]"') from exc

from .connection import AsyncDatabase, Database
from .errors import (
    CrossTenantWriteError,
    DuplicateError,
    InvalidInputError,
    InvalidTenantContextError,
    MissingTenantContextError,
    ReferenceNotFoundError,
    RtvDbError,
    StillReferencedError,
    TenantAccessError,
)
from .tenant.context import TenantContext
from .tenant.orm import async_tenant_session, tenant_session
from .tenant.scope import with_tenant_scope

__all__ = [
    "Tenancy",
    "TenantResolver",
    "header_tenant",
    "path_tenant",
    "jwt_claim_tenant",
    "install_exception_handlers",
    "STATUS_CODES",
]

TenantResolver = Callable[[Request], "str | uuid.UUID | TenantContext | None | Awaitable[str | uuid.UUID | TenantContext | None]"]


def header_tenant(name: str = "X-Tenant-Id", *, user_header: str | None = None) -> TenantResolver:
    """The tenant id from a request header (and the user id from ``user_header``).

    Only as trustworthy as what sets the header: an API gateway that authenticates the caller
    and *overwrites* it. Exposed to clients directly, any caller can name any tenant. A header
    sent more than once is refused (:class:`~rtv_db.InvalidInputError`, 422): a gateway that
    appends its value instead of overwriting would otherwise let the client's copy, sent first,
    win.
    """

    def single(request: Request, header: str) -> str | None:
        values = request.headers.getlist(header)
        if len(values) > 1:
            raise InvalidInputError(f"header {header} was sent {len(values)} times; send it once")
        return values[0] if values else None

    def resolve(request: Request) -> TenantContext | None:
        value = single(request, name)
        if value is None:
            return None
        user = single(request, user_header) if user_header else None
        return TenantContext(value, user_id=user, correlation_id=_correlation(request))

    return resolve


def path_tenant(name: str = "tenant_id") -> TenantResolver:
    """The tenant id from a path parameter (``/tenants/{tenant_id}/...``).

    The path says which tenant the caller *asks* for; the app must still check the caller may
    act for it (compose: resolve the caller first, compare, then return the id).
    """

    def resolve(request: Request) -> TenantContext | None:
        value = request.path_params.get(name)
        return None if value is None else TenantContext(value, correlation_id=_correlation(request))

    return resolve


def jwt_claim_tenant(decode: Callable[[str], Mapping[str, Any]], claim: str = "tenant_id", *,
                     user_claim: str | None = "sub") -> TenantResolver:
    """The tenant id from a claim of the bearer token.

    ``decode`` is the app's: it verifies the token (signature, issuer, audience, expiry, e.g.
    with PyJWT's ``jwt.decode(token, key, algorithms=[...], audience=...)``) and returns its
    claims, raising on a bad token. No token, a bad one, or no such claim: 401.
    """

    def resolve(request: Request) -> TenantContext | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            claims = decode(token.strip())
        except Exception:
            raise MissingTenantContextError("the bearer token is not valid") from None
        value = claims.get(claim) if isinstance(claims, Mapping) else None
        if value is None:
            return None
        user = claims.get(user_claim) if user_claim else None
        return TenantContext(value, user_id=str(user)[:200] if user is not None else None,
                             correlation_id=_correlation(request))

    return resolve


def _correlation(request: Request) -> str:
    given = request.headers.get("x-request-id")
    if given and len(given) <= 200 and given.isprintable():
        return given
    return str(uuid.uuid4())


class Tenancy:
    """Request dependencies for one database and one tenant resolver.

    * ``Depends(tenancy.context)``: the request's :class:`~rtv_db.TenantContext`;
    * ``Depends(tenancy.scope)``: a :class:`~rtv_db.TenantScope` (an ``AsyncTenantScope`` on an
      :class:`~rtv_db.AsyncDatabase`); each call is its own transaction;
    * ``Depends(tenancy.session)``: a tenant ORM session (async on an AsyncDatabase), closed
      after the response; the endpoint commits, anything uncommitted is rolled back.
    """

    def __init__(self, db: Database | AsyncDatabase, resolver: TenantResolver, **session_kwargs: Any) -> None:
        if not isinstance(db, (Database, AsyncDatabase)):
            raise TypeError(f"Tenancy needs a Database or AsyncDatabase, not {type(db).__name__}")
        if not callable(resolver):
            raise TypeError("resolver must be a callable taking the request")
        self.db = db
        self.resolver = resolver

        async def context(request: Request) -> TenantContext:
            value = resolver(request)
            if inspect.isawaitable(value):
                value = await value
            if value is None:
                raise MissingTenantContextError("no tenant for this request")
            return value if isinstance(value, TenantContext) else TenantContext(value)  # type: ignore[arg-type]

        def scope(ctx: TenantContext = Depends(context)) -> Any:
            return with_tenant_scope(db, ctx)

        if isinstance(db, AsyncDatabase):
            async def session(ctx: TenantContext = Depends(context)) -> AsyncIterator[Any]:
                async with async_tenant_session(db, ctx, **session_kwargs) as s:
                    yield s

            self.session: Callable[..., Any] = session
        else:
            def sync_session(ctx: TenantContext = Depends(context)) -> Iterator[Any]:
                with tenant_session(db, ctx, **session_kwargs) as s:
                    yield s

            self.session = sync_session
        self.context = context
        self.scope = scope


# Most specific first: the handler for an exception is looked up along its MRO anyway.
STATUS_CODES: dict[type[RtvDbError], int] = {
    InvalidTenantContextError: 400,
    MissingTenantContextError: 401,
    TenantAccessError: 404,
    DuplicateError: 409,
    StillReferencedError: 409,
    ReferenceNotFoundError: 422,
    InvalidInputError: 422,
    CrossTenantWriteError: 422,
}


def _handler(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status, headers=headers)

    return handle


def install_exception_handlers(app: FastAPI) -> None:
    """Map rtv-db's errors to HTTP responses (see the table in the module docstring).

    The messages are safe to show: rtv-db's errors name tables, columns and constraints, never
    another tenant's values, and "not found" reads the same for another tenant's row.
    """
    for exc_type, status in STATUS_CODES.items():
        app.add_exception_handler(exc_type, _handler(status))
