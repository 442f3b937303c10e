"""Reading the audit trail: past queries with their latest verdict, one query's full record, and
its report re-created from the case base."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, or_, select

from cbr.errors import CbrError, UnknownNameError
from cbr.files import atomic_open, is_stdout, output_kind
from cbr.pipeline.settings import DEFAULT_REPORTS, SCALES
from cbr.reporting.report import load_record, strip_maps, write_outputs
from cbr.store.rows import as_utc, iso
from cbr.store.schema import Case, Feedback, Model, Query, Vote

__all__ = ["history", "HistoryFilter", "show", "rerender_report", "latest_feedback", "query_window"]


@dataclass(frozen=True)
class HistoryFilter:
    """Which past queries ``history`` lists; None (or False) leaves a criterion out."""

    since: datetime | None = None  # at or after this time (a naive datetime is taken as UTC)
    label: str | None = None  # the latest feedback label is this
    predicted: str | None = None  # predicted as this
    disagreed: bool = False  # the latest feedback differs from the prediction
    abstained: bool | None = None  # True: only abstentions; False: only answered queries
    out_of_distribution: bool | None = None  # True: only queries flagged out of distribution
    reviewed: bool | None = None  # True: only queries with feedback; False: only those not yet reviewed


def latest_feedback():
    """Subquery: the id (``fid``) of each query's latest feedback row."""
    return (select(Feedback.query_id, func.max(Feedback.id).label("fid"))
            .group_by(Feedback.query_id).subquery("latest"))


def _status(prediction, fb_label, retained: bool) -> str:
    if fb_label is None:
        status = "-"
    elif fb_label == prediction:
        status = "confirmed"
    else:
        status = f"corrected -> {fb_label}"
    return f"{status}, retained" if retained else status


def history(cb, where: HistoryFilter | None = None, *, limit: int | None = 50, offset: int = 0,
            **criteria) -> list[dict]:
    """Past queries, newest first, with their latest expert feedback.

    Args:
        cb: an open CaseBase.
        where: a HistoryFilter; ``criteria`` (its field names as keywords) replace its fields.
        limit: at most this many rows (None: all).
        offset: skip this many rows first (pagination).

    Example:
        >>> rows = history(open_casebase("cases.db"), disagreed=True, limit=20)
        >>> page2 = history(cb, HistoryFilter(reviewed=False), limit=20, offset=20)
    """
    where = dataclasses.replace(where or HistoryFilter(), **criteria)
    since, label, predicted, disagreed = where.since, where.label, where.predicted, where.disagreed
    latest = latest_feedback()
    n_feedback = select(func.count(Feedback.id)).where(Feedback.query_id == Query.id).correlate(Query).scalar_subquery()
    # A retained case is the query's own image (feedback checks its sha256), and cases.sha256 is
    # indexed: each row looks up one case instead of scanning them all.
    retained = (select(Case.id).where(Case.sha256 == Query.sha256, Case.query_id == Query.id,
                                      Case.origin == "retain")
                .correlate(Query).exists())
    stmt = (
        select(Query, Feedback, n_feedback, retained)
        .outerjoin(latest, latest.c.query_id == Query.id)
        .outerjoin(Feedback, Feedback.id == latest.c.fid)
        .order_by(Query.created_at.desc(), Query.id.desc())
    )
    if since is not None:
        stmt = stmt.where(Query.created_at >= as_utc(since))
    if label is not None:
        stmt = stmt.where(Feedback.label == label)
    if predicted is not None:
        stmt = stmt.where(Query.prediction == predicted)
    if disagreed:
        stmt = stmt.where(Feedback.id.is_not(None), or_(Query.prediction.is_(None), Feedback.label != Query.prediction))
    if where.abstained is not None:
        stmt = stmt.where(Query.abstained.is_(bool(where.abstained)))
    if where.out_of_distribution is not None:
        ood = Query.out_of_distribution.is_(True)
        stmt = stmt.where(ood if where.out_of_distribution else or_(Query.out_of_distribution.is_(None), ~ood))
    if where.reviewed is not None:
        stmt = stmt.where(Feedback.id.is_not(None) if where.reviewed else Feedback.id.is_(None))
    if limit is not None:
        stmt = stmt.limit(int(limit))
    if offset:
        stmt = stmt.offset(int(offset))
    with cb.read() as s:
        rows = s.execute(stmt).all()
    out = []
    for q, f, count, kept in rows:
        kept = bool(kept)
        out.append({
            "query_id": q.id, "created_at": iso(q.created_at), "image": q.image_path, "sha256": q.sha256,
            "patient_id": q.patient_id, "prediction": q.prediction, "confidence": q.confidence,
            "abstained": q.abstained, "out_of_distribution": q.out_of_distribution,
            "abstain_reason": q.abstain_reason, "typicality": q.typicality,
            "feedback": None if f is None else {"id": f.id, "label": f.label, "by": f.by, "note": f.note,
                                                "created_at": iso(f.created_at)},
            "feedback_count": int(count),
            "retained": kept,
            "status": _status(q.prediction, None if f is None else f.label, kept),
        })
    return out


