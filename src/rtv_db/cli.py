"""The ``rtv-db`` command line.

Every command that touches a database takes ``--database-url`` (an admin URL: superuser or
CREATEROLE); without it, the embedded server is used (started, or reused when running).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from .config import Settings, redact_url, to_libpq_url
from .errors import ConfigurationError, RtvDbError, ServerError
from .server import EmbeddedServer
from .targets import Target, resolve_target

__all__ = ["main", "cli"]

console = Console()
err_console = Console(stderr=True)
_F = TypeVar("_F", bound=Callable[..., Any])


def _fail_cleanly(fn: _F) -> _F:
    """Print rtv-db errors as one clear line and exit 1, instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RtvDbError as exc:
            err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, markup=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def database_url_option(fn: _F) -> _F:
    return click.option(
        "--database-url",
        envvar="RTV_DB_ADMIN_URL",
        default=None,
        help="Admin URL (superuser or CREATEROLE). Default: the embedded server.",
    )(fn)


def _settings(data_dir: Path | None) -> Settings:
    return Settings.from_env(data_dir=data_dir)


def target_for(database_url: str | None, data_dir: Path | None = None) -> Target:
    """Resolve the database a command works on (starting the embedded server if needed)."""
    return resolve_target(_settings(data_dir), database_url=database_url)


@click.group()
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="RTV_DB_DATA_DIR", default=None,
              help="Where the embedded server keeps its data (default: /var/lib/rtv-db as root, else the user data folder).")
