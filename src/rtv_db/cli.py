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

from .config import Settings, redact_url
from .errors import RtvDbError
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
    """Print the URL of the running server, for a role."""
    settings = _settings(ctx.obj["data_dir"])
    target = resolve_target(settings, start=False)
    url = {"admin": target.admin_url, "runtime": target.runtime_url, "system": target.system_url}[role]
    click.echo(url)


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
    else:
        console.print(f"{where} is already at {result.after}: nothing to do", highlight=False)


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


@cli.command()
@database_url_option
@click.pass_context
@_fail_cleanly
def demo(ctx: click.Context, database_url: str | None) -> None:
    """Start the embedded server, migrate, and show what exists and how isolation holds."""
    from .demo import run_demo

    run_demo(console, database_url=database_url, data_dir=ctx.obj["data_dir"])


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


def main() -> None:
    cli(prog_name="rtv-db")


if __name__ == "__main__":
    main()
