"""What issue 11's clean session and transaction-bound context cost a scoped point read.

    PYTHONPATH=src:. .venv/bin/python -m bench.clean_session [--before-tree /tmp/rtv-before]

Starts its own embedded server (bench/env.py's BenchServer), migrates one database, loads
``--tenants`` x ``--rows`` brand kits with the synthetic loader and times, interleaved in rounds
in this one process (the order rotating every round, as bench/harness.py does), one point read
of one brand kit by id per operation:

* ``B0``: the baseline of bench/variants.py: hand-written psycopg on one held connection as the
  system role (BYPASSRLS), ``SELECT ... WHERE client_id = %s AND id = %s`` then ``commit()``
  (psycopg's own BEGIN, its default prepare_threshold);
* ``after_full``: ``with_tenant_scope(db, tenant).scoped_get(brand_kits, id)`` on a default
  ``Database``, as shipped;
* ``after_no_clean``: the same on a second ``Database`` whose transactions start without
  ``SELECT rtv.clean_session()`` (``rtv_db.tenant._transaction._statements_for`` is wrapped for
  that engine only): what the clean step costs end to end;
* ``hand_ctx``: hand-written psycopg as the runtime role (autocommit, nothing prepared):
  ``BEGIN ... READ WRITE`` + ``SELECT rtv.set_signed_context(token, ...)`` pipelined, the
  SELECT, ``COMMIT``: the server-side context step without rtv-db's Python;
* ``hand_ctx_clean``: the same with ``SELECT rtv.clean_session()`` in the pipeline, as rtv-db
  sends it.

Every variant checks its answer. Reported per variant: median and p95 latency, the ratio of
medians to B0 (bench/harness.py's method, comparable with docs/benchmarks) and the median over
rounds of the per-round ratio (each round's median over B0's median in the same round). Round
trips and statements per operation are counted afterwards on the wire (bench/wire.py), never
while timing. Results: a table on stdout, JSON in build/clean-session.json.

The same file runs on the revision before issue 11 (commit 62297ef: v1 token bound to the
backend, no clean session, psycopg's default prepare_threshold), where it times ``B0``,
``before_full`` (scoped_get as shipped then) and ``hand_ctx`` (v1 token). ``--before-tree PATH``
(a worktree of that commit: ``git worktree add /tmp/rtv-before 62297ef``) runs that in a
subprocess on its own server, with the same sizes and method, and puts both in one report::

    python bench/clean_session.py --mode before   # with PYTHONPATH=/tmp/rtv-before/src:/tmp/rtv-before

``--repeat N`` alternates N runs per revision (before, after, before, ...) and summarises the
median over them. Defaults (100 tenants x 100 rows, 400 rounds of 20): about a minute per
before+after pair on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg

from bench.env import BenchServer, machine_info
from bench.variants import POINT_SQL, Op, context_statement, make_ops
from bench.wire import WireCounter
from rtv_db import Database, brand_kits, with_tenant_scope
from rtv_db.config import to_libpq_url
from rtv_db.tenant import _transaction as tx

AFTER = hasattr(tx, "_CLEAN_SESSION")  # issue 11's code (HEAD) or the revision before it
CLEAN_SQL = "SELECT rtv.clean_session()"
ROOT = Path(__file__).resolve().parents[1]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"benchmark variant returned a wrong answer: {what}")


# -- after_no_clean: rtv-db without the clean step, for chosen engines only ----------------------

_NO_CLEAN: set[int] = set()
if AFTER:
    _statements_for = tx._statements_for

    def _statements_without_clean(conn: Any, driver: Any) -> Any:
        statements = _statements_for(conn, driver)
        if id(tx._root(conn.engine)) in _NO_CLEAN:
            statements = [s for s in statements if s != (tx._CLEAN_SESSION, None)]
        return statements

    tx._statements_for = _statements_without_clean  # _on_begin looks it up at each call


# -- the variants -------------------------------------------------------------------------------


class Variants:
    def __init__(self) -> None:
        self.fns: dict[str, Callable[[int], None]] = {}
        self.closers: list[Callable[[], Any]] = []

    def close(self) -> None:
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:
                pass


def build(runtime_url: str, system_url: str, ops: list[Op]) -> Variants:
    v = Variants()

    base = psycopg.connect(to_libpq_url(system_url))  # as bench/variants.py's baseline
    v.closers.append(base.close)

    def b0(i: int) -> None:
        op = ops[i]
        rows = base.execute(POINT_SQL, (op.tenant, op.row)).fetchall()
        base.commit()
        _check(len(rows) == 1 and rows[0][0] == op.tenant, "B0")

    v.fns["B0"] = b0

    def scoped(db: Database, name: str) -> Callable[[int], None]:
        def fn(i: int) -> None:
            op = ops[i]
            row = with_tenant_scope(db, op.tenant).scoped_get(brand_kits, op.row)
            _check(row is not None and row.client_id == op.tenant, name)

        return fn

    db = Database(runtime_url)
    v.closers.append(db.close)
    v.fns["after_full" if AFTER else "before_full"] = scoped(db, "scoped_get")
    if AFTER:
        db_nc = Database(runtime_url)
        v.closers.append(db_nc.close)
        _NO_CLEAN.add(id(tx._root(db_nc.engine)))
        v.fns["after_no_clean"] = scoped(db_nc, "scoped_get without clean_session")

    begin = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE" if AFTER else "BEGIN"  # as each revision sends it
    for name, clean in (("hand_ctx", False), ("hand_ctx_clean", True)) if AFTER else (("hand_ctx", False),):
        conn = psycopg.connect(to_libpq_url(runtime_url), autocommit=True, prepare_threshold=None)
        v.closers.append(conn.close)

        def hand(i: int, conn: psycopg.Connection[Any] = conn, clean: bool = clean, name: str = name) -> None:
            op = ops[i]
            sql, params = context_statement(conn, op.tenant)  # a fresh token (v2, or v1 for this backend)
            with conn.pipeline():
                conn.execute(begin)
                if clean:
                    conn.execute(CLEAN_SQL)
                conn.execute(sql, params)  # type: ignore[arg-type]
            rows = conn.execute(POINT_SQL, (op.tenant, op.row)).fetchall()
            conn.commit()
            _check(len(rows) == 1 and rows[0][0] == op.tenant, name)

        v.fns[name] = hand
    return v


# -- timing -------------------------------------------------------------------------------------


def interleave(fns: dict[str, Callable[[int], None]], *, rounds: int, batch: int, warmup: int) -> dict[str, list[list[float]]]:
    """bench/harness.py's ``interleave_rounds``, copied: this file also runs against an older tree's
    bench/ (``--mode before``), whose harness does not have it."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](i)
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    clock = time.perf_counter
    op = 0
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, out = fns[name], []
            for i in range(batch):
                start = clock()
                fn(op + i)
                out.append(clock() - start)
            samples[name].append(out)
        op += batch
    return samples


