"""`rtv-db demo` end to end on the test's database: seeded, isolated, refused, audited, verified."""

from __future__ import annotations

import io

from rich.console import Console

from rtv_db.demo import run_demo


def _run(target) -> str:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    run_demo(console, database_url=target.require_admin())
    return out.getvalue()


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start): text.index(end)]


def test_demo_shows_isolation(target, admin_conn):
    text = _run(target)
    assert max(len(line) for line in text.splitlines()) <= 80
    isolation = _section(text, "4. isolation", "5. cross-tenant")
    assert "Acme Holiday, Acme Main" in isolation and "Globex Core, Globex Summer Challenge" in isolation
    no_tenant = [line for line in isolation.splitlines() if "no tenant" in line and "(no rows)" in line]
    assert len(no_tenant) == 2  # brand kits and nearest chunk: nothing without a tenant
    writes = _section(text, "5. cross-tenant", "6. audit")
    assert "accepted" not in writes
    assert "CrossTenantWriteError" in writes and "row-level security" in writes
    assert "0 rows updated" in writes and "0 rows deleted" in writes
    audit = _section(text, "6. audit", "7. rtv-db verify")
    has_audit = admin_conn.execute("SELECT to_regclass('public.audit_events') IS NOT NULL").fetchone()[0]
    if has_audit:
        assert "INSERT" in audit and "UPDATE" in audit and "as globex: 0 events" in audit
    else:
        assert "no audit trail in this build" in audit
    assert "clean: no findings" in text.split("7. rtv-db verify")[1]
    # The cross-tenant attempts changed nothing of globex's.
    names = {r[0] for r in admin_conn.execute(
        "SELECT name FROM brand_kits WHERE client_id = '00000000-0000-4000-8000-00000000b002'")}
    assert names == {"Globex Core", "Globex Summer Challenge"}


def test_demo_twice(target, admin_conn):
    _run(target)
    second = _run(target)
    assert "already seeded: nothing new" in second
    # The demo's own write replaces its previous one instead of piling up.
    count = admin_conn.execute("SELECT count(*) FROM platform_actions WHERE payload ? 'demo_run'").fetchone()[0]
    assert count == 1
