"""Seed data for rtv-db databases (see ``synthetic`` for the bulk synthetic loader)."""
