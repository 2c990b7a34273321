"""The demo dataset: three tenants with accounts, brand kits, knowledge and platform actions.

:func:`seed_demo` writes it through the system scope. Every id is fixed (derived from the
tenant's slug with :func:`uuid.uuid5`) and every insert is ``ON CONFLICT DO NOTHING``, so running
it again inserts nothing and changes nothing. Embeddings are computed, not downloaded: a hashed
bag of words projected onto 384 dimensions and normalised (:func:`demo_embedding`), so that
similar texts are near each other without any model.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert

from ..schema import (
    EMBEDDING_DIM,
    brand_kits,
    clients,
    knowledge_bases,
    knowledge_chunks,
    platform_accounts,
    platform_actions,
)
from ..tenant import SystemScope

__all__ = [
    "DEMO_TENANTS",
    "DemoAccount",
    "DemoTenant",
    "DATASET",
    "SeedResult",
    "demo_embedding",
    "demo_rows",
    "seed_demo",
]

# Every demo id derives from this namespace, so the dataset is the same on every machine.
_NAMESPACE = uuid.UUID("5eed0000-7a6e-4d0b-9e8a-000000000004")
# Scheduled times are fixed too (a checksum of the data must not depend on when it was seeded).
_EPOCH = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class DemoAccount:
    """A platform account of a demo tenant and the lanes it may be driven through."""

    platform: str
    handle: str
    display_name: str
    lanes: tuple[str, ...]


@dataclass(frozen=True)
class DemoTenant:
    """One demo tenant and the content it is seeded with."""

    slug: str
    id: uuid.UUID
    name: str
    voice: str
    personality: tuple[str, ...]
    colors: Mapping[str, str]
    accounts: tuple[DemoAccount, ...]
    brand_kits: tuple[str, ...]
    knowledge: Mapping[str, tuple[str, ...]]  # knowledge base name -> chunk texts
    settings: Mapping[str, Any] = field(default_factory=dict)

    def account_id(self, account: DemoAccount) -> uuid.UUID:
        return _id(self.slug, "platform_account", account.platform, account.handle)


def _id(*parts: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, "/".join(parts))


# Acme's and Globex's ids are the ones earlier `rtv-db demo` runs used, so an existing demo
# database gains the new rows instead of a second Acme.
DATASET: tuple[DemoTenant, ...] = (
    DemoTenant(
        slug="demo-acme",
        id=uuid.UUID("00000000-0000-4000-8000-00000000a001"),
        name="Acme Coffee Roasters",
        voice="warm",
        personality=("curious", "craft-proud", "neighbourly"),
        colors={"primary": "#6F4E37", "secondary": "#F5E6CA", "accent": "#C0392B"},
        accounts=(
            DemoAccount("instagram", "acmecoffee", "Acme Coffee", ("api",)),
            DemoAccount("linkedin", "acme-coffee-roasters", "Acme Coffee Roasters", ("api", "browser")),
            DemoAccount("tiktok", "acme.brews", "Acme Brews", ("browser",)),
        ),
        brand_kits=("Acme Main", "Acme Holiday"),
        knowledge={
            "Product catalogue": (
                "Ethiopia Yirgacheffe: washed, light roast, notes of jasmine, bergamot and lemon.",
                "Colombia Huila: medium roast, caramel sweetness, red apple acidity, chocolate finish.",
                "House espresso blend: Brazil and Guatemala, dark roast, crema-rich, notes of cocoa.",
                "Decaf Mexico: Swiss water process, medium roast, brown sugar and almond.",
            ),
            "Brand voice guide": (
                "Write like a friendly barista: warm, specific about flavour, never snobbish.",
                "Always credit the farm and the region; mention the roast date when it is fresh.",
                "Avoid jargon such as 'cupping score' in consumer posts; explain taste instead.",
            ),
        },
        settings={"timezone": "America/Chicago", "plan": "growth"},
    ),
    DemoTenant(
        slug="demo-globex",
        id=uuid.UUID("00000000-0000-4000-8000-00000000b002"),
        name="Globex Fitness",
        voice="energetic",
        personality=("motivating", "direct", "inclusive"),
        colors={"primary": "#0B6E4F", "secondary": "#FFFFFF", "accent": "#F2C14E"},
        accounts=(
            DemoAccount("instagram", "globexfit", "Globex Fitness", ("api", "browser")),
            DemoAccount("x", "globexfit", "Globex Fitness", ("api",)),
            DemoAccount("youtube", "GlobexFitnessTV", "Globex Fitness TV", ("api",)),
        ),
        brand_kits=("Globex Core", "Globex Summer Challenge"),
        knowledge={
            "Class schedule": (
                "Spin class runs Monday, Wednesday and Friday at 6:30 in studio two.",
                "Beginner strength training on Tuesday evenings; coaches cover squat and deadlift form.",
                "Yoga flow on Sunday mornings, all levels welcome, mats provided.",
            ),
            "Membership FAQ": (
                "Memberships can be paused for up to three months per year at no cost.",
                "Guests train free on their first visit with a member; bring photo ID.",
                "Cancel any time from the app; the membership runs to the end of the paid month.",
            ),
        },
        settings={"timezone": "Europe/London", "plan": "starter"},
    ),
    DemoTenant(
        slug="demo-initech",
        id=uuid.UUID("00000000-0000-4000-8000-00000000c003"),
        name="Initech Software",
        voice="professional",
        personality=("precise", "helpful", "dry humour"),
        colors={"primary": "#1F3A93", "secondary": "#ECF0F1", "accent": "#E67E22"},
        accounts=(
            DemoAccount("linkedin", "initech", "Initech", ("api", "browser")),
            DemoAccount("x", "initech_hq", "Initech HQ", ("api",)),
            DemoAccount("threads", "initech", "Initech", ("browser",)),
        ),
        brand_kits=("Initech Corporate",),
        knowledge={
            "Release notes": (
                "Version 4.2 adds single sign-on with SAML and SCIM user provisioning.",
                "Version 4.1 speeds up report exports threefold and fixes the TPS cover sheet bug.",
                "Version 4.0 introduces the new dashboard with configurable widgets.",
            ),
            "Support playbook": (
                "Acknowledge every support mention within two business hours.",
                "Move account-specific questions to a private channel; never post customer data.",
                "Outages are announced on the status page first, then on social accounts.",
            ),
        },
        settings={"timezone": "America/New_York", "plan": "enterprise"},
    ),
)

DEMO_TENANTS: dict[str, uuid.UUID] = {t.slug.removeprefix("demo-"): t.id for t in DATASET}
"""Short name (``acme``, ``globex``, ``initech``) -> tenant id."""

_ACTION_KINDS = (
    ("publish_post", "pending"),
    ("reply_comment", "succeeded"),
    ("fetch_insights", "failed"),
)


def demo_embedding(content: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for ``content``: signed feature hashing of its words.

    Texts that share words point in similar directions, which is enough to demonstrate
    similarity search; it is not a language model.
    """
    vector = [0.0] * dim
    for word in re.findall(r"[a-z0-9]+", content.lower()):
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vector[digest % dim] += 1.0 if (digest >> 63) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:  # no words at all: a fixed unit vector, so the column is never a zero vector
        vector[0], norm = 1.0, 1.0
    return [v / norm for v in vector]


