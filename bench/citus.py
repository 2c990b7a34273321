"""Issue 12, item 4: rtv-db's scoped reads through a Citus coordinator against single-node PostgreSQL.

    PYTHONPATH=src:. .venv/bin/python -m bench.citus      # as root (cluster.sh), about 3 minutes

Uses the 3-node cluster of ``../shared/citus/cluster.sh`` (``CITUS_DIR`` overrides; coordinator
127.0.0.1:9700, workers :9701 and :9702, loopback only) and three fresh databases, each dropped
first if an earlier run left it, migrated by ``rtv_db.migrate`` in unsigned mode (set in this
process's environment only: the one mode rtv-db supports on Citus) and loaded with the same
synthetic data (``--tenants`` x ``--rows`` brand kits, ``rtv_db.seed.synthetic.load_synthetic``),
then ANALYZEd:

* ``pg``: a plain database on the coordinator's PostgreSQL 15 instance, without ``CREATE
  EXTENSION citus``, so ``migrate`` sees plain PostgreSQL and distributes nothing: the same
  server binary, settings and machine as the Citus databases, single node;
* ``citus2``: ``CITUS_DB=<name> cluster.sh start`` (citus + vector on every node, both workers
  registered), distributed by ``migrate``: shards on both workers;
* ``citus1``: the same, but ``citus_remove_node('127.0.0.1', 9702)`` in that database's own
  metadata (Citus keeps one ``pg_dist_node`` per database) before ``migrate``: every shard and the
  reference table on worker :9701 only. The other databases of the cluster are not touched.

Then, in this one process:

1. **Latency**, interleaved in rounds (``--rounds`` of ``--batch`` operations, the order rotating
   every round, after ``--warmup`` operations per variant, as bench/harness.py does), the same
   (tenant, id) sequence for every variant, each checking its answer:
   ``<db>_get`` = ``with_tenant_scope(db, t).scoped_get(brand_kits, id)``; ``<db>_list`` =
   ``with_tenant_scope(db, t).scoped_query(brand_kits, limit=100)``; ``<db>_raw`` = hand-written
   psycopg as the system role (BYPASSRLS) on one held connection, bench/variants.py's POINT_SQL
   then ``commit()``: the server and the coordinator's routing without rtv-db's Python.
   Reported: median and p95 per variant, the ratio of medians to the same call on ``pg`` and the
   median over rounds of the per-round ratio (with its interquartile range).
2. **EXPLAIN** of the scoped point read (``build_select`` with ``id = ...``, inside a scoped
   transaction, as tests/test_citus.py does) on each database: ``Task Count: 1`` on Citus.
3. **Throughput**: N threads (``--threads``, default 1, 4, 8), each doing scoped point reads of
   random tenants on one ``Database`` (pool 10) for ``--duration`` seconds after a short warm-up
   (bench/concurrency.py's ``run_threads``), on each database in turn, the order rotating, N
   outer, ``--repeat`` times; the median ops/s and the ratios to ``pg`` and citus2 / citus1.

The whole cluster (coordinator, both workers) and this client share one machine: on a 2-core VM
the workers add no CPU, so the 1- vs 2-worker figure shows routing and placement costs, not
scale-out capacity. Results: a table on stdout, JSON in build/citus-bench.json. The databases are
dropped at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from bench.concurrency import run_threads
from bench.env import machine_info
from bench.harness import interleave_rounds
from bench.variants import POINT_SQL, make_ops
from rtv_db.config import Settings, to_libpq_url, to_sqlalchemy_url
from rtv_db.seed.synthetic import load_synthetic

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
COORDINATOR, WORKERS = 9700, (9701, 9702)
DBS = ("pg", "citus2", "citus1")
_TABLES = ("clients", "platform_accounts", "brand_kits", "knowledge_bases", "knowledge_chunks", "platform_actions")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"benchmark variant returned a wrong answer: {what}")


def _url(port: int, database: str) -> str:
    return f"postgresql://postgres@{HOST}:{port}/{database}"


def _admin(port: int, database: str = "postgres") -> psycopg.Connection[Any]:
    return psycopg.connect(_url(port, database), autocommit=True)


def _drop_everywhere(name: str) -> None:
    for port in (COORDINATOR, *WORKERS):
        with _admin(port) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -- the three databases ------------------------------------------------------------------------


def create_databases(prefix: str, citus_dir: Path) -> dict[str, dict[str, Any]]:
    """Fresh ``pg``, ``citus2`` and ``citus1`` databases (not migrated yet): name and admin URL."""
    out: dict[str, dict[str, Any]] = {}
    for key in DBS:
        name = f"{prefix}_{key}"
        _drop_everywhere(name)
        if key == "pg":
            with _admin(COORDINATOR) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            admin = _url(COORDINATOR, name)
        else:
            proc = subprocess.run(["bash", str(citus_dir / "cluster.sh"), "start"], env=dict(os.environ, CITUS_DB=name),
                                  capture_output=True, text=True, check=True)
            match = re.search(r"^CITUS_URL=(\S+)$", proc.stdout, re.M)
            if match is None:
                raise RuntimeError(f"cluster.sh start printed no CITUS_URL:\n{proc.stdout}\n{proc.stderr}")
            admin = match.group(1)
            if key == "citus1":
                with psycopg.connect(admin, autocommit=True) as conn:  # this database's metadata only
                    conn.execute("SELECT citus_remove_node(%s, %s)", (HOST, WORKERS[1]))
        out[key] = {"database": name, "admin_url": to_sqlalchemy_url(admin)}
    return out


def prepare(dbs: dict[str, dict[str, Any]], tenants: int, rows: int) -> None:
    """Migrate (unsigned), load, ANALYZE each database; record what it is."""
    os.environ["RTV_DB_CONTEXT_MODE"] = "unsigned"  # this process only, before migrate and any Database
    settings = Settings.from_env()
    from rtv_db.migrate import migrate

    for key, d in dbs.items():
        admin = d["admin_url"]
        t0 = time.perf_counter()
        result = migrate(admin, settings)
        d["migrate_seconds"] = round(time.perf_counter() - t0, 1)
        d["citus_actions"] = len(result.citus_actions)
        d["runtime_url"] = settings.derived_runtime_url(admin)
        d["system_url"] = settings.derived_system_url(admin)
        load = load_synthetic(d["system_url"], tenants, rows, progress=False)
        d["load_seconds"] = round(load.seconds, 1)
        d["rows_loaded"] = load.total_rows
        with psycopg.connect(to_libpq_url(admin), autocommit=True) as conn:
            conn.execute("ANALYZE " + ", ".join(_TABLES))
            d["citus"] = bool(conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'citus'").fetchone()[0])  # type: ignore[index]
            d["server"] = str(conn.execute("SELECT version()").fetchone()[0])  # type: ignore[index]
            if d["citus"]:
                d["citus_version"] = str(conn.execute("SELECT citus_version()").fetchone()[0])  # type: ignore[index]
                d["workers"] = [f"{h}:{p}" for h, p in conn.execute(
                    "SELECT nodename, nodeport FROM pg_dist_node WHERE noderole = 'primary' AND groupid > 0 ORDER BY nodeport")]
                d["brand_kits_shards_per_node"] = {f"{h}:{p}": n for h, p, n in conn.execute(
                    "SELECT nodename, nodeport, count(*) FROM citus_shards WHERE table_name = 'brand_kits'::regclass "
                    "GROUP BY 1, 2 ORDER BY 2")}
        print(f"  {key}: {d['database']} migrated in {d['migrate_seconds']} s ({d['citus_actions']} Citus steps), "
              f"{d['rows_loaded']} rows loaded in {d['load_seconds']} s", flush=True)


# -- latency ------------------------------------------------------------------------------------


def build_variants(dbs: dict[str, dict[str, Any]], ops: list[Any], rows: int) -> tuple[dict[str, Callable[[int], None]], list[Callable[[], Any]]]:
    from rtv_db import Database, brand_kits, with_tenant_scope

    fns: dict[str, Callable[[int], None]] = {}
    closers: list[Callable[[], Any]] = []
    expect_list = min(100, rows)
    for key in DBS:
        db = Database(dbs[key]["runtime_url"])
        closers.append(db.close)

        def get(i: int, db: Database = db, key: str = key) -> None:
            op = ops[i]
            row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant and row.id == op.row, f"{key}_get")

        def listing(i: int, db: Database = db, key: str = key) -> None:
            op = ops[i]
            got = with_tenant_scope(db, op.tenant).scoped_query(brand_kits, limit=100)
            _check(len(got) == expect_list and all(r.client_id == op.tenant for r in got), f"{key}_list")

        fns[f"{key}_get"] = get
        fns[f"{key}_list"] = listing
    for key in ("pg", "citus2"):
        conn = psycopg.connect(to_libpq_url(dbs[key]["system_url"]))  # as bench/variants.py's baseline
        closers.append(conn.close)

        def raw(i: int, conn: psycopg.Connection[Any] = conn, key: str = key) -> None:
            op = ops[i]
            got = conn.execute(POINT_SQL, (op.tenant, op.row)).fetchall()
            conn.commit()
            _check(len(got) == 1 and got[0][0] == op.tenant, f"{key}_raw")

        fns[f"{key}_raw"] = raw
    return fns, closers


def summarize(samples: dict[str, list[list[float]]]) -> dict[str, dict[str, Any]]:
    """Median and p95 per variant; ratio of medians to the same call on ``pg``, and per round."""
    flat = {name: sorted(x for rnd in rounds for x in rnd) for name, rounds in samples.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, values in flat.items():
        s: dict[str, Any] = {
            "n": len(values),
            "median_us": round(statistics.median(values) * 1e6, 1),
            "p95_us": round(values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] * 1e6, 1),
        }
        base = "pg_" + name.split("_", 1)[1]
        if not name.startswith("pg_") and base in samples:
            s["x_pg"] = round(statistics.median(values) / statistics.median(flat[base]), 3)
            per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(samples[name], samples[base])]
            q1, _, q3 = statistics.quantiles(per_round, n=4)
            s["x_pg_round_median"] = round(statistics.median(per_round), 3)
            s["x_pg_round_iqr"] = [round(q1, 3), round(q3, 3)]
        out[name] = s
    return out


# -- EXPLAIN ------------------------------------------------------------------------------------


def explain_point_reads(dbs: dict[str, dict[str, Any]], op: Any) -> dict[str, dict[str, Any]]:
    from rtv_db import Database, brand_kits, with_tenant_scope
    from rtv_db.tenant._statements import build_select

    out: dict[str, dict[str, Any]] = {}
    for key in DBS:
        db = Database(dbs[key]["runtime_url"])
        try:
            scope = with_tenant_scope(db, op.tenant)
            with scope.scoped_transaction() as tx:
                stmt = build_select(brand_kits, scope.context, [brand_kits.c.id == op.row])
                compiled = stmt.compile(dialect=tx.connection.dialect)
                plan = [r[0] for r in tx.connection.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params)]
        finally:
            db.close()
        text = "\n".join(plan)
        count = re.search(r"Task Count: (\d+)", text)
        out[key] = {"task_count": int(count.group(1)) if count else None,
                    "nodes": re.findall(r"Node: host=\S+ port=(\d+)", text), "plan": plan}
    return out


# -- throughput ---------------------------------------------------------------------------------


def throughput(dbs: dict[str, dict[str, Any]], tenants: int, rows: int, threads: list[int], duration: float,
               warmup: float, repeat: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[float]]] = {str(n): {key: [] for key in DBS} for n in threads}
    r = 0
    for n in threads:
        ops_by_worker = [make_ops(2000, tenants, rows, seed=100 + w) for w in range(n)]
        for _ in range(repeat):
            order = DBS[r % len(DBS):] + DBS[: r % len(DBS)]
            r += 1
            for key in order:
                ops_s = run_threads("rtv", dbs[key]["runtime_url"], dbs[key]["system_url"], ops_by_worker,
                                    duration, warmup, pool=10)
                runs[str(n)][key].append(round(ops_s, 1))
        print(f"  {n} threads: " + ", ".join(f"{k} {statistics.median(v):.0f}/s" for k, v in runs[str(n)].items()), flush=True)
    summary: dict[str, Any] = {}
    for n, by_db in runs.items():
        med = {key: statistics.median(v) for key, v in by_db.items()}
        summary[n] = {
            "ops_per_s": {key: round(v, 1) for key, v in med.items()},
            "runs": by_db,
            "citus2_x_pg": round(med["citus2"] / med["pg"], 3),
            "citus1_x_pg": round(med["citus1"] / med["pg"], 3),
            "citus2_x_citus1": round(med["citus2"] / med["citus1"], 3),
        }
    return summary


# -- main ---------------------------------------------------------------------------------------


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _table(report: dict[str, Any]) -> str:
    lat = report["latency"]
    lines = [f"latency ({report['sizes']['rounds']} rounds of {report['sizes']['batch']}, load {report['loadavg']})",
             f"  {'variant':<14}{'median µs':>11}{'p95 µs':>10}{'× pg':>8}{'× pg/round [IQR]':>24}"]
    for name, s in lat.items():
        ratio = f"{s['x_pg']:.2f}×" if "x_pg" in s else "–"
        iqr = (f"{s['x_pg_round_median']:.2f} [{s['x_pg_round_iqr'][0]:.2f}-{s['x_pg_round_iqr'][1]:.2f}]"
               if "x_pg" in s else "–")
        lines.append(f"  {name:<14}{s['median_us']:>11.1f}{s['p95_us']:>10.1f}{ratio:>8}{iqr:>24}")
    lines.append("EXPLAIN scoped point read: " + ", ".join(
        f"{k} Task Count {v['task_count']} (nodes {','.join(v['nodes']) or '-'})" for k, v in report["explain"].items()))
    lines.append(f"throughput, scoped point reads, ops/s (median of {report['sizes']['repeat']} × {report['sizes']['duration']} s)")
    lines.append(f"  {'threads':<9}{'pg':>9}{'citus2':>9}{'citus1':>9}{'c2/pg':>8}{'c1/pg':>8}{'c2/c1':>8}")
    for n, s in report["throughput"].items():
        o = s["ops_per_s"]
        lines.append(f"  {n:<9}{o['pg']:>9.0f}{o['citus2']:>9.0f}{o['citus1']:>9.0f}"
                     f"{s['citus2_x_pg']:>8.2f}{s['citus1_x_pg']:>8.2f}{s['citus2_x_citus1']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--citus-dir", type=Path, default=Path(os.environ.get("CITUS_DIR", ROOT.parent / "shared" / "citus")))
    p.add_argument("--prefix", default="rtv_bench_citus", help="database names: <prefix>_pg, _citus2, _citus1")
    p.add_argument("--json", type=Path, default=ROOT / "build" / "citus-bench.json")
    p.add_argument("--tenants", type=int, default=200)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=2, help="throughput runs per database and thread count")
    p.add_argument("--keep", action="store_true", help="keep the three databases")
    args = p.parse_args(argv)
    if not (args.citus_dir / "cluster.sh").is_file():
        p.error(f"no {args.citus_dir / 'cluster.sh'}")

    started, started_at = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    print("setting up the databases", flush=True)
    dbs = create_databases(args.prefix, args.citus_dir)
    try:
        prepare(dbs, args.tenants, args.rows)
        ops = make_ops(max(args.warmup, args.rounds * args.batch), args.tenants, args.rows)
        explain = explain_point_reads(dbs, ops[0])
        load_before = _loadavg()
        fns, closers = build_variants(dbs, ops, args.rows)
        try:
            print(f"latency: {len(fns)} variants interleaved", flush=True)
            t0 = time.perf_counter()
            samples = interleave_rounds(fns, rounds=args.rounds, batch=args.batch, warmup=args.warmup)
            latency_s = time.perf_counter() - t0
        finally:
            for fn in reversed(closers):
                fn()
        print("throughput", flush=True)
        tput = throughput(dbs, args.tenants, args.rows, args.threads, args.duration, 0.5, args.repeat)
        report: dict[str, Any] = {
            "started_at": started_at,
            "machine": machine_info(),
            "command": "PYTHONPATH=src:. .venv/bin/python -m bench.citus",
            "sizes": {"tenants": args.tenants, "rows": args.rows, "rounds": args.rounds, "batch": args.batch,
                      "warmup": args.warmup, "threads": args.threads, "duration": args.duration, "repeat": args.repeat},
            "context_mode": "unsigned",
            "databases": {k: {x: v for x, v in d.items() if not x.endswith("_url")} | {
                "admin_url": make_url(d["admin_url"]).render_as_string(hide_password=True)} for k, d in dbs.items()},
            "loadavg": {"before": load_before, "after": _loadavg()},
            "latency_seconds": round(latency_s, 1),
            "latency": summarize(samples),
            "explain": explain,
            "throughput": tput,
        }
        report["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        if not args.keep:
            for d in dbs.values():
                _drop_everywhere(d["database"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    print(f"results: {args.json} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
