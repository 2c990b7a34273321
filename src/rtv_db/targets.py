"""Resolving which server a command talks to: a configured URL, or the embedded server."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings, to_sqlalchemy_url
from .errors import ConfigurationError
from .server import EmbeddedServer

__all__ = ["Target", "resolve_target"]


@dataclass(frozen=True)
class Target:
    """The three URLs of one database: admin (migrations), runtime (the application), system."""

    admin_url: str | None
    runtime_url: str
    system_url: str | None
    settings: Settings
    embedded: EmbeddedServer | None = None

    def require_admin(self) -> str:
        if self.admin_url is None:
            raise ConfigurationError(
                "this command needs an admin URL (superuser or CREATEROLE): pass --database-url or set RTV_DB_ADMIN_URL"
            )
        return self.admin_url


def resolve_target(settings: Settings | None = None, *, database_url: str | None = None, start: bool = True) -> Target:
    """The URLs to use: ``database_url`` (an admin URL), else the settings, else the embedded server.

    With nothing configured the embedded server is started (or reused) when ``start`` is true.
    """
    settings = settings or Settings.from_env()
    admin = database_url or settings.admin_url
    if admin:
        admin = to_sqlalchemy_url(admin)
        return Target(admin, settings.derived_runtime_url(admin), settings.derived_system_url(admin), settings)
    if settings.runtime_url:
        # Application-only configuration: no admin, no system scope.
        return Target(None, to_sqlalchemy_url(settings.runtime_url), None, settings)
    server = EmbeddedServer(settings.data_dir, settings.database)
    admin = to_sqlalchemy_url(server.start() if start else server.url())
    return Target(admin, settings.derived_runtime_url(admin), settings.derived_system_url(admin), settings, server)
