"""Signed tenant context: the keys, the token, and installing them in the database.

The application proves the tenant context to PostgreSQL with a token it signs with a key the
runtime role can never read (see docs/signed-context.md and migration 0004)::

    v2.<key_id>.<tenant>.<platform account or ->.<lane>.<expiry epoch>.<nonce>.<hex MAC>

The MAC is HMAC-SHA256 over everything before its own dot, a newline, the user id, a newline and
the correlation id (those two travel as their own parameters, but are signed). The nonce (128
random bits) makes every token unique: the database spends it once, for one transaction
(migration 0005), so a token is bound to the transaction that used it, not to a backend, and
works behind any pooler.

Where the keys come from, first match wins:

1. ``RTV_DB_CONTEXT_KEY``: ``<key_id>:<hex secret>``, several separated by commas;
2. the key file ``RTV_DB_CONTEXT_KEY_FILE``, else ``<data dir>/context.key``: one
   ``<key_id> <hex secret>`` per line (``#`` comments allowed), mode 0600.

The **last** key signs; every listed key is installed by ``rtv-db migrate`` (which generates the
key file when there is no key at all). ``RTV_DB_CONTEXT_MODE=unsigned`` turns signing off, for
debugging only; ``rtv-db verify`` reports it. ``RTV_DB_CONTEXT_TTL`` is the token lifetime in
seconds (default 300; a token only has to outlive the ``BEGIN`` it is sent with).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from sqlalchemy import Connection, text

from .config import Settings
from .errors import ConfigurationError

__all__ = [
    "ContextKey",
    "ContextMode",
    "TOKEN_VERSION",
    "generate_key",
    "parse_keys",
    "format_key_file",
    "key_file_path",
    "load_keys",
    "save_key_file",
    "ensure_keys",
    "context_mode",
    "context_ttl",
    "mint_token",
    "install_context_config",
    "installed_key_ids",
    "check_context_mode",
    "rotate_key",
    "retire_key",
    "list_keys",
]

ContextMode = Literal["signed", "unsigned"]
TOKEN_VERSION: Final = "v2"
KEY_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_SECRET_BYTES: Final = 32
DEFAULT_TTL: Final = 300
_KEY_FILE_NAME: Final = "context.key"


@dataclass(frozen=True)
class ContextKey:
    """One signing key. Its ``repr`` never shows the secret."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not KEY_ID.match(self.key_id):
            raise ConfigurationError(f"context key id {self.key_id[:40]!r} must be 1-32 of A-Z a-z 0-9 _ -")
        if len(self.secret) < _SECRET_BYTES:
            raise ConfigurationError(f"context key {self.key_id!r} is too short: at least {_SECRET_BYTES} bytes")

    @property
    def hex(self) -> str:
        return self.secret.hex()


def generate_key(key_id: str | None = None) -> ContextKey:
    """A new random 256-bit key; its id is ``k`` + the UTC time + 4 random hex digits."""
    key_id = key_id or time.strftime("k%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(2)
    return ContextKey(key_id, secrets.token_bytes(_SECRET_BYTES))


def _parse_one(item: str, where: str) -> ContextKey:
    key_id, sep, secret = item.strip().replace(" ", ":", 1).partition(":")
    try:
        if not sep:
            raise ValueError
        return ContextKey(key_id.strip(), bytes.fromhex(secret.strip()))
    except ValueError:
        # never echo the value: it may be a secret with a typo
        raise ConfigurationError(f"{where}: expected '<key_id>:<hex secret>'") from None


def parse_keys(value: str, *, where: str = "context key") -> list[ContextKey]:
    """Keys from ``RTV_DB_CONTEXT_KEY`` (comma-separated) or a key file (one per line)."""
    keys: list[ContextKey] = []
    for item in re.split(r"[,\n]", value):
        item = item.split("#", 1)[0].strip()
        if item:
            keys.append(_parse_one(item, where))
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"{where}: a key id appears twice")
    return keys


def format_key_file(keys: list[ContextKey]) -> str:
    return (
        "# rtv-db tenant context keys: '<key_id> <hex secret>'. The last key signs. Keep this file secret (0600).\n"
        + "".join(f"{k.key_id} {k.hex}\n" for k in keys)
    )


def key_file_path(settings: Settings | None = None) -> Path:
    """``RTV_DB_CONTEXT_KEY_FILE``, else ``context.key`` in the data directory."""
    configured = os.environ.get("RTV_DB_CONTEXT_KEY_FILE")
    if configured:
        return Path(configured)
    return (settings or Settings.from_env()).data_dir / _KEY_FILE_NAME


def load_keys(settings: Settings | None = None) -> list[ContextKey]:
    """The configured keys (the last one signs); empty when none is configured."""
    env = os.environ.get("RTV_DB_CONTEXT_KEY")
    if env:
        return parse_keys(env, where="RTV_DB_CONTEXT_KEY")
    path = key_file_path(settings)
    try:
        content = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigurationError(f"cannot read the context key file {path}: {exc.strerror}") from None
    return parse_keys(content, where=str(path))


