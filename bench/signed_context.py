"""Point-read cost of the signed tenant context (issue 8), self-contained: a deeper look.

The main bench (``python -m bench``, workloads 1-3) reports the signed and unsigned context side
by side on its own data (the ``*_unsigned`` variants). This script adds what the main bench does
not: the pre-signing revision 0002 as a third point, the reader's cost alone and the statement's
server-side cost without the client.

    PYTHONPATH=src python bench/signed_context.py [--reads 3000] [--rounds 5]

Starts a throw-away embedded server (or uses RTV_DB_BENCH_ADMIN_URL, a superuser URL), makes
three databases and times the same tenant-scoped point read (``scoped_get`` by primary key, one
transaction each, through the pool) on each:

* ``0002``: before signing (plain ``SET LOCAL`` settings, SECURITY INVOKER readers);
* ``unsigned``: revision 0004 in its debugging mode;
* ``signed``: revision 0004, the default.

Rounds alternate between the variants so that machine noise hits all three alike; the median
of the per-round means is reported. It also times the verification alone (the reader called
20,000 times in one statement), the point-read statement on the server alone (a DO loop: no
client, pool or network noise) and prints the point read's EXPLAIN ANALYZE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url

from rtv_db import Database, SystemScope, migrate, with_tenant_scope
from rtv_db.config import Settings, to_libpq_url, to_sqlalchemy_url
from rtv_db.rls import with_rls_context
from rtv_db.schema import brand_kits, clients
from rtv_db.server import EmbeddedServer
from rtv_db.signing import generate_key
from rtv_db.targets import resolve_target

TENANTS = 20
KITS_PER_TENANT = 200


def _seed(system_url: str) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Tenants with brand kits; returns (tenant, kit id) pairs to read."""
    ids = [uuid.uuid4() for _ in range(TENANTS)]
    targets: list[tuple[uuid.UUID, uuid.UUID]] = []
    with SystemScope(system_url, reason="bench seed") as system, system.transaction() as conn:
        conn.execute(clients.insert(), [{"id": t, "name": f"T{i}", "slug": f"t{i}-{t.hex[:8]}"} for i, t in enumerate(ids)])
        rows = []
        for t in ids:
            for j in range(KITS_PER_TENANT):
                kit = uuid.uuid4()
                rows.append({"client_id": t, "id": kit, "name": f"kit {j}", "tone": {}, "colors": {}, "logo_refs": []})
                targets.append((t, kit))
        conn.execute(brand_kits.insert(), rows)
    return targets


def _time_reads(db: Database, targets: list[tuple[uuid.UUID, uuid.UUID]], n: int) -> float:
    """Mean microseconds per point read."""
    started = time.perf_counter()
    for i in range(n):
        tenant, kit = targets[(i * 7919) % len(targets)]
        assert with_tenant_scope(db, tenant).scoped_get(brand_kits, kit) is not None
    return (time.perf_counter() - started) / n * 1e6


def _reader_cost(db: Database, tenant: uuid.UUID) -> float:
    """Microseconds per call of rtv.current_tenant_id() (not wrapped: called once per row)."""
    with with_rls_context(db, tenant) as conn:
        started = time.perf_counter()
        conn.execute(text("SELECT count(rtv.current_tenant_id()) FROM generate_series(1, 20000)")).scalar_one()
        return (time.perf_counter() - started) / 20000 * 1e6


