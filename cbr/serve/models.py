"""Pydantic bodies of the JSON API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Health", "FeedbackIn", "RegionIn", "ExampleIn", "QueryPage"]


class Health(BaseModel):
    status: str = "ok"
    cases: int = Field(description="active cases in the case base")
    members: list[dict] = Field(description="loaded ensemble members: model_id, model, fingerprint, vectors")


class FeedbackIn(BaseModel):
    """``cbr feedback``: a new verdict row (never overwritten), optionally retaining the image."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1, max_length=255)
    note: str | None = Field(default=None, max_length=10_000)
    by: str | None = Field(default=None, max_length=255)
    retain: bool = False
    # the expert's box on the lesion, [x0, y0, x1, y1] in the query image's pixels (checked by add_feedback)
    region: tuple[int, int, int, int] | None = None


class RegionIn(BaseModel):
    """A box on the query image, as fractions (0..1) of the letterboxed square the page shows."""

    model_config = ConfigDict(extra="forbid")
    box: tuple[float, float, float, float]


class ExampleIn(BaseModel):
    """Neighbours (case ids) marked relevant or not, for a Rocchio re-query."""

    model_config = ConfigDict(extra="forbid")
    relevant: list[int] = Field(default_factory=list, max_length=1000)
    irrelevant: list[int] = Field(default_factory=list, max_length=1000)


class QueryPage(BaseModel):
    items: list[dict]
    limit: int
    offset: int
    next_offset: int | None
