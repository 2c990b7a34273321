"""Create the roles and migrate the schema: what ``rtv-db migrate`` does.

Given a superuser (or CREATEROLE) URL on an empty database, :func:`migrate` runs
``migrations/bootstrap.sql`` (roles, database grants, the pgvector extension) and then the
Alembic revisions as the owner role, all in one transaction under an advisory lock, so two
deployments migrating at once do not interleave. Run again, it changes nothing.

On a Citus coordinator (the ``citus`` extension is installed), a second transaction under the
same lock then distributes the tables (:mod:`rtv_db.citus`); on plain PostgreSQL that step is
one catalog lookup and nothing else.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script.revision import RevisionError
from alembic.runtime.migration import MigrationContext
from psycopg import sql
from sqlalchemy import Connection, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from . import citus
from .config import Settings, redact_url, to_sqlalchemy_url
from .connection import connect_error
from .errors import MigrationError

__all__ = ["MigrationResult", "migrate", "downgrade", "current_revision", "head_revision"]

_log = logging.getLogger("rtv_db.migrate")
_MIGRATIONS = Path(str(resources.files("rtv_db") / "migrations"))
# Any fixed number: serialises concurrent `rtv-db migrate` runs on one database.
_MIGRATION_LOCK = 7_311_000_001


@dataclass(frozen=True)
class MigrationResult:
    """The revision before and after a migration run."""

    before: str | None
    after: str | None
    citus_actions: tuple[str, ...] = ()  # what the Citus step did (empty on plain PostgreSQL)
    context_changes: tuple[str, ...] = ()  # keys installed, a context mode switched

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _alembic_config(conn: Connection, settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    cfg.attributes["rtv_roles"] = {
        "owner": settings.owner_role,
        "runtime": settings.runtime_role,
        "system": settings.system_role,
    }
    return cfg


def head_revision() -> str:
    """The newest revision this version of rtv-db knows."""
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _bootstrap(conn: Connection, settings: Settings) -> str:
    """Roles, database grants, the runtime role's settings and session hardening, extensions: the
    part that needs the admin login."""
    dbapi = conn.connection.dbapi_connection
    database = conn.exec_driver_sql("SELECT current_database()").scalar_one()

    def literal(value: str | None) -> sql.Composable:
        return sql.Literal(value) if value is not None else sql.SQL("NULL")

    text = (_MIGRATIONS / "bootstrap.sql").read_text()
    rendered = sql.SQL(text).format(  # type: ignore[arg-type]  # the file is trusted, reviewed SQL
        owner=sql.Identifier(settings.owner_role),
        runtime=sql.Identifier(settings.runtime_role),
        system=sql.Identifier(settings.system_role),
        owner_name=sql.Literal(settings.owner_role),
        runtime_name=sql.Literal(settings.runtime_role),
        system_name=sql.Literal(settings.system_role),
        runtime_password=literal(settings.runtime_password),
        system_password=literal(settings.system_password),
        database=sql.Identifier(database),
        statement_timeout_ms=sql.Literal(int(settings.statement_timeout_ms)),
        idle_in_transaction_timeout_ms=sql.Literal(int(settings.idle_in_transaction_timeout_ms)),
        temp_file_limit_kb=sql.Literal(int(settings.temp_file_limit_kb)),
    ).as_string(dbapi)
    conn.exec_driver_sql(rendered, execution_options={"no_parameters": True})
    return rendered


# The blocks of the bootstrap that are per node on Citus (function grants, database privileges):
# the distribution step runs them on every worker too.
_WORKER_BLOCKS = re.compile(r"^DO \$(sessions|citus_commands)\$.*?^\$\1\$;", re.DOTALL | re.MULTILINE)
_WORKER_TEMP = ("DO $temp$ BEGIN EXECUTE pg_catalog.format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC',"
                " pg_catalog.current_database()); END $temp$;")


def _worker_hardening(bootstrap_sql: str) -> str:
    # Local to each worker (Citus refuses propagating DDL there: "operation is not allowed on this node").
    return "\n".join(["BEGIN; SET LOCAL citus.enable_ddl_propagation TO off;", _WORKER_TEMP,
                      *(m.group(0) for m in _WORKER_BLOCKS.finditer(bootstrap_sql)), "COMMIT;"])


def _new_tables_only(before: str | None, wanted: str) -> bool:
    """Whether every revision from ``before`` to ``wanted`` only creates new tenant tables.

    Such a revision (``citus_new_tables_only = True``, as ``rtv-db revision --tenant-table``
    writes it) changes nothing that is distributed: its tables are created on the coordinator
    and the distribution step distributes them. Any other revision on a distributed database
    is refused.
    """
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    try:
        scripts = list(ScriptDirectory.from_config(cfg).iterate_revisions(wanted, before))
    except RevisionError:
        return False  # ``wanted`` is not ahead of ``before`` (an older revision, or another branch)
    return bool(scripts) and all(getattr(s.module, "citus_new_tables_only", False) for s in scripts)


# Statistics ANALYZE collected before a tenant column got STATISTICS 0 (revisions 0006, 0009): on
# PostgreSQL 18 revision 0009 clears them as the owner (pg_clear_attribute_stats); before 18 only a
# superuser may delete them. Tenant tables: client_id, or clients; their indexes' expressions too.
_COLLECTED_STATISTICS = """
    WITH tenant AS (
        SELECT t.oid FROM pg_catalog.pg_class t JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = 'public' AND t.relkind IN ('r', 'p')
          AND (t.relname = 'clients' OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute x WHERE x.attrelid = t.oid
                                                AND x.attname = 'client_id' AND NOT x.attisdropped))
    ), rel AS (
        SELECT oid FROM tenant UNION SELECT i.indexrelid FROM pg_catalog.pg_index i JOIN tenant ON tenant.oid = i.indrelid
    )
    DELETE FROM pg_catalog.pg_statistic s USING pg_catalog.pg_attribute a
    WHERE s.starelid IN (SELECT oid FROM rel) AND a.attrelid = s.starelid AND a.attnum = s.staattnum
      AND a.attstattarget = 0
