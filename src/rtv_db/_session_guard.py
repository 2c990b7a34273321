"""A pooled connection left in a state the next transaction cannot undo from the inside is not reused.

``rtv.clean_session()`` resets the server's side of a session at the start of every transaction
rtv-db starts. Three things it cannot reach in time, each checked here without a round trip:

* **What the driver heard.** psycopg encodes and decodes with the ``client_encoding`` the server
  last reported (ParameterStatus), parses dates by its ``DateStyle`` and intervals by its
  ``IntervalStyle``, gives ``timestamptz`` values its ``TimeZone`` and quotes literals by its
  ``standard_conforming_strings``. The server reports a change when it is next ready for a query,
  which for a pipeline is at its end: after tenant A's session-level ``SET client_encoding =
  'LATIN1'``, psycopg encoded and decoded the next tenant's whole first pipeline as LATIN1,
  although the ``RESET ALL`` at its start had switched the server back ('Café' read as 'CafÃ©',
  and stored so when written back). The reported values are recorded when the connection is
  made; a connection whose values differ is not used again.
* **A retired session.** ``rtv.clean_session()`` (revision 0008) raises a WARNING
  ``rtv-db: session retired`` when its reset took long: state an earlier transaction planted that
  ``RESET ALL`` cannot take away (placeholder settings keep their memory). A notice handler
  installed at connect marks the connection.
* **A backend that ended while the connection was idle** in the pool (a planted
  ``idle_session_timeout``, an administrator's ``pg_terminate_backend``, a restart): an idle
  connection's socket has something to read (the FATAL message, or the end of the stream).
  Checked at checkout only; the next statement would otherwise meet the dead socket.

At check-in a marked or drifted connection is closed (:meth:`invalidate`); at checkout the same
checks, and the socket's, raise ``DisconnectionError``, on which SQLAlchemy's pool opens a new
connection in its place: the caller never sees it. Each discard is logged at WARNING on
``rtv_db.connection`` (it follows SQL that changed the session, or a backend that ended).
"""

from __future__ import annotations

import logging
import select
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError

__all__ = ["RETIRED_MESSAGE", "REPORTED_PARAMETERS", "SessionState", "session_state", "install_session_guard"]

_log = logging.getLogger("rtv_db.connection")

# The primary message of revision 0008's WARNING (fixed text, nothing of any tenant in it).
RETIRED_MESSAGE: Final = "rtv-db: session retired"
# The parameters psycopg reads from the server's reports when it adapts values.
REPORTED_PARAMETERS: Final = (b"client_encoding", b"DateStyle", b"IntervalStyle", b"TimeZone",
                              b"standard_conforming_strings")
_STATE: Final = "rtv_session_state"


def _reported(pgconn: Any) -> tuple[bytes | None, ...]:
    return tuple(pgconn.parameter_status(name) for name in REPORTED_PARAMETERS)


@dataclass
class SessionState:
    """What rtv-db knows about one physical connection's session (kept in the pool record's info)."""

    reported: tuple[bytes | None, ...]  # REPORTED_PARAMETERS as the server reported them at connect
    retired: bool = False  # rtv.clean_session() retired the session
    retired_detail: str = field(default="", repr=False)

    def drift(self, pgconn: Any) -> list[str]:
        """``name: connect-time value -> now`` for each reported parameter that changed since connect."""
        now = _reported(pgconn)
        if now == self.reported:
            return []
        return [f"{name.decode()}: {_text(old)} -> {_text(new)}"
                for name, old, new in zip(REPORTED_PARAMETERS, self.reported, now) if old != new]

    def on_notice(self, diag: Any) -> None:
        """psycopg notice handler: note the retirement warning of ``rtv.clean_session()``."""
        if diag.message_primary == RETIRED_MESSAGE:
            self.retired = True
            self.retired_detail = diag.message_detail or ""


def _text(value: bytes | None) -> str:
    return "unset" if value is None else repr(value.decode("ascii", "replace")[:40])


def session_state(info: Any) -> SessionState | None:
    """The :class:`SessionState` of a pooled connection (its ``info`` dict), if rtv-db recorded one."""
    return info.get(_STATE)  # type: ignore[no-any-return]


def _driver(dbapi_connection: Any) -> Any:
    """The psycopg connection (SQLAlchemy wraps the async one in an adapter)."""
    return getattr(dbapi_connection, "driver_connection", None) or dbapi_connection


def _record_session(dbapi_connection: Any, record: Any) -> None:
    driver = _driver(dbapi_connection)
    state = SessionState(_reported(driver.pgconn))
    driver.add_notice_handler(state.on_notice)
    record.info[_STATE] = state


def _unfit(state: SessionState, pgconn: Any) -> str | None:
    """Why a connection must not be used again, or None."""
    if state.retired:
        return f"its session was retired by rtv.clean_session() ({state.retired_detail or 'planted state'})"
    drift = state.drift(pgconn)
    if drift:
        return "a transaction changed what the server reports to the driver at session level (" + "; ".join(drift) + ")"
    return None


def _ended_while_idle(pgconn: Any) -> bool:
    """Whether an idle connection's socket has something to read: the backend said or did something
    while nothing was running (it ended), or the socket is gone."""
    try:
        fd = pgconn.socket
        readable, _, _ = select.select([fd], [], [], 0)
    except Exception:  # a closed connection has no socket (psycopg raises), or a bad descriptor
        return True
    return bool(readable)


def _close_unfit_at_checkin(dbapi_connection: Any, record: Any) -> None:
    if dbapi_connection is None:
        return  # already invalidated
    state = session_state(record.info)
    if state is None:
        return
    reason = _unfit(state, _driver(dbapi_connection).pgconn)
    if reason is not None:
        _log.warning("rtv-db security: pooled connection closed: %s", reason)
        record.invalidate(DisconnectionError(reason))


def _refuse_unfit_at_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    state = session_state(record.info)
    if state is None:
        return
    pgconn = _driver(dbapi_connection).pgconn
    reason = _unfit(state, pgconn)
    if reason is None and _ended_while_idle(pgconn):
        reason = "its backend ended while the connection was idle in the pool"
    if reason is not None:
        _log.warning("rtv-db: pooled connection replaced at checkout: %s", reason)
        raise DisconnectionError(reason)  # the pool invalidates it and connects again


def install_session_guard(engine: Engine) -> None:
    """Record each new connection's session and keep unfit ones out of ``engine``'s pool."""
    event.listen(engine, "connect", _record_session)
    event.listen(engine, "checkin", _close_unfit_at_checkin)
    event.listen(engine, "checkout", _refuse_unfit_at_checkout)
