"""``rtv-db demo``: the embedded server, the schema, and isolation shown live."""

from __future__ import annotations

import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import text

from .catalog import list_roles, list_tables
from .config import Settings, redact_url
from .connection import Database
from .errors import RtvDbError
from .migrate import migrate
from .schema import brand_kits, clients
from .targets import resolve_target
from .tenant import SystemScope, with_tenant_scope

__all__ = ["run_demo"]

# Fixed ids, so the demo's tenants are the same on every run (and running it twice adds nothing).
DEMO_TENANTS = {
    "acme": uuid.UUID("00000000-0000-4000-8000-00000000a001"),
    "globex": uuid.UUID("00000000-0000-4000-8000-00000000b002"),
}


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def _ensure_demo_tenants(system_url: str) -> None:
    from sqlalchemy.dialects.postgresql import insert

    with SystemScope(system_url, reason="demo: create two demo tenants") as system, system.transaction() as conn:
        for slug, tid in DEMO_TENANTS.items():
            conn.execute(insert(clients).values(id=tid, name=slug.title(), slug=f"demo-{slug}").on_conflict_do_nothing())
            conn.execute(
                insert(brand_kits)
                .values(client_id=tid, name=f"{slug.title()} Main", tone={"voice": "friendly", "personality": []})
                .on_conflict_do_nothing()
            )


def run_demo(console: Console, *, database_url: str | None = None, data_dir: Path | None = None) -> None:
    settings = Settings.from_env(data_dir=data_dir)
    with console.status("starting the database server..."):
        target = resolve_target(settings, database_url=database_url)
    where = "embedded server" if target.embedded else "server"
    console.print(f"[bold]1. {where}[/] {redact_url(target.require_admin())}", highlight=False)
    if target.embedded:
        console.print(f"   {target.embedded.status().describe()}", highlight=False)

    with console.status("migrating..."):
        result = migrate(target.require_admin(), settings)
    console.print(f"[bold]2. schema[/] at revision {result.after}" + (" (migrated now)" if result.changed else " (already up to date)"))

    admin = Database(target.require_admin(), check_role=False)
    try:
        with admin.engine.connect() as conn:
            tables = list_tables(conn)
            roles = list_roles(conn, [settings.owner_role, settings.runtime_role, settings.system_role])
    finally:
        admin.close()

    table = Table(title="tables", title_justify="left")
    for column in ("table", "owner", "client_id", "RLS enabled", "RLS forced", "policies"):
        table.add_column(column)
    for t in tables:
        table.add_row(t.name, t.owner, _yes(t.has_client_id or t.name == "clients"), _yes(t.rls_enabled), _yes(t.rls_forced), str(t.policies))
    console.print(table)

    role_table = Table(title="roles", title_justify="left")
    for column in ("role", "login", "superuser", "bypass RLS", "create role", "owns objects"):
        role_table.add_column(column)
    for r in roles:
        role_table.add_row(r.name, _yes(r.login), _yes(r.superuser), _yes(r.bypassrls), _yes(r.createrole), str(r.owns))
    console.print(role_table)

    if target.system_url is None:
        return
    _ensure_demo_tenants(target.system_url)
    db = Database(target.runtime_url)
    try:
        _show_isolation(console, db)
    finally:
        db.close()


def _show_isolation(console: Console, db: Database) -> None:
    console.print("[bold]3. isolation[/], as the runtime role: the same query, three contexts")
    result = Table(title="SELECT name FROM brand_kits", title_justify="left")
    result.add_column("context")
    result.add_column("rows seen")
    for slug, tid in DEMO_TENANTS.items():
        rows = with_tenant_scope(db, tid).scoped_query(brand_kits)
        result.add_row(f"tenant {slug}", ", ".join(r.name for r in rows) or "(none)")
    with db.engine.connect() as conn:
        raw = conn.execute(text("SELECT name FROM brand_kits")).scalars().all()
    result.add_row("no tenant (raw SQL)", ", ".join(raw) or "(none)")
    console.print(result)

    acme, globex = DEMO_TENANTS["acme"], DEMO_TENANTS["globex"]
    try:
        with_tenant_scope(db, acme).scoped_insert(brand_kits, {"client_id": globex, "name": "sneaky"})
        console.print("   [red]cross-tenant insert was accepted[/]")
    except RtvDbError as exc:
        console.print(f"   cross-tenant insert refused by the API: [yellow]{type(exc).__name__}[/]: {exc}", highlight=False)
    try:
        with db.engine.begin() as conn:
            conn.execute(text("SELECT rtv.set_tenant_context(:t)"), {"t": str(acme)})
            conn.execute(text("INSERT INTO brand_kits (client_id, name) VALUES (:c, 'sneaky')"), {"c": str(globex)})
        console.print("   [red]cross-tenant raw insert was accepted[/]")
    except Exception as exc:  # the database's refusal, shown as PostgreSQL words it
        message = str(getattr(exc, "orig", exc)).splitlines()[0]
        console.print(f"   cross-tenant raw SQL insert refused by PostgreSQL: [yellow]{message}[/]", highlight=False)