@click.option("-v", "--verbose", is_flag=True, help="Log what rtv-db does.")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, verbose: bool) -> None:
    """rtv-db: RTV's multi-tenant PostgreSQL data layer."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"data_dir": data_dir}


# -- server -----------------------------------------------------------------------------------


@cli.group()
def server() -> None:
    """Manage the embedded PostgreSQL server."""


def _embedded(ctx: click.Context) -> EmbeddedServer:
    settings = _settings(ctx.obj["data_dir"])
    return EmbeddedServer(settings.data_dir, settings.database)


@server.command("start")
@click.pass_context
@_fail_cleanly
def server_start(ctx: click.Context) -> None:
    """Start the server (or reuse the running one)."""
    srv = _embedded(ctx)
    was_running = srv.status().running
    srv.start()
    console.print(("reused: " if was_running else "started: ") + srv.status().describe(), highlight=False)


@server.command("stop")
@click.pass_context
@_fail_cleanly
def server_stop(ctx: click.Context) -> None:
    """Stop the server, whoever started it."""
    srv = _embedded(ctx)
    console.print("stopped" if srv.stop() else "not running", highlight=False)


@server.command("status")
@click.pass_context
@_fail_cleanly
def server_status(ctx: click.Context) -> None:
    """Say whether the server runs; exit 3 when it does not."""
    status = _embedded(ctx).status()
    console.print(status.describe(), highlight=False)
    if not status.running:
        sys.exit(3)


@server.command("url")
@click.option("--role", type=click.Choice(["admin", "runtime", "system"]), default="admin", show_default=True)
@click.pass_context
@_fail_cleanly
def server_url(ctx: click.Context, role: str) -> None:
    """Print the URL of the running server, for a role (socket directory and port included)."""
    settings = _settings(ctx.obj["data_dir"])
    target = resolve_target(settings, start=False)
    url = {"admin": target.admin_url, "runtime": target.runtime_url, "system": target.system_url}[role]
    click.echo(url)


@server.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@click.pass_context
@_fail_cleanly
def server_info(ctx: click.Context, as_json: bool) -> None:
    """Where the running server listens, and the URLs of its roles (for a pooler or another tool)."""
    import json

    from sqlalchemy.engine import make_url

    settings = _settings(ctx.obj["data_dir"])
    srv = EmbeddedServer(settings.data_dir, settings.database)
    status = srv.status()
    if not status.running:
        raise ServerError(f"the embedded server is not running (data directory {srv.pgdata}); run `rtv-db server start`")
    target = resolve_target(settings, start=False)
    runtime = make_url(target.runtime_url)
    info = {
        "host": str(status.socket_dir) if status.socket_dir else status.hostname,
        "port": status.port,
        "socket_dir": str(status.socket_dir) if status.socket_dir else None,
        "socket": str(status.socket_dir / f".s.PGSQL.{status.port}") if status.socket_dir and status.port else None,
        "tcp_host": status.hostname,
        "database": settings.database,
        "pid": status.pid,
        "data_dir": str(status.pgdata),
        "runtime_role": runtime.username,
        "runtime_url": to_libpq_url(target.runtime_url),
        "admin_url": to_libpq_url(target.require_admin()),
        "system_url": to_libpq_url(target.system_url) if target.system_url else None,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for name, value in info.items():
        click.echo(f"{name.ljust(width)}  {'' if value is None else value}")


# -- schema -----------------------------------------------------------------------------------


@cli.command()
@database_url_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.pass_context
@_fail_cleanly
def migrate(ctx: click.Context, database_url: str | None, revision: str) -> None:
    """Create the roles and migrate the schema (idempotent)."""
    from .migrate import migrate as run_migrate

    target = target_for(database_url, ctx.obj["data_dir"])
    result = run_migrate(target.require_admin(), target.settings, revision)
    where = redact_url(target.require_admin())
    if result.changed:
        console.print(f"migrated {where}: {result.before or 'empty'} -> {result.after}", highlight=False)
    elif not result.context_changes and not result.citus_actions:
        console.print(f"{where} is already at {result.after}: nothing to do", highlight=False)
    else:
        console.print(f"{where} is already at {result.after}", highlight=False)
    for change in result.context_changes:
        console.print(f"  {change}", highlight=False)
    if result.citus_actions:
        console.print(f"  citus: {len(result.citus_actions)} step(s) done:", highlight=False)
    for action in result.citus_actions:
        console.print(f"  citus: {action}", highlight=False)
    if any(change.startswith("context mode") for change in result.context_changes):
        console.print("  set the same RTV_DB_CONTEXT_MODE for the application and restart it (in signed mode the "
                      "database refuses an unsigned application's context)", highlight=False)


@cli.command()
@database_url_option
@click.option("--revision", default="base", show_default=True, help="Target revision (base removes every object).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@_fail_cleanly
def downgrade(ctx: click.Context, database_url: str | None, revision: str, yes: bool) -> None:
    """Downgrade the schema (drops tables and their data)."""
    from .migrate import downgrade as run_downgrade

    target = target_for(database_url, ctx.obj["data_dir"])
    if not yes:
        click.confirm(f"downgrade {redact_url(target.require_admin())} to {revision}, dropping data?", abort=True)
    result = run_downgrade(target.require_admin(), target.settings, revision)
    console.print(f"downgraded: {result.before} -> {result.after or 'base'}", highlight=False)


# -- data and checks --------------------------------------------------------------------------


def _load_synthetic() -> Callable[..., Any]:
    """The bulk loader, when this build has it (it lives in rtv_db.seed.synthetic)."""
    try:
        from .seed.synthetic import load_synthetic
    except ImportError as exc:
        raise ConfigurationError(f"the synthetic bulk loader is not available in this build ({exc})") from exc
    return load_synthetic  # type: ignore[no-any-return]


@cli.command()
@database_url_option
@click.option("--tenants", type=click.IntRange(min=1), default=None, help="Synthetic load: number of tenants.")
@click.option("--rows", type=click.IntRange(min=1), default=None, help="Synthetic load: rows per tenant.")
@click.pass_context
@_fail_cleanly
def seed(ctx: click.Context, database_url: str | None, tenants: int | None, rows: int | None) -> None:
    """Create the demo dataset (idempotent), or with --tenants/--rows a bulk synthetic load."""
    from .migrate import current_revision

    if (tenants is None) != (rows is None):
        raise click.UsageError("--tenants and --rows go together")
    target = target_for(database_url, ctx.obj["data_dir"])
    if target.system_url is None:
        raise ConfigurationError("seeding needs an admin URL (it uses the system role): pass --database-url")
    if current_revision(target.require_admin()) is None:
        raise ConfigurationError(f"{redact_url(target.require_admin())} is not migrated: run `rtv-db migrate` first")
    if tenants is not None and rows is not None:
        load_synthetic = _load_synthetic()
        result = load_synthetic(target.system_url, tenants, rows, progress=True)
        if hasattr(result, "total_rows") and hasattr(result, "seconds"):
            summary = f"{result.total_rows:,} rows in {result.seconds:.1f} s"
        else:  # a loader with another result type: say what it returned
            summary = str(result)
        console.print(f"synthetic load done: {summary}", highlight=False)
        return
    from .seed import seed_demo

    with console.status("seeding the demo dataset..."):
        result = seed_demo(target.system_url)
    console.print(seed_table(result))
    console.print("seeded: " + (f"{result.total_inserted} new rows" if result.changed else "nothing new (already there)"),
                  highlight=False)


def seed_table(result: Any) -> Any:
    """The rows of the demo dataset per table: planned and newly inserted."""
    from rich.table import Table

    table = Table(title=f"demo dataset: {len(result.tenants)} tenants", title_justify="left")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("new", justify="right")
    for name, planned in result.planned.items():
        table.add_row(name, str(planned), str(result.inserted.get(name, 0)))
    return table


@cli.command("revision")
@click.option("--tenant-table", "table", required=True, help="Name of the new tenant table.")
@click.option("--column", "columns", multiple=True, help='A column definition, e.g. "title text NOT NULL" (repeat).')
@click.option("--parent", "parents", multiple=True, metavar="TABLE:COLUMN",
              help="A tenant parent and the column holding its id, e.g. brand_kits:brand_kit_id (repeat).")
@click.option("--unique", "uniques", multiple=True, metavar="COL[,COL]", help="A unique constraint (client_id is put first).")
@click.option("--index", "indexes", multiple=True, metavar="COL[,COL]", help="An index (client_id is put first).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The versions folder (default: rtv-db's own migrations/versions).")
@_fail_cleanly
def revision(table: str, columns: tuple[str, ...], parents: tuple[str, ...], uniques: tuple[str, ...],
             indexes: tuple[str, ...], directory: Path | None) -> None:
    """Write a migration that adds a tenant table with every guarantee (docs/tenant-tables.md)."""
    from .errors import InvalidInputError
    from .migrations.tenant_table import Parent, write_tenant_table_revision

    def parent(spec: str) -> Parent:
        table_name, sep, column = spec.partition(":")
        if not sep:
            raise InvalidInputError(f"--parent {spec[:60]!r}: expected TABLE:COLUMN")
        return Parent(table_name.strip(), column.strip())

    folder = directory or Path(__file__).parent / "migrations" / "versions"
    path = write_tenant_table_revision(
        folder, table, list(columns), parents=[parent(p) for p in parents],
        unique=[[c.strip() for c in u.split(",")] for u in uniques],
        indexes=[[c.strip() for c in i.split(",")] for i in indexes],
    )
    console.print(f"wrote {path}: review it, add the model (docs/tenant-tables.md), run rtv-db migrate", highlight=False)


@cli.command("verify")
@database_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--runtime-role", default=None, help="The application's role (default: RTV_DB_RUNTIME_ROLE or rtv_app).")
@click.option("--schema", default="public", show_default=True, help="The schema of the tenant tables.")
@click.pass_context
def verify_command(ctx: click.Context, database_url: str | None, as_json: bool, runtime_role: str | None,
                   schema: str) -> None:
    """Lint a live database's tenant isolation. Exit 0: clean, 1: findings, 2: could not check."""
    import psycopg

    from .verify import VerifyConfig, findings_to_json, render_report, verify

    try:
        target = target_for(database_url, ctx.obj["data_dir"])
        url = target.admin_url or target.runtime_url
        settings = target.settings
        findings = verify(url, config=VerifyConfig(runtime_role=runtime_role or settings.runtime_role, schema=schema,
                                                   owner_role=settings.owner_role, system_role=settings.system_role))
    except (RtvDbError, psycopg.Error) as exc:
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, markup=True)
        sys.exit(2)
    if as_json:
        click.echo(findings_to_json(findings))
    else:
        console.print(render_report(findings))
    sys.exit(1 if findings else 0)


