"""``rtv-db demo``: start the server, migrate, seed, and show tenant isolation live.

Every step prints a small terminal table (readable at 80 columns): what exists, what each
tenant sees for the same query, cross-tenant writes being refused, the audit trail of what the
demo just did, and the ``verify`` report.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Connection, text

from .catalog import list_roles, list_tables
from .config import Settings, redact_url
from .connection import Database
from .errors import RtvDbError
from .migrate import migrate
from .schema import brand_kits, platform_actions
from .seed import DEMO_TENANTS, seed_demo
from .seed.demo_data import DATASET, DemoTenant, demo_embedding
from .targets import resolve_target
from .tenant import with_tenant_scope
from .verify import render_report, verify

__all__ = ["run_demo", "DEMO_TENANTS"]

_TABLES = ("clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions")


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def _short(value: object, width: int = 44) -> str:
    s = str(value)
    return s if len(s) <= width else s[: width - 1] + "…"


def _step(console: Console, n: int, title: str) -> None:
    console.print()
    console.rule(f"[bold]{n}. {title}[/]", align="left")


def run_demo(console: Console, *, database_url: str | None = None, data_dir: Path | None = None) -> None:
    """The whole demo; ``database_url`` (an admin URL) instead of the embedded server."""
    settings = Settings.from_env(data_dir=data_dir)
    _step(console, 1, "server")
    with console.status("starting the database server..."):
        target = resolve_target(settings, database_url=database_url)
    console.print(f"{'embedded server' if target.embedded else 'server'}: {redact_url(target.require_admin())}",
                  highlight=False)
    if target.embedded:
        console.print(target.embedded.status().describe(), highlight=False)

    _step(console, 2, "schema")
    with console.status("migrating..."):
        result = migrate(target.require_admin(), settings)
    console.print(f"revision {result.after}" + (" (migrated now)" if result.changed else " (already up to date)"))
    _show_catalog(console, target.require_admin(), settings)

    _step(console, 3, "seed")
    assert target.system_url is not None  # an admin URL always yields a system URL
    with console.status("seeding the demo dataset through the system scope..."):
        seeded = seed_demo(target.system_url)
    names = ", ".join(f"{t.name} ({t.slug})" for t in seeded.tenants)
    console.print(f"{len(seeded.tenants)} tenants: {names}", highlight=False)
    console.print(f"{seeded.total_inserted} new rows" if seeded.changed else "already seeded: nothing new")

    db = Database(target.runtime_url)
    try:
        _step(console, 4, "isolation: the same query, as each tenant and as nobody")
        _show_isolation(console, db)
        _step(console, 5, "cross-tenant writes")
        correlation_id = _show_writes(console, db)
        _step(console, 6, "audit trail of what just happened")
        _show_audit(console, db, correlation_id)
    finally:
        db.close()

    _step(console, 7, "rtv-db verify")
    with console.status("checking roles, policies, keys, views and functions..."):
        findings = verify(target.require_admin(), runtime_role=settings.runtime_role)
    console.print(render_report(findings))


def _show_catalog(console: Console, admin_url: str, settings: Settings) -> None:
    admin = Database(admin_url, check_role=False)
    try:
        with admin.engine.connect() as conn:
            tables = list_tables(conn)
            roles = list_roles(conn, [settings.owner_role, settings.runtime_role, settings.system_role])
    finally:
        admin.close()
    table = Table(title="tables", title_justify="left")
    for column in ("table", "owner", "tenant", "RLS", "forced", "policies"):
        table.add_column(column)
    for t in tables:
        table.add_row(t.name, t.owner, _yes(t.has_client_id or t.name == "clients"), _yes(t.rls_enabled),
                      _yes(t.rls_forced), str(t.policies))
    console.print(table)
    role_table = Table(title="roles", title_justify="left")
    for column in ("role", "login", "superuser", "bypass RLS", "owns"):
        role_table.add_column(column)
    for r in roles:
        role_table.add_row(r.name, _yes(r.login), _yes(r.superuser), _yes(r.bypassrls), str(r.owns))
    console.print(role_table)


def _tenant(slug: str) -> DemoTenant:
    return next(t for t in DATASET if t.slug == f"demo-{slug}")


def _scope(db: Database, slug: str, **kwargs: Any) -> Any:
    """A tenant scope for a demo tenant, on its first platform account (platform_actions needs one)."""
    tenant = _tenant(slug)
    account = tenant.accounts[0]
    return with_tenant_scope(db, tenant.id, platform_account_id=tenant.account_id(account), lane=account.lanes[0],
                             **kwargs)


def _count(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())  # table names are ours


def _show_isolation(console: Console, db: Database) -> None:
    slugs = list(DEMO_TENANTS)
    contexts: list[tuple[str, Any]] = [(s, _scope(db, s)) for s in slugs] + [("no tenant", None)]

    kits = Table(title="SELECT name FROM brand_kits  (runtime role)", title_justify="left")
    kits.add_column("context")
    kits.add_column("rows seen")
    counts = Table(title="SELECT count(*) FROM <table>", title_justify="left")
    counts.add_column("table")
    for label, _ in contexts:
        counts.add_column(label, justify="right")
    nearest = Table(title="nearest knowledge chunk to 'dark roast espresso' (pgvector)", title_justify="left")
    nearest.add_column("context")
    nearest.add_column("chunk")
    query_vector = str(demo_embedding("dark roast espresso"))

    per_table: dict[str, list[str]] = {t: [] for t in _TABLES}
    for label, scope in contexts:
        if scope is None:
            cm: Any = db.engine.begin()  # no context at all: what a forgotten scope would see
        else:
            cm = scope.scoped_transaction()
        with cm as handle:
            conn = handle if scope is None else handle.connection
            names = conn.execute(text("SELECT name FROM brand_kits ORDER BY name")).scalars().all()
            kits.add_row(label, ", ".join(names) or "[dim](no rows)[/]")
            for t in _TABLES:
                per_table[t].append(str(_count(conn, t)))
            hit = conn.execute(
                text("SELECT content FROM knowledge_chunks ORDER BY embedding <=> CAST(:q AS vector) LIMIT 1"),
                {"q": query_vector},
            ).scalar_one_or_none()
            nearest.add_row(label, _short(hit) if hit else "[dim](no rows)[/]")
    for t, values in per_table.items():
        counts.add_row(t, *values)
    console.print(kits)
    console.print(counts)
    console.print("[dim]platform_actions also needs the platform account and lane in the context: each tenant "
                  "sees the actions of its first account.[/]")
    console.print(nearest)


def _show_writes(console: Console, db: Database) -> str:
    """Try writes across tenants (all refused), make one legitimate write; return its correlation id."""
    acme, globex = _tenant("acme"), _tenant("globex")
    correlation_id = f"demo-{uuid.uuid4()}"
    attempts = Table(title="acme tries to write globex's data", title_justify="left")
    attempts.add_column("attempt", max_width=30)
    attempts.add_column("result")

    try:
        _scope(db, "acme").scoped_insert(brand_kits, {"client_id": globex.id, "name": "sneaky"})
        attempts.add_row("API: insert with globex's client_id", "[red]accepted[/]")
    except RtvDbError as exc:
        attempts.add_row("API: insert with globex's client_id", f"[green]refused[/] by the API: {type(exc).__name__}")

    try:
        with _scope(db, "acme").scoped_transaction() as tx:
            tx.connection.execute(text("INSERT INTO brand_kits (client_id, name) VALUES (:c, 'sneaky')"),
                                  {"c": str(globex.id)})
        attempts.add_row("raw SQL: INSERT ... globex's client_id", "[red]accepted[/]")
    except Exception as exc:  # PostgreSQL's refusal, in its own words
        message = str(getattr(exc, "orig", exc)).splitlines()[0]
        attempts.add_row("raw SQL: INSERT ... globex's client_id", f"[green]refused[/] by PostgreSQL: {_short(message, 60)}")

    globex_kit = next(iter(globex.brand_kits))
    with _scope(db, "acme").scoped_transaction() as tx:
        updated = tx.connection.execute(
            text("UPDATE brand_kits SET name = 'pwned' WHERE name = :n"), {"n": globex_kit}
        ).rowcount
        deleted = tx.connection.execute(text("DELETE FROM brand_kits WHERE client_id = :c"), {"c": str(globex.id)}).rowcount
    attempts.add_row(f"raw SQL: UPDATE globex's '{globex_kit}'",
                     f"[green]{updated} rows updated[/]" if updated == 0 else f"[red]{updated} rows updated[/]")
    attempts.add_row("raw SQL: DELETE globex's brand kits",
                     f"[green]{deleted} rows deleted[/]" if deleted == 0 else f"[red]{deleted} rows deleted[/]")
    console.print(attempts)

    # One legitimate unit of work, so the audit trail has something to show: a new action (the
    # previous run's one is removed, so repeated demos do not pile up rows) and a brand kit edit.
    scope = _scope(db, "acme", user_id="demo-user", correlation_id=correlation_id)
    demo_run = platform_actions.c.payload["demo_run"].as_boolean().is_(True)
    with scope.scoped_transaction() as tx:
        removed = len(tx.scoped_delete(platform_actions, demo_run))
        tx.scoped_insert(platform_actions, {"kind": "publish_post", "status": "pending",
                                            "payload": {"text": "Fresh roast today!", "demo_run": True}})
        kit = brand_kits.c.name == acme.brand_kits[0]
        (current,) = tx.scoped_query(brand_kits, kit)
        accent = "#D35400" if current.colors.get("accent") != "#D35400" else acme.colors["accent"]
        tx.scoped_update(brand_kits, {"colors": dict(current.colors) | {"accent": accent}}, kit)
    console.print(f"acme, legitimately, in one transaction: {removed} earlier demo action(s) deleted, 1 inserted, "
                  f"brand kit accent set to {accent} (correlation id [cyan]{correlation_id}[/])", highlight=False)
    return correlation_id


# Column names an audit table may use, in order of preference, per thing shown (the fallback
# reader, for a build whose rtv_db.audit module is missing or different).
_AUDIT_COLUMNS: dict[str, Sequence[str]] = {
    "time": ("occurred_at", "created_at", "at", "event_time"),
    "action": ("action", "operation", "op"),
    "table": ("table_name", "resource_type", "relation"),
    "row": ("row_id", "row_key", "resource_id", "record_id"),
    "columns": ("changed_columns", "columns", "changed"),
    "user": ("user_id",),
}


def _audit_via_api(scope: Any, correlation_id: str) -> list[dict[str, Any]] | None:
    """The events through rtv_db.audit.read_audit_trail, or None when this build has no such API."""
    try:
        from .audit import read_audit_trail  # type: ignore[attr-defined]

        page = read_audit_trail(scope, correlation_id=correlation_id, limit=50)
    except (ImportError, AttributeError, TypeError):
        return None
    return [{"time": e.occurred_at, "action": e.action, "table": e.table_name, "row": e.row_id,
             "columns": e.changed_columns, "user": e.user_id} for e in reversed(page.events)]


def _audit_via_sql(scope: Any, correlation_id: str) -> list[dict[str, Any]] | None:
    """The events read with plain SQL on the tenant's transaction, or None without an audit table."""
    with scope.scoped_transaction() as tx:
        conn = tx.connection
        if not conn.execute(text("SELECT to_regclass('public.audit_events') IS NOT NULL")).scalar_one():
            return None
        present = set(conn.execute(text(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.audit_events'::regclass "
            "AND attnum > 0 AND NOT attisdropped")).scalars())
        shown = {k: next(c for c in names if c in present) for k, names in _AUDIT_COLUMNS.items()
                 if any(c in present for c in names)}
        if "correlation_id" not in present or not shown:
            return None
        order = f'"{shown["time"]}"' if "time" in shown else "1"
        select = ", ".join(f'"{c}"' for c in shown.values())  # names from the catalog, quoted
        rows = conn.execute(text(f"SELECT {select} FROM audit_events WHERE correlation_id = :c ORDER BY {order}"),
                            {"c": correlation_id}).all()
    return [dict(zip(shown, row)) for row in rows]


