"""The bad-input catalogue: each bad input gets a typed, clear error, and nothing is written.

The catalogue is data (``CASES``): an id, the call, the error type, a pattern its message must
match. One parametrised test runs each case as the runtime role and proves with the system scope
that no table changed. ``docs/bad-input.md`` documents the same catalogue; a test keeps the two
in step (every case id appears in the document).

The cases never write, so they share one database per module (a fresh one per case would cost
most of the run time for nothing).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import Column, MetaData, Table, literal, or_, text

from conftest import make_tenants, migrated_database
from reliability_checks import assert_no_context_left, table_counts
from rtv_db import (
    CrossTenantWriteError,
    Database,
    InvalidInputError,
    InvalidTenantContextError,
    MissingTenantContextError,
    SystemScope,
    TenantContext,
    UnscopedWriteError,
    with_tenant_scope,
)
from rtv_db.config import to_libpq_url
from rtv_db.schema import brand_kits, clients, knowledge_bases, knowledge_chunks, platform_accounts, platform_actions
from rtv_db.signing import load_keys, mint_token
from rtv_db.tenant._statements import MAX_JSON_DEPTH, MAX_VALUE_BYTES

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
TEN_MB = 10 * 1024 * 1024


@dataclass(frozen=True)
class World:
    db: Database
    system: SystemScope
    runtime_url: str
    a: uuid.UUID
    b: uuid.UUID
    account_a: uuid.UUID
    account_b: uuid.UUID
    kb_a: uuid.UUID
    kb_b: uuid.UUID
    kit_b: uuid.UUID

    def scope(self, tenant: Any = None, **kwargs: Any):
        return with_tenant_scope(self.db, self.a if tenant is None else tenant, **kwargs)

    def actions(self, account: Any = None, lane: str = "api"):
        return self.scope(platform_account_id=account or self.account_a, lane=lane)


@pytest.fixture(scope="module")
def world(cluster, template) -> Iterator[World]:
    with migrated_database(cluster, template, "rtv_test_bad_input") as target:
        system = SystemScope(target.system_url, reason="bad-input catalogue setup")
        db = Database(target.runtime_url)
        try:
            a, b = make_tenants(system, "A", "B")
            ids = {k: uuid.uuid4() for k in ("account_a", "account_b", "kb_a", "kb_b")}
            with system.transaction() as conn:
                conn.execute(platform_accounts.insert(), [
                    {"client_id": a, "id": ids["account_a"], "platform": "x", "handle": "a", "lanes": ["api", "browser"]},
                    {"client_id": b, "id": ids["account_b"], "platform": "x", "handle": "b", "lanes": ["api"]},
                ])
                conn.execute(knowledge_bases.insert(), [
                    {"client_id": a, "id": ids["kb_a"], "name": "kb"}, {"client_id": b, "id": ids["kb_b"], "name": "kb"},
                ])
                kit_b = conn.execute(text("SELECT id FROM brand_kits WHERE client_id = :b"), {"b": b}).scalar_one()
            yield World(db, system, target.runtime_url, a, b, kit_b=kit_b, **ids)
        finally:
            db.close()
            system.close()


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _raw_sql(w: World, statement: str, *args: Any) -> None:
    """Run ``statement`` on a raw runtime-role connection, bypassing Python's validation."""
    with psycopg.connect(to_libpq_url(w.runtime_url)) as conn:
        conn.execute(statement, args)


def _token(tenant: uuid.UUID, *, expired: bool = False) -> str:
    """A token signed with the run's key."""
    return mint_token(load_keys()[-1], tenant_id=tenant, platform_account_id=None, lane="api",
                      expires_at=int(time.time()) + (-10 if expired else 300), correlation_id="c")


def _replay(w: Any) -> None:
    """Spend a token in one transaction (committed), then offer it again."""
    token = _token(w.a)
    _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, 'c')", token)
    _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, 'c')", token)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[World], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    message: str  # a regular expression the error message must match


ICE = InvalidTenantContextError
IIE = InvalidInputError
INTEGRITY = sqlalchemy.exc.IntegrityError

