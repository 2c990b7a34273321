"""Async against sync: the point read and the 100-row list, each through asyncio and through the
sync API, interleaved in ONE run inside one event loop (the sync variants block the loop, as they
would in a sync program; the async ones await), so each API's ratio to its own hand-written
baseline comes from the same rounds:

* ``baseline`` / ``async_baseline``: hand-written psycopg (``Connection`` / ``AsyncConnection``),
  system role (BYPASSRLS), one held connection: B0 and its asyncio twin;
* ``sqlalchemy_core_once`` / ``async_sqlalchemy_core_once``: plain SQLAlchemy Core (``engine.begin()``
  / ``async with engine.begin()``), statement built once, system role, rtv-db's pool settings;
* ``core`` / ``async_core``: ``with_tenant_scope(Database | AsyncDatabase, t).scoped_get`` /
  ``scoped_query``, signed.

Reported per workload: the ratio of each to its baseline, and ``async_core`` ratio / ``core`` ratio
(issue 13: within 10%).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import create_async_engine

from rtv_db import AsyncDatabase, EngineOptions, brand_kits, with_tenant_scope
from rtv_db.config import to_libpq_url, to_sqlalchemy_url

from .harness import summarize
from .variants import LIST_SQL, POINT_SQL, Op, Variants, point_read, tenant_list

__all__ = ["run", "markdown"]

_SYNC = ("baseline", "sqlalchemy_core_once", "core")


async def _interleave(fns: dict[str, Callable[[int], Any]], *, rounds: int, batch: int, warmup: int) -> dict[str, list[float]]:
    """bench/harness.py's interleave, awaiting the variants that return an awaitable."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            out = fns[name](i)
            if inspect.isawaitable(out):
                await out
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock, op = time.perf_counter, 0
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, out_list = fns[name], samples[name]
            for i in range(batch):
                start = clock()
                res = fn(op + i)
                if inspect.isawaitable(res):
                    await res
                out_list.append(clock() - start)
        op += batch
    return samples


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"benchmark variant returned a wrong answer: {what}")


async def _async_variants(runtime_url: str, system_url: str, ops: list[Op], limit: int | None,
                          closers: list[Callable[[], Any]]) -> dict[str, Callable[[int], Any]]:
    """The three async variants of the point read (``limit`` None) or of the list."""
    conn = await psycopg.AsyncConnection.connect(to_libpq_url(system_url))
    closers.append(conn.close)
    engine = create_async_engine(to_sqlalchemy_url(system_url), **EngineOptions().engine_kwargs())
    closers.append(engine.dispose)
    db = AsyncDatabase(runtime_url)
    closers.append(db.close)
    if limit is None:
        stmt = select(brand_kits).where(brand_kits.c.client_id == bindparam("t"), brand_kits.c.id == bindparam("r")).limit(1)

        async def async_baseline(i: int) -> None:
            op = ops[i]
            rows = await (await conn.execute(POINT_SQL, (op.tenant, op.row))).fetchall()
            await conn.commit()
            _check(len(rows) == 1 and rows[0][0] == op.tenant, "async_baseline point read")

        async def async_sqlalchemy_core_once(i: int) -> None:
            op = ops[i]
            async with engine.begin() as c:
                row = (await c.execute(stmt, {"t": op.tenant, "r": op.row})).first()
            _check(row is not None and row.client_id == op.tenant, "async_sqlalchemy_core_once point read")

        async def async_core(i: int) -> None:
            op = ops[i]
            row = await with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant, "async_core point read")
    else:
        stmt = select(brand_kits).where(brand_kits.c.client_id == bindparam("t")).order_by(brand_kits.c.id).limit(limit)

        async def async_baseline(i: int) -> None:
            op = ops[i]
            rows = await (await conn.execute(LIST_SQL, (op.tenant, limit))).fetchall()
            await conn.commit()
            _check(len(rows) == limit and rows[0][0] == op.tenant, "async_baseline list")

        async def async_sqlalchemy_core_once(i: int) -> None:
            op = ops[i]
            async with engine.begin() as c:
                rows = (await c.execute(stmt, {"t": op.tenant})).all()
            _check(len(rows) == limit and rows[0].client_id == op.tenant, "async_sqlalchemy_core_once list")

        async def async_core(i: int) -> None:
            op = ops[i]
            rows = await with_tenant_scope(db, op.tenant).scoped_query(brand_kits, order_by=[brand_kits.c.id], limit=limit)
            _check(len(rows) == limit and rows[0].client_id == op.tenant, "async_core list")

    return {"async_baseline": async_baseline, "async_sqlalchemy_core_once": async_sqlalchemy_core_once, "async_core": async_core}


async def _one(runtime_url: str, system_url: str, ops: list[Op], limit: int | None, sizes: Any) -> dict[str, Any]:
    sync: Variants = (point_read(runtime_url, system_url, ops, with_orm=False, with_no_ping=False, unsigned=False)
                      if limit is None else tenant_list(runtime_url, system_url, ops, limit, unsigned=False))
    closers: list[Callable[[], Any]] = []
    try:
        fns = {name: sync.fns[name] for name in _SYNC}
        fns.update(await _async_variants(runtime_url, system_url, ops, limit, closers))
        samples = await _interleave(fns, rounds=sizes.rounds, batch=sizes.batch, warmup=sizes.warmup)
    finally:
        for close in reversed(closers):
            res = close()
            if inspect.isawaitable(res):
                await res
        sync.close()
    stats = {**summarize({k: samples[k] for k in _SYNC}, "baseline"),
             **summarize({k: v for k, v in samples.items() if k.startswith("async_")}, "async_baseline")}
    latency = {k: s.as_dict() for k, s in stats.items()}
    return {"latency": latency,
            "async_over_sync": {name: round(latency[f"async_{name}"]["ratio"] / latency[name]["ratio"], 3)
                                for name in ("sqlalchemy_core_once", "core")}}


def run(runtime_url: str, system_url: str, ops: list[Op], limit: int, sizes: Any) -> dict[str, Any]:
    """Both workloads, signed context (the database must accept it: either mode does)."""
    async def both() -> dict[str, Any]:
        return {"point_read": await _one(runtime_url, system_url, ops, None, sizes),
                "tenant_list": await _one(runtime_url, system_url, ops, limit, sizes)}

    return asyncio.run(both())


def markdown(a: dict[str, Any]) -> list[str]:
    out = ["## Async and sync side by side", "",
           "The point read and the 100-row list through the sync API and through asyncio, all six variants interleaved "
           "in one run inside one event loop. Ratio = variant / its own API's hand-written psycopg baseline (B0 for sync, "
           "`psycopg.AsyncConnection` for async); the last column is the async ratio / the sync ratio (issue 13: "
           "within 10%, i.e. ≤ 1.10).", "",
           "| workload | variant | sync median µs | sync ratio | async median µs | async ratio | async / sync ratio |",
           "|---|---|---:|---:|---:|---:|---:|"]
    labels = {"baseline": "hand-written psycopg", "sqlalchemy_core_once": "plain SQLAlchemy Core, statement built once",
              "core": "rtv-db Core scope (signed)"}
    for key, title in (("point_read", "point read"), ("tenant_list", "list 100")):
        lat = a[key]["latency"]
        for name in _SYNC:
            s, x = lat[name], lat[f"async_{name}"]
            rel = a[key]["async_over_sync"].get(name)
            out.append(f"| {title} | {labels[name]} | {s['median_us']:.1f} | {s['ratio']:.3f} | {x['median_us']:.1f} | "
                       f"{x['ratio']:.3f} | {'-' if rel is None else f'{rel:.3f}'} |")
    return out
