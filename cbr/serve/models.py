"""Pydantic bodies of the JSON API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Health", "FeedbackIn", "RegionIn", "ExampleIn", "QueryPage", "AnswerOut", "MAX_ID", "MAX_OFFSET", "QueryId", "CaseId",
           "MemberId", "RowId"]

# Ids, pages and offsets are checked here (422), so no integer the database cannot hold (SQLite's
# and PostgreSQL's 64-bit) ever reaches it as an OverflowError.
MAX_ID = 2 ** 63 - 1
MAX_OFFSET = 2 ** 31 - 1
RowId = Annotated[int, Field(ge=1, le=MAX_ID)]
QueryId = Annotated[int, Path(ge=1, le=MAX_ID, description="a query's id")]
CaseId = Annotated[int, Path(ge=1, le=MAX_ID, description="a case's id")]
MemberId = Annotated[int | None, Query(ge=1, le=MAX_ID, description="a member's model id; default the first")]


class Health(BaseModel):
    status: str = "ok"
    cases: int = Field(description="active cases in the case base")
    members: list[dict] = Field(description="loaded ensemble members: model_id, model, fingerprint, vectors")
    limits: dict = Field(description="this server's limits: max_k, allow_methods, explain_budget, explain_neighbours, "
                                     "max_decodes, max_upload_mb, session_hours")


Pixel = Annotated[int, Field(ge=0, le=MAX_OFFSET)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # of the letterboxed square's side


class FeedbackIn(BaseModel):
    """``cbr feedback``: a new verdict row (never overwritten), optionally retaining the image."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=255)
    note: str | None = Field(default=None, max_length=10_000)
    by: str | None = Field(default=None, max_length=255)
    retain: bool = False
    # the expert's box on the lesion, [x0, y0, x1, y1] in the query image's pixels (checked by add_feedback)
    region: tuple[Pixel, Pixel, Pixel, Pixel] | None = None
    # a label no case has yet is refused (422) unless this confirms it starts a new class (a typo would)
    new_class: bool = False


class RegionIn(BaseModel):
    """A box on the query image, as fractions (0..1) of the letterboxed square the page shows."""

    model_config = ConfigDict(extra="forbid")
    box: tuple[Fraction, Fraction, Fraction, Fraction]


class ExampleIn(BaseModel):
    """Neighbours (case ids) marked relevant or not, for a Rocchio re-query."""

    model_config = ConfigDict(extra="forbid")
    relevant: list[RowId] = Field(default_factory=list, max_length=1000)
    irrelevant: list[RowId] = Field(default_factory=list, max_length=1000)


class QueryPage(BaseModel):
    items: list[dict]
    limit: int
    offset: int
    next_offset: int | None


class AnswerOut(BaseModel):
    """One answered query: the object ``cbr query --json`` prints for one image."""

    # A key Answer.to_dict gains is passed on (never a failed answer), and test_serve_api fails
    # until it is declared here.
    model_config = ConfigDict(extra="allow")
    query_id: int
    image: str = Field(description="the recorded image (the stored upload, or a case's file)")
    sha256: str
    prediction: dict = Field(description="the ensemble's vote: label, confidence, probabilities, abstained, "
                                         "typicality, out_of_distribution, the prediction set, evidence")
    neighbours: list[dict] = Field(description="the first member's neighbours, most similar first")
    explanation: str | None = Field(description="the query's overlay image; None without an explanation")
    report: str | None = Field(description="the self-contained HTML report, if one was written")
    model_fingerprints: list[str]
    members: list[dict] = Field(description="per ensemble member: its vote, evidence and neighbours")
    notes: list[str] = Field(description="what the reader must know: self match, out of distribution, refinement")
    map_reliability: dict | None = Field(description="how often the shown maps' model hit the lesion; None: never measured")
    calibration: dict = Field(description="where the vote was calibrated: source, cases")
    finding: dict = Field(description="where the finding is (the localiser's region) and the class map's share on it")
    nearest_unlike: dict | None = Field(description="the most similar case whose label is not the answer")
    region: dict | None = Field(description="a region query's box and where it came from (drawn | localiser)")
