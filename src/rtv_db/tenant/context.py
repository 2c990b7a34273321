"""The tenant context: who a unit of work is for, carried in a ``contextvars`` variable.

Concurrent asyncio tasks and threads each see their own context. A background job gets its
context explicitly: serialise it with :meth:`TenantContext.to_dict` (signed, with an expiry),
verify and rebuild it with :meth:`TenantContext.from_dict`, and run the job inside
:func:`use_tenant_context` or :func:`run_with_tenant_context`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import time
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
DEFAULT_JOB_TTL = 3600  # seconds a job payload stays valid: time in the queue, not the job's run time
_MAX_JOB_TTL = 30 * 86_400
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

    def to_dict(self, *, ttl: int = DEFAULT_JOB_TTL, key: Any = None) -> dict[str, Any]:
        """A signed, JSON-safe form, to hand the context to a background job.

        The fields of the context, ``expires_at`` (epoch seconds, ``ttl`` from now), the id of
        the key and an HMAC-SHA256 ``signature`` over all of them, made with a key derived from
        the tenant context signing key (the last of :func:`rtv_db.signing.load_keys`, or ``key``).
        A queue message that names another tenant, or any other change, fails
        :meth:`from_dict`. The payload is signed, not encrypted: the ids stay readable.
        """
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= _MAX_JOB_TTL:
            raise InvalidTenantContextError(f"ttl must be 1 to {_MAX_JOB_TTL} seconds")
        signing_key = _job_keys(key)[-1]
        data: dict[str, Any] = {
            "v": _JOB_PAYLOAD_VERSION,
            "tenant_id": str(self.tenant_id),
            "platform_account_id": str(self.platform_account_id) if self.platform_account_id else None,
            "lane": self.lane,
            "user_id": self.user_id,
            "correlation_id": self.correlation_id,
            "expires_at": int(time.time()) + ttl,
            "key_id": signing_key.key_id,
        }
        data["signature"] = _job_signature(signing_key, data)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, key: Any = None, allow_unsigned: bool = False) -> "TenantContext":
        """Verify and rebuild a context made by :meth:`to_dict`.

        Raises :class:`~rtv_db.InvalidJobPayloadError` for a malformed payload,
        :class:`~rtv_db.TamperedJobPayloadError` for a bad signature or a key this process does
        not have, :class:`~rtv_db.ExpiredJobPayloadError` past its expiry (all of them
        :class:`~rtv_db.InvalidTenantContextError`). ``allow_unsigned=True`` also accepts the
        unsigned payloads of earlier rtv-db versions, to drain an old queue: only then, since an
        unsigned payload acts as whichever tenant it names.
        """
        from ..errors import ExpiredJobPayloadError, InvalidJobPayloadError, TamperedJobPayloadError

        if not isinstance(data, Mapping):
            raise InvalidJobPayloadError(f"a job payload must be a mapping, not {type(data).__name__}")
        unknown = set(data) - _CONTEXT_FIELDS - _SIGNATURE_FIELDS
        if unknown:
            raise InvalidJobPayloadError(f"unknown tenant context fields: {sorted(map(str, unknown))[:10]}"[:300])
        if not _SIGNATURE_FIELDS & set(data):
            if not allow_unsigned:
                raise InvalidJobPayloadError(
                    "the job payload is not signed (made by an earlier rtv-db, or by hand): create it with "
                    "TenantContext.to_dict(), or pass allow_unsigned=True to drain an old queue"
                )
            if "tenant_id" not in data:
                raise InvalidJobPayloadError("the job payload has no tenant_id")
            return cls(**{k: v for k, v in data.items() if v is not None})
        missing = sorted((_CONTEXT_FIELDS | _SIGNATURE_FIELDS) - set(data) - {"platform_account_id", "user_id"})
        if missing:
            raise InvalidJobPayloadError(f"the job payload lacks {', '.join(missing)}")
        if data["v"] != _JOB_PAYLOAD_VERSION:
            raise InvalidJobPayloadError(f"unknown job payload version {str(data['v'])[:20]!r}")
        signature, key_id, expires_at = data["signature"], data["key_id"], data["expires_at"]
        if not isinstance(signature, str) or not isinstance(key_id, str) or len(signature) != 64:
            raise InvalidJobPayloadError("the job payload's signature or key_id is malformed")
        if not isinstance(expires_at, int) or isinstance(expires_at, bool):
            raise InvalidJobPayloadError("the job payload's expires_at is not an integer")
        for name in _CONTEXT_FIELDS:
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidJobPayloadError(f"the job payload's {name} must be a string, not {type(value).__name__}")
        by_id = {k.key_id: k for k in _job_keys(key)}
        signing_key = by_id.get(key_id)
        if signing_key is None:
            raise TamperedJobPayloadError("the job payload is signed with a key this process does not have")
        if not hmac.compare_digest(_job_signature(signing_key, data), signature.lower()):
            raise TamperedJobPayloadError("the job payload's signature does not match its fields: refused")
        if expires_at < int(time.time()):
            raise ExpiredJobPayloadError("the job payload has expired")
        try:
            return cls(**{k: data[k] for k in _CONTEXT_FIELDS if data.get(k) is not None})
        except InvalidTenantContextError as exc:
            raise InvalidJobPayloadError(f"the job payload's context is invalid: {exc}") from None


_CONTEXT_FIELDS = frozenset({"tenant_id", "platform_account_id", "lane", "user_id", "correlation_id"})
_SIGNATURE_FIELDS = frozenset({"v", "expires_at", "key_id", "signature"})
_JOB_PAYLOAD_VERSION = 1
_JOB_KEY_LABEL = b"rtv-db job payload v1"


def _job_keys(explicit: Any) -> list[Any]:
    """The context keys (the last signs); ``explicit`` (a ContextKey or ``"<id>:<hex>"``) instead."""
    from .. import signing
    from ..errors import ConfigurationError

    if explicit is not None:
        return [signing.parse_keys(explicit, where="key")[-1] if isinstance(explicit, str) else explicit]
    keys = signing.load_keys()
    if not keys:
        raise ConfigurationError(
            "no tenant context key to sign or verify job payloads: set RTV_DB_CONTEXT_KEY or "
            "RTV_DB_CONTEXT_KEY_FILE, or run `rtv-db migrate` (see docs/signed-context.md)"
        )
    return keys


def _job_signature(key: Any, data: Mapping[str, Any]) -> str:
    """HMAC-SHA256 over the canonical JSON of every field but the signature, with a key derived
    from the context key (never the context key itself: a job signature is no database token)."""
    job_key = hmac.new(key.secret, _JOB_KEY_LABEL, hashlib.sha256).digest()
    fields = {k: data.get(k) for k in sorted(_CONTEXT_FIELDS | _SIGNATURE_FIELDS) if k != "signature"}
    message = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(job_key, message, hashlib.sha256).hexdigest()


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
