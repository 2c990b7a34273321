"""The bulk synthetic loader: counts, deterministic ids, refusing or skipping existing tenants."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from rtv_db import brand_kits, clients, knowledge_chunks, platform_actions, with_tenant_scope
from rtv_db.errors import SyntheticDataExistsError
from rtv_db.seed.synthetic import KIND_BRAND_KIT, load_synthetic, synthetic_row_id, synthetic_slug, synthetic_tenant_id


def _count(system, table) -> int:
    with system.transaction() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_loads_tenants_and_rows(target, system, db) -> None:
    result = load_synthetic(target.system_url, 3, 20, progress=False)
    assert result.tenants == 3 and result.skipped_tenants == 0
    assert result.rows == {"clients": 3, "platform_accounts": 3, "brand_kits": 60, "knowledge_bases": 3,
                           "knowledge_chunks": 6, "platform_actions": 6}
    assert _count(system, brand_kits) == 60 and _count(system, knowledge_chunks) == 6 and _count(system, platform_actions) == 6
    # Deterministic ids, and each tenant sees exactly its own rows through RLS.
    row = with_tenant_scope(db, synthetic_tenant_id(1)).scoped_get(brand_kits, synthetic_row_id(KIND_BRAND_KIT, 1, 7))
    assert row is not None and row.name == "Brand 7"
    assert with_tenant_scope(db, synthetic_tenant_id(1)).scoped_get(brand_kits, synthetic_row_id(KIND_BRAND_KIT, 2, 7)) is None
    assert len(with_tenant_scope(db, synthetic_tenant_id(2)).scoped_query(brand_kits)) == 20


def test_existing_tenants_fail_by_default_and_skip_on_request(target, system) -> None:
    load_synthetic(target.system_url, 2, 5, progress=False)
    with pytest.raises(SyntheticDataExistsError, match=synthetic_slug(0)):
        load_synthetic(target.system_url, 3, 5, progress=False)
    assert _count(system, clients) == 2  # nothing written by the refused load
    result = load_synthetic(target.system_url, 3, 5, progress=False, if_exists="skip")
    assert result.tenants == 1 and result.skipped_tenants == 2
    assert _count(system, clients) == 3 and _count(system, brand_kits) == 15


def test_batches_are_whole_tenants(target, system) -> None:
    batches: list[int] = []
    load_synthetic(target.system_url, 5, 10, progress=False, batch_rows=30, on_batch=batches.append)
    assert len(batches) > 1 and batches[-1] == 5
    assert _count(system, brand_kits) == 50
