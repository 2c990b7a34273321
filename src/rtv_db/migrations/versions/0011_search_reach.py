r"""Per-tenant search indexes that no other tenant can walk or hold back (issue 24, items 8, 9).

(Placeholder while issue 24 is under way: filled in by its own change.)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run  # noqa: F401

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