def demo_rows(dataset: Sequence[DemoTenant] = DATASET) -> dict[str, list[dict[str, Any]]]:
    """The rows of the demo dataset, per table, in insertion order (parents first)."""
    rows: dict[str, list[dict[str, Any]]] = {
        t.name: [] for t in (clients, platform_accounts, brand_kits, knowledge_bases, knowledge_chunks, platform_actions)
    }
    for tenant in dataset:
        tid = tenant.id
        rows["clients"].append({"id": tid, "name": tenant.name, "slug": tenant.slug, "settings": dict(tenant.settings)})
        for n, account in enumerate(tenant.accounts):
            account_id = tenant.account_id(account)
            rows["platform_accounts"].append({
                "client_id": tid, "id": account_id, "platform": account.platform, "handle": account.handle,
                "display_name": account.display_name, "lanes": list(account.lanes),
            })
            for lane in account.lanes:
                for k, (kind, status) in enumerate(_ACTION_KINDS):
                    when = _EPOCH + timedelta(days=n, hours=k)
                    rows["platform_actions"].append({
                        "client_id": tid,
                        "id": _id(tenant.slug, "platform_action", account.platform, account.handle, lane, kind),
                        "platform_account_id": account_id, "kind": kind, "lane": lane, "status": status,
                        "payload": {"text": f"{tenant.name} on {account.platform}: {kind.replace('_', ' ')}",
                                    "campaign": tenant.brand_kits[0]},
                        "scheduled_at": when,
                        "finished_at": None if status == "pending" else when + timedelta(minutes=2),
                    })
        for n, kit in enumerate(tenant.brand_kits):
            rows["brand_kits"].append({
                "client_id": tid, "id": _id(tenant.slug, "brand_kit", kit), "name": kit,
                "tone": {"voice": tenant.voice, "personality": list(tenant.personality)},
                "colors": dict(tenant.colors),
                "logo_refs": [f"s3://rtv-demo-assets/{tenant.slug}/logo-{n + 1}.svg",
                              f"s3://rtv-demo-assets/{tenant.slug}/logo-{n + 1}-mono.png"],
            })
        for kb_name, chunks in tenant.knowledge.items():
            kb_id = _id(tenant.slug, "knowledge_base", kb_name)
            rows["knowledge_bases"].append({
                "client_id": tid, "id": kb_id, "name": kb_name, "description": f"{tenant.name}: {kb_name.lower()}",
            })
            for position, content in enumerate(chunks):
                rows["knowledge_chunks"].append({
                    "client_id": tid, "id": _id(tenant.slug, "knowledge_chunk", kb_name, str(position)),
                    "knowledge_base_id": kb_id, "content": content,
                    "metadata": {"position": position, "source": "demo seed"},
                    "embedding": demo_embedding(content),
                })
    return rows


