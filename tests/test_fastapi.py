"""rtv_db.fastapi end to end: real uvicorn servers on loopback ports, httpx clients, two tenants
at once. examples/fastapi_app.py runs as its own process (the async path); a small sync app runs
in a thread (the sync path, and the JWT-claim resolver)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install 'rtv-db[fastapi]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the dev extra has it)")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (the dev extra has it)")

from fastapi import Depends, FastAPI  # noqa: E402

from rtv_db import Database, TenantScope, brand_kits, knowledge_bases, with_tenant_scope  # noqa: E402
from rtv_db.fastapi import Tenancy, install_exception_handlers, jwt_claim_tenant, path_tenant  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not come up")


@pytest.fixture()
def example_server(target) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, DATABASE_URL=target.runtime_url, PYTHONPATH=str(ROOT / "src"))
    env.pop("RTV_DB_ADMIN_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples"), "fastapi_app:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _kb(db: Database, tenant: uuid.UUID) -> uuid.UUID:
    (row,) = with_tenant_scope(db, tenant).scoped_insert(knowledge_bases, {"name": "KB"})
    return row.id


async def test_example_app_two_tenants_concurrently(example_server, db, tenants) -> None:
    kb_a, kb_b = _kb(db, tenants.a), _kb(db, tenants.b)
    ha, hb = {"X-Tenant-Id": str(tenants.a)}, {"X-Tenant-Id": str(tenants.b)}
    async with httpx.AsyncClient(base_url=example_server, timeout=30) as client:

        async def work(headers: dict[str, str], tenant: str, i: int) -> str:
            created = await client.post("/brand-kits", json={"name": f"{tenant}-{i}"}, headers=headers)
            assert created.status_code == 201, created.text
            kit = created.json()
            got = await client.get(f"/brand-kits/{kit['id']}", headers=headers)
            assert got.status_code == 200 and got.json()["name"] == f"{tenant}-{i}"
            listed = await client.get("/brand-kits?limit=200", headers=headers)
            assert listed.json()["next"] is None
            names = [k["name"] for k in listed.json()["items"]]
            assert all(n.startswith(f"{tenant}-") or n == f"Brand {tenant}" for n in names), names
            return kit["id"]

        jobs = [work(ha, "A", i) for i in range(25)] + [work(hb, "B", i) for i in range(25)]
        ids = await asyncio.gather(*[jobs[j] for pair in zip(range(25), range(25, 50)) for j in pair])
        a_ids, b_ids = ids[0::2], ids[1::2]

        # A tenant header sent twice (a gateway that appends its value after the client's): refused,
        # not resolved to the first copy, which the client chose (issue 24).
        twice = await client.get("/brand-kits", headers=[("X-Tenant-Id", str(tenants.b)), ("X-Tenant-Id", str(tenants.a))])
        assert twice.status_code == 422 and twice.json()["error"] == "InvalidInputError", twice.text
        assert "Brand B" not in twice.text

        # Another tenant's row by id answers exactly like a random id: 404, the same body.
        other = await client.get(f"/brand-kits/{b_ids[0]}", headers=ha)
        random = await client.get(f"/brand-kits/{uuid.uuid4()}", headers=ha)
        assert other.status_code == random.status_code == 404
        assert other.json() == random.json() == {"detail": "brand kit not found", "error": "TenantAccessError"}
        deleted_other = await client.delete(f"/brand-kits/{b_ids[0]}", headers=ha)
        assert deleted_other.status_code == 404 and deleted_other.json() == random.json()
        assert (await client.get(f"/brand-kits/{b_ids[0]}", headers=hb)).status_code == 200  # still there
        assert (await client.delete(f"/brand-kits/{a_ids[0]}", headers=ha)).status_code == 204

        # Duplicate: 409, no values of the row in the body.
        dup = await client.post("/brand-kits", json={"name": "A-1"}, headers=ha)
        assert dup.status_code == 409 and dup.json()["error"] == "DuplicateError"
        assert "A-1" not in dup.text and str(tenants.a) not in dup.text

        # A chunk in another tenant's knowledge base and in none: 422, the same body.
        theirs = await client.post("/chunks", json={"knowledge_base_id": str(kb_b), "content": "x"}, headers=ha)
        none = await client.post("/chunks", json={"knowledge_base_id": str(uuid.uuid4()), "content": "x"}, headers=ha)
        assert theirs.status_code == none.status_code == 422
        assert theirs.json() == none.json() and theirs.json()["error"] == "ReferenceNotFoundError"
        mine = await client.post("/chunks", json={"knowledge_base_id": str(kb_a), "content": "x"}, headers=ha)
        assert mine.status_code == 201

        # Pages: every kit of B once, in name order; A's cursor is refused for B.
        names, after = [], None
        while True:
            page = (await client.get("/brand-kits", params={"limit": 7, **({"after": after} if after else {})},
                                     headers=hb)).json()
            names += [k["name"] for k in page["items"]]
            if not (after := page["next"]):
                break
        assert names == sorted(["Brand B"] + [f"B-{i}" for i in range(25)])
        a_cursor = (await client.get("/brand-kits", params={"limit": 2}, headers=ha)).json()["next"]
        refused = await client.get("/brand-kits", params={"limit": 2, "after": a_cursor}, headers=hb)
        assert refused.status_code == 422 and refused.json()["error"] == "InvalidCursorError"

        # Malformed context: 400; none: 401.
        bad = await client.get("/brand-kits", headers={"X-Tenant-Id": "not-a-uuid"})
        assert bad.status_code == 400 and bad.json()["error"] == "InvalidTenantContextError"
        missing = await client.get("/brand-kits")
        assert missing.status_code == 401 and missing.json()["error"] == "MissingTenantContextError"
        # FastAPI's own validation (a non-UUID path id) stays a 422.
        assert (await client.get("/brand-kits/nope", headers=ha)).status_code == 422

    a_rows = with_tenant_scope(db, tenants.a).scoped_query(brand_kits)
    b_rows = with_tenant_scope(db, tenants.b).scoped_query(brand_kits)
    assert len(a_rows) == 25 and len(b_rows) == 26  # A deleted one of its 25 + "Brand A"; B kept all
    assert not {str(r.id) for r in a_rows} & set(b_ids)


# -- the sync path, in a thread ---------------------------------------------------------------------


def _verify(token: str) -> dict[str, str]:
    """Stand-in for the app's JWT verification (PyJWT's jwt.decode with its key)."""
    if not token.startswith("valid:"):
        raise ValueError("bad signature")
    return {"tenant_id": token.removeprefix("valid:"), "sub": "user-1"}


def _sync_app(db: Database) -> FastAPI:
    by_token = Tenancy(db, jwt_claim_tenant(_verify))
    by_path = Tenancy(db, path_tenant("tenant_id"))
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/kits")
    def kits(scope: TenantScope = Depends(by_token.scope)) -> list[str]:
        return sorted(r.name for r in scope.scoped_query(brand_kits))

    @app.get("/me")
    def me(session=Depends(by_token.session)) -> dict[str, str | None]:
        ctx = session.info["rtv_tenant_context"]
        return {"tenant": str(ctx.tenant_id), "user": ctx.user_id}

    @app.post("/tenants/{tenant_id}/kits", status_code=201)
    def add(tenant_id: str, name: str, scope: TenantScope = Depends(by_path.scope)) -> dict[str, str]:
        (row,) = scope.scoped_insert(brand_kits, {"name": name})
        return {"id": str(row.id)}

    return app


@pytest.fixture()
def sync_server(db) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_sync_app(db), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(20)


def test_sync_app_with_jwt_and_path_resolvers(sync_server, tenants) -> None:
    with httpx.Client(base_url=sync_server, timeout=30) as client:
        assert client.get("/kits", headers={"Authorization": f"Bearer valid:{tenants.a}"}).json() == ["Brand A"]
        assert client.get("/kits", headers={"Authorization": f"Bearer valid:{tenants.b}"}).json() == ["Brand B"]
        assert client.get("/me", headers={"Authorization": f"Bearer valid:{tenants.a}"}).json() == {
            "tenant": str(tenants.a), "user": "user-1"}
        for headers in ({}, {"Authorization": "Bearer forged"}, {"Authorization": "Basic x"}):
            r = client.get("/kits", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert client.get("/kits", headers={"Authorization": "Bearer valid:12"}).status_code == 400
        r = client.post(f"/tenants/{tenants.a}/kits", params={"name": "Via path"})
        assert r.status_code == 201
        assert client.post(f"/tenants/{tenants.a}/kits", params={"name": "Via path"}).status_code == 409
        assert client.post("/tenants/xyz/kits", params={"name": "x"}).status_code == 400
        big = client.post(f"/tenants/{tenants.a}/kits", params={"name": "a\x00b"})
        assert big.status_code == 422 and big.json()["error"] == "InvalidInputError"
