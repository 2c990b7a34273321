"""Seed data: the demo dataset (:func:`seed_demo`) and, in ``synthetic``, bulk synthetic load.

Both write through the system scope (the system role, RLS bypassed, every use logged): seeding
is cross-tenant work by nature.
"""

from .demo_data import DEMO_TENANTS, SeedResult, demo_embedding, seed_demo

__all__ = ["DEMO_TENANTS", "SeedResult", "demo_embedding", "seed_demo"]
