"""Running every workload and collecting the results (``python -m bench``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from rich.console import Console

from . import async_variants, concurrency, latency, peer_isolation, peers, server_time
from .env import BenchServer, Dataset, machine_info
from .harness import interleave
from .plans import collect_plans
from .variants import Op, Variants, context_switch, make_ops, point_read, tenant_list, writes
from .wire import WireCounter, count_per_op

__all__ = ["Sizes", "FULL", "SMOKE", "run_all"]


@dataclass(frozen=True)
class Sizes:
    """Every size the run uses; FULL and SMOKE below."""

    name: str
    tenants: int  # workloads 1, 2, 4, 5, 6: tenants x rows brand kits
    rows: int
    list_limit: int
    scale_tenants: tuple[int, ...]  # workload 3, at scale_rows rows per tenant
    scale_rows: int
    rounds: int  # interleaved rounds per workload
    batch: int  # operations per variant per round
    warmup: int
    scale_rounds: int
    workers: tuple[int, ...]
    pool: int
    duration: float  # seconds per concurrency measurement
    conc_reps: int
    wire_ops: int
    server_calls: int  # scoped_get calls counted in pg_stat_user_functions
    explain_reps: int


FULL = Sizes("full", tenants=1000, rows=1000, list_limit=100, scale_tenants=(10, 100, 1000, 10000), scale_rows=100,
             rounds=150, batch=20, warmup=200, scale_rounds=60, workers=(1, 4, 16, 64), pool=10, duration=3.0,
             conc_reps=2, wire_ops=20, server_calls=500, explain_reps=50)
SMOKE = Sizes("smoke", tenants=20, rows=30, list_limit=20, scale_tenants=(5, 20), scale_rows=20,
              rounds=3, batch=10, warmup=10, scale_rounds=2, workers=(1, 4), pool=2, duration=0.3,
              conc_reps=1, wire_ops=8, server_calls=20, explain_reps=3)


@dataclass
class Results:
    sizes: dict[str, Any]
    machine: dict[str, Any]
    server: dict[str, Any]
    started_at: str
    seconds: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)
    workloads: dict[str, Any] = field(default_factory=dict)
    plans: list[Any] = field(default_factory=list)
    peers: dict[str, Any] = field(default_factory=dict)
    latency_model: dict[str, Any] = field(default_factory=dict)
    async_sync: dict[str, Any] = field(default_factory=dict)
    server_time: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _stats(result: dict[str, Any]) -> dict[str, Any]:
    return {name: s.as_dict() for name, s in result.items()}


def _time(factory: Callable[[], Variants], sizes: Sizes, *, rounds: int | None = None, baseline: str | None = "baseline") -> dict[str, Any]:
    v = factory()
    try:
        return _stats(interleave(v.fns, rounds=rounds or sizes.rounds, batch=sizes.batch, warmup=sizes.warmup, baseline=baseline))
    finally:
        v.close()


def _wire(server: BenchServer, ds: Dataset, factory: Callable[[str, str], Variants], n: int) -> dict[str, Any]:
    """Round trips and statements per operation of each variant, counted on the wire."""
    assert ds.target.system_url is not None
    counter = WireCounter(ds.target.runtime_url)
    return _counted(counter, lambda: factory(counter.proxied_url(ds.target.runtime_url), counter.proxied_url(ds.target.system_url)), n)


def run_all(sizes: Sizes, *, database_url: str | None = None, console: Console | None = None,
            progress: bool = True) -> Results:
    console = console or Console(stderr=True)
    started = time.perf_counter()
    server = BenchServer(database_url, progress=progress)
    try:
        res = Results(sizes=asdict(sizes), machine=machine_info(),
                      server={"version": server.server_version(), "embedded": database_url is None,
                              "settings": server.settings_of_interest()},
                      started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        _run(server, sizes, res, console)
        res.seconds = round(time.perf_counter() - started, 1)
        return res
    finally:
        server.close()


def _run(server: BenchServer, sizes: Sizes, res: Results, console: Console) -> None:
    say = lambda msg: console.print(f"[bold]bench[/] {msg}", highlight=False)  # noqa: E731
    T, R, L = sizes.tenants, sizes.rows, sizes.list_limit

    say(f"loading {T} tenants x {R} rows")
    main = server.create("main")
    load = server.load(main, T, R)
    res.load = {"tenants": T, "rows_per_tenant": R, "rows": load.rows, "total_rows": load.total_rows,
                "seconds": round(load.seconds, 2), "rows_per_second": round(load.rows_per_second),
                "audit_triggers": server.has_table(main, "audit_events")}
    rt, st = main.target.runtime_url, main.target.system_url
    assert st is not None
    n_ops = sizes.rounds * sizes.batch + sizes.warmup + 50
    ops = make_ops(n_ops, T, R)

    # Workloads 1 and 2 compare the signed context (as shipped) with the unsigned one, interleaved
    # on the same data: the database is in unsigned mode meanwhile, which accepts both setters
    # and verifies a signed token exactly as signed mode does (the mode is read only without one).
    server.set_context_mode(main, "unsigned")
    try:
        say("workload 1: point read by id (signed and unsigned context)")
        res.workloads["point_read"] = {
            "sizes": {"tenants": T, "rows_per_tenant": R},
            "latency": _time(lambda: point_read(rt, st, ops), sizes),
            "wire": _wire(server, main, lambda r, s: point_read(r, s, ops), sizes.wire_ops),
        }

        say("workload 2: tenant-scoped list")
        res.workloads["tenant_list"] = {
            "sizes": {"tenants": T, "rows_per_tenant": R, "limit": L},
            "latency": _time(lambda: tenant_list(rt, st, ops, L), sizes),
            "wire": _wire(server, main, lambda r, s: tenant_list(r, s, ops, L), sizes.wire_ops),
        }
    finally:
        server.set_context_mode(main, "signed")

    say("workload 4: context switching on one pooled connection")
    k = min(100, T)
    patterns = {
        "same_tenant": make_ops(n_ops, T, R, seed=11, tenant_of=lambda i: 0),
        "alternating_2": make_ops(n_ops, T, R, seed=12, tenant_of=lambda i: i % 2),
        f"rotating_{k}": make_ops(n_ops, T, R, seed=13, tenant_of=lambda i: i % k),
    }
    res.workloads["context_switch"] = {
        "sizes": {"pool_size": 1, "tenants_rotated": k},
        "latency": _time(lambda: context_switch(rt, st, patterns), sizes, baseline="same_tenant"),
        "wire": _wire(server, main, lambda r, s: context_switch(r, s, {"alternating_2": patterns["alternating_2"]}), sizes.wire_ops),
    }

    say("workload 5: concurrency")
    res.workloads["concurrency"] = _concurrency(sizes, rt, st)

    say("workload 6: writes")
    res.workloads["writes"] = _writes(server, main, sizes, ops)

    say("peers: sqlalchemy-tenants and rls, ORM get and list")
    res.peers = _peers(server, main, sizes, ops)

    res.latency_model = latency.model(res.workloads)

    say("async and sync side by side")
    res.async_sync = async_variants.run(rt, st, ops, L, sizes)

    say("server time of RLS + context (pg_stat_user_functions, EXPLAIN ANALYZE)")
    res.server_time = server_time.measure(server.url_for(main.name), main.name, rt, st, ops, sizes.server_calls, sizes.explain_reps)

    say("EXPLAIN plans")
    plans = collect_plans(rt, st, ops[0], L)
    res.plans = plans  # type: ignore[assignment]

    say("workload 3: scale in tenants")
    res.workloads["scale"] = _scale(server, sizes, say)


def _peers(server: BenchServer, ds: Dataset, sizes: Sizes, ops: list[Op]) -> dict[str, Any]:
    missing = peers.available()
    if missing:
        return {"skipped": missing}
    from rtv_db.seed.synthetic import synthetic_tenant_id

    tenants = [synthetic_tenant_id(t) for t in range(sizes.tenants)]
    rt, st = ds.target.runtime_url, ds.target.system_url
    assert st is not None
    setup_started = time.perf_counter()
    p = peers.setup(server, ds, tenants)
    out: dict[str, Any] = {"setup_seconds": round(time.perf_counter() - setup_started, 1)}
    for key, limit in (("get", None), ("list", sizes.list_limit)):
        counter = WireCounter(rt)
        out[key] = {
            "latency": _time(lambda: peers.variants(p, rt, st, ops, limit), sizes),
            "wire": _counted(counter, lambda: peers.variants(p, rt, st, ops, limit, url=counter.proxied_url), sizes.wire_ops),
        }
    out["isolation"] = peer_isolation.check(p, tenants)
    return out


def _counted(counter: WireCounter, factory: Callable[[], Variants], n: int) -> dict[str, Any]:
    v = factory()
    try:
        return count_per_op(counter, v.fns, n)
    finally:
        v.close()
        counter.close()


def _concurrency(sizes: Sizes, rt: str, st: str) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": {"pool": sizes.pool, "workers": list(sizes.workers), "seconds_per_run": sizes.duration,
                                     "reps": sizes.conc_reps}, "throughput": {}}
    for mode, runner in (("threads", concurrency.run_threads), ("asyncio", concurrency.run_asyncio)):
        rows = []
        for workers in sizes.workers:
            tput: dict[str, list[float]] = {"baseline": [], "core": []}
            for rep in range(sizes.conc_reps):
                order = ("baseline", "core") if rep % 2 == 0 else ("core", "baseline")
                for variant in order:
                    # Worker w works on tenant w only (each worker a different tenant).
                    per_worker = [make_ops(200, sizes.tenants, sizes.rows, seed=100 + w,
                                           tenant_of=lambda i, w=w: w % sizes.tenants) for w in range(workers)]
                    tput[variant].append(runner(variant, rt, st, per_worker, sizes.duration, min(0.5, sizes.duration), sizes.pool))
            b, c = sorted(tput["baseline"])[len(tput["baseline"]) // 2], sorted(tput["core"])[len(tput["core"]) // 2]
            rows.append({"workers": workers, "baseline_ops_s": round(b, 1), "core_ops_s": round(c, 1),
                         "ratio": round(c / b, 3) if b else None})
        out["throughput"][mode] = rows
    return out


def _writes(server: BenchServer, ds: Dataset, sizes: Sizes, ops: list[Op]) -> dict[str, Any]:
    rt, st = ds.target.runtime_url, ds.target.system_url
    assert st is not None
    audit = server.has_table(ds, "audit_events")
    out: dict[str, Any] = {"audit_trail_present": audit}
    run_tag = uuid.uuid4().hex[:6]
    out["latency"] = _time(lambda: writes(rt, st, ops, tag=f"{run_tag}a"), sizes)
    out["wire"] = _wire(server, ds, lambda r, s: writes(r, s, ops, tag=f"{run_tag}w"), sizes.wire_ops)
    if audit:
        # The audit's own cost: the same inserts with brand_kits' audit trigger disabled,
        # interleaved round by round with the audited ones.
        from .harness import summarize

        samples: dict[str, list[float]] = {"baseline_audit": [], "core_audit": [], "baseline_no_audit": [], "core_no_audit": []}
        v = writes(rt, st, ops, tag=f"{run_tag}x")
        try:
            for i in range(sizes.warmup):
                v.fns["baseline"](i), v.fns["core"](i)
            op = 0
            for r in range(sizes.rounds):
                for enabled in ((True, False) if r % 2 == 0 else (False, True)):
                    server.set_audit(ds, enabled, ("brand_kits",))
                    suffix = "audit" if enabled else "no_audit"
                    for name in ("baseline", "core"):
                        for i in range(sizes.batch):
                            t0 = time.perf_counter()
                            v.fns[name](op + i)
                            samples[f"{name}_{suffix}"].append(time.perf_counter() - t0)
                op += sizes.batch
        finally:
            server.set_audit(ds, True, ("brand_kits",))
            v.close()
        out["audit_cost"] = _stats(summarize(samples, "baseline_no_audit"))
    return out


def _scale(server: BenchServer, sizes: Sizes, say: Callable[[str], None]) -> dict[str, Any]:
    ds = server.create("scale")
    server.set_context_mode(ds, "unsigned")  # rls_query_only and the *_unsigned variants, as in workloads 1-2
    points = []
    for n in sizes.scale_tenants:
        say(f"  scale: {n} tenants x {sizes.scale_rows} rows")
        server.load(ds, n - ds.tenants, sizes.scale_rows)
        n_ops = sizes.scale_rounds * sizes.batch + sizes.warmup + 10
        ops = make_ops(n_ops, n, sizes.scale_rows, seed=n)
        rt, st = ds.target.runtime_url, ds.target.system_url
        assert st is not None
        limit = min(sizes.list_limit, sizes.scale_rows)
        point = _time(lambda: point_read(rt, st, ops, with_orm=False, with_no_ping=False), sizes, rounds=sizes.scale_rounds)
        listing = _time(lambda: tenant_list(rt, st, ops, limit), sizes, rounds=sizes.scale_rounds)
        points.append({"tenants": n, "rows_per_tenant": sizes.scale_rows, "total_brand_kits": n * sizes.scale_rows,
                       "load_seconds": round(ds.loads[-1].seconds, 2), "point_read": point, "tenant_list": listing})
    flat: dict[str, Any] = {}
    first, last = points[0], points[-1]
    for workload in ("point_read", "tenant_list"):
        for variant in last[workload]:
            flat[f"{workload}.{variant}"] = round(last[workload][variant]["median_us"] / first[workload][variant]["median_us"], 3)
    return {"points": points, "growth_smallest_to_largest": flat}