@dataclass(frozen=True)
class SeedResult:
    """What :func:`seed_demo` did: the tenants, and how many rows each table gained."""

    tenants: tuple[DemoTenant, ...]
    planned: Mapping[str, int]   # rows of the dataset, per table
    inserted: Mapping[str, int]  # rows actually inserted by this run (0 everywhere on a re-run)

    @property
    def total_inserted(self) -> int:
        return sum(self.inserted.values())

    @property
    def changed(self) -> bool:
        return self.total_inserted > 0


_TABLES: dict[str, Table] = {t.name: t for t in (clients, platform_accounts, brand_kits, knowledge_bases,
                                                  knowledge_chunks, platform_actions)}


def seed_demo(system_url: str, dataset: Sequence[DemoTenant] = DATASET) -> SeedResult:
    """Create the demo dataset through the system scope, in one transaction; idempotent.

    Rows that already exist (same primary key, or same natural key such as a tenant's slug) are
    left exactly as they are.
    """
    rows = demo_rows(dataset)
    inserted: dict[str, int] = {}
    with SystemScope(system_url, reason="seed: demo dataset") as system, system.transaction() as conn:
        for name, table_rows in rows.items():
            table = _TABLES[name]
            stmt = insert(table).on_conflict_do_nothing().returning(table.c.id)
            inserted[name] = len(conn.execute(stmt, table_rows).all()) if table_rows else 0
    return SeedResult(tuple(dataset), {k: len(v) for k, v in rows.items()}, inserted)
