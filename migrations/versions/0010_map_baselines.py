"""map reliability beside trivial guesses: the pointing game of a centre point and of the training
masks' mean map on the same images, and the calibrated on-finding threshold

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: Union[str, None] = "0009"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Additive: an older measurement has none (NULL); its badge is shown without the guesses.
    with op.batch_alter_table("map_reliability") as batch:
        batch.add_column(sa.Column("baselines", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("map_reliability") as batch:
        batch.drop_column("baselines")
