"""Stateful property test: random sequences of scoped operations across five tenants, against a model.

Hypothesis drives inserts, queries, updates, deletes, transactions with nested savepoints, rollbacks
(an exception raised inside a transaction or a savepoint), raw SQL inside a tenant's transaction,
and two tenants' transactions open at once, on two tables. A Python model says what each tenant
must hold. After every step (the invariant) each tenant sees exactly its own rows, as the model
says, no row of another tenant is visible to it even through raw SQL, raw SQL with no context sees
nothing, and no pooled connection carries a context.

Names are drawn from a small set on purpose: tenants keep using the same names, so a slip that
let one tenant's statement touch another's row would show at once. Every example starts from
empty tables (reset through the system scope), so a failing sequence shrinks to a minimal one.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy.exc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import Table, text

from conftest import make_tenants, migrated_database
from reliability_checks import assert_no_context_left
from rtv_db import Database, SystemScope, with_tenant_scope
from rtv_db.schema import brand_kits, knowledge_bases

TENANTS = 5
NAMES = [f"n{i}" for i in range(5)]

# Each table's one value column, and how a value is stored in it.
TABLES: dict[str, tuple[Table, str]] = {
    "knowledge_bases": (knowledge_bases, "description"),
    "brand_kits": (brand_kits, "colors"),
}

Model = dict[int, dict[str, dict[str, str | None]]]  # tenant index -> table -> name -> value


def _store(table: str, value: str | None) -> Any:
    return {"v": value} if table == "brand_kits" else value


def _load(table: str, stored: Any) -> str | None:
    if table == "brand_kits":
        return stored.get("v") if stored else None
    return stored


class Rollback(Exception):
    """Raised inside a transaction or a savepoint to roll it back."""


@dataclass(frozen=True)
class World:
    db: Database
    system: SystemScope
    tenants: list[uuid.UUID]


@pytest.fixture(scope="module")
def world(cluster, template) -> Iterator[World]:
    with migrated_database(cluster, template, "rtv_test_props") as target:
        system = SystemScope(target.system_url, reason="property test setup")
        db = Database(target.runtime_url)
        try:
            tenants = make_tenants(system, *[f"P{i}" for i in range(TENANTS)])
            yield World(db, system, tenants)
        finally:
            db.close()
            system.close()


tenant_ix = st.integers(min_value=0, max_value=TENANTS - 1)
table_names = st.sampled_from(sorted(TABLES))
names = st.sampled_from(NAMES)
values = st.none() | st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6
)
# An operation inside a transaction: (kind, table, name, value).
ops = st.lists(st.tuples(st.sampled_from(["insert", "update", "delete"]), table_names, names, values), max_size=4)


class TenantMachine(RuleBasedStateMachine):
    """Scoped operations on five tenants, checked against :attr:`model` after every step."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        with world.system.transaction() as conn:  # every example starts from nothing
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
        self.model: Model = {t: {name: {} for name in TABLES} for t in range(TENANTS)}

    def scope(self, t: int):
        return with_tenant_scope(self.world.db, self.world.tenants[t])

    # -- applying operations, to the database (through a scope) and to a model ------------------

    @staticmethod
    def _apply_model(rows: dict[str, dict[str, str | None]], kind: str, table: str, name: str, value: str | None) -> None:
        if kind == "insert":
            rows[table][name] = value
        elif kind == "update" and name in rows[table]:
            rows[table][name] = value
        elif kind == "delete":
            rows[table].pop(name, None)

    @staticmethod
    def _apply_db(scope: Any, kind: str, table: str, name: str, value: str | None) -> int:
        tbl, column = TABLES[table]
        if kind == "insert":
            return len(scope.scoped_insert(tbl, {"name": name, column: _store(table, value)}))
        if kind == "update":
            return len(scope.scoped_update(tbl, {column: _store(table, value)}, tbl.c.name == name))
        return len(scope.scoped_delete(tbl, tbl.c.name == name))

    def _run(self, scope: Any, rows: dict[str, dict[str, str | None]], batch: list[tuple[str, str, str, str | None]]) -> None:
        """Run ``batch`` in an open transaction, keeping ``rows`` (its model) in step.

        An insert of a name the tenant already has would abort the whole transaction (unique
        violation), so inside transactions such an insert becomes an update.
        """
        for kind, table, name, value in batch:
            if kind == "insert" and name in rows[table]:
                kind = "update"
            expected = 1 if kind == "insert" or name in rows[table] else 0
            assert self._apply_db(scope, kind, table, name, value) == expected
            self._apply_model(rows, kind, table, name, value)

    # -- rules -----------------------------------------------------------------------------------

    @rule(t=tenant_ix, table=table_names, name=names, value=values)
    def insert(self, t: int, table: str, name: str, value: str | None) -> None:
        if name in self.model[t][table]:
            # The name is taken in this tenant (only in this one: names are unique per tenant).
            with pytest.raises(sqlalchemy.exc.IntegrityError):
                self._apply_db(self.scope(t), "insert", table, name, value)
            return
        assert self._apply_db(self.scope(t), "insert", table, name, value) == 1
        self._apply_model(self.model[t], "insert", table, name, value)

    @rule(t=tenant_ix, table=table_names, name=names, value=values)
    def update(self, t: int, table: str, name: str, value: str | None) -> None:
        assert self._apply_db(self.scope(t), "update", table, name, value) == (1 if name in self.model[t][table] else 0)
        self._apply_model(self.model[t], "update", table, name, value)

    @rule(t=tenant_ix, table=table_names, name=names)
    def delete(self, t: int, table: str, name: str) -> None:
        assert self._apply_db(self.scope(t), "delete", table, name, None) == (1 if name in self.model[t][table] else 0)
        self._apply_model(self.model[t], "delete", table, name, None)

    @rule(t=tenant_ix, table=table_names)
    def query(self, t: int, table: str) -> None:
        tbl, column = TABLES[table]
        rows = self.scope(t).scoped_query(tbl)
        assert {r.name: _load(table, getattr(r, column)) for r in rows} == self.model[t][table]

    @rule(t=tenant_ix, batch=ops, savepoints=st.lists(st.tuples(ops, st.booleans(), ops), max_size=2), commit=st.booleans())
    def transaction(self, t: int, batch, savepoints, commit: bool) -> None:
        """A transaction with savepoints (each kept or rolled back, one level nested), committed or rolled back."""
        working = copy.deepcopy(self.model[t])
        try:
            with self.scope(t).scoped_transaction() as tx:
                self._run(tx, working, batch)
                for sp_ops, keep, nested_ops in savepoints:
                    before_sp = copy.deepcopy(working)
                    try:
                        with tx.scoped_transaction() as sp:
                            self._run(sp, working, sp_ops)
                            before_nested = copy.deepcopy(working)
                            try:
                                with sp.scoped_transaction() as nested:
                                    self._run(nested, working, nested_ops)
                                    raise Rollback  # the innermost savepoint always rolls back
                            except Rollback:
                                working = before_nested
                            if not keep:
                                raise Rollback
                    except Rollback:
                        working = before_sp
                if not commit:
                    raise Rollback
        except Rollback:
            return
        self.model[t] = working

    @rule(t=tenant_ix, table=table_names, value=values)
    def raw_update_everything(self, t: int, table: str, value: str | None) -> None:
        """Raw SQL with no WHERE inside a tenant's transaction: RLS limits it to that tenant's rows."""
        tbl, column = TABLES[table]
        with self.scope(t).scoped_transaction() as tx:
            updated = tx.connection.execute(tbl.update().values({column: _store(table, value)})).rowcount
        assert updated == len(self.model[t][table])
        for name in self.model[t][table]:
            self.model[t][table][name] = value

    @rule(t1=tenant_ix, t2=tenant_ix, batch1=ops, batch2=ops, commit2=st.booleans())
    def interleaved(self, t1: int, t2: int, batch1, batch2, commit2: bool) -> None:
        """Two tenants' transactions open at once, on two pooled connections, statements interleaved."""
        if t1 == t2:
            return
        w1, w2 = copy.deepcopy(self.model[t1]), copy.deepcopy(self.model[t2])
        with self.scope(t1).scoped_transaction() as tx1:
            try:
                with self.scope(t2).scoped_transaction() as tx2:
                    for i in range(max(len(batch1), len(batch2))):
                        self._run(tx1, w1, batch1[i:i + 1])
                        self._run(tx2, w2, batch2[i:i + 1])
                    if not commit2:
                        raise Rollback
                self.model[t2] = w2
            except Rollback:
                pass
        self.model[t1] = w1

    # -- the invariant ---------------------------------------------------------------------------

    @invariant()
    def each_tenant_sees_exactly_its_own_rows(self) -> None:
        db, tenants = self.world.db, self.world.tenants
        for t, tenant in enumerate(tenants):
            with self.scope(t).scoped_transaction() as tx:
                for table, (tbl, column) in TABLES.items():
                    rows = tx.scoped_query(tbl)
                    assert {r.client_id for r in rows} <= {tenant}
                    assert {r.name: _load(table, getattr(r, column)) for r in rows} == self.model[t][table]
                    # Raw SQL, no tenant predicate: RLS alone must show this tenant's rows only.
                    raw = tx.connection.execute(text(f"SELECT client_id, count(*) FROM {table} GROUP BY 1")).all()
                    assert raw == ([(tenant, len(self.model[t][table]))] if self.model[t][table] else [])
        with db.engine.connect() as conn:  # no context at all: nothing
            for table in TABLES:
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0
        assert_no_context_left(db)


def test_random_scoped_operations_never_cross_tenants(world: World) -> None:
    run_state_machine_as_test(
        lambda: TenantMachine(world),
        settings=settings(
            max_examples=30,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,  # no example database: a failure is reported with its seed and shrunk steps
        ),
    )


def test_the_model_can_fail(world: World) -> None:
    """The invariant notices a row the model does not expect (written behind the API's back)."""
    machine = TenantMachine(world)
    machine.insert(0, "knowledge_bases", "n0", "x")
    machine.each_tenant_sees_exactly_its_own_rows()
    with world.system.transaction() as conn:  # a row of tenant 0's written where the model cannot see it
        conn.execute(knowledge_bases.insert().values(client_id=world.tenants[0], name="intruder"))
    with pytest.raises(AssertionError):
        machine.each_tenant_sees_exactly_its_own_rows()
