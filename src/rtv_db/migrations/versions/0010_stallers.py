r"""The watchdog knows which tenant stalls, and a repeat staller is refused for good (issue 24, items 3, 5).

(Placeholder while issue 24 is under way: filled in by its own change.)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from rtv_db.migrations._sql import run  # noqa: F401

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