def _read_audit(scope: Any, correlation_id: str) -> list[dict[str, Any]] | None:
    events = _audit_via_api(scope, correlation_id)
    return events if events is not None else _audit_via_sql(scope, correlation_id)


def _show_audit(console: Console, db: Database, correlation_id: str) -> None:
    """The audit events of the demo's write, read as acme (and as globex: none)."""
    events = _read_audit(_scope(db, "acme"), correlation_id)
    if events is None:
        console.print("[yellow]no audit trail in this build[/] (the audit_events migration is not "
                      "applied); nothing else in the demo depends on it.")
        return
    table = Table(title="acme's audit trail for the demo's correlation id", title_justify="left")
    keys = list(events[0]) if events else ["time", "action", "table", "row", "columns", "user"]
    for key in keys:
        table.add_column(key, no_wrap=key in ("time", "action", "table", "row"))
    for event in events:
        table.add_row(*[_fmt(event[k], k) for k in keys])
    console.print(table if events else "[yellow]no audit events recorded for the demo's write[/]")
    seen = _read_audit(_scope(db, "globex"), correlation_id) or []
    console.print(f"the same read as globex: {len(seen)} events (acme's trail is acme's alone). The refused "
                  "attempts left no events: they rolled back.")


def _fmt(value: object, key: str = "") -> str:
    if key == "columns" and value is None:
        return "[dim](whole row)[/]"
    if key == "row" and value is not None:
        return str(value)[:8] + "…"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if hasattr(value, "strftime"):
        return value.strftime("%H:%M:%S")  # type: ignore[no-any-return]
    return "" if value is None else str(value)
