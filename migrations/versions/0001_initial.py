"""initial case base: models, datasets, cases, embeddings, index manifests, explanations,
queries, votes, neighbours, feedback, ingest problems

Revision ID: 0001
Revises:
Create Date: 2026-11-22

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("weights", sa.String(32), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("fingerprint", name="uq_models_fingerprint"),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_datasets"),
    )
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("image_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(255), nullable=True),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("vote_rule", sa.String(32), nullable=False),
        sa.Column("ensemble", sa.String(32), nullable=False),
        sa.Column("explain_method", sa.String(32), nullable=False),
        sa.Column("prediction", sa.String(255), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("abstained", sa.Boolean(), nullable=False),
        sa.Column("credibility", sa.Float(), nullable=True),
        sa.Column("report_path", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_queries"),
    )
    op.create_index("ix_queries_created_at", "queries", ["created_at"])
    op.create_index("ix_queries_sha256", "queries", ["sha256"])
    op.create_index("ix_queries_prediction", "queries", ["prediction"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(255), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("by", sa.String(255), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_feedback_query_id_queries"),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
    )
    op.create_index("ix_feedback_query_id", "feedback", ["query_id"])
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("label", sa.String(255), nullable=False),
        sa.Column("group_id", sa.String(255), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=True),
        sa.Column("feedback_id", sa.Integer(), nullable=True),
        sa.Column("added_at", TZ, nullable=False),
        sa.Column("removed_at", TZ, nullable=True),
        sa.Column("removed_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_cases_dataset_id_datasets"),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_cases_query_id_queries"),
        sa.ForeignKeyConstraint(["feedback_id"], ["feedback.id"], name="fk_cases_feedback_id_feedback"),
        sa.PrimaryKeyConstraint("id", name="pk_cases"),
        sa.UniqueConstraint("sha256", name="uq_cases_sha256"),
    )
    op.create_index("ix_cases_label", "cases", ["label"])
    op.create_index("ix_cases_group_id", "cases", ["group_id"])
    op.create_table(
        "embeddings",
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_embeddings_case_id_cases"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_embeddings_model_id_models"),
        sa.PrimaryKeyConstraint("case_id", "model_id", name="pk_embeddings"),
    )
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"])
    op.create_table(
        "index_manifests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("ntotal", sa.Integer(), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_index_manifests_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_index_manifests"),
        sa.UniqueConstraint("model_id", name="uq_index_manifests_model_id"),
    )
    op.create_table(
        "explanations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("query_id", sa.Integer(), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("scale", sa.Float(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_explanations_model_id_models"),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_explanations_case_id_cases"),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_explanations_query_id_queries"),
        sa.PrimaryKeyConstraint("id", name="pk_explanations"),
    )
    op.create_index("ix_explanations_case_id", "explanations", ["case_id"])
    op.create_index("ix_explanations_query_id", "explanations", ["query_id"])
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("prediction", sa.String(255), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("abstained", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_votes_query_id_queries"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_votes_model_id_models"),
        sa.PrimaryKeyConstraint("id", name="pk_votes"),
    )
    op.create_index("ix_votes_query_id", "votes", ["query_id"])
    op.create_table(
        "query_neighbours",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        sa.Column("label", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], name="fk_query_neighbours_query_id_queries"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_query_neighbours_model_id_models"),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_query_neighbours_case_id_cases"),
        sa.PrimaryKeyConstraint("id", name="pk_query_neighbours"),
    )
    op.create_index("ix_query_neighbours_query_id", "query_neighbours", ["query_id"])
    op.create_index("ix_query_neighbours_case_id", "query_neighbours", ["case_id"])
    op.create_table(
        "ingest_problems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_ingest_problems_dataset_id_datasets"),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_problems"),
    )
    op.create_index("ix_ingest_problems_dataset_id", "ingest_problems", ["dataset_id"])


def downgrade() -> None:
    for table in (
        "ingest_problems", "query_neighbours", "votes", "explanations", "index_manifests",
        "embeddings", "cases", "feedback", "queries", "datasets", "models",
    ):
        op.drop_table(table)
