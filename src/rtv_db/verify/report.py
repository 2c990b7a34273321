"""Running the checks and reporting them: :func:`verify` (with the Citus checks on a coordinator),
JSON and the rich table of the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import psycopg
from psycopg import Connection

from ..config import to_libpq_url
from ..connection import connect_error
from ._model import CHECKS, Check, Finding, VerifyConfig


# -- running --------------------------------------------------------------------------------------

_SEVERITY_ORDER = {"error": 0, "warning": 1}


def run_checks(conn: Connection, config: VerifyConfig, checks: Iterable[Check] | None = None) -> list[Finding]:
    """Run ``checks`` (default: :data:`CHECKS`) on an open connection; errors first."""
    findings: list[Finding] = []
    for check in list(CHECKS if checks is None else checks):
        findings.extend(check(conn, config))
    return sorted(findings, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.code, f.object))


def verify(
    url: str,
    *,
    runtime_role: str = "rtv_app",
    schema: str = "public",
    checks: Iterable[Check] | None = None,
    config: VerifyConfig | None = None,
) -> list[Finding]:
    """Lint the database at ``url``; an empty list means clean.

    ``url`` may be the admin URL or any role that can read the catalog. Raises
    :class:`~rtv_db.DatabaseConnectionError` when the database cannot be reached.
    """
    config = config or VerifyConfig(runtime_role=runtime_role, schema=schema)
    libpq = to_libpq_url(url)
    try:
        conn = psycopg.connect(libpq, autocommit=True)
    except psycopg.OperationalError as exc:
        raise connect_error(url, exc) from exc
    with conn:
        # Read-only by construction: the linter never changes what it inspects.
        conn.execute("SET default_transaction_read_only = on")
        findings = run_checks(conn, config, checks)
        on_citus = conn.execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus'").fetchone()
    if on_citus and checks is None:
        findings = _with_citus_findings(url, config, findings)
    return findings


def _with_citus_findings(url: str, config: VerifyConfig, findings: list[Finding]) -> list[Finding]:
    """On Citus: add the distribution checks, and drop the findings Citus makes moot."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from .. import citus
    from ..config import to_sqlalchemy_url

    engine = create_engine(to_sqlalchemy_url(url), poolclass=NullPool)
    try:
        with engine.connect() as sa_conn:
            extra = [Finding(**asdict(f)) for f in citus.check_citus(sa_conn, config)]
    finally:
        engine.dispose()
    kept = [f for f in findings if f.code not in citus.SUPERSEDED_VERIFY_CODES]
    return sorted(kept + extra, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.code, f.object))


def findings_to_json(findings: Iterable[Finding]) -> str:
    """The machine-readable report: ``{"clean": bool, "findings": [...]}``."""
    items = [f.to_dict() for f in findings]
    return json.dumps({"clean": not items, "count": len(items), "findings": items}, indent=2)


def render_report(findings: Sequence[Finding], *, title: str = "rtv-db verify") -> Any:
    """A rich renderable of the report (fits 80 columns): one row per finding, why and fix below it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if not findings:
        return Text.assemble(("clean: ", "bold green"), "no findings (RLS, roles, keys, indexes, views, functions)")
    table = Table(title=f"{title}: {len(findings)} finding(s)", title_justify="left", show_lines=True, expand=False)
    table.add_column("code", style="bold", overflow="fold", max_width=26)
    table.add_column("finding", overflow="fold", ratio=1)
    for f in findings:
        colour = "red" if f.severity == "error" else "yellow"
        detail = Text()
        detail.append(f.message + "\n")
        detail.append("why: ", style="bold")
        detail.append(f.why + "\n", style="dim")
        detail.append("fix: ", style="bold")
        detail.append(f.fix, style="cyan")
        table.add_row(Text.assemble((f.code, colour), "\n", (f.severity, colour), "\n", (f.object, "dim")), detail)
    return Group(table)
