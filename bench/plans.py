"""EXPLAIN (ANALYZE, BUFFERS) of the benchmark's queries, as the runtime role with the tenant
context set (RLS applies) and as the system role (the baseline), written to plans.md.

Each RLS plan is checked: an index on ``client_id`` is used, and the context function runs in an
InitPlan executed once (``loops=1``) rather than once per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from rtv_db.config import to_libpq_url

from .variants import COLUMNS, Op, context_statement

__all__ = ["Plan", "collect_plans", "plans_markdown"]


@dataclass
class Plan:
    title: str
    role: str
    sql: str
    text: str
    index_used: bool
    initplan_once: bool | None  # None where no InitPlan is expected (baseline)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "role": self.role, "sql": self.sql, "index_used": self.index_used,
                "initplan_once": self.initplan_once}


_LOOPS = re.compile(r"loops=(\d+)")


def _initplan_once(text: str) -> bool:
    """Every InitPlan's node ran with loops=1."""
    lines = text.splitlines()
    found = False
    for n, line in enumerate(lines):
        if line.strip().startswith("InitPlan"):
            found = True
            node = next((l for l in lines[n + 1 :] if "->" in l), "")
            loops = _LOOPS.search(node)
            if not loops or loops.group(1) != "1":
                return False
    return found


def _explain(url: str, query: sql.Composed, tenant: Any | None) -> str:
    with psycopg.connect(to_libpq_url(url)) as conn:
        if tenant is not None:
            conn.execute(*context_statement(conn, tenant))  # signed: a token for this backend
        rows = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, SUMMARY OFF) ") + query).fetchall()
        conn.rollback()
    return "\n".join(r[0] for r in rows)


def collect_plans(runtime_url: str, system_url: str, op: Op, limit: int) -> list[Plan]:
    t, r = sql.Literal(str(op.tenant)), sql.Literal(str(op.row))
    cols = sql.SQL(COLUMNS)
    point = sql.SQL("SELECT {} FROM brand_kits WHERE client_id = {}::uuid AND id = {}::uuid").format(cols, t, r)
    listing = sql.SQL("SELECT {} FROM brand_kits WHERE client_id = {}::uuid ORDER BY id LIMIT {}").format(cols, t, sql.Literal(limit))
    policy_only = sql.SQL("SELECT {} FROM brand_kits ORDER BY id LIMIT {}").format(cols, sql.Literal(limit))
    cases = [
        ("1. Point read, RLS + literal predicate", "runtime (rtv_app), context set", runtime_url, point, op.tenant),
        ("1. Point read, baseline (literal predicate only)", "system (rtv_system, BYPASSRLS)", system_url, point, None),
        ("2. Tenant list, RLS + literal predicate", "runtime (rtv_app), context set", runtime_url, listing, op.tenant),
        ("2. Tenant list, baseline (literal predicate only)", "system (rtv_system, BYPASSRLS)", system_url, listing, None),
        ("2b. Tenant list, RLS policy alone (no literal predicate)", "runtime (rtv_app), context set", runtime_url,
         policy_only, op.tenant),
    ]
    plans = []
    with psycopg.connect(to_libpq_url(system_url)) as conn:
        sql_text = {title: query.as_string(conn) for title, _, _, query, _ in cases}
    for title, role, url, query, tenant in cases:
        text = _explain(url, query, tenant)
        # An index led by client_id, walked in order or as a bitmap (without statistics on client_id,
        # revision 0009, a short tenant list may be planned as a bitmap scan and a top-N sort).
        index_used = bool(re.search(r"(Index (Only )?Scan using|Bitmap Index Scan on) brand_kits_(pkey|client_id\w*)", text))
        plans.append(Plan(title, role, sql_text[title], text, index_used, _initplan_once(text) if tenant else None))
    return plans


def plans_markdown(plans: list[Plan], header: str) -> str:
    out = ["# EXPLAIN plans", "", header, ""]
    for p in plans:
        out += [f"## {p.title}", "", f"Role: {p.role}", "", "```sql", p.sql, "```", "", "```", p.text, "```", ""]
        checks = [f"index on client_id used: **{'yes' if p.index_used else 'NO'}**"]
        if p.initplan_once is not None:
            checks.append(f"context function in an InitPlan run once (loops=1): **{'yes' if p.initplan_once else 'NO'}**")
        out += ["- " + c for c in checks] + [""]
    return "\n".join(out)
