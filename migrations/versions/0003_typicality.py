"""typicality: per-model leave-one-out nearest-neighbour scores (out-of-distribution p-values),
the case set each calibration was computed on, and each query's typicality, flag, abstention
reason and notes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "typicality_calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.String(32), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("cases_digest", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_typicality_calibrations_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_typicality_calibrations"),
        sa.UniqueConstraint("model_id", name="uq_typicality_calibrations_model_id"),
    )
    # Older rows have no digest: they count as stale and are recomputed when next needed.
    with op.batch_alter_table("calibrations") as batch:
        batch.add_column(sa.Column("cases_digest", sa.String(128), nullable=True))
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("typicality", sa.Float(), nullable=True))
        batch.add_column(sa.Column("out_of_distribution", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("abstain_reason", sa.String(32), nullable=True))
        batch.add_column(sa.Column("notes", sa.JSON(), nullable=True))
        batch.create_index("ix_queries_out_of_distribution", ["out_of_distribution"])
    with op.batch_alter_table("votes") as batch:
        batch.add_column(sa.Column("typicality", sa.Float(), nullable=True))
        batch.add_column(sa.Column("abstain_reason", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        batch.drop_column("abstain_reason")
        batch.drop_column("typicality")
    with op.batch_alter_table("queries") as batch:
        batch.drop_index("ix_queries_out_of_distribution")
        batch.drop_column("notes")
        batch.drop_column("abstain_reason")
        batch.drop_column("out_of_distribution")
        batch.drop_column("typicality")
    with op.batch_alter_table("calibrations") as batch:
        batch.drop_column("cases_digest")
    op.drop_table("typicality_calibrations")
