"""The benchmark's databases: an embedded server in a temp dir (or ``--database-url``), one
migrated database per dataset, loaded with the synthetic loader and analysed."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from rtv_db.config import Settings, to_libpq_url, to_sqlalchemy_url
from rtv_db.migrate import migrate
from rtv_db.seed.synthetic import SyntheticResult, load_synthetic
from rtv_db.server import EmbeddedServer
from rtv_db.signing import generate_key
from rtv_db.targets import Target

__all__ = ["BenchServer", "Dataset", "machine_info"]

_TABLES = ("clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions")


@dataclass
class Dataset:
    """One migrated database and what has been loaded into it."""

    name: str
    target: Target
    tenants: int = 0
    rows: int = 0
    loads: list[SyntheticResult] = field(default_factory=list)


class BenchServer:
    """Where the benchmark runs: its own embedded server, or the server of an admin URL."""

    def __init__(self, database_url: str | None = None, *, progress: bool = True,
                 server_settings: dict[str, str] | None = None) -> None:
        """``server_settings``: for the embedded server only, set with ``ALTER SYSTEM`` and the
        server restarted (e.g. ``{"shared_buffers": "1GB"}``); a given URL's server is used as it is."""
        self.progress = progress
        if not os.environ.get("RTV_DB_CONTEXT_KEY") and not os.environ.get("RTV_DB_CONTEXT_KEY_FILE"):
            # The signing key of this run: `migrate` installs it, the engines and the hand-written
            # variants sign with it (and no key file is written anywhere).
            key = generate_key()
            os.environ["RTV_DB_CONTEXT_KEY"] = f"{key.key_id}:{key.hex}"
        os.environ.pop("RTV_DB_CONTEXT_MODE", None)  # signed databases: the default, as shipped
        self._tmp: Path | None = None
        self._server: EmbeddedServer | None = None
        self._created: list[str] = []
        self._after_close: list[Any] = []
        if database_url:
            self.settings = Settings(admin_url=None, runtime_url=None)
            self.admin_url = to_sqlalchemy_url(database_url)
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="rtv-bench-"))
            self._server = EmbeddedServer(self._tmp, database="postgres")
            self.settings = Settings(data_dir=self._tmp)
            self.admin_url = to_sqlalchemy_url(self._server.start())
            if server_settings:
                with self.admin() as conn:
                    for name, value in server_settings.items():
                        conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
                self._server.stop()
                self.admin_url = to_sqlalchemy_url(self._server.start())

    def url_for(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def admin(self, database: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(to_libpq_url(self.url_for(database)), autocommit=True)

    def create(self, purpose: str) -> Dataset:
        name = f"rtv_bench_{purpose}_{uuid.uuid4().hex[:8]}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.append(name)
        admin = self.url_for(name)
        migrate(admin, self.settings)
        target = Target(admin, self.settings.derived_runtime_url(admin), self.settings.derived_system_url(admin), self.settings)
        return Dataset(name, target)

    def create_database(self, purpose: str, owner: str | None = None) -> str:
        """An empty database (dropped at close), owned by ``owner`` if given."""
        name = f"rtv_bench_{purpose}_{uuid.uuid4().hex[:8]}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                         + (sql.SQL(" OWNER {}").format(sql.Identifier(owner)) if owner else sql.SQL("")))
        self._created.append(name)
        return name

    def after_close(self, fn: Any) -> None:
        """Run ``fn()`` at close, after the databases are dropped (e.g. to drop roles that owned them)."""
        self._after_close.append(fn)

    def load(self, ds: Dataset, tenants: int, rows: int) -> SyntheticResult:
        """Add ``tenants`` tenants (after those already loaded) with ``rows`` brand kits each; ANALYZE."""
        if ds.rows and rows != ds.rows:
            raise ValueError("a dataset keeps one rows-per-tenant")
        assert ds.target.system_url is not None
        audited = self.has_table(ds, "audit_events")
        if audited:
            # The bulk load is setup, not a workload: the audit trail would record 1M+ inserts.
            self.set_audit(ds, False)
        try:
            result = load_synthetic(ds.target.system_url, tenants, rows, first_tenant=ds.tenants, progress=self.progress)
        finally:
            if audited:
                self.set_audit(ds, True)
        ds.tenants += tenants
        ds.rows = rows
        ds.loads.append(result)
        with self.admin(ds.name) as conn:
            # The system role may not ANALYZE tables it does not own: the admin does it, so
            # the planner sees the new sizes before anything is timed.
            conn.execute("ANALYZE " + ", ".join(_TABLES))
        return result

    def set_audit(self, ds: Dataset, enabled: bool, tables: tuple[str, ...] = _TABLES) -> None:
        """Enable or disable the audit trail's row trigger (``audit_row_change``) on ``tables``."""
        with self.admin(ds.name) as conn:
            for table in tables:
                conn.execute(sql.SQL("ALTER TABLE {} {} TRIGGER audit_row_change").format(
                    sql.Identifier(table), sql.SQL("ENABLE" if enabled else "DISABLE")))

    def set_context_mode(self, ds: Dataset, mode: str) -> None:
        """Switch the database's tenant context mode ('signed' or 'unsigned'), as `migrate` with
        RTV_DB_CONTEXT_MODE would. Unsigned mode accepts both setters; a signed token is verified
        the same way in either mode (the mode is read only when no token is set)."""
        with self.admin(ds.name) as conn:
            conn.execute("UPDATE rtv_secret.context_settings SET mode = %s", (mode,))

    def has_table(self, ds: Dataset, table: str) -> bool:
        with self.admin(ds.name) as conn:
            return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]  # type: ignore[index]

    def server_version(self) -> str:
        with self.admin() as conn:
            return str(conn.execute("SELECT version()").fetchone()[0])  # type: ignore[index]

    def settings_of_interest(self) -> dict[str, str]:
        names = ("shared_buffers", "max_connections", "work_mem", "synchronous_commit", "fsync", "jit")
        with self.admin() as conn:
            rows = conn.execute("SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", (list(names),)).fetchall()
        return {name: value for name, value in rows}

    def close(self) -> None:
        try:
            with self.admin() as conn:
                for name in self._created:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg.Error:
            pass
        for fn in reversed(self._after_close):
            try:
                fn()
            except psycopg.Error:
                pass
        if self._server is not None:
            self._server.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, memory, OS and Python: what the README quotes with the figures."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        import os

        nproc = os.cpu_count() or 0
    import psycopg as _pg
    import sqlalchemy

    return {
        "nproc": nproc,
        "cpu_model": cpu,
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": f"{_pg.__version__} ({_pg.pq.__impl__})",
    }