def query_window(cb, query_id: int) -> str:
    """The VOI window the query's members decoded DICOM/NIfTI with (one per case base)."""
    with cb.read() as s:
        cfg = s.scalar(select(Model.config).join(Vote, Vote.model_id == Model.id)
                       .where(Vote.query_id == query_id).limit(1))
    return (cfg or {}).get("window", "auto")


def show(cb, query_id: int) -> dict:
    """A query's full record rebuilt from the case base, as JSON-ready data (maps summarised).

    Args:
        cb: an open CaseBase.
        query_id: the id printed by ``cbr query`` or ``cbr history``.

    Example:
        >>> record = show(open_casebase("cases.db"), 12)
    """
    return strip_maps(load_record(cb, query_id, decode_maps=False))


def rerender_report(cb, query_id: int, out=None, scale: str = "shared") -> str:
    """Re-create a query's self-contained HTML report from the case base; returns its path.

    Works after the files written at query time are gone; a case whose image is gone is shown
    as a placeholder with its stored map.

    Args:
        cb: an open CaseBase.
        query_id: the query.
        out: the report file (or an existing folder); default ``cbr-reports/query-<id>/report.html``
            beside its overlays. ``-`` is stdout and a FIFO is written through; a device, socket or
            symbolic link to a file is refused (``OutputError``).
        scale: ``shared`` (one colour scale for the query and its neighbours) or ``per-image``.

    Example:
        >>> rerender_report(open_casebase("cases.db"), 12, "audit/q12.html")
    """
    if scale not in SCALES:
        raise UnknownNameError("colour scale", scale, SCALES)
    load_record(cb, query_id, with_maps=False)  # unknown id -> NotFoundError before touching files
    if out is None:
        out = Path(DEFAULT_REPORTS) / f"query-{int(query_id)}" / "report.html"
    if not is_stdout(out) and Path(out).is_dir():  # a folder, or a link to one: nothing is replaced
        return write_outputs(cb, query_id, out, scale=scale)["report"]
    kind = output_kind(out)  # a device, socket or other link is refused before anything is written
    if kind in ("stdout", "pipe"):
        return _report_through(cb, query_id, out, scale)
    out = Path(out)
    if out.name == "report.html":
        return write_outputs(cb, query_id, out.parent, scale=scale)["report"]
    if not out.parent.exists():
        raise CbrError(f"folder {out.parent} does not exist; create it or choose another --out")
    # Any other file name: render into a private folder beside it (so no report.html or overlay
    # already there is clobbered), then move the self-contained HTML into place atomically.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        written = Path(write_outputs(cb, query_id, tmp, scale=scale)["report"])
        os.replace(written, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with cb.write() as s:
        s.get(Query, int(query_id)).report_path = str(out.resolve())
    return str(out)


def _report_through(cb, query_id: int, out, scale: str) -> str:
    """Render into a private folder and copy the self-contained HTML to stdout or a FIFO; the
    query keeps the report path it had (a stream is not a report one can open again)."""
    with cb.read() as s:
        before = s.get(Query, int(query_id)).report_path
    tmp = Path(tempfile.mkdtemp(prefix="cbr-report."))
    try:
        written = Path(write_outputs(cb, query_id, tmp, scale=scale)["report"])
        with atomic_open(out, "w", encoding="utf-8") as fh:  # text: a terminal gets it escaped
            fh.write(written.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with cb.write() as s:
            s.get(Query, int(query_id)).report_path = before
    return str(out)
