r"""A transaction's start that nothing left in the session can fail, slow or corrupt (issue 24, items 2, 4, 6).

(Placeholder while issue 24 is under way: filled in by its own change.)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run  # noqa: F401

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
