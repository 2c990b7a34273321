"""Pre-ping only after idle: a pooled connection is checked at checkout when it has been idle a while.

SQLAlchemy's ``pool_pre_ping`` pings on every checkout: a round trip per scoped call, more than
the call itself costs once BEGIN, context, statement and COMMIT travel together. A backend that
dies while its connection sits in the pool is mostly one that sat there long (a server or proxy
idle limit, a failover): so, like PgBouncer's ``server_check_delay``, rtv-db pings only a
connection idle for ``pre_ping_after_idle`` seconds or more (10 by default; 0 pings every time).
A backend lost within that window fails the one call that meets it (``OperationalError``, the
connection invalidated); the next call gets a fresh one.
"""

from __future__ import annotations

import time
from typing import Any, Final

from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError

__all__ = ["install_idle_ping"]

_IDLE_SINCE: Final = "rtv_idle_since"


def install_idle_ping(engine: Engine, after_idle: float) -> None:
    """Ping connections idle for ``after_idle`` seconds or more when they are checked out."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _idle_from_now(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        if since is None or time.monotonic() - since < after_idle:
            return  # new, or used moments ago
        try:
            alive = dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                raise DisconnectionError("pooled connection lost while idle") from exc  # the pool retries
            raise
        if not alive:
            raise DisconnectionError("pooled connection lost while idle")
