"""Soak: many scoped transactions from concurrent workers, then a full leak and consistency check.

20 tenants, 8 worker threads. Each tenant belongs to one worker, which keeps a ledger of what
that tenant's ``knowledge_bases`` must hold, so every read can be compared with the truth while
the run goes on, and the whole database with all ledgers at the end.

* ``test_soak_short`` (2,000 transactions) runs in the default suite.
* ``test_soak`` is marked ``soak`` (outside the default run): ``pytest -m soak tests/test_soak.py``;
  ``RTV_SOAK_TRANSACTIONS`` sets the count (default 100,000), ``RTV_SOAK_REPORT`` a JSON file
  for the figures.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import pytest
from sqlalchemy import text

from conftest import make_tenants
from reliability_checks import (
    assert_audit_matches,
    assert_no_context_left,
    assert_no_cross_tenant_rows,
    assert_raw_sql_sees_nothing,
    rows_by_tenant,
)
from rtv_db import Database, EngineOptions, brand_kits, knowledge_bases, with_tenant_scope

TENANTS = 20
WORKERS = 8
MAX_ROWS_PER_TENANT = 30  # keeps reads cheap: above it, inserts turn into deletes


class _Rollback(Exception):
    """Raised on purpose inside a transaction to roll it back."""


@dataclass
class WorkerStats:
    transactions: int = 0
    reads: int = 0
    writes: int = 0
    rollbacks: int = 0
    leaks: int = 0  # rows of another tenant seen
    mismatches: list[str] = field(default_factory=list)  # a read that disagreed with the ledger
    errors: list[str] = field(default_factory=list)


class Worker:
    """Runs ``count`` scoped transactions on its own tenants and keeps their ledgers."""

    def __init__(self, db: Database, tenants: dict[uuid.UUID, str], count: int, seed: int) -> None:
        self.db = db
        self.tenants = tenants
        self.count = count
        self.rng = random.Random(seed)
        self.ledger: dict[uuid.UUID, dict[uuid.UUID, str | None]] = {t: {} for t in tenants}
        self.stats = WorkerStats()
        self._serial = 0

    def _name(self) -> str:
        self._serial += 1
        return f"kb-{self._serial}-{self.rng.getrandbits(32):08x}"

    def _check_rows(self, tenant: uuid.UUID, rows: list, what: str) -> None:
        foreign = [r for r in rows if r.client_id != tenant]
        self.stats.leaks += len(foreign)
        got = {r.id: r.description for r in rows if r.client_id == tenant}
        if got != self.ledger[tenant]:
            self.stats.mismatches.append(
                f"{what} for {tenant}: {len(got)} rows, ledger {len(self.ledger[tenant])}; "
                f"missing {len(self.ledger[tenant].keys() - got.keys())}, extra {len(got.keys() - self.ledger[tenant].keys())}"
            )

    def step(self) -> None:
        tenant = self.rng.choice(list(self.tenants))
        scope = with_tenant_scope(self.db, tenant)
        ledger = self.ledger[tenant]
        op = self.rng.random()
        if op < 0.30:  # read everything and compare with the ledger
            self._check_rows(tenant, scope.scoped_query(knowledge_bases), "read")
            self.stats.reads += 1
        elif op < 0.35:  # read another table: exactly this tenant's brand kit
            names = [r.name for r in scope.scoped_query(brand_kits)]
            if names != [f"Brand {self.tenants[tenant]}"]:
                self.stats.leaks += sum(1 for n in names if n != f"Brand {self.tenants[tenant]}")
                self.stats.mismatches.append(f"brand kits of {tenant}: {names}")
            self.stats.reads += 1
        elif op < 0.60:  # insert one row (or delete one when the tenant is full)
            if len(ledger) >= MAX_ROWS_PER_TENANT:
                self._delete(scope, ledger)
            else:
                (row,) = scope.scoped_insert(knowledge_bases, {"name": self._name(), "description": None})
                ledger[row.id] = None
            self.stats.writes += 1
        elif op < 0.75:  # update one row by id
            if ledger:
                kb_id = self.rng.choice(list(ledger))
                description = f"d{self.rng.getrandbits(24)}"
                updated = scope.scoped_update(knowledge_bases, {"description": description}, knowledge_bases.c.id == kb_id)
                if len(updated) != 1:
                    self.stats.mismatches.append(f"update of {kb_id} touched {len(updated)} rows")
                ledger[kb_id] = description
            self.stats.writes += 1
        elif op < 0.83:  # delete one row by id
            if ledger:
                self._delete(scope, ledger)
            self.stats.writes += 1
        elif op < 0.95:  # several statements in one transaction, with a savepoint that rolls back
            staged: dict[uuid.UUID, str | None] = {}
            with scope.scoped_transaction() as tx:
                if len(ledger) < MAX_ROWS_PER_TENANT - 2:
                    for _ in range(2):
                        (row,) = tx.scoped_insert(knowledge_bases, {"name": self._name()})
                        staged[row.id] = None
                try:
                    with tx.scoped_transaction() as sp:
                        sp.scoped_insert(knowledge_bases, {"name": self._name()})
                        raise _Rollback
                except _Rollback:
                    pass
                foreign = tx.connection.execute(
                    text("SELECT count(*) FROM knowledge_bases WHERE client_id <> :me"), {"me": tenant}
                ).scalar_one()
                self.stats.leaks += foreign
                rows = tx.scoped_query(knowledge_bases)
                expected = ledger | staged
                if {r.id: r.description for r in rows} != expected:
                    self.stats.mismatches.append(f"in-transaction read of {tenant} disagrees with the ledger")
            ledger.update(staged)
            self.stats.writes += 1
        else:  # a transaction that fails: nothing of it may stay
            try:
                with scope.scoped_transaction() as tx:
                    tx.scoped_insert(knowledge_bases, {"name": self._name(), "description": "rolled back"})
                    if ledger:
                        kb_id = next(iter(ledger))
                        tx.scoped_delete(knowledge_bases, knowledge_bases.c.id == kb_id)
                    raise _Rollback
            except _Rollback:
                pass
            self.stats.rollbacks += 1
        self.stats.transactions += 1

    def _delete(self, scope, ledger: dict[uuid.UUID, str | None]) -> None:
        kb_id = self.rng.choice(list(ledger))
        deleted = scope.scoped_delete(knowledge_bases, knowledge_bases.c.id == kb_id)
        if len(deleted) != 1:
            self.stats.mismatches.append(f"delete of {kb_id} touched {len(deleted)} rows")
        del ledger[kb_id]

    def run(self) -> None:
        try:
            for _ in range(self.count):
                self.step()
        except Exception as exc:  # recorded, and the test fails on it
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")


def run_soak(target, system, transactions: int) -> dict:
    names = [f"S{i:02d}" for i in range(TENANTS)]
    ids = make_tenants(system, *names)
    tenant_names = dict(zip(ids, names))
    db = Database(target.runtime_url, options=EngineOptions(pool_size=WORKERS, max_overflow=2))
    try:
        per_worker = [transactions // WORKERS + (1 if i < transactions % WORKERS else 0) for i in range(WORKERS)]
        workers = [
            Worker(db, {t: n for j, (t, n) in enumerate(tenant_names.items()) if j % WORKERS == i}, per_worker[i], seed=i)
            for i in range(WORKERS)
        ]
        threads = [threading.Thread(target=w.run, name=f"soak-{i}") for i, w in enumerate(workers)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started

        # The full check: every tenant's rows as the application sees them, and as they really are.
        ledgers = {t: rows for w in workers for t, rows in w.ledger.items()}
        lost = extra = 0
        for tenant, ledger in ledgers.items():
            rows = with_tenant_scope(db, tenant).scoped_query(knowledge_bases)
            assert all(r.client_id == tenant for r in rows)
            got = {r.id: r.description for r in rows}
            lost += len(ledger.keys() - got.keys()) + sum(1 for k in ledger.keys() & got.keys() if got[k] != ledger[k])
            extra += len(got.keys() - ledger.keys())
        really = rows_by_tenant(system, "knowledge_bases")
        expected = Counter({t: len(rows) for t, rows in ledgers.items() if rows})
        assert_no_cross_tenant_rows(db, ids)
        assert_raw_sql_sees_nothing(db)
        pooled = assert_no_context_left(db)
        assert_audit_matches(system)
        stats = [w.stats for w in workers]
        report = {
            "transactions": sum(s.transactions for s in stats),
            "reads": sum(s.reads for s in stats),
            "writes": sum(s.writes for s in stats),
            "rollbacks": sum(s.rollbacks for s in stats),
            "tenants": TENANTS,
            "workers": WORKERS,
            "seconds": round(elapsed, 2),
            "transactions_per_second": round(sum(s.transactions for s in stats) / elapsed, 1),
            "leaks": sum(s.leaks for s in stats),
            "mismatches_during_run": sum(len(s.mismatches) for s in stats),
            "lost_writes": lost,
            "phantom_rows": extra,
            "rows_at_end": sum(really.values()),
            "ledger_rows_at_end": sum(expected.values()),
            "pooled_connections_checked": len(pooled),
            "errors": [e for s in stats for e in s.errors],
            "first_mismatches": [m for s in stats for m in s.mismatches][:5],
            "pool": asdict(db.get_pool_stats()),
        }
        report["storage_matches_ledgers"] = really == expected
        return report
    finally:
        db.close()


def _assert_clean(report: dict, transactions: int) -> None:
    assert report["errors"] == []
    assert report["transactions"] == transactions
    assert report["leaks"] == 0
    assert report["mismatches_during_run"] == 0, report["first_mismatches"]
    assert report["lost_writes"] == 0
    assert report["phantom_rows"] == 0
    assert report["storage_matches_ledgers"]
    assert report["pool"]["checked_out"] == 0


def test_soak_short(target, system) -> None:
    """2,000 transactions: the soak's checks, in the default run."""
    report = run_soak(target, system, 2_000)
    _assert_clean(report, 2_000)


@pytest.mark.soak
def test_soak(target, system) -> None:
    """The long soak (``-m soak``): ``RTV_SOAK_TRANSACTIONS`` transactions, 100,000 by default."""
    transactions = int(os.environ.get("RTV_SOAK_TRANSACTIONS", "100000"))
    report = run_soak(target, system, transactions)
    print("\nsoak report:", json.dumps(report, indent=2, default=str))
    if os.environ.get("RTV_SOAK_REPORT"):
        with open(os.environ["RTV_SOAK_REPORT"], "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    _assert_clean(report, transactions)