_BAD_TENANT_IDS: list[tuple[str, Any, str]] = [
    ("tenant-not-uuid", "not-a-uuid", "not a UUID"),
    ("tenant-empty", "", "is required"),
    ("tenant-none", None, "is required"),
    ("tenant-blank", "   ", "not a UUID"),
    ("tenant-padded", "  01234567-89ab-cdef-0123-456789abcdef  ", "not a UUID"),
    ("tenant-short-number", "12345", "not a UUID"),
    ("tenant-too-long", "a" * 1000, "too long"),
    ("tenant-sqli-drop", "'; DROP TABLE clients; --", "not a UUID"),
    ("tenant-sqli-or", "00000000-0000-0000-0000-000000000000' OR '1'='1", "not a UUID"),
    ("tenant-braces", "{01234567-89ab-cdef-0123-456789abcdef}", "canonical form"),
    ("tenant-urn", "urn:uuid:01234567-89ab-cdef-0123-456789abcdef", "canonical form"),
    ("tenant-unicode-digits", "\u0660" * 32, "canonical form"),
    ("tenant-nul", "01234567-89ab-cdef-0123-456789abcde\x00", "not a UUID"),
    ("tenant-int", 42, "not int"),
    ("tenant-uuid-as-int", uuid.UUID(int=7).int, "not int"),
    ("tenant-bytes", uuid.UUID(int=7).bytes, "not bytes"),
    ("tenant-float", 1.5, "not float"),
    ("tenant-dict", {"id": "01234567-89ab-cdef-0123-456789abcdef"}, "not dict"),
    ("tenant-list", ["01234567-89ab-cdef-0123-456789abcdef"], "not list"),
    ("tenant-true", True, "not bool"),
    ("tenant-false", False, "not bool"),
]

_BAD_LANES: list[tuple[str, Any]] = [
    ("lane-admin", "admin"),
    ("lane-uppercase", "API"),
    ("lane-padded", " api"),
    ("lane-empty", ""),
    ("lane-none", None),
    ("lane-nul", "api\x00"),
    ("lane-sqli", "api' OR '1'='1"),
    ("lane-int", 1),
    ("lane-list", ["api"]),
]

