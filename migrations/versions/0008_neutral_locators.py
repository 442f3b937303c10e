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
    # Plain ADD/DROP COLUMN (SQLite 3.35+ drops an unkeyed, unindexed column in place), never a batch
    # table copy: the copy drops `cases` and `queries`, which embeddings, votes and feedback cite, and
    # with foreign keys on SQLite refuses that drop for any case base with rows in them.
    op.add_column("cases", sa.Column("file_locator", sa.Text(), nullable=True))
    op.add_column("queries", sa.Column("image_file", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("queries", "image_file")
    op.drop_column("cases", "file_locator")
