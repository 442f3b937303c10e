"""embeddings indexed by (model_id, case_id): an index build's keyset walk seeks each chunk

An index is filled from the stored embeddings 50,000 case ids at a time, in id order, per model.
With an index on model_id alone SQLite answered every chunk by reading all of the model's rows and
sorting them: one build of 10M cases read about 2 TB. The new index serves the walk as one range.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

"""
from typing import Sequence, Union

from alembic import op

revision: str = "0012"
down_revision: Union[str, None] = "0011"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # The new index leads with model_id, so it also serves what the old one did (the foreign key's
    # lookups, a model's count).
    op.create_index("ix_embeddings_model_id_case_id", "embeddings", ["model_id", "case_id"])
    op.drop_index("ix_embeddings_model_id", table_name="embeddings")


def downgrade() -> None:
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"])
    op.drop_index("ix_embeddings_model_id_case_id", table_name="embeddings")
