"""SQLAlchemy tables of the case base. Alembic migrations in ``migrations/`` create them."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Model",
    "Dataset",
    "Case",
    "Embedding",
    "IndexManifest",
    "Calibration",
    "TypicalityScores",
    "MapReliability",
    "Explanation",
    "Query",
    "Vote",
    "Neighbour",
    "Feedback",
    "Problem",
    "Finding",
    "FindingIndex",
    "utcnow",
    "readable_file",
]

# Named constraints keep Alembic's batch mode (SQLite) and other backends in step.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def readable_file(shown: str, file: str) -> property:
    """A row's locator to read its pixels from (its file, frame or slice): the ``file`` column, set
    when the ``shown`` column holds a neutral locator (a DICOM image of a pseudonymised case base is
    shown as ``dicom:<hashed SOPInstanceUID>``, since file names carry names and birth dates), else
    ``shown`` itself. ``file`` is never shown or exported."""
    return property(lambda row: getattr(row, file) or getattr(row, shown), doc=readable_file.__doc__)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Model(Base):
    """An embedder that built an index: how to recreate it and its fingerprint."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    backbone: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(String(32))  # imagenet | none | checkpoint
    source: Mapped[str] = mapped_column(Text)  # backbone name or checkpoint path
    config: Mapped[dict] = mapped_column(JSON)  # ModelConfig.to_dict()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    """A folder or manifest that cases were read from."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # folder | manifest
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Case(Base):
    """A labelled image. Removed cases are kept (past queries cite them) but never searched."""

    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(255), index=True)
    group_id: Mapped[str | None] = mapped_column(String(255), index=True)
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    origin: Mapped[str] = mapped_column(String(16), default="index")  # index | retain
    query_id: Mapped[int | None] = mapped_column(ForeignKey("queries.id"))  # retain provenance
    feedback_id: Mapped[int | None] = mapped_column(ForeignKey("feedback.id"))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    removed_reason: Mapped[str | None] = mapped_column(Text)
    file_locator: Mapped[str | None] = mapped_column(Text)  # None: ``path`` is the file itself
    readable_locator = readable_file("path", "file_locator")


class Embedding(Base):
    """A case's L2-normalised float32 embedding under one model.

    The case base is the source of truth: an index file can always be rebuilt from these rows,
    without re-reading images.
    """

    __tablename__ = "embeddings"
    # (model_id, case_id): an index build walks one model's rows in case id order, a chunk at a
    # time (store.member.embedding_chunks); with model_id alone SQLite read and sorted all of the
    # model's rows for every chunk (migration 0012).
    __table_args__ = (Index("ix_embeddings_model_id_case_id", "model_id", "case_id"),)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class IndexManifest(Base):
    """Which FAISS file holds a model's vectors, with its checksum and vector count."""

    __tablename__ = "index_manifests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), unique=True)
    kind: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)  # file name inside the case base's index folder
    checksum: Mapped[str] = mapped_column(String(64))
    ntotal: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Calibration(Base):
    """Held-out neighbour labels that calibrate the credibility vote of one model."""

    __tablename__ = "calibrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), unique=True)
    rows: Mapped[list] = mapped_column(JSON)  # [[true_label, [neighbour labels in rank order]], ...]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    cases_digest: Mapped[str | None] = mapped_column(String(128))  # active cases it was computed on
    # the weighted vote's fitted temperature and prior (cbr.pipeline.temperature), and where the rows came
    # from: {"value", "prior", "reference", "k", "n", "nll", ..., "source", "cases", "why"}; "folds": the
    # same fitted per cross-fitting fold on the other folds, "fold_of": each row's fold
    # (cbr.pipeline.calibration)
    temperature: Mapped[dict | None] = mapped_column(JSON)