def summarize(samples: dict[str, list[list[float]]], baseline: str = "B0") -> dict[str, dict[str, float]]:
    flat = {name: sorted(x for rnd in rounds for x in rnd) for name, rounds in samples.items()}
    base_median = statistics.median(flat[baseline])
    base_rounds = [statistics.median(rnd) for rnd in samples[baseline]]
    out = {}
    for name, values in flat.items():
        median = statistics.median(values)
        per_round = [statistics.median(rnd) / b for rnd, b in zip(samples[name], base_rounds)]
        q1, _, q3 = statistics.quantiles(per_round, n=4)
        out[name] = {
            "n": len(values),
            "median_us": round(median * 1e6, 1),
            "p95_us": round(values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] * 1e6, 1),
            "ratio": round(median / base_median, 3),  # ratio of medians (bench/harness.py)
            "ratio_round_median": round(statistics.median(per_round), 3),
            "ratio_round_iqr": [round(q1, 3), round(q3, 3)],
        }
    return out


def count_wire(runtime_url: str, system_url: str, ops: list[Op], n: int = 20) -> dict[str, dict[str, Any]]:
    """Round trips and statements per operation, counted on a proxy (bench/wire.py)."""
    counter = WireCounter(runtime_url)
    v = build(counter.proxied_url(runtime_url), counter.proxied_url(system_url), ops)
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, fn in v.fns.items():
            for i in range(10):  # past psycopg's prepare threshold: the steady state
                fn(i)
            rt = st = 0
            for i in range(10, 10 + n):
                before = counter.snapshot()
                fn(i)
                delta = counter.snapshot().minus(before)
                rt, st = rt + delta.round_trips, st + delta.statements
            out[name] = {"round_trips_per_op": round(rt / n, 2), "statements_per_op": round(st / n, 2),
                         "one_op": delta.transcript}
    finally:
        v.close()
        counter.close()
    return out


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    server = BenchServer(progress=False)
    try:
        ds = server.create("clean")
        server.load(ds, args.tenants, args.rows)
        runtime, system = ds.target.runtime_url, ds.target.system_url
        assert system is not None
        ops = make_ops(max(args.warmup, args.rounds * args.batch), args.tenants, args.rows)
        load_before = _loadavg()
        v = build(runtime, system, ops)
        try:
            t0 = time.perf_counter()
            samples = interleave(v.fns, rounds=args.rounds, batch=args.batch, warmup=args.warmup)
            timing_s = time.perf_counter() - t0
        finally:
            v.close()
        wire = count_wire(runtime, system, ops)
        return {
            "revision": "after" if AFTER else "before",
            "rtv_db": str(Path(tx.__file__).resolve().parents[2]),
            "server": server.server_version(),
            "sizes": {"tenants": args.tenants, "rows": args.rows, "rounds": args.rounds, "batch": args.batch,
                      "warmup": args.warmup},
            "loadavg": {"before": load_before, "after": _loadavg()},
            "timing_seconds": round(timing_s, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "stats": summarize(samples),
            "wire": wire,
        }
    finally:
        server.close()


def _run_before(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "before.json"
        env = dict(os.environ, PYTHONPATH=f"{tree / 'src'}{os.pathsep}{tree}")
        env.pop("RTV_DB_CONTEXT_KEY", None)  # each run signs with a key of its own server
        cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", "before", "--json", str(out),
               "--tenants", str(args.tenants), "--rows", str(args.rows), "--rounds", str(args.rounds),
               "--batch", str(args.batch), "--warmup", str(args.warmup)]
        subprocess.run(cmd, env=env, cwd=tmp, check=True)
        return json.loads(out.read_text())


def _table(res: dict[str, Any]) -> str:
    lines = [f"{res['revision']} ({res['rtv_db']}), {res['timing_seconds']} s timed, load {res['loadavg']}",
             f"  {'variant':<16}{'median µs':>11}{'p95 µs':>9}{'× B0':>8}{'× B0/round [IQR]':>24}{'RT':>6}{'stmts':>7}"]
    for name, s in res["stats"].items():
        w = res["wire"].get(name, {})
        iqr = f"{s['ratio_round_median']:.2f} [{s['ratio_round_iqr'][0]:.2f}-{s['ratio_round_iqr'][1]:.2f}]"
        lines.append(f"  {name:<16}{s['median_us']:>11.1f}{s['p95_us']:>9.1f}{s['ratio']:>7.2f}×{iqr:>24}"
                     f"{w.get('round_trips_per_op', float('nan')):>6.1f}{w.get('statements_per_op', float('nan')):>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("auto", "before"), default="auto", help="internal: the subprocess on the old tree")
    p.add_argument("--before-tree", type=Path, help="a worktree of the revision before issue 11 (62297ef) to run too")
    p.add_argument("--json", type=Path, default=ROOT / "build" / "clean-session.json")
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--repeat", type=int, default=1, help="runs per revision, alternating before/after")
    args = p.parse_args(argv)
    if args.mode == "before" and AFTER:
        p.error("--mode before needs the old tree's rtv_db first on PYTHONPATH")

    runs: list[dict[str, Any]] = []
    for _ in range(1 if args.mode == "before" else args.repeat):  # before, after, before, after, ...
        if args.before_tree is not None and args.mode != "before":
            runs.append(_run_before(args.before_tree, args))
        runs.append(measure(args))
    report: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "runs": runs,
    }
    if {r["revision"] for r in runs} == {"before", "after"}:
        # Each figure: the median over the runs (one run per revision unless --repeat).
        def med(rev: str, name: str, key: str = "ratio") -> float:
            return round(statistics.median(r["stats"][name][key] for r in runs if r["revision"] == rev), 3)

        report["summary"] = {
            "runs_per_revision": args.repeat,
            "before_full_x_B0": med("before", "before_full"),
            "after_full_x_B0": med("after", "after_full"),
            "after_no_clean_x_B0": med("after", "after_no_clean"),
            "after_full_over_before_full": round(med("after", "after_full") / med("before", "before_full"), 3),
            "after_full_over_no_clean": round(med("after", "after_full") / med("after", "after_no_clean"), 3),
            "hand_ctx_v1_x_B0": med("before", "hand_ctx"),
            "hand_ctx_v2_x_B0": med("after", "hand_ctx"),
            "hand_ctx_clean_x_B0": med("after", "hand_ctx_clean"),
            "B0_median_us": {"before": med("before", "B0", "median_us"), "after": med("after", "B0", "median_us")},
            "clean_step_us_end_to_end": round(med("after", "after_full", "median_us") - med("after", "after_no_clean", "median_us"), 1),
            "clean_step_us_hand": round(med("after", "hand_ctx_clean", "median_us") - med("after", "hand_ctx", "median_us"), 1),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report if args.mode != "before" else runs[-1], indent=2) + "\n")
    if args.mode != "before":
        for r in runs:
            print(_table(r))
        if "summary" in report:
            print(json.dumps(report["summary"], indent=2))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
