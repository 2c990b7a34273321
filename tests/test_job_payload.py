"""Signed job payloads: TenantContext.to_dict / from_dict, and examples/job_worker.py run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rtv_db import (
    ExpiredJobPayloadError,
    InvalidJobPayloadError,
    InvalidTenantContextError,
    TamperedJobPayloadError,
    TenantContext,
    brand_kits,
    with_tenant_scope,
)
from rtv_db.signing import generate_key

ROOT = Path(__file__).resolve().parent.parent
KEY = generate_key("jobtest")
OTHER = generate_key("jobtest")  # the same id, another secret


def _ctx() -> TenantContext:
    return TenantContext(uuid.uuid4(), uuid.uuid4(), "browser", user_id="u-1", correlation_id="c-1")


def test_round_trip_is_signed_and_json_safe() -> None:
    ctx = _ctx()
    payload = ctx.to_dict(key=KEY)
    assert json.loads(json.dumps(payload)) == payload
    assert set(payload) >= {"tenant_id", "signature", "expires_at", "key_id"}
    assert payload["key_id"] == "jobtest" and len(payload["signature"]) == 64
    assert TenantContext.from_dict(json.loads(json.dumps(payload)), key=KEY) == ctx


def test_default_key_is_the_context_key(monkeypatch) -> None:
    monkeypatch.setenv("RTV_DB_CONTEXT_KEY", f"old:{generate_key().hex},{KEY.key_id}:{KEY.hex}")
    ctx = _ctx()
    payload = ctx.to_dict()
    assert payload["key_id"] == KEY.key_id  # the last key signs
    assert TenantContext.from_dict(payload) == ctx
    assert TenantContext.from_dict(ctx.to_dict(key=KEY)) == ctx


@pytest.mark.parametrize("field, value", [
    ("tenant_id", str(uuid.uuid4())),
    ("platform_account_id", str(uuid.uuid4())),
    ("platform_account_id", None),
    ("lane", "api"),
    ("user_id", "admin"),
    ("user_id", None),
    ("correlation_id", "c-2"),
    ("expires_at", 4_102_444_800),
    ("signature", "0" * 64),
    ("key_id", "k-other"),
])
def test_any_change_is_tampering(field, value) -> None:
    payload = _ctx().to_dict(key=KEY) | {field: value}
    with pytest.raises(TamperedJobPayloadError):
        TenantContext.from_dict(payload, key=KEY)


def test_another_key_is_tampering() -> None:
    with pytest.raises(TamperedJobPayloadError):
        TenantContext.from_dict(_ctx().to_dict(key=OTHER), key=KEY)


def test_expired(monkeypatch) -> None:
    payload = _ctx().to_dict(key=KEY, ttl=1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 5)
    with pytest.raises(ExpiredJobPayloadError) as caught:
        TenantContext.from_dict(payload, key=KEY)
    assert isinstance(caught.value, InvalidTenantContextError)  # a 400, like any bad context


@pytest.mark.parametrize("data", [
    {},
    {"tenant_id": str(uuid.uuid4())},  # an unsigned payload of an earlier rtv-db
    None,
    "a string",
    [1, 2],
    {"signature": "x"},
    {"is_admin": True},
])
def test_malformed_is_typed_never_type_error(data) -> None:
    with pytest.raises(InvalidJobPayloadError):
        TenantContext.from_dict(data, key=KEY)


@pytest.mark.parametrize("field, value", [
    ("expires_at", "soon"), ("expires_at", True), ("signature", 5), ("tenant_id", 5), ("v", 2), ("key_id", None),
])
def test_malformed_fields(field, value) -> None:
    with pytest.raises(InvalidJobPayloadError):
        TenantContext.from_dict(_ctx().to_dict(key=KEY) | {field: value}, key=KEY)


def test_unsigned_payloads_only_on_request() -> None:
    tenant = uuid.uuid4()
    old = {"tenant_id": str(tenant), "platform_account_id": None, "lane": "api", "user_id": None, "correlation_id": "c"}
    with pytest.raises(InvalidJobPayloadError, match="not signed"):
        TenantContext.from_dict(old, key=KEY)
    assert TenantContext.from_dict(old, allow_unsigned=True).tenant_id == tenant
    with pytest.raises(InvalidJobPayloadError):
        TenantContext.from_dict({}, allow_unsigned=True)


def test_bad_ttl() -> None:
    for ttl in (0, -1, True, 10**9, 1.5):
        with pytest.raises(InvalidTenantContextError):
            _ctx().to_dict(key=KEY, ttl=ttl)


def test_the_job_worker_example(target, tenants) -> None:
    """examples/job_worker.py as a program: four worker threads, two tenants, one forged payload."""
    env = dict(os.environ, DATABASE_URL=target.runtime_url, PYTHONPATH=str(ROOT / "src"))
    env.pop("RTV_DB_ADMIN_URL", None)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "job_worker.py"), str(tenants.a), str(tenants.b)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert {"job": "forged", "refused": "TamperedJobPayloadError"} in results
    ran = [r for r in results if "brand_kit" in r]
    assert len(ran) == 6
    assert {r["tenant"] for r in ran} == {str(tenants.a), str(tenants.b)}
    from rtv_db import Database

    db = Database(target.runtime_url)
    try:
        for tenant in (tenants.a, tenants.b):
            rows = with_tenant_scope(db, tenant).scoped_query(brand_kits)
            mine = {str(r.id) for r in rows}
            assert {r["brand_kit"] for r in ran if r["tenant"] == str(tenant)} <= mine
            assert sum(r.name.startswith("job-kit-") for r in rows) == 3  # the forged job wrote nothing
    finally:
        db.close()
