"""findings: a case's finding regions (mask components, reviewers' boxes), each with its embedding,
and the findings' own FAISS index per model with its typicality calibration

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: Union[str, None] = "0010"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Additive: two new tables; a case base without findings answers region queries with a one-line
    # hint to index again.
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("box", sa.JSON(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name=op.f("fk_findings_case_id_cases")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_findings_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    op.create_index(op.f("ix_findings_case_id"), "findings", ["case_id"])
    op.create_index(op.f("ix_findings_model_id"), "findings", ["model_id"])
    op.create_table(
        "finding_indexes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("ntotal", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_finding_indexes_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finding_indexes")),
        sa.UniqueConstraint("model_id", name=op.f("uq_finding_indexes_model_id")),
    )


def downgrade() -> None:
    op.drop_table("finding_indexes")
    op.drop_index(op.f("ix_findings_model_id"), table_name="findings")
    op.drop_index(op.f("ix_findings_case_id"), table_name="findings")
    op.drop_table("findings")
