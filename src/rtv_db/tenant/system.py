"""The system scope: explicit, logged, cross-tenant work (seeding, maintenance jobs).

It connects as the system role, which has BYPASSRLS, so it is never the default: it exists only
where code constructs a :class:`SystemScope` with a reason, and every transaction it opens is
logged at WARNING on ``rtv_db.system`` with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from ..connection import Database
from ..errors import ConfigurationError
from ._transaction import CONTEXT_OPTION, SYSTEM
from .orm import SESSION_SYSTEM_KEY

__all__ = ["SystemScope"]

_log = logging.getLogger("rtv_db.system")


class SystemScope:
    """Cross-tenant access as the system role, for a stated reason.

    >>> system = SystemScope(target.system_url, reason="nightly retention")   # doctest: +SKIP
    >>> with system.transaction() as conn: ...                                # doctest: +SKIP
    """

    def __init__(self, url: str, *, reason: str, **engine_kwargs: Any) -> None:
        if not reason or not reason.strip():
            raise ConfigurationError("the system scope needs a reason; it is logged with every use")
        self.reason = reason.strip()
        self.db = Database(url, check_role=False, **engine_kwargs)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction across tenants; commits on success."""
        _log.warning("system scope (cross-tenant, RLS bypassed) used: %s", self.reason)
        with self.db.engine.connect() as conn:
            conn = conn.execution_options(**{CONTEXT_OPTION: SYSTEM})
            with conn.begin():
                yield conn

    def session(self, **kwargs: Any) -> Session:
        """An ORM session across tenants (no tenant filter is added)."""
        _log.warning("system scope ORM session opened: %s", self.reason)
        bind = self.db.engine.execution_options(**{CONTEXT_OPTION: SYSTEM})
        info = dict(kwargs.pop("info", {}) or {}) | {SESSION_SYSTEM_KEY: True}
        return Session(bind=bind, info=info, **kwargs)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "SystemScope":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
