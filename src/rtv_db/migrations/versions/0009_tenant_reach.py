r"""No index, statistic or audit gap a tenant can reach across tenants (issue 24, items 1, 10, 12).

(Placeholder while issue 24 is under way: filled in by its own change.)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run  # noqa: F401

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
