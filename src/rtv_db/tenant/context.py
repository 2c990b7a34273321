"""The tenant context: who a unit of work is for, carried in a ``contextvars`` variable.

Concurrent asyncio tasks and threads each see their own context. A background job gets its
context explicitly: serialise it with :meth:`TenantContext.to_dict`, rebuild it with
:meth:`TenantContext.from_dict`, and run the job inside :func:`use_tenant_context`.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from ..errors import InvalidTenantContextError, MissingTenantContextError

__all__ = [
    "Lane",
    "LANES",
    "TenantContext",
    "current_tenant_context",
    "require_tenant_context",
    "use_tenant_context",
    "run_with_tenant_context",
    "parse_uuid",
]

Lane = Literal["api", "browser"]
LANES: tuple[str, ...] = ("api", "browser")
_MAX_ID_LENGTH = 200
_T = TypeVar("_T")


def parse_uuid(value: object, what: str, *, required: bool = True) -> uuid.UUID | None:
    """``value`` as a UUID, or :class:`InvalidTenantContextError` saying what was wrong.

    Accepts a :class:`uuid.UUID` or its canonical string form; never an int, bytes or bool.
    """
    if value is None or value == "":
        if required:
            raise InvalidTenantContextError(f"{what} is required")
        return None
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise InvalidTenantContextError(f"{what} must be a UUID or a UUID string, not {type(value).__name__}")
    if len(value) > 64:
        raise InvalidTenantContextError(f"{what} is not a UUID (too long)")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidTenantContextError(f"{what} is not a UUID: {value[:40]!r}") from None
    if str(parsed) != value.strip().lower() and parsed.hex != value.lower():
        # uuid.UUID() also accepts "{...}" and "urn:uuid:"; the database does not.
        raise InvalidTenantContextError(f"{what} is not a UUID in canonical form: {value[:40]!r}")
    return parsed


def _optional_text(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTenantContextError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > _MAX_ID_LENGTH or not value.isprintable():
        raise InvalidTenantContextError(f"{what} must be at most {_MAX_ID_LENGTH} printable characters")
    return value


@dataclass(frozen=True, slots=True)
class TenantContext:
    """Who a unit of work is for. Validated on construction; immutable.

    ``tenant_id`` is the client's id (the ``client_id`` column). ``platform_account_id`` is
    required for platform actions. ``lane`` is ``"api"`` or ``"browser"``. ``correlation_id``
    is generated when not given; it ties audit events of one request together.
    """

    tenant_id: uuid.UUID
    platform_account_id: uuid.UUID | None = None
    lane: Lane = "api"
    user_id: str | None = None
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "tenant_id", parse_uuid(self.tenant_id, "tenant_id"))
        set_(self, "platform_account_id", parse_uuid(self.platform_account_id, "platform_account_id", required=False))
        if not isinstance(self.lane, str) or self.lane not in LANES:
            raise InvalidTenantContextError(f"lane must be one of {', '.join(LANES)}, not {self.lane!r}"[:120])
        set_(self, "user_id", _optional_text(self.user_id, "user_id"))
        correlation = _optional_text(self.correlation_id, "correlation_id")
        if not correlation:
            raise InvalidTenantContextError("correlation_id must not be empty")

    def with_platform(self, platform_account_id: uuid.UUID | str, lane: Lane | None = None) -> "TenantContext":
        """The same context for one platform account (and lane)."""
        return replace(self, platform_account_id=platform_account_id, lane=lane or self.lane)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str | None]:
        """A JSON-safe form, to hand the context to a background job."""
        return {
            "tenant_id": str(self.tenant_id),
            "platform_account_id": str(self.platform_account_id) if self.platform_account_id else None,
            "lane": self.lane,
            "user_id": self.user_id,
            "correlation_id": self.correlation_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TenantContext":
        """Rebuild (and re-validate) a context made by :meth:`to_dict`."""
        unknown = set(data) - {"tenant_id", "platform_account_id", "lane", "user_id", "correlation_id"}
        if unknown:
            raise InvalidTenantContextError(f"unknown tenant context fields: {sorted(unknown)}")
        kwargs = {k: v for k, v in data.items() if v is not None}
        return cls(**kwargs)


_current: contextvars.ContextVar[TenantContext | None] = contextvars.ContextVar("rtv_tenant_context", default=None)


def current_tenant_context() -> TenantContext | None:
    """The context of the running task or thread, or None."""
    return _current.get()


def require_tenant_context() -> TenantContext:
    """The current context; :class:`MissingTenantContextError` when there is none."""
    ctx = _current.get()
    if ctx is None:
        raise MissingTenantContextError("no tenant context: wrap the work in use_tenant_context() or a tenant scope")
    return ctx


@contextmanager
def use_tenant_context(ctx: TenantContext) -> Iterator[TenantContext]:
    """Make ``ctx`` the current context inside the block (and restore the previous one after)."""
    if not isinstance(ctx, TenantContext):
        raise InvalidTenantContextError(f"expected a TenantContext, not {type(ctx).__name__}")
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def run_with_tenant_context(ctx: TenantContext, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``fn`` with ``ctx`` current, in a copy of the caller's contextvars (for job runners)."""

    def _run() -> _T:
        with use_tenant_context(ctx):
            return fn(*args, **kwargs)

    return contextvars.copy_context().run(_run)
