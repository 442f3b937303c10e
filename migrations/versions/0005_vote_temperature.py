"""vote temperature: the weighted vote's temperature fitted on each calibration slice

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Additive: an older calibration has no fit (and no similarities in its rows); queries then
    # use the default temperature until the next `cbr index` recalibrates.
    with op.batch_alter_table("calibrations") as batch:
        batch.add_column(sa.Column("temperature", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calibrations") as batch:
        batch.drop_column("temperature")