CASES: list[Case] = [
    *(Case(cid, (lambda v: lambda w: with_tenant_scope(w.db, v))(value), ICE, msg) for cid, value, msg in _BAD_TENANT_IDS),
    *(Case(cid, (lambda v: lambda w: w.scope(platform_account_id=w.account_a, lane=v))(value), ICE, "lane must be one of")
      for cid, value in _BAD_LANES),
    Case("account-not-uuid", lambda w: w.scope(platform_account_id="acct-1"), ICE, "platform_account_id is not a UUID"),
    Case("account-int", lambda w: w.scope(platform_account_id=7), ICE, "platform_account_id must be a UUID"),
    Case("user-id-nul", lambda w: w.scope(user_id="u\x00"), ICE, "printable"),
    Case("user-id-too-long", lambda w: w.scope(user_id="u" * 201), ICE, "at most 200"),
    Case("user-id-int", lambda w: w.scope(user_id=5), ICE, "must be a string"),
    Case("correlation-id-newline", lambda w: w.scope(correlation_id="a\nb"), ICE, "printable"),
    Case("context-from-dict-extra", lambda w: TenantContext.from_dict({"tenant_id": str(w.a), "is_admin": True}), ICE, "unknown"),
    # Another tenant's rows, named explicitly.
    Case("action-other-tenants-account", lambda w: w.actions(w.account_b).scoped_insert(platform_actions, {"kind": "post"}),
         INTEGRITY, "platform_actions_platform_account_fkey"),
    Case("action-unknown-account", lambda w: w.actions(uuid.uuid4()).scoped_insert(platform_actions, {"kind": "post"}),
         INTEGRITY, "platform_actions_platform_account_fkey"),
    Case("action-values-name-other-account",
         lambda w: w.actions().scoped_insert(platform_actions, {"kind": "post", "platform_account_id": w.account_b}),
         CrossTenantWriteError, "differs from the context's account"),
    Case("action-values-other-lane", lambda w: w.actions().scoped_insert(platform_actions, {"kind": "post", "lane": "browser"}),
         CrossTenantWriteError, "differs from the context's lane"),
    Case("action-without-account", lambda w: w.scope().scoped_insert(platform_actions, {"kind": "post"}),
         MissingTenantContextError, "needs a platform_account_id"),
    Case("action-bad-status", lambda w: w.actions().scoped_insert(platform_actions, {"kind": "post", "status": "hacked"}),
         INTEGRITY, "platform_actions_status_check"),
    Case("insert-other-client-id", lambda w: w.scope().scoped_insert(brand_kits, {"name": "x", "client_id": w.b}),
         CrossTenantWriteError, "names another tenant"),
    Case("insert-garbage-client-id", lambda w: w.scope().scoped_insert(brand_kits, {"name": "x", "client_id": "' OR 1=1"}),
         CrossTenantWriteError, "names another tenant"),
    Case("chunk-other-tenants-kb",
         lambda w: w.scope().scoped_insert(knowledge_chunks, {"knowledge_base_id": w.kb_b, "content": "x"}),
         INTEGRITY, "knowledge_chunks_knowledge_base_fkey"),
    Case("update-client-id", lambda w: w.scope().scoped_update(brand_kits, {"client_id": w.b}, brand_kits.c.name == "Brand A"),
         CrossTenantWriteError, "may not change brand_kits.client_id"),
    Case("update-id", lambda w: w.scope().scoped_update(brand_kits, {"id": uuid.uuid4()}, brand_kits.c.name == "Brand A"),
         CrossTenantWriteError, "may not change brand_kits.id"),
    Case("unknown-tenant", lambda w: w.scope(uuid.uuid4()).scoped_insert(brand_kits, {"name": "x"}),
         INTEGRITY, "brand_kits_client_id_fkey"),
    Case("insert-into-clients", lambda w: w.scope().scoped_insert(clients, {"name": "x", "slug": "x"}), IIE, "system scope"),
    # Oversized values.
    Case("json-10mb", lambda w: w.scope().scoped_insert(brand_kits, {"name": "big", "colors": {"x": "0" * TEN_MB}}),
         IIE, "limit is 1048576 bytes"),
    Case("json-10mb-many-keys",
         lambda w: w.scope().scoped_insert(brand_kits, {"name": "big", "colors": {f"k{i}": i for i in range(800_000)}}),
         IIE, "bytes as JSON; the limit is 1048576"),
    Case("json-just-over-limit",
         lambda w: w.scope().scoped_insert(brand_kits, {"name": "big", "colors": {"k": "x" * (MAX_VALUE_BYTES - 8)}}),
         IIE, "limit is 1048576"),
    Case("json-10mb-update",
         lambda w: w.scope().scoped_update(brand_kits, {"tone": {"voice": "x" * TEN_MB}}, brand_kits.c.name == "Brand A"),
         IIE, "limit is 1048576"),
    Case("json-too-deep", lambda w: w.scope().scoped_insert(brand_kits, {"name": "deep", "colors": _nested(10_000)}),
         IIE, f"more than {MAX_JSON_DEPTH} levels"),
    Case("text-10mb", lambda w: w.scope().scoped_insert(knowledge_chunks, {"knowledge_base_id": w.kb_a, "content": "x" * TEN_MB}),
         IIE, "limit is 1048576"),
    Case("name-too-long", lambda w: w.scope().scoped_insert(brand_kits, {"name": "n" * 201}), INTEGRITY, "brand_kits_name_check"),
    Case("insert-100k-rows-one-bad",
         lambda w: w.scope().scoped_insert(knowledge_chunks, [{"knowledge_base_id": w.kb_a, "content": f"c{i}"} for i in range(99_999)]
                                           + [{"knowledge_base_id": w.kb_a, "content": "bad\x00"}]),
         IIE, "NUL"),
    # Odd Unicode and values PostgreSQL cannot store.
    Case("text-nul", lambda w: w.scope().scoped_insert(brand_kits, {"name": "a\x00b"}), IIE, "NUL character"),
    Case("json-value-nul", lambda w: w.scope().scoped_insert(brand_kits, {"name": "j", "colors": {"k": "a\x00"}}), IIE, "NUL"),
    Case("json-key-nul", lambda w: w.scope().scoped_insert(brand_kits, {"name": "j", "colors": {"k\x00": 1}}), IIE, "NUL"),
    Case("text-lone-surrogate", lambda w: w.scope().scoped_insert(brand_kits, {"name": "a\ud800"}), IIE, "lone surrogate"),
    Case("json-lone-surrogate", lambda w: w.scope().scoped_insert(brand_kits, {"name": "j", "colors": {"k": "\udfff"}}),
         IIE, "lone surrogate"),
    Case("json-nan", lambda w: w.scope().scoped_insert(brand_kits, {"name": "j", "colors": {"k": float("nan")}}), IIE, "not JSON"),
    Case("json-set", lambda w: w.scope().scoped_insert(brand_kits, {"name": "j", "colors": {"k": {1, 2}}}), IIE, "not JSON"),
    Case("array-nul", lambda w: w.scope().scoped_update(platform_accounts, {"lanes": ["api\x00"]}, platform_accounts.c.handle == "a"),
         IIE, "NUL"),
    Case("where-nul", lambda w: w.scope().scoped_delete(brand_kits, brand_kits.c.name == "a\x00"), sqlalchemy.exc.DataError, "NUL"),
    Case("embedding-wrong-dimension",
         lambda w: w.scope().scoped_insert(knowledge_chunks, {"knowledge_base_id": w.kb_a, "content": "x", "embedding": [0.5] * 3}),
         sqlalchemy.exc.DataError, "expected 384 dimensions"),
    Case("embedding-nan",
         lambda w: w.scope().scoped_insert(knowledge_chunks, {"knowledge_base_id": w.kb_a, "content": "x",
                                                              "embedding": [float("nan")] * 384}),
         sqlalchemy.exc.DataError, "NaN not allowed"),
    Case("wrong-value-type", lambda w: w.scope().scoped_insert(brand_kits, {"name": "t", "tone": "not an object"}),
         INTEGRITY, "brand_kits_tone_check"),
    # The shape of the call.
    Case("unknown-column", lambda w: w.scope().scoped_insert(brand_kits, {"name": "x", "is_admin": True}), IIE, "no column"),
    Case("column-sqli", lambda w: w.scope().scoped_insert(brand_kits, {"name": "x", "name) VALUES ('x'); --": 1}), IIE, "no column"),
    Case("column-not-str", lambda w: w.scope().scoped_insert(brand_kits, {1: "x"}), IIE, "no column"),
    Case("update-unknown-column", lambda w: w.scope().scoped_update(brand_kits, {"nope": 1}, brand_kits.c.name == "Brand A"),
         IIE, "no column"),
    Case("values-str", lambda w: w.scope().scoped_insert(brand_kits, "name=x"), IIE, "must be a mapping"),
    Case("values-int", lambda w: w.scope().scoped_insert(brand_kits, 42), IIE, "must be a mapping"),
    Case("values-none", lambda w: w.scope().scoped_insert(brand_kits, None), IIE, "must be a mapping"),
    Case("values-bytes", lambda w: w.scope().scoped_insert(brand_kits, b"name"), IIE, "must be a mapping"),
    Case("values-list-of-str", lambda w: w.scope().scoped_insert(brand_kits, ["name"]), IIE, "must be a mapping"),
    Case("values-empty-list", lambda w: w.scope().scoped_insert(brand_kits, []), IIE, "nothing to insert"),
    Case("update-values-str", lambda w: w.scope().scoped_update(brand_kits, "name='x'", brand_kits.c.name == "Brand A"),
         IIE, "must be a mapping"),
    Case("update-values-empty", lambda w: w.scope().scoped_update(brand_kits, {}, brand_kits.c.name == "Brand A"),
         IIE, "nothing to update"),
    Case("update-without-where", lambda w: w.scope().scoped_update(brand_kits, {"name": "x"}), UnscopedWriteError, "needs a condition"),
    Case("delete-without-where", lambda w: w.scope().scoped_delete(brand_kits), UnscopedWriteError, "needs a condition"),
    # A condition that is always true for the tenant is no condition (all_rows=True says it).
    Case("update-literal-true", lambda w: w.scope().scoped_update(brand_kits, {"name": "x"}, literal(True)),
         UnscopedWriteError, "always true for the tenant .it is a literal TRUE"),
    Case("delete-text-true", lambda w: w.scope().scoped_delete(brand_kits, text("true")),
         UnscopedWriteError, "mentions no column of brand_kits"),
    Case("delete-id-is-not-null", lambda w: w.scope().scoped_delete(brand_kits, brand_kits.c.id.isnot(None)),
         UnscopedWriteError, "brand_kits.id is never NULL"),
    Case("update-column-equals-itself", lambda w: w.scope().scoped_update(brand_kits, {"name": "x"},
                                                                          brand_kits.c.name == brand_kits.c.name),
         UnscopedWriteError, "compares brand_kits.name with itself"),
    Case("delete-or-true", lambda w: w.scope().scoped_delete(brand_kits, or_(brand_kits.c.name == "Brand A", text("1 = 1"))),
         UnscopedWriteError, "a branch of its OR"),
    Case("delete-tenant-column-only", lambda w: w.scope().scoped_delete(brand_kits, brand_kits.c.client_id == w.a),
         UnscopedWriteError, "no column of brand_kits other than client_id"),
    Case("update-all-rows-not-bool", lambda w: w.scope().scoped_update(brand_kits, {"name": "x"}, all_rows="yes"),
         IIE, "all_rows must be True or False"),
    Case("where-raw-string", lambda w: w.scope().scoped_delete(brand_kits, "1=1"), sqlalchemy.exc.ArgumentError, "text"),
    Case("table-name-string", lambda w: w.scope().scoped_query("brand_kits"), IIE, "expected a table"),
    Case("table-not-tenant", lambda w: w.scope().scoped_query(Table("t", MetaData(), Column("id"))), IIE, "not a tenant table"),
    Case("get-id-not-uuid", lambda w: w.scope().scoped_get(brand_kits, "1 OR 1=1"), IIE, "id is not a UUID"),
    # The SQL setters themselves, called directly as the runtime role with what Python would refuse.
    Case("sql-plain-setter", lambda w: _raw_sql(w, "SELECT rtv.set_tenant_context(%s)", str(w.a)),
         psycopg.errors.InsufficientPrivilege, "must be signed"),
    Case("sql-token-garbage", lambda w: _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, NULL)", "not-a-token"),
         psycopg.errors.InvalidAuthorizationSpecification, "refused"),
    Case("sql-token-null", lambda w: _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, NULL)", None),
         psycopg.errors.NullValueNotAllowed, "a token is required"),
    Case("sql-token-sqli", lambda w: _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, NULL)", "v1.k.' OR '1'='1"),
         psycopg.errors.InvalidAuthorizationSpecification, "refused"),
    Case("sql-token-replayed", _replay, psycopg.errors.InvalidAuthorizationSpecification, "replayed"),
    Case("sql-token-expired", lambda w: _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, 'c')", _token(w.a, expired=True)),
         psycopg.errors.InvalidAuthorizationSpecification, "expired"),
    Case("sql-token-tampered-tenant",
         lambda w: _raw_sql(w, "SELECT rtv.set_signed_context(%s, NULL, 'c')", _token(w.a).replace(str(w.a), str(w.b))),
         psycopg.errors.InvalidAuthorizationSpecification, "bad signature"),
]


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world: World, case: Case) -> None:
    before = table_counts(world.system)
    with pytest.raises(case.error) as info:
        case.call(world)
    assert re.search(case.message, str(info.value)), f"{type(info.value).__name__}: {str(info.value)[:300]}"
    assert len(str(info.value)) < 2000, "the message must be clear, not a dump of the input"
    assert table_counts(world.system) == before, "a bad input wrote something"
    assert_no_context_left(world.db)
    if os.environ.get("RTV_BAD_INPUT_DUMP"):  # to write the table in docs/bad-input.md
        with open(os.environ["RTV_BAD_INPUT_DUMP"], "a") as fh:
            fh.write(json.dumps([case.id, f"{type(info.value).__module__}.{type(info.value).__qualname__}",
                                 str(info.value).splitlines()[0][:160]]) + "\n")


