"""Transaction-local settings (``TRANSACTION_SETTINGS_OPTION``): applied after the clean session and
the context, in the same round trip, gone in the next transaction; names outside the allowlist
are refused before anything is sent."""

from __future__ import annotations

import pytest

from bench.wire import WireCounter
from rtv_db import Database, EngineOptions, InvalidInputError, brand_kits, with_tenant_scope
from rtv_db.tenant._transaction import CONTEXT_OPTION, TRANSACTION_SETTINGS_OPTION, transaction_settings

SETTINGS = (("enable_seqscan", "off"), ("hnsw.ef_search", 200))


@pytest.fixture()
def wired(target):
    counter = WireCounter(target.runtime_url)
    db = Database(counter.proxied_url(target.runtime_url), options=EngineOptions(pool_size=1, max_overflow=0),
                  pool_pre_ping=False)
    yield counter, db
    db.close()
    counter.close()


def _show(conn) -> tuple[str, str, int]:
    row = conn.exec_driver_sql(
        "SELECT current_setting('enable_seqscan'), current_setting('hnsw.ef_search', true), pg_backend_pid()").one()
    return row[0], row[1], row[2]


def test_a_setting_applies_in_its_transaction_only(wired, tenants):
    _counter, db = wired
    scope = with_tenant_scope(db, tenants.a)
    with db.engine.connect() as conn:
        conn = conn.execution_options(**{CONTEXT_OPTION: scope.context, TRANSACTION_SETTINGS_OPTION: SETTINGS})
        with conn.begin():
            seqscan, ef_search, pid = _show(conn)
            assert (seqscan, ef_search) == ("off", "200")
            assert [k.name for k in conn.execute(brand_kits.select())] == ["Brand A"]  # the context is set too
    with db.engine.connect() as conn:  # the same pooled connection (pool of one), no option
        conn = conn.execution_options(**{CONTEXT_OPTION: scope.context})
        with conn.begin():
            seqscan, ef_search, again = _show(conn)
    assert again == pid
    assert seqscan == "on" and ef_search in (None, "", "40"), (seqscan, ef_search)


def test_settings_cost_no_round_trip(wired, tenants):
    counter, db = wired
    scope = with_tenant_scope(db, tenants.a)
    scope.scoped_query(brand_kits)  # warm: connect, role check
    before = counter.snapshot()
    with scope._connection(settings=SETTINGS) as conn:
        seqscan, ef_search, _ = _show(conn)
    spent = counter.snapshot().minus(before)
    assert (seqscan, ef_search) == ("off", "200")
    assert spent.round_trips == 1, spent.transcript
    trip = [sql for part in spent.transcript for sql in part]
    n = 3  # after BEGIN: the SET LOCALs that switch off planted timeouts and JIT for the start (issue 24)
    assert all(sql.startswith("SET LOCAL ") for sql in trip[1:1 + n]), trip
    assert trip[1 + n] == "SELECT rtv.clean_session()" and "set_signed_context" in trip[2 + n], trip
    assert [sql for sql in trip if "set_config" in sql] == ["SELECT set_config($1::text, $2::text, true)"] * 2, trip
    assert trip.index("SELECT set_config($1::text, $2::text, true)") == 3 + n and trip[-1] == "COMMIT", trip
    # In a transaction started without them, a scoped call sets them on its connection.
    with scope.scoped_transaction() as tx:
        with tx._connection(settings=(("enable_sort", False),)) as conn:
            assert conn.exec_driver_sql("SHOW enable_sort").scalar() == "off"
        assert tx.connection.exec_driver_sql("SHOW enable_seqscan").scalar() == "on"


@pytest.mark.parametrize("bad", [
    (("search_path", "evil"),),
    (("row_security", "off"),),
    (("default_transaction_read_only", "off"),),
    (("enable_seqscan", "off"), ("statement_timeout", "0")),
    (("enable_seqscan", "off\x00"),),
    (("enable_seqscan",),),
    "enable_seqscan",
])
def test_an_unlisted_setting_is_refused_before_anything_is_sent(wired, tenants, bad):
    counter, db = wired
    scope = with_tenant_scope(db, tenants.a)
    scope.scoped_query(brand_kits)
    before = counter.snapshot()
    with pytest.raises(InvalidInputError):
        with db.engine.connect() as conn:
            conn.execution_options(**{CONTEXT_OPTION: scope.context, TRANSACTION_SETTINGS_OPTION: bad})
    with pytest.raises(InvalidInputError):
        db.engine.execution_options(**{TRANSACTION_SETTINGS_OPTION: bad})
    with pytest.raises(InvalidInputError):
        with scope._connection(settings=bad):
            pass
    spent = counter.snapshot().minus(before)
    assert spent.statements == 0 and spent.round_trips == 0, spent.transcript


def test_settings_take_a_mapping_and_text_values():
    assert transaction_settings({"enable_seqscan": False, "hnsw.ef_search": 100}) == (
        ("enable_seqscan", "off"), ("hnsw.ef_search", "100"))
    assert transaction_settings([["hnsw.iterative_scan", "relaxed_order"]]) == (("hnsw.iterative_scan", "relaxed_order"),)


@pytest.mark.parametrize("single_call", [True, False])
def test_a_refused_context_is_reported_as_such_with_settings_after_it(db, tenants, monkeypatch, single_call):
    from rtv_db import TenantContextRefusedError
    from rtv_db.tenant import _transaction

    real = _transaction.ContextSetter.statement

    def forged(self, ctx):
        sql, params = real(self, ctx)
        token = params[0]
        return sql, (token[:-1] + ("1" if token[-1] == "0" else "0"),) + params[1:]  # a broken MAC

    scope = with_tenant_scope(db, tenants.a)
    monkeypatch.setattr(_transaction.ContextSetter, "statement", forged)
    with pytest.raises(TenantContextRefusedError):  # not the PipelineAborted of the settings after it
        if single_call:
            with scope._connection(settings=SETTINGS) as conn:
                conn.exec_driver_sql("SELECT 1")
        else:
            with db.engine.connect() as conn:
                conn = conn.execution_options(**{CONTEXT_OPTION: scope.context, TRANSACTION_SETTINGS_OPTION: SETTINGS})
                with conn.begin():
                    pass
