"""query uncertainty: the prediction set, its coverage, a conflict with a stored case, and where the
vote was calibrated, so a report rebuilt later says what the answer said

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: Union[str, None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Additive: an older query has none (NULL), and its report shows what it had.
    # Plain ADD/DROP COLUMN, never a batch table copy: the copy drops `queries`, which votes and
    # feedback cite, and with foreign keys on SQLite refuses that drop once a query is stored.
    op.add_column("queries", sa.Column("uncertainty", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("queries", "uncertainty")
