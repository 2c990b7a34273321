"""Server time of RLS and the tenant context for a scoped point read (issue 13, item 2's target:
at most a third of the ~360 µs measured before it).

Two sources, both on the bench's own database (nothing is changed on the server itself):

* ``pg_stat_user_functions``, with ``track_functions = 'all'`` set on the bench database
  (``ALTER DATABASE ... SET``, so only its new connections track): ``n`` scoped_get calls through
  a fresh ``Database`` (signed, as shipped), the engine disposed so every backend flushes its
  counters, then the difference of each function's ``calls``, ``self_time`` and ``total_time``,
  per scoped_get. Tracking itself adds a little time to every call, so these are upper bounds.
* ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` of the point read, as the runtime role with the
  signed context set (RLS, the policies' readers in an InitPlan) and as the system role (no RLS):
  the median planning and execution time over ``reps`` runs. rtv-db prepares nothing, so every
  call is planned: planning time is part of the per-call cost.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import psycopg
from psycopg import sql

from rtv_db import Database, brand_kits, with_tenant_scope
from rtv_db.config import to_libpq_url

from .variants import COLUMNS, Op, context_statement

__all__ = ["measure", "markdown"]

_STATS_SQL = ("SELECT schemaname || '.' || funcname, calls, self_time, total_time FROM pg_stat_user_functions")


def _group(name: str) -> str:
    short = name.split(".", 1)[-1]
    if short == "clean_session":
        return "clean session"
    if short.startswith(("set_signed_context", "set_tenant_context", "verify_token", "hmac_pad", "context_refusal")):
        return "context setter"
    if short.startswith(("current_", "verified_context", "to_uuid_or_null", "context_mode", "get_current_tenant")):
        return "readers"
    return "other"


def _function_stats(admin_url: str) -> dict[str, tuple[int, float, float]]:
    with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(_STATS_SQL).fetchall()}


def _functions(admin_url: str, runtime_url: str, ops: list[Op], n: int) -> dict[str, Any]:
    before = _function_stats(admin_url)
    db = Database(runtime_url)
    try:
        for op in ops[:n]:
            row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
            assert row is not None and row.client_id == op.tenant
    finally:
        db.close()  # the backends exit and flush their counters
    after: dict[str, tuple[int, float, float]] = {}
    for _ in range(50):  # a backend flushes as it exits, which the client does not wait for
        time.sleep(0.1)
        after = _function_stats(admin_url)
        if _delta_calls(before, after, "rtv.clean_session") >= n:
            time.sleep(0.2)
            after = _function_stats(admin_url)
            break
    rows = []
    for name, (calls, self_ms, total_ms) in sorted(after.items()):
        c0, s0, t0 = before.get(name, (0, 0.0, 0.0))
        if calls - c0 <= 0:
            continue
        rows.append({"function": name, "group": _group(name), "calls_per_get": round((calls - c0) / n, 2),
                     "self_us_per_get": round((self_ms - s0) * 1000 / n, 2), "total_us_per_get": round((total_ms - t0) * 1000 / n, 2)})
    groups: dict[str, float] = {}
    for r in rows:
        groups[r["group"]] = round(groups.get(r["group"], 0.0) + r["self_us_per_get"], 2)
    return {"n": n, "functions": rows, "self_us_by_group": groups, "self_us_total": round(sum(groups.values()), 2)}


def _delta_calls(before: dict[str, Any], after: dict[str, Any], name: str) -> int:
    return after.get(name, (0,))[0] - before.get(name, (0,))[0]


def _explain_times(url: str, query: sql.Composed, ops: list[Op], reps: int, with_context: bool) -> dict[str, Any]:
    planning, execution = [], []
    with psycopg.connect(to_libpq_url(url)) as conn:
        for op in ops[:reps]:
            if with_context:
                conn.execute(*context_statement(conn, op.tenant))
            q = query.format(sql.Literal(str(op.tenant)), sql.Literal(str(op.row)))
            plan = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + q).fetchone()[0][0]  # type: ignore[index]
            conn.rollback()
            planning.append(plan["Planning Time"] * 1000)
            execution.append(plan["Execution Time"] * 1000)
    return {"reps": len(planning), "planning_us": round(statistics.median(planning), 1),
            "execution_us": round(statistics.median(execution), 1)}


def measure(admin_url: str, database: str, runtime_url: str, system_url: str, ops: list[Op], n: int, reps: int) -> dict[str, Any]:
    """``admin_url``: a superuser URL of the bench database ``database`` (which it alters)."""
    with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET track_functions = 'all'").format(sql.Identifier(database)))
    try:
        functions = _functions(admin_url, runtime_url, ops, n)
    finally:
        with psycopg.connect(to_libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET track_functions").format(sql.Identifier(database)))
    point = sql.SQL("SELECT " + COLUMNS + " FROM brand_kits WHERE client_id = {}::uuid AND id = {}::uuid")
    return {
        "functions": functions,
        "explain": {"rls_signed": _explain_times(runtime_url, point, ops, reps, True),
                    "baseline": _explain_times(system_url, point, ops, reps, False)},
    }


def markdown(s: dict[str, Any]) -> list[str]:
    f, e = s["functions"], s["explain"]
    out = ["## Server time of RLS and the context, per point read", "",
           f"From `pg_stat_user_functions` (`track_functions = 'all'` on the bench database only) over {f['n']} "
           "`scoped_get` calls (signed, as shipped), per call; self time excludes the functions it calls. "
           "Tracking adds its own overhead to each call, so these are upper bounds.", "",
           "| function | group | calls per get | self µs per get | total µs per get |", "|---|---|---:|---:|---:|"]
    for r in f["functions"]:
        out.append(f"| `{r['function']}` | {r['group']} | {r['calls_per_get']:g} | {r['self_us_per_get']:.1f} | {r['total_us_per_get']:.1f} |")
    out += ["", "Self time by group, µs per point read: " + ", ".join(f"{g} {v:.1f}" for g, v in f["self_us_by_group"].items())
            + f"; **all functions: {f['self_us_total']:.1f} µs** (issue 13's target: at most a third of about 360 µs, i.e. ≤ 120 µs).", "",
            f"`EXPLAIN (ANALYZE, BUFFERS)` of the point read, median of {e['rls_signed']['reps']} runs (µs):", "",
            "| query | planning | execution | sum |", "|---|---:|---:|---:|"]
    for key, label in (("rls_signed", "runtime role, signed context set: RLS + readers (InitPlan)"),
                       ("baseline", "system role (BYPASSRLS): the baseline's query")):
        x = e[key]
        out.append(f"| {label} | {x['planning_us']:.1f} | {x['execution_us']:.1f} | {x['planning_us'] + x['execution_us']:.1f} |")
    return out