class TypicalityScores(Base):
    """Leave-one-out nearest-neighbour scores of one model's cases: the typicality calibration."""

    __tablename__ = "typicality_calibrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), unique=True)
    score: Mapped[str] = mapped_column(String(32))  # e.g. kth_similarity
    k: Mapped[int] = mapped_column(Integer)
    scores: Mapped[list] = mapped_column(JSON)  # ascending
    cases_digest: Mapped[str] = mapped_column(String(128))  # active cases it was computed on
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MapReliability(Base):
    """How often one model's maps hit the lesion: the pointing game measured against masks."""

    __tablename__ = "map_reliability"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), unique=True)  # the latest measurement
    pointing_game: Mapped[float] = mapped_column(Float)  # share of masked images whose map maximum is inside
    n: Mapped[int] = mapped_column(Integer)  # masked (non-empty) images it was measured on
    method: Mapped[str] = mapped_column(String(32))  # the explanation method, e.g. gradcam
    layer: Mapped[str] = mapped_column(String(255))  # the CAM layer ("" = the last block)
    target: Mapped[str] = mapped_column(String(32))  # which maps: class | similarity | embedding
    source: Mapped[str] = mapped_column(String(32))  # evaluate (held-out queries) | index (the cases' maps)
    # the guesses on the same images: {"centre": pointing game, "mean_mask": ..., "on_finding_floor": ...}
    baselines: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Explanation(Base):
    """A raw low-resolution CAM (float16 of map/scale) owned by a case or a query."""

    __tablename__ = "explanations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), index=True)
    query_id: Mapped[int | None] = mapped_column(ForeignKey("queries.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # case | query | neighbour
    method: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))  # e.g. class:tumour, similarity:query, embedding
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16), default="float16")
    scale: Mapped[float] = mapped_column(Float)  # raw map = data * scale
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Query(Base):
    """One answered query: the ensemble's result."""

    __tablename__ = "queries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    image_path: Mapped[str] = mapped_column(Text)  # as shown: a neutral locator for a pseudonymised DICOM
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(255))
    k: Mapped[int] = mapped_column(Integer)
    vote_rule: Mapped[str] = mapped_column(String(32))
    ensemble: Mapped[str] = mapped_column(String(32))
    explain_method: Mapped[str] = mapped_column(String(32))
    prediction: Mapped[str | None] = mapped_column(String(255), index=True)
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict] = mapped_column(JSON)
    abstained: Mapped[bool] = mapped_column(Boolean, default=False)
    credibility: Mapped[float | None] = mapped_column(Float)
    report_path: Mapped[str | None] = mapped_column(Text)
    typicality: Mapped[float | None] = mapped_column(Float)  # None: not measured (older queries)
    out_of_distribution: Mapped[bool | None] = mapped_column(Boolean, index=True)
    abstain_reason: Mapped[str | None] = mapped_column(String(32))
    notes: Mapped[list | None] = mapped_column(JSON)  # for display; lineage is in the two columns below
    # A refinement (cbr serve) records the query it was made from, and how: "region" or "example".
    parent_query_id: Mapped[int | None] = mapped_column(ForeignKey("queries.id"), index=True)
    refinement_kind: Mapped[str | None] = mapped_column(String(16))
    # The conformal prediction set and its coverage, a conflict with a stored case, and where the vote
    # was calibrated: {"set", "coverage", "conflict", "calibration"} (None: an older query).
    uncertainty: Mapped[dict | None] = mapped_column(JSON)
    image_file: Mapped[str | None] = mapped_column(Text)  # None: ``image_path`` is the file itself
    readable_image = readable_file("image_path", "image_file")


class Vote(Base):
    """One ensemble member's vote on a query."""

    __tablename__ = "votes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    prediction: Mapped[str | None] = mapped_column(String(255))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict] = mapped_column(JSON)
    abstained: Mapped[bool] = mapped_column(Boolean, default=False)
    typicality: Mapped[float | None] = mapped_column(Float)
    abstain_reason: Mapped[str | None] = mapped_column(String(32))


class Neighbour(Base):
    """A case retrieved for a query by one member, with the label it had at the time."""

    __tablename__ = "query_neighbours"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    rank: Mapped[int] = mapped_column(Integer)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    similarity: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(255))


class Feedback(Base):
    """An expert's verdict on a query. Never overwritten: later verdicts are new rows."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id"), index=True)
    label: Mapped[str] = mapped_column(String(255))
    note: Mapped[str | None] = mapped_column(Text)
    by: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The expert's box [x0, y0, x1, y1] on the query image, in its pixels (x1, y1 exclusive), or
    # None; `cbr export --what regions` turns boxes into lesion masks for `cbr train --mask-guidance`.
    # none_as_null: a verdict without a box is SQL NULL (not JSON null), so `region IS NOT NULL` finds the boxes
    region: Mapped[list | None] = mapped_column(JSON(none_as_null=True))


class Problem(Base):
    """A file that could not be ingested, and why."""

    __tablename__ = "ingest_problems"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Finding(Base):
    """A finding region of a case under one model: its box and the embedding of its context crop.

    ``source`` says where the box came from: ``mask`` (a component of the manifest's lesion mask) or
    ``feedback`` (a reviewer's box). The box is [x0, y0, x1, y1] in the case image's pixels (x1, y1
    exclusive). Like ``Embedding``, these rows are the source of truth of the findings' index.
    """

    __tablename__ = "findings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    source: Mapped[str] = mapped_column(String(16))  # mask | feedback
    box: Mapped[list] = mapped_column(JSON)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, L2-normalised
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FindingIndex(Base):
    """Which FAISS file holds a model's finding vectors (ids: finding ids), and the findings'
    leave-one-out typicality scores that calibrate region queries."""

    __tablename__ = "finding_indexes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), unique=True)
    path: Mapped[str] = mapped_column(Text)  # file name inside the case base's index folder
    checksum: Mapped[str] = mapped_column(String(64))
    ntotal: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    scores: Mapped[list] = mapped_column(JSON)  # ascending
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
