"""Settings: which server, which roles, which credentials.

rtv-db talks to PostgreSQL under three roles:

* the **admin** URL (``--database-url`` / ``RTV_DB_ADMIN_URL``): a superuser or CREATEROLE login
  that runs ``rtv-db migrate`` and the other CLI commands. Migrations ``SET ROLE`` to the owner.
* the **owner** role (``rtv_owner``, NOLOGIN): owns every table, function and policy.
* the **runtime** role (``rtv_app``): what the application connects as (``DATABASE_URL``).
  It owns nothing, cannot bypass RLS and holds only DML grants.
* the **system** role (``rtv_system``): the explicit cross-tenant scope for seeding and
  maintenance. It bypasses RLS, so it is never the default and every use is logged.

Without any URL the embedded server is used, and every URL is derived from it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from ._paths import default_data_dir
from .errors import ConfigurationError

__all__ = ["Settings", "ROLE_NAME", "redact_url", "to_sqlalchemy_url", "to_libpq_url"]

ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


@dataclass(frozen=True)
class Settings:
    """Where the database is and which roles rtv-db uses. Build with :meth:`from_env`."""

    admin_url: str | None = None
    runtime_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    database: str = "rtv"
    owner_role: str = "rtv_owner"
    runtime_role: str = "rtv_app"
    runtime_password: str | None = None
    system_role: str = "rtv_system"
    system_password: str | None = None

    def __post_init__(self) -> None:
        for attr in ("owner_role", "runtime_role", "system_role"):
            name = getattr(self, attr)
            if not ROLE_NAME.match(name):
                raise ConfigurationError(
                    f"{attr}={name!r} is not a plain lower-case PostgreSQL role name"
                )
        if len({self.owner_role, self.runtime_role, self.system_role}) != 3:
            raise ConfigurationError("owner, runtime and system roles must be three different roles")

    @classmethod
    def from_env(cls, *, admin_url: str | None = None, **overrides: object) -> "Settings":
        """Settings from ``RTV_DB_*`` environment variables, with explicit values winning."""
        values: dict[str, object] = {
            "admin_url": admin_url or _env("RTV_DB_ADMIN_URL"),
            "runtime_url": _env("DATABASE_URL"),
        }
        data_dir = _env("RTV_DB_DATA_DIR")
        if data_dir:
            values["data_dir"] = Path(data_dir)
        for key in ("owner_role", "runtime_role", "runtime_password", "system_role", "system_password"):
            env_value = _env(f"RTV_DB_{key.upper()}")
            if env_value is not None:
                values[key] = env_value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def uses_embedded_server(self) -> bool:
        """True when no URL is configured and the embedded server is the database."""
        return self.admin_url is None and self.runtime_url is None

    def role_url(self, base_url: str, role: str, password: str | None) -> str:
        """``base_url`` with its user (and password) replaced by ``role``."""
        url = make_url(to_sqlalchemy_url(base_url)).set(username=role, password=password)
        return url.render_as_string(hide_password=False)

    def derived_runtime_url(self, admin_url: str) -> str:
        """The runtime URL: ``DATABASE_URL`` when set, else the admin URL as the runtime role."""
        if self.runtime_url:
            return to_sqlalchemy_url(self.runtime_url)
        return self.role_url(admin_url, self.runtime_role, self.runtime_password)

    def derived_system_url(self, admin_url: str) -> str:
        """The admin URL as the system role."""
        return self.role_url(admin_url, self.system_role, self.system_password)


def to_sqlalchemy_url(url: str | URL) -> str:
    """A SQLAlchemy URL on the psycopg 3 driver, from a libpq or SQLAlchemy URL."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+asyncpg"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise ConfigurationError(f"not a PostgreSQL URL: {redact_url(str(url))}")
    return parsed.render_as_string(hide_password=False)


def to_libpq_url(url: str | URL) -> str:
    """A plain ``postgresql://`` URL for psycopg.connect, from a SQLAlchemy URL."""
    parsed = make_url(to_sqlalchemy_url(url) if isinstance(url, str) else url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def redact_url(url: str | URL) -> str:
    """The URL with its password masked, safe for logs and error messages."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
        return parsed.render_as_string(hide_password=True)
    except Exception:  # an unparsable URL may still hold a password: print none of it
        return "<unparsable database URL>"


def describe_target(url: str | URL) -> str:
    """``database 'x' on host 'y'`` for error messages; never includes credentials."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception:
        return "an unparsable database URL"
    host = parsed.host or parsed.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{parsed.port}" if parsed.port else ""
    return f"database {parsed.database!r} on host {host}{port} as user {parsed.username!r}"
