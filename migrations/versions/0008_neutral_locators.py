"""neutral locators: where to re-read a case or query image shown under a neutral locator

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: Union[str, None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Additive: NULL means the case's path (the query's image_path) is itself where its pixels are
    # read from, as for every row stored before this revision.
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("file_locator", sa.Text(), nullable=True))
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("image_file", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.drop_column("image_file")
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("file_locator")
