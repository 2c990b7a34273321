"""Workload 5: throughput of N workers (threads, or asyncio tasks), each on its own tenant,
sharing a pool of 10 connections: rtv-db's scoped point read against a hand-written pool of 10
psycopg connections running the baseline transaction."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from rtv_db import AsyncDatabase, Database, EngineOptions, brand_kits, with_tenant_scope
from rtv_db.config import to_libpq_url

from .variants import POINT_SQL, Op

__all__ = ["run_threads", "run_asyncio"]


def _timed_threads(workers: int, duration: float, warmup: float, body: Callable[[int, int], None]) -> float:
    """Ops per second of ``workers`` threads calling ``body(worker, i)`` for ``duration`` seconds."""
    counts = [0] * workers
    phase = {"measuring": False, "stop": False}
    errors: list[BaseException] = []

    def loop(w: int) -> None:
        i = 0
        try:
            while not phase["stop"]:
                body(w, i)
                i += 1
                if phase["measuring"]:
                    counts[w] += 1
        except BaseException as exc:  # surfaced below: a failing variant must not look fast
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    phase["measuring"] = True
    started = time.perf_counter()
    time.sleep(duration)
    total = sum(counts)
    elapsed = time.perf_counter() - started
    phase["stop"] = True
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return total / elapsed


def run_threads(variant: str, runtime_url: str, system_url: str, ops_by_worker: list[list[Op]],
                duration: float, warmup: float, pool: int) -> float:
    workers = len(ops_by_worker)
    if variant == "baseline":
        conns: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
        for _ in range(pool):
            conns.put(psycopg.connect(to_libpq_url(system_url)))

        def body(w: int, i: int) -> None:
            op = ops_by_worker[w][i % len(ops_by_worker[w])]
            conn = conns.get()
            try:
                row = conn.execute(POINT_SQL, (op.tenant, op.row)).fetchone()
                conn.commit()
            finally:
                conns.put(conn)
            assert row is not None and row[0] == op.tenant

        try:
            return _timed_threads(workers, duration, warmup, body)
        finally:
            while not conns.empty():
                conns.get().close()
    db = Database(runtime_url, options=EngineOptions(pool_size=pool, max_overflow=0, pool_timeout=60))

    def scoped(w: int, i: int) -> None:
        op = ops_by_worker[w][i % len(ops_by_worker[w])]
        row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
        assert row is not None and row.client_id == op.tenant

    try:
        return _timed_threads(workers, duration, warmup, scoped)
    finally:
        db.close()


async def _timed_tasks(workers: int, duration: float, warmup: float, body: Callable[[int, int], Any]) -> float:
    counts = [0] * workers
    phase = {"measuring": False, "stop": False}

    async def loop(w: int) -> None:
        i = 0
        while not phase["stop"]:
            await body(w, i)
            i += 1
            if phase["measuring"]:
                counts[w] += 1

    tasks = [asyncio.create_task(loop(w)) for w in range(workers)]
    await asyncio.sleep(warmup)
    phase["measuring"] = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    total = sum(counts)
    elapsed = time.perf_counter() - started
    phase["stop"] = True
    await asyncio.gather(*tasks)  # re-raises a failing worker's error
    return total / elapsed


async def _asyncio(variant: str, runtime_url: str, system_url: str, ops_by_worker: list[list[Op]],
                   duration: float, warmup: float, pool: int) -> float:
    workers = len(ops_by_worker)
    if variant == "baseline":
        conns: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        for _ in range(pool):
            conns.put_nowait(await psycopg.AsyncConnection.connect(to_libpq_url(system_url)))

        async def body(w: int, i: int) -> None:
            op = ops_by_worker[w][i % len(ops_by_worker[w])]
            conn = await conns.get()
            try:
                cur = await conn.execute(POINT_SQL, (op.tenant, op.row))
                row = await cur.fetchone()
                await conn.commit()
            finally:
                conns.put_nowait(conn)
            assert row is not None and row[0] == op.tenant

        try:
            return await _timed_tasks(workers, duration, warmup, body)
        finally:
            while not conns.empty():
                await conns.get_nowait().close()
    db = AsyncDatabase(runtime_url, options=EngineOptions(pool_size=pool, max_overflow=0, pool_timeout=60))

    async def scoped(w: int, i: int) -> None:
        op = ops_by_worker[w][i % len(ops_by_worker[w])]
        row = await with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
        assert row is not None and row.client_id == op.tenant

    try:
        return await _timed_tasks(workers, duration, warmup, scoped)
    finally:
        await db.close()


def run_asyncio(variant: str, runtime_url: str, system_url: str, ops_by_worker: list[list[Op]],
                duration: float, warmup: float, pool: int) -> float:
    return asyncio.run(_asyncio(variant, runtime_url, system_url, ops_by_worker, duration, warmup, pool))