@cli.command()
@database_url_option
@click.pass_context
@_fail_cleanly
def demo(ctx: click.Context, database_url: str | None) -> None:
    """Start the embedded server, migrate, seed, and show isolation live (the main job)."""
    from .demo import run_demo

    run_demo(console, database_url=database_url, data_dir=ctx.obj["data_dir"])


# -- audit ------------------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Read and prune the audit trail."""


@audit.command("purge")
@database_url_option
@click.option("--older-than", "older_than", required=True, help="Age of the events to remove: 90d, 12h, 30m, 45s, 2w.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@_fail_cleanly
def audit_purge(ctx: click.Context, database_url: str | None, older_than: str, yes: bool) -> None:
    """Delete every tenant's audit events older than --older-than (owner-level retention)."""
    from .audit import parse_age, purge_audit_events

    age = parse_age(older_than)
    target = target_for(database_url, ctx.obj["data_dir"])
    if not yes:
        click.confirm(f"delete audit events older than {age} on {redact_url(target.require_admin())}?", abort=True)
    removed = purge_audit_events(target.require_admin(), age)
    console.print(f"removed {removed} audit event(s) older than {age}", highlight=False)


@audit.command("show")
@database_url_option
@click.option("--tenant", "tenant_id", required=True, help="The tenant (client id) whose trail to show.")
@click.option("--table", default=None, help="Only events of this table.")
@click.option("--row-id", default=None, help="Only events of this row.")
@click.option("--correlation-id", default=None, help="Only events of this correlation id.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
@_fail_cleanly
def audit_show(ctx: click.Context, database_url: str | None, tenant_id: str, table: str | None, row_id: str | None,
               correlation_id: str | None, limit: int) -> None:
    """Show a tenant's newest audit events, read as that tenant (the runtime role, RLS-bound)."""
    from rich.table import Table as RichTable

    from .audit import read_audit_trail
    from .connection import Database
    from .tenant import with_tenant_scope

    target = target_for(database_url, ctx.obj["data_dir"])
    db = Database(target.runtime_url)
    try:
        page = read_audit_trail(with_tenant_scope(db, tenant_id), table=table, row_id=row_id,
                                correlation_id=correlation_id, limit=limit)
    finally:
        db.close()
    out = RichTable(title=f"audit trail of tenant {tenant_id} (newest first)")
    for column in ("time", "action", "table", "row", "changed columns", "lane", "user", "correlation", "role"):
        out.add_column(column, overflow="fold")
    for e in page.events:
        out.add_row(e.occurred_at.strftime("%Y-%m-%d %H:%M:%S.%f"), e.action, e.table_name, str(e.row_id)[:8],
                    ", ".join(e.changed_columns or ()), e.lane or "", e.user_id or "", (e.correlation_id or "")[:12],
                    e.db_role)
    console.print(out)
    if page.next_cursor:
        console.print("(more: older events exist; raise --limit to see them)", highlight=False)


# -- key (signed tenant context) ---------------------------------------------------------------


@cli.group()
def key() -> None:
    """Manage the tenant context signing keys (see docs/signed-context.md)."""


@key.command("list")
@database_url_option
@click.pass_context
@_fail_cleanly
def key_list(ctx: click.Context, database_url: str | None) -> None:
    """Show the keys the database accepts and the one the application signs with (no secrets)."""
    from .signing import key_file_path, list_keys

    target = target_for(database_url, ctx.obj["data_dir"])
    rows = list_keys(target.require_admin(), target.settings)
    for row in rows:
        state = "installed" if row["installed"] else "NOT installed (run rtv-db migrate)"
        extra = ", signs" if row["signs"] else ""
        extra += "" if row["configured"] else ", not in the application's configuration"
        created = f" since {row['created_at']:%Y-%m-%d %H:%M:%S %Z}" if row["created_at"] else ""
        console.print(f"{row['key_id']}: {state}{created}{extra}", highlight=False)
    if not rows:
        console.print("no keys", highlight=False)
    console.print(f"key file: {key_file_path(target.settings)}", highlight=False)


@key.command("rotate")
@database_url_option
@click.pass_context
@_fail_cleanly
def key_rotate(ctx: click.Context, database_url: str | None) -> None:
    """Add a new signing key; the old one stays valid until retired."""
    from .signing import key_file_path, rotate_key

    target = target_for(database_url, ctx.obj["data_dir"])
    new = rotate_key(target.require_admin(), target.settings)
    console.print(f"new key {new.key_id} installed and written to {key_file_path(target.settings)} (it signs from now on).",
                  highlight=False)
    console.print("Restart the application instances; then retire the old key with `rtv-db key retire OLD_ID`.", highlight=False)


@key.command("retire")
@database_url_option
@click.argument("key_id")
@click.option("--force", is_flag=True, help="Retire even the key the application signs with.")
@click.pass_context
@_fail_cleanly
def key_retire(ctx: click.Context, database_url: str | None, key_id: str, force: bool) -> None:
    """Stop accepting KEY_ID (deleted from the database and the key file)."""
    from .signing import retire_key

    target = target_for(database_url, ctx.obj["data_dir"])
    retire_key(target.require_admin(), target.settings, key_id, force=force)
    console.print(f"key {key_id} retired: tokens signed with it are refused from now on", highlight=False)


@key.command("generate")
def key_generate() -> None:
    """Print a new key as <id>:<hex> (for RTV_DB_CONTEXT_KEY in a secret store). Installs nothing."""
    from .signing import generate_key

    new = generate_key()
    click.echo(f"{new.key_id}:{new.hex}")


# -- search (per-tenant indexes) -------------------------------------------------------------


@cli.group()
def search() -> None:
    """Per-tenant HNSW indexes for large tenants' similarity search (see docs/search.md)."""


def _print_index(index: Any) -> None:
    size = f"{index.size_bytes / 2**20:.1f} MiB" if index.size_bytes is not None else "no index"
    built = f", built in {index.build_seconds:.1f} s" if index.build_seconds is not None else ""
    console.print(f"{index.tenant_id}: {index.state}, {index.chunks} chunks, {index.index_name} ({size}){built}",
                  highlight=False, soft_wrap=True)


@search.command("index")
@database_url_option
@click.option("--tenant", "tenant_id", default=None, help="The tenant (client id) to index.")
@click.option("--min-chunks", type=click.IntRange(min=1), default=None,
              help="Without --tenant: index every tenant with at least this many chunks and no ready index. "
                   "With it: the size below which the tenant is refused (default 10000).")
@click.pass_context
@_fail_cleanly
def search_index(ctx: click.Context, database_url: str | None, tenant_id: str | None, min_chunks: int | None) -> None:
    """Build a tenant's own index (no writer is blocked); its searches use it once it is ready."""
    import contextlib

    from .search_index import DEFAULT_MIN_CHUNKS, BuildProgress, index_large_tenants, index_tenant

    if tenant_id is None and min_chunks is None:
        raise click.UsageError("give --tenant, --min-chunks, or both")
    target = target_for(database_url, ctx.obj["data_dir"])
    minimum = min_chunks or DEFAULT_MIN_CHUNKS
    # On a terminal, what the build is doing (waiting for older transactions, the phases of
    # CREATE INDEX CONCURRENTLY with their counts): a large build takes minutes.
    with contextlib.ExitStack() as stack:
        status = stack.enter_context(err_console.status("starting", spinner="line")) if err_console.is_terminal else None

        def show(step: BuildProgress) -> None:
            if status is not None:
                status.update(step.message)

        progress = show if status is not None else None
        built = ([index_tenant(target, tenant_id, min_chunks=minimum, progress=progress)] if tenant_id
                 else index_large_tenants(target, min_chunks=minimum, progress=progress))
    for index in built:
        _print_index(index)
    if not built:
        console.print(f"no tenant has {min_chunks} chunks or more without a ready index", highlight=False)


@search.command("list")
@database_url_option
@click.pass_context
@_fail_cleanly
def search_list(ctx: click.Context, database_url: str | None) -> None:
    """Show every tenant that has a search key, its index's state and size."""
    from .search_index import tenant_indexes

    indexes = tenant_indexes(target_for(database_url, ctx.obj["data_dir"]))
    for index in indexes:
        _print_index(index)
    if not indexes:
        console.print("no tenant has its own search index: every search is exact", highlight=False)


@search.command("drop")
@database_url_option
@click.option("--tenant", "tenant_id", required=True, help="The tenant (client id) whose index to drop.")
@click.pass_context
@_fail_cleanly
def search_drop(ctx: click.Context, database_url: str | None, tenant_id: str) -> None:
    """Drop a tenant's index: its searches are exact again (it keeps its key)."""
    from .search_index import drop_tenant_index

    _print_index(drop_tenant_index(target_for(database_url, ctx.obj["data_dir"]), tenant_id))


# -- watchdog ----------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@database_url_option
@click.option("--once", is_flag=True, help="One sweep, then exit (for cron or a test).")
@click.option("--interval-ms", type=click.IntRange(min=1), default=None, help="Between sweeps (default 500).")
@click.option("--max-lock-wait-ms", type=click.IntRange(min=1), default=None,
              help="A wait this long on a runtime-role lock ends the holder, or a waiter of another tenant (default 5000).")
@click.option("--max-transaction-ms", type=click.IntRange(min=1), default=None,
              help="No runtime-role transaction lives longer (default 300000).")
@click.option("--grace-ms", type=click.IntRange(min=0), default=None,
              help="Added to the statement and idle-in-transaction timeouts (default 1000).")
@click.option("--max-memory-mb", type=click.IntRange(min=0), default=None,
              help="Private memory of a backend and its parallel workers (default 1024; 0: no rule). Needs the "
                   "watchdog on the server's host.")
@click.option("--max-locks", type=click.IntRange(min=0), default=None,
              help="Shared lock table entries of a backend (default 4 x max_locks_per_transaction; 0: no rule).")
@click.option("--quarantine-after", type=click.IntRange(min=0), default=None,
              help="Counted terminations of one tenant that quarantine it (default 3; 0: never).")
@click.option("--quarantine-window-ms", type=click.IntRange(min=1), default=None,
              help="... within this window (default 3600000).")
@click.pass_context
@_fail_cleanly
def watchdog(ctx: click.Context, database_url: str | None, once: bool, interval_ms: int | None,
             max_lock_wait_ms: int | None, max_transaction_ms: int | None, grace_ms: int | None,
             max_memory_mb: int | None, max_locks: int | None, quarantine_after: int | None,
             quarantine_window_ms: int | None) -> None:
    """End runtime-role transactions past the limits, even when they lifted their own timeouts;
    quarantine a tenant that keeps stalling (`quarantined`, `release`)."""
    if ctx.invoked_subcommand is not None:
        return
    from .watchdog import WatchdogLimits, run_watchdog

    target = target_for(database_url, ctx.obj["data_dir"])
    limits = WatchdogLimits.from_settings(
        target.settings, interval_ms=interval_ms, max_lock_wait_ms=max_lock_wait_ms,
        max_transaction_ms=max_transaction_ms, grace_ms=grace_ms, max_memory_mb=max_memory_mb, max_locks=max_locks,
        quarantine_after=quarantine_after, quarantine_window_ms=quarantine_window_ms)
    console.print(f"rtv-db watchdog on {redact_url(target.require_admin())}: role {limits.runtime_role}, statement "
                  f"{limits.statement_ms}+{limits.grace_ms} ms, idle {limits.idle_in_transaction_ms}+{limits.grace_ms} ms, "
                  f"lock wait {limits.max_lock_wait_ms} ms, transaction {limits.max_transaction_ms} ms, memory "
                  f"{limits.max_memory_mb or 'no limit'} MB, locks {limits.max_locks if limits.max_locks is not None else 'auto'}, "
                  f"quarantine after {limits.quarantine_after or 'never'} within {limits.quarantine_window_ms} ms, "
                  f"every {limits.interval_ms} ms", highlight=False)

    def report(item: Any) -> None:
        tenant = f"tenant {item.tenant}" if item.tenant else "no tenant mark"
        console.print(f"terminated backend {item.pid} from {item.client} ({item.reason}: {item.detail}; {tenant})",
                      highlight=False)
        if item.quarantined:
            console.print(f"quarantined tenant {item.tenant}: its context is refused until "
                          f"`rtv-db watchdog release {item.tenant}`", highlight=False)

    def probed(found: Any) -> None:
        console.print(f"watchdog sees: {found.describe()}", highlight=False)

    try:
        for _ in run_watchdog(target.require_admin(), limits, iterations=1 if once else None, on_termination=report,
                              on_probe=probed):
            pass
    except KeyboardInterrupt:
        pass


@watchdog.command("quarantined")
@database_url_option
@click.pass_context
@_fail_cleanly
def watchdog_quarantined(ctx: click.Context, database_url: str | None) -> None:
    """List the tenants whose context is refused for repeated stalls."""
    from .watchdog import connect_watchdog, quarantined_tenants

    target = target_for(database_url, ctx.obj["data_dir"])
    with connect_watchdog(target.require_admin()) as conn:
        found = quarantined_tenants(conn)
    if not found:
        console.print("no tenant is quarantined", highlight=False)
    for item in found:
        console.print(f"{item.tenant_id}  since {item.since.isoformat(timespec='seconds')}  after {item.terminations} "
                      f"terminations (last: {item.reason})", highlight=False)


@watchdog.command("release")
@database_url_option
@click.argument("tenant")
@click.pass_context
@_fail_cleanly
def watchdog_release(ctx: click.Context, database_url: str | None, tenant: str) -> None:
    """Release TENANT (a client id) from quarantine: its context is accepted again."""
    from .watchdog import connect_watchdog, release_tenant

    target = target_for(database_url, ctx.obj["data_dir"])
    with connect_watchdog(target.require_admin()) as conn:
        released = release_tenant(conn, tenant)
    console.print(f"released tenant {tenant}" if released else f"tenant {tenant} was not quarantined", highlight=False)


def main() -> None:
    cli(prog_name="rtv-db")


if __name__ == "__main__":
    main()
