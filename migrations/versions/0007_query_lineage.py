"""query lineage: a refinement's parent query and kind as columns, not words in a note

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

"""
import re
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The words cbr wrote before this revision; read here once, to backfill the columns, and never again.
_OLD_NOTE = re.compile(r"^refinement of query (\d+) by (region|example)\b")


def upgrade() -> None:
    # Additive: a first query has no parent (NULL).
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("parent_query_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("refinement_kind", sa.String(16), nullable=True))
        batch.create_foreign_key("fk_queries_parent_query_id_queries", "queries", ["parent_query_id"], ["id"])
        batch.create_index("ix_queries_parent_query_id", ["parent_query_id"])
    _backfill(op.get_bind())


def _backfill(conn) -> None:
    queries = sa.table("queries", sa.column("id", sa.Integer), sa.column("notes", sa.JSON),
                       sa.column("parent_query_id", sa.Integer), sa.column("refinement_kind", sa.String))
    rows = conn.execute(sa.select(queries.c.id, queries.c.notes).where(queries.c.notes.isnot(None))).all()
    known = set(conn.execute(sa.select(queries.c.id)).scalars())
    for query_id, notes in rows:
        for note in notes or ():
            m = _OLD_NOTE.match(str(note))
            if m and int(m.group(1)) in known:  # a parent that is gone stays unlinked rather than break the key
                conn.execute(sa.update(queries).where(queries.c.id == query_id)
                             .values(parent_query_id=int(m.group(1)), refinement_kind=m.group(2)))
                break


def downgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.drop_index("ix_queries_parent_query_id")
        batch.drop_constraint("fk_queries_parent_query_id_queries", type_="foreignkey")
        batch.drop_column("refinement_kind")
        batch.drop_column("parent_query_id")