def save_key_file(path: Path, keys: list[ContextKey]) -> None:
    """Write the key file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is ignored when the file already existed
        os.write(fd, format_key_file(keys).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_keys(settings: Settings | None = None) -> list[ContextKey]:
    """The configured keys; when there are none, generate one into the key file."""
    keys = load_keys(settings)
    if not keys:
        keys = [generate_key()]
        save_key_file(key_file_path(settings), keys)
    return keys


def context_mode() -> ContextMode:
    """``RTV_DB_CONTEXT_MODE``: ``signed`` (the default) or ``unsigned`` (debugging only)."""
    mode = (os.environ.get("RTV_DB_CONTEXT_MODE") or "signed").strip().lower()
    if mode not in ("signed", "unsigned"):
        raise ConfigurationError(f"RTV_DB_CONTEXT_MODE must be signed or unsigned, not {mode[:20]!r}")
    return mode  # type: ignore[return-value]


def context_ttl() -> int:
    """``RTV_DB_CONTEXT_TTL``: seconds a token stays valid after it is minted (default 300)."""
    raw = os.environ.get("RTV_DB_CONTEXT_TTL") or str(DEFAULT_TTL)
    try:
        ttl = int(raw)
    except ValueError:
        raise ConfigurationError(f"RTV_DB_CONTEXT_TTL must be a number of seconds, not {raw[:20]!r}") from None
    if not 1 <= ttl <= 86_400:
        raise ConfigurationError("RTV_DB_CONTEXT_TTL must be between 1 and 86400 seconds")
    return ttl


def _field(value: object | None) -> str:
    return "-" if value is None else str(value)


def mint_token(
    key: ContextKey,
    *,
    tenant_id: object,
    platform_account_id: object | None,
    lane: str,
    expires_at: int,
    user_id: str | None = None,
    correlation_id: str | None = None,
    nonce: str | None = None,
) -> str:
    """A signed context token for one transaction, valid until ``expires_at`` (epoch s).

    ``nonce`` (32 hex digits) is random unless given (tests replay one on purpose).
    """
    body = ".".join(
        (TOKEN_VERSION, key.key_id, str(tenant_id), _field(platform_account_id), lane, str(int(expires_at)),
         nonce or secrets.token_hex(16))
    )
    message = f"{body}\n{user_id or ''}\n{correlation_id or ''}".encode()
    return f"{body}.{hmac.new(key.secret, message, hashlib.sha256).hexdigest()}"


# -- the database side ------------------------------------------------------------------------


def _has_secret_schema(conn: Connection) -> bool:
    return conn.execute(text("SELECT to_regclass('rtv_secret.context_keys') IS NOT NULL")).scalar_one()


def install_context_config(conn: Connection, settings: Settings | None = None) -> list[str]:
    """Install the configured keys and mode (run as the owner, by ``rtv-db migrate``).

    Generates the key file when no key is configured (signed mode). A key id already installed
    with a different secret is an error, never silently replaced. Returns what changed, in words
    (``"context mode: signed -> unsigned"``, ``"context key k... installed"``), empty when nothing
    did. Does nothing before revision 0004.
    """
    if not _has_secret_schema(conn):
        return []
    mode = context_mode()
    keys = ensure_keys(settings) if mode == "signed" else load_keys(settings)
    changes: list[str] = []
    for key in keys:
        inserted, same = conn.execute(
            text(
                "INSERT INTO rtv_secret.context_keys (key_id, secret) VALUES (:id, :secret) "
                "ON CONFLICT (key_id) DO UPDATE SET key_id = EXCLUDED.key_id "
                "RETURNING xmax = 0, secret = :secret"
            ),
            {"id": key.key_id, "secret": key.secret},
        ).one()
        if not same:
            raise ConfigurationError(
                f"context key {key.key_id!r} is installed with a different secret: rotate to a new key id instead"
            )
        if inserted:
            changes.append(f"context key {key.key_id} installed")
    previous = conn.execute(
        text("UPDATE rtv_secret.context_settings s SET mode = :mode FROM rtv_secret.context_settings old "
             "WHERE old.singleton RETURNING old.mode"), {"mode": mode}
    ).scalar_one()
    if previous != mode:
        changes.append(f"context mode: {previous} -> {mode}")
    return changes


def installed_key_ids(conn: Connection) -> list[tuple[str, Any]]:
    """``(key_id, created_at)`` of the keys the database accepts (needs the owner or admin)."""
    rows = conn.execute(text("SELECT key_id, created_at FROM rtv_secret.context_keys ORDER BY created_at, key_id"))
    return [(r[0], r[1]) for r in rows]


def check_context_mode(conn: Any) -> list[dict[str, str]]:
    """Findings about the tenant context mode, for ``rtv-db verify``.

    ``conn`` is a SQLAlchemy connection or a psycopg connection, on any role. An unsigned mode,
    or a database without signed context at all, is a finding; signed mode is none.
    """
    query = (
        "SELECT CASE WHEN to_regprocedure('rtv.context_mode()') IS NULL THEN 'absent' "
        "ELSE (SELECT mode FROM (SELECT rtv.context_mode() AS mode) m) END"
    )
    if isinstance(conn, Connection):
        mode = conn.execute(text(query)).scalar_one()
    else:
        mode = conn.execute(query).fetchone()[0]
    why = ("in unsigned mode any SQL on the runtime role (an injection) can SET LOCAL another tenant's "
           "id and read that tenant's rows; signed mode makes the context a token only the application can mint")
    if mode == "unsigned":
        return [{
            "code": "context-unsigned",
            "object": "rtv_secret.context_settings",
            "message": "the tenant context is unsigned (RTV_DB_CONTEXT_MODE=unsigned): debugging mode",
            "why": why,
            "fix": "unset RTV_DB_CONTEXT_MODE (or set it to signed) and run rtv-db migrate",
        }]
    if mode == "absent":
        return [{
            "code": "context-unsigned",
            "object": "rtv.context_mode()",
            "message": "the database has no signed tenant context (migration 0004 not applied)",
            "why": why,
            "fix": "run rtv-db migrate",
        }]
    return []


# -- rotation (rtv-db key ...) ------------------------------------------------------------------


def _owner_transaction(admin_url: str, settings: Settings) -> Any:
    """A context manager: a transaction on ``admin_url`` as the owner role."""
    from contextlib import contextmanager

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from .config import to_sqlalchemy_url

    @contextmanager
    def run() -> Any:
        engine = create_engine(to_sqlalchemy_url(admin_url), poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f'SET LOCAL ROLE "{settings.owner_role}"')  # a validated role name
                if not _has_secret_schema(conn):
                    raise ConfigurationError("this database has no signed context yet: run rtv-db migrate first")
                yield conn
        finally:
            engine.dispose()

    return run()


def _require_key_file(settings: Settings) -> Path:
    if os.environ.get("RTV_DB_CONTEXT_KEY"):
        raise ConfigurationError(
            "the keys come from RTV_DB_CONTEXT_KEY, which rtv-db cannot edit: run `rtv-db key generate`, append the new "
            "key to RTV_DB_CONTEXT_KEY (comma-separated, last signs), run `rtv-db migrate`, roll the application, then "
            "drop the old key from the variable and run `rtv-db key retire OLD_ID` (see docs/signed-context.md)"
        )
    return key_file_path(settings)


def rotate_key(admin_url: str, settings: Settings) -> ContextKey:
    """Add a new key: first to the database (so it verifies), then last in the key file (so it signs).

    Both keys stay valid until the old one is retired: applications still signing with the old
    key keep working while they are restarted one by one.
    """
    path = _require_key_file(settings)
    keys = load_keys(settings)
    new = generate_key()
    while new.key_id in {k.key_id for k in keys}:
        new = generate_key()
    with _owner_transaction(admin_url, settings) as conn:
        conn.execute(text("INSERT INTO rtv_secret.context_keys (key_id, secret) VALUES (:id, :secret)"),
                     {"id": new.key_id, "secret": new.secret})
    save_key_file(path, [*keys, new])
    return new


def retire_key(admin_url: str, settings: Settings, key_id: str, *, force: bool = False) -> None:
    """Stop accepting ``key_id``: delete it from the database and from the key file.

    Refuses to retire the key the application signs with (the last configured one) unless
    ``force``: every transaction would then be refused.
    """
    keys = load_keys(settings)
    from_env = bool(os.environ.get("RTV_DB_CONTEXT_KEY"))
    if keys and keys[-1].key_id == key_id and not force:
        raise ConfigurationError(f"{key_id!r} is the key the application signs with: rotate first (or pass --force)")
    with _owner_transaction(admin_url, settings) as conn:
        deleted = conn.execute(text("DELETE FROM rtv_secret.context_keys WHERE key_id = :id"), {"id": key_id}).rowcount
        if not deleted:
            raise ConfigurationError(f"no key {key_id!r} is installed in this database")
    if not from_env and any(k.key_id == key_id for k in keys):
        save_key_file(key_file_path(settings), [k for k in keys if k.key_id != key_id])


def list_keys(admin_url: str, settings: Settings) -> list[dict[str, Any]]:
    """The installed and configured keys (ids and dates only, never secrets)."""
    configured = load_keys(settings)
    signing_id = configured[-1].key_id if configured else None
    with _owner_transaction(admin_url, settings) as conn:
        installed = dict(installed_key_ids(conn))
    ids = list(dict.fromkeys([*installed, *(k.key_id for k in configured)]))
    return [
        {
            "key_id": key_id,
            "installed": key_id in installed,
            "created_at": installed.get(key_id),
            "configured": any(k.key_id == key_id for k in configured),
            "signs": key_id == signing_id,
        }
        for key_id in ids
    ]
