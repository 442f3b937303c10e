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
    # Additive: a first query has no parent (NULL). Plain ADD COLUMN, never a batch table copy: the
    # copy drops `queries`, which votes, neighbours and feedback cite, and with foreign keys on (cbr
    # always turns them on, and migrates inside a transaction where they cannot be turned off) SQLite
    # refuses that drop for any case base that has answered a query.
    if op.get_bind().dialect.name == "sqlite":
        # SQLite adds a key only inline with its column (and only with a NULL default).
        op.execute("ALTER TABLE queries ADD COLUMN parent_query_id INTEGER "
                   "CONSTRAINT fk_queries_parent_query_id_queries REFERENCES queries (id)")
    else:
        op.add_column("queries", sa.Column("parent_query_id", sa.Integer(), nullable=True))
        op.create_foreign_key("fk_queries_parent_query_id_queries", "queries", "queries", ["parent_query_id"], ["id"])
    op.add_column("queries", sa.Column("refinement_kind", sa.String(16), nullable=True))
    op.create_index("ix_queries_parent_query_id", "queries", ["parent_query_id"])
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
    op.drop_index("ix_queries_parent_query_id", table_name="queries")
    op.drop_column("queries", "refinement_kind")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot drop a column that carries a key, so this one copies the table (which takes
        # its inline key with it); with foreign keys on, that works only while no row cites a query.
        with op.batch_alter_table("queries") as batch:
            batch.drop_column("parent_query_id")
    else:
        op.drop_constraint("fk_queries_parent_query_id_queries", "queries", type_="foreignkey")
        op.drop_column("queries", "parent_query_id")