def _statement_cost(db: Database, tenant: uuid.UUID, kit: uuid.UUID) -> float:
    """Server-side microseconds per point-read statement (policy InitPlan included), without the
    client, the pool or the network: 3000 executions inside one DO block."""
    with with_rls_context(db, tenant) as conn:
        started = time.perf_counter()
        conn.exec_driver_sql(
            "DO $$ BEGIN FOR i IN 1..3000 LOOP "
            f"PERFORM name FROM brand_kits WHERE client_id = '{tenant}' AND id = '{kit}'; "  # uuids: safe literals
            "END LOOP; END $$"
        )
        return (time.perf_counter() - started) / 3000 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("RTV_DB_CONTEXT_KEY", f"{generate_key().key_id}:{generate_key().hex}")
    data_dir = Path(tempfile.mkdtemp(prefix="rtv-bench-signed-"))
    external = os.environ.get("RTV_DB_BENCH_ADMIN_URL")
    server = None
    if external:
        admin = to_sqlalchemy_url(external)
    else:
        server = EmbeddedServer(data_dir, database="postgres")
        server.start()
        admin = to_sqlalchemy_url(server.url("postgres"))
    settings = Settings(data_dir=data_dir)
    names = {v: f"rtv_bench_signed_{v}_{uuid.uuid4().hex[:6]}" for v in ("0002", "unsigned", "signed")}
    dbs: dict[str, Database] = {}
    try:
        with psycopg.connect(to_libpq_url(admin), autocommit=True) as conn:
            for name in names.values():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        seeded: dict[str, list[tuple[uuid.UUID, uuid.UUID]]] = {}
        for variant, name in names.items():
            url = make_url(admin).set(database=name).render_as_string(hide_password=False)
            target = resolve_target(settings, database_url=url)
            if variant == "unsigned":
                os.environ["RTV_DB_CONTEXT_MODE"] = "unsigned"
            migrate(target.require_admin(), settings, "0002" if variant == "0002" else "head")
            if variant == "0002":
                os.environ["RTV_DB_CONTEXT_MODE"] = "unsigned"  # the 0002 setter is the unsigned one
            dbs[variant] = Database(target.runtime_url)
            seeded[variant] = _seed(target.system_url)  # type: ignore[arg-type]
            # warm up (pool, plans) and fix the engine's mode while the environment says which it is
            _time_reads(dbs[variant], seeded[variant], 200)
            os.environ.pop("RTV_DB_CONTEXT_MODE", None)

        results: dict[str, list[float]] = {v: [] for v in names}
        for _ in range(args.rounds):
            for variant, db in dbs.items():
                results[variant].append(_time_reads(db, seeded[variant], args.reads))
        readers = {v: statistics.median(_reader_cost(db, seeded[v][0][0]) for _ in range(3)) for v, db in dbs.items()}
        statements: dict[str, list[float]] = {v: [] for v in names}
        for _ in range(5):
            for v, db in dbs.items():
                statements[v].append(_statement_cost(db, *seeded[v][0]))

        print(f"point read (scoped_get by primary key, one transaction each), {args.reads} reads x {args.rounds} rounds, median of round means:")
        base = statistics.median(results["0002"])
        for variant in names:
            med = statistics.median(results[variant])
            print(f"  {variant:9s} {med:8.1f} us/read   ratio to 0002: {med / base:5.3f}   rounds: "
                  + ", ".join(f"{x:.0f}" for x in results[variant]))
        print("reader alone, rtv.current_tenant_id() per call:")
        for variant, cost in readers.items():
            print(f"  {variant:9s} {cost:8.2f} us/call")
        print("point-read statement on the server (DO loop, 5 interleaved rounds, median):")
        base_stmt = statistics.median(statements["0002"])
        for v, costs in statements.items():
            print(f"  {v:9s} {statistics.median(costs):8.2f} us/statement   ratio to 0002: {statistics.median(costs) / base_stmt:5.3f}")
        signed_db = dbs["signed"]
        tenant, kit = seeded["signed"][0]
        with with_rls_context(signed_db, tenant) as conn:
            plan = conn.execute(text("EXPLAIN (ANALYZE, VERBOSE, COSTS OFF) SELECT * FROM brand_kits WHERE client_id = :t AND id = :k"),
                                {"t": tenant, "k": kit}).scalars().all()
        print("EXPLAIN ANALYZE of the signed point read:")
        print("\n".join("  " + line for line in plan))
    finally:
        for db in dbs.values():
            db.close()
        with psycopg.connect(to_libpq_url(admin), autocommit=True) as conn:
            for name in names.values():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
