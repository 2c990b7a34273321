"""Handing work to a thread pool with the tenant context signed in the job payload.

The producer (a web request, say) turns its context into a payload with ``ctx.to_dict()``:
JSON-safe, signed with a key derived from the tenant context key, valid for an hour. The worker
trusts nothing else: ``TenantContext.from_dict`` verifies it (a changed tenant id, an unknown key
or an expired payload raise typed errors and the job never runs), and the job runs inside
``run_with_tenant_context``, bound by RLS to that one tenant.

    DATABASE_URL=postgresql://rtv_app:...@host/rtv python examples/job_worker.py TENANT_ID [TENANT_ID ...]

(``RTV_DB_CONTEXT_KEY`` or the key file must be the one ``rtv-db migrate`` installed.) It
enqueues three jobs per tenant plus one forged payload, runs them on four worker threads, and
prints one JSON line per job.
"""

from __future__ import annotations

import json
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rtv_db import Database, InvalidJobPayloadError, TenantContext, brand_kits, run_with_tenant_context
from rtv_db.tenant import require_tenant_context, with_tenant_scope


def add_brand_kit(db: Database, name: str) -> str:
    """The job: runs as whichever tenant the verified payload names, and only as that one."""
    scope = with_tenant_scope(db, require_tenant_context())
    (row,) = scope.scoped_insert(brand_kits, {"name": name})
    return str(row.id)


def handle(db: Database, message: str) -> dict[str, Any]:
    """One queue message (the JSON the producer sent): verify, then run."""
    job = json.loads(message)
    try:
        ctx = TenantContext.from_dict(job["context"])
    except InvalidJobPayloadError as exc:  # malformed, tampered, expired: refuse, never guess a tenant
        return {"job": job.get("name"), "refused": type(exc).__name__}
    kit_id = run_with_tenant_context(ctx, add_brand_kit, db, job["name"])
    return {"job": job["name"], "tenant": str(ctx.tenant_id), "brand_kit": kit_id}


def enqueue(jobs: "queue.Queue[str]", ctx: TenantContext, name: str) -> None:
    """The producer side: the payload travels as plain JSON (a queue, Redis, a table...)."""
    jobs.put(json.dumps({"name": name, "context": ctx.to_dict()}))


def run(db: Database, tenant_ids: list[str], workers: int = 4) -> list[dict[str, Any]]:
    jobs: "queue.Queue[str]" = queue.Queue()
    for tenant_id in tenant_ids:
        ctx = TenantContext(tenant_id, user_id="producer")
        for i in range(3):
            enqueue(jobs, ctx, f"job-kit-{i}")
    # A forged message: a real payload of the first tenant, rewritten to name the last one.
    forged = TenantContext(tenant_ids[0]).to_dict() | {"tenant_id": tenant_ids[-1]}
    jobs.put(json.dumps({"name": "forged", "context": forged}))
    messages = [jobs.get() for _ in range(jobs.qsize())]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda m: handle(db, m), messages))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-5], file=sys.stderr)
        return 2
    db = Database.from_settings()
    try:
        for result in run(db, argv):
            print(json.dumps(result, sort_keys=True))
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