"""


def _drop_collected_statistics(conn: Connection, settings: Settings) -> None:
    """Delete what ANALYZE collected for tenant columns that now have STATISTICS 0, as the admin
    login when it is a superuser; before PostgreSQL 18 nobody else may (a warning says so)."""
    superuser, version = conn.exec_driver_sql(
        "SELECT rolsuper, current_setting('server_version_num')::int FROM pg_catalog.pg_roles"
        " WHERE rolname = session_user").one()
    if not superuser:
        if version < 180000:
            _log.warning("statistics collected on tenant columns before they got STATISTICS 0 stay until a superuser"
                         " runs `rtv-db migrate` (PostgreSQL %s); `rtv-db verify` as the admin lists them", version)
        return
    conn.exec_driver_sql("RESET ROLE")
    deleted = conn.exec_driver_sql(_COLLECTED_STATISTICS).rowcount
    conn.exec_driver_sql(f'SET LOCAL ROLE "{settings.owner_role}"')
    if deleted:
        _log.info("deleted %s collected statistic(s) of tenant columns with STATISTICS 0", deleted)


def _run(admin_url: str, settings: Settings, action: str, revision: str) -> MigrationResult:
    url = to_sqlalchemy_url(admin_url)
    engine = create_engine(url, poolclass=NullPool)
    try:
        try:
            connection = engine.connect()
        except SQLAlchemyError as exc:
            raise connect_error(url, exc) from exc
        with connection as conn, conn.begin():
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            before = _revision(conn)
            on_citus = action == "upgrade" and citus.is_citus(conn)
            if on_citus:
                # Before anything changes: signed mode (the default) is refused on Citus.
                from .signing import context_mode

                citus.refuse_signed_context(context_mode())
                wanted = head_revision() if revision == "head" else revision
                if before != wanted and citus.has_distributed_tables(conn) and not _new_tables_only(before, wanted):
                    # The revisions run without DDL propagation (below): on distributed tables
                    # their DDL would change the coordinator's tables and not the shards.
                    raise MigrationError(
                        f"upgrading a distributed Citus database ({before} -> {wanted}) is not supported: the"
                        " revisions run as the NOLOGIN owner without DDL propagation, so their changes would not"
                        " reach the shards. Nothing was changed. See docs/citus.md, 'Upgrading a distributed"
                        " database'.")
            bootstrap_sql = ""
            if action == "upgrade":
                bootstrap_sql = _bootstrap(conn, settings)
            if on_citus:
                # The revisions run as the owner, a NOLOGIN role: Citus would send their DDL to the
                # workers over new connections as that role, which cannot log in there. They stay
                # coordinator-local; the distribution step (as the admin) creates on the workers
                # what the distributed tables and functions need.
                conn.exec_driver_sql("SET LOCAL citus.enable_ddl_propagation TO off")
            conn.exec_driver_sql(f'SET LOCAL ROLE "{settings.owner_role}"')
            cfg = _alembic_config(conn, settings)
            context_changes: list[str] = []
            if action == "upgrade":
                command.upgrade(cfg, revision)
                # The tenant context keys and mode (revision 0004), installed as the owner.
                from .signing import install_context_config

                context_changes = install_context_config(conn, settings)
                _drop_collected_statistics(conn, settings)
            else:
                command.downgrade(cfg, revision)
            after = _revision(conn)
        actions: list[str] = []
        if action == "upgrade":
            # Its own transaction: the tables exist (committed) before Citus copies their
            # definitions to the workers, and a failure here leaves a migrated schema that the
            # next run distributes (every step is skipped when already done).
            with engine.begin() as conn:
                if on_citus:
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                    actions = citus.distribute(conn, runtime_role=settings.runtime_role)
                    actions += citus.harden_workers(conn, _worker_hardening(bootstrap_sql),
                                                    runtime_role=settings.runtime_role)
    except SQLAlchemyError as exc:
        raise MigrationError(f"{action} to {revision} failed on {redact_url(url)}: {getattr(exc, 'orig', None) or exc}") from exc
    finally:
        engine.dispose()
    _log.info("%s %s -> %s", action, before, after)
    return MigrationResult(before=before, after=after, citus_actions=tuple(actions),
                           context_changes=tuple(context_changes))


def migrate(admin_url: str, settings: Settings | None = None, revision: str = "head") -> MigrationResult:
    """Create the roles and upgrade the schema to ``revision``; a no-op when already there."""
    return _run(admin_url, settings or Settings.from_env(), "upgrade", revision)


def downgrade(admin_url: str, settings: Settings | None = None, revision: str = "base") -> MigrationResult:
    """Downgrade the schema to ``revision`` (``base`` removes every object; roles stay)."""
    return _run(admin_url, settings or Settings.from_env(), "downgrade", revision)


def current_revision(admin_url: str) -> str | None:
    """The revision the database is at, or None before the first migration."""
    engine = create_engine(to_sqlalchemy_url(admin_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return _revision(conn)
    finally:
        engine.dispose()