def test_the_catalogue_is_documented() -> None:
    doc = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not missing, f"docs/bad-input.md lacks: {missing}"


# -- inputs that are accepted: the same tenant, or stored exactly ------------------------------

@pytest.mark.parametrize("spelling", ["upper", "hex", "uuid"])
def test_other_spellings_of_a_valid_id_name_the_same_tenant(world: World, spelling: str) -> None:
    value = {"upper": str(world.a).upper(), "hex": world.a.hex, "uuid": world.a}[spelling]
    scope = with_tenant_scope(world.db, value)
    assert scope.tenant_id == world.a
    assert [r.name for r in scope.scoped_query(brand_kits)] == ["Brand A"]


ODD_TEXT = [
    "emoji 🎨🧪👩‍👩‍👧",
    "rtl \u202eevil\u202c override",
    "zero\u200bwidth\u200djoiner\ufeff",
    "combining e\u0301 \u0301",
    "cjk 漢字 かな 한글",
    "noncharacter \uffff \U0010ffff",
    "quotes ' \" ` ; -- /* */ $$ \\",
    "format %s %(x)s {0} :name $1",
    "control \t\r\n\x1b[31m",
]


@pytest.mark.parametrize("value", ODD_TEXT, ids=[v.split()[0] for v in ODD_TEXT])
def test_odd_unicode_is_stored_exactly(world: World, value: str) -> None:
    scope = world.scope()
    with scope.scoped_transaction() as tx:  # written and read back, then rolled back: the module's data stays
        (row,) = tx.scoped_insert(brand_kits, {"name": value[:200], "colors": {value: value}, "logo_refs": [value]})
        again = tx.scoped_get(brand_kits, row.id)
        assert (again.name, again.colors, again.logo_refs) == (value[:200], {value: value}, [value])
        # The other tenant sees none of it.
        assert world.scope(world.b).scoped_get(brand_kits, row.id) is None
        tx.connection.rollback()


