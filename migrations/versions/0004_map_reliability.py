"""map reliability: per model, the measured pointing game of its maps against lesion masks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Additive: an older case base simply has no measurement, shown as "not measured".
    op.create_table(
        "map_reliability",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("pointing_game", sa.Float(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("layer", sa.String(255), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_map_reliability_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_map_reliability"),
        sa.UniqueConstraint("model_id", name="uq_map_reliability_model_id"),
    )


def downgrade() -> None:
    op.drop_table("map_reliability")
