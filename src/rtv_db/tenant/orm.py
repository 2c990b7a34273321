"""ORM integration: sessions that scope every statement on a tenant model to one tenant.

Listeners on :class:`sqlalchemy.orm.Session` (so on every session, async ones included):

* ``do_orm_execute`` adds ``client_id = :tenant`` (``id`` for ``clients``) to every ORM SELECT,
  UPDATE and DELETE that touches a tenant model, relationship loads and joins included, through
  ``with_loader_criteria``. With no tenant context it raises
  :class:`~rtv_db.MissingTenantContextError` before anything is sent.
* ``before_flush`` stamps ``client_id`` on new tenant objects and refuses one that names another
  tenant, or a change of ``client_id`` on an existing object.

Statements on models that are not rtv-db's tenant models pass through untouched. The session's
context is its ``info["rtv_tenant_context"]`` (set by :func:`tenant_session`), else the
contextvar; the system scope marks its sessions ``info["rtv_system"]``.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from sqlalchemy import Connection, Engine, event, inspect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction, with_loader_criteria

from ..errors import CrossTenantWriteError, InvalidInputError, MissingTenantContextError
from ..schema.models import Client, TenantModel
from .context import TenantContext, current_tenant_context
from ._transaction import CONTEXT_OPTION, DEFERRED_START_OPTION

__all__ = ["TenantSession", "tenant_session", "async_tenant_session", "SESSION_CONTEXT_KEY", "SESSION_SYSTEM_KEY"]

SESSION_CONTEXT_KEY = "rtv_tenant_context"
SESSION_SYSTEM_KEY = "rtv_system"


def _is_tenant_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, (TenantModel, Client))


def _session_context(session: Session) -> TenantContext | None:
    if session.info.get(SESSION_SYSTEM_KEY):
        return None
    ctx = session.info.get(SESSION_CONTEXT_KEY)
    return ctx if ctx is not None else current_tenant_context()


@functools.lru_cache(maxsize=4096)
def _criteria(tenant_id: uuid.UUID) -> tuple[Any, ...]:
    """The two loader-criteria options for one tenant, built once per tenant (building them costs
    more than SQLAlchemy's cached compile). The lambdas' closure (``tenant_id``) is a bound
    parameter to SQLAlchemy's lambda caching: one cache key, one compiled statement, for every
    tenant; the value is taken from the option at each execution."""
    return (
        with_loader_criteria(TenantModel, lambda cls: cls.client_id == tenant_id, include_aliases=True),
        with_loader_criteria(Client, lambda cls: cls.id == tenant_id, include_aliases=True),
    )


@event.listens_for(Session, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    if not (state.is_select or state.is_update or state.is_delete):
        return
    if state.session.info.get(SESSION_SYSTEM_KEY):
        return
    if not any(_is_tenant_class(m.class_) for m in state.all_mappers):
        return
    ctx = _session_context(state.session)
    if ctx is None:
        names = sorted({m.class_.__name__ for m in state.all_mappers if _is_tenant_class(m.class_)})
        raise MissingTenantContextError(f"ORM statement on {', '.join(names)} without a tenant context; nothing was sent")
    state.statement = state.statement.options(*_criteria(ctx.tenant_id))


@event.listens_for(Session, "before_flush")
def _stamp_objects(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    if session.info.get(SESSION_SYSTEM_KEY):
        return
    tenant_objects = [obj for obj in (*session.new, *session.dirty) if _is_tenant_class(type(obj))]
    if not tenant_objects:
        return
    ctx = _session_context(session)
    if ctx is None:
        raise MissingTenantContextError("flushing tenant objects without a tenant context; nothing was written")
    for obj in tenant_objects:
        column = type(obj).__rtv_tenant_column__
        if obj in session.new:
            if isinstance(obj, Client):
                raise CrossTenantWriteError("tenants are created by the system scope, not inside a tenant session")
            current = getattr(obj, column)
            if current is None:
                setattr(obj, column, ctx.tenant_id)
            elif uuid.UUID(str(current)) != ctx.tenant_id:
                raise CrossTenantWriteError(f"new {type(obj).__name__} names another tenant; nothing was written")
            _stamp_platform(obj, ctx)
        else:
            history = inspect(obj).attrs[column].history
            if history.deleted and history.added:
                raise CrossTenantWriteError(f"{type(obj).__name__}.{column} cannot change; nothing was written")


def _stamp_platform(obj: Any, ctx: TenantContext) -> None:
    if not (hasattr(obj, "platform_account_id") and hasattr(obj, "lane")):
        return
    if obj.platform_account_id is None:
        obj.platform_account_id = ctx.platform_account_id
    if obj.lane is None:
        obj.lane = ctx.lane


def _bind_for(bind: Any, ctx: TenantContext) -> Any:
    from ..connection import AsyncDatabase, Database

    if isinstance(bind, (Database, AsyncDatabase)):
        bind = bind.engine
    if isinstance(bind, (Engine, AsyncEngine)):
        # The session's own transactions: their start rides with their first statement.
        return bind.execution_options(**{CONTEXT_OPTION: ctx, DEFERRED_START_OPTION: True})
    if isinstance(bind, (Connection, AsyncConnection)):
        return bind  # already inside a scoped transaction whose context is set
    raise TypeError(f"cannot bind a tenant session to {type(bind).__name__}")


class TenantSession(Session):
    """The session :func:`tenant_session` makes: ``get(Model, id)`` takes the id alone.

    A tenant model's primary key is ``(client_id, id)``; in a tenant session the tenant is
    known, so ``session.get(BrandKit, kit_id)`` fills in ``client_id``. The full key (a tuple
    or a mapping) still works and must name this tenant. A malformed id raises
    :class:`~rtv_db.InvalidInputError` before anything is sent.
    """

    def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        return super().get(entity, self._tenant_ident(entity, ident), **kwargs)

    def _tenant_ident(self, entity: Any, ident: Any) -> Any:
        cls = getattr(entity, "class_", entity)
        if not (isinstance(cls, type) and issubclass(cls, TenantModel)):
            return ident
        if isinstance(ident, (tuple, list, dict)):
            return ident
        ctx = _session_context(self)
        if ctx is None:
            raise MissingTenantContextError(f"get({cls.__name__}, id) without a tenant context; nothing was sent")
        return {"client_id": ctx.tenant_id, "id": _row_id(ident)}


def _row_id(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            pass
        else:
            if str(parsed) == value.lower():
                return parsed
    raise InvalidInputError(f"id must be a UUID or its canonical string, not {str(value)[:40]!r}")


def tenant_session(bind: Any, context: TenantContext, **kwargs: Any) -> Session:
    """A :class:`TenantSession` for one tenant on a Database, Engine or a scoped transaction's Connection."""
    info = dict(kwargs.pop("info", {}) or {}) | {SESSION_CONTEXT_KEY: context}
    return TenantSession(bind=_bind_for(bind, context), info=info, **kwargs)


def async_tenant_session(bind: Any, context: TenantContext, **kwargs: Any) -> AsyncSession:
    """The asyncio twin of :func:`tenant_session`.

    ``expire_on_commit`` defaults to False: after ``await session.commit()`` the objects keep
    their loaded values (an expired attribute would need a lazy load, which asyncio cannot do
    implicitly). Pass ``expire_on_commit=True`` for SQLAlchemy's default.
    """
    info = dict(kwargs.pop("info", {}) or {}) | {SESSION_CONTEXT_KEY: context}
    kwargs.setdefault("expire_on_commit", False)
    kwargs.setdefault("sync_session_class", TenantSession)
    return AsyncSession(bind=_bind_for(bind, context), info=info, **kwargs)