def test_json_at_the_limit_is_accepted(world: World) -> None:
    value = {"k": "x" * (MAX_VALUE_BYTES - 9)}  # {"k": "..."} is exactly MAX_VALUE_BYTES bytes
    with world.scope().scoped_transaction() as tx:
        (row,) = tx.scoped_insert(brand_kits, {"name": "at-limit", "colors": value})
        assert len(row.colors["k"]) == MAX_VALUE_BYTES - 9
        tx.connection.rollback()


def test_another_tenants_account_reveals_nothing(world: World) -> None:
    """B's real account and a random uuid fail the same way: the error is no oracle."""
    errors = []
    for account in (world.account_b, uuid.uuid4()):
        with pytest.raises(sqlalchemy.exc.IntegrityError) as info:
            world.actions(account).scoped_insert(platform_actions, {"kind": "post"})
        errors.append((type(info.value.orig), info.value.orig.diag.constraint_name, str(info.value.orig).replace(str(account), "?")))
    assert errors[0] == errors[1]
    # And reading through B's account shows nothing either.
    assert world.actions(world.account_b).scoped_query(platform_actions) == []


def test_another_tenants_row_is_not_found_not_changed(world: World) -> None:
    """Naming B's row by id from A: zero rows read, updated or deleted; no error that would tell."""
    scope = world.scope()
    before = table_counts(world.system)
    assert scope.scoped_get(brand_kits, world.kit_b) is None
    assert scope.scoped_update(brand_kits, {"name": "pwned"}, brand_kits.c.id == world.kit_b) == []
    assert scope.scoped_delete(brand_kits, brand_kits.c.id == world.kit_b) == []
    assert table_counts(world.system) == before
    with world.system.transaction() as conn:
        assert conn.execute(text("SELECT name FROM brand_kits WHERE id = :k"), {"k": world.kit_b}).scalar_one() == "Brand B"
