"""The audit trail: past queries, their records and reports, expert feedback (revise and retain),
removing cases, and exporting rows for analysis outside cbr.

Feedback rows are never overwritten and cases are never deleted: a past query keeps citing the
cases and verdicts it had. Changes to the index files follow the same order as ``cbr index``: the
case base commits first, then every member's index is saved as a new generation under the writer
lock, so a crash in between is repaired from the stored embeddings on the next open.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import func, or_, select

from cbr.errors import CbrError, ImageError, NotFoundError, UnknownNameError
from cbr.store.schema import Case, Explanation, Feedback, IndexManifest, Query, utcnow

__all__ = [
    "RetainError",
    "EXPORTS",
    "history",
    "show",
    "add_feedback",
    "remove_cases",
    "export",
    "rerender_report",
]

LOG = logging.getLogger(__name__)
DEFAULT_REPORTS = "cbr-reports"
EXPORT_FORMATS = ("csv", "json")


class RetainError(CbrError):
    """Feedback was recorded but its image could not be retained as a case."""

    def __init__(self, feedback_id: int, query_id: int, reason: str):
        self.feedback_id, self.query_id, self.reason = feedback_id, query_id, reason
        super().__init__(
            f"feedback {feedback_id} on query {query_id} is recorded, but the image was not retained: {reason}"
        )


def _utc(dt: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite hands them back naive, in UTC)."""
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _iso(dt: datetime | None) -> str | None:
    """UTC times as ``YYYY-MM-DDTHH:MM:SS+00:00``, the same on every backend."""
    dt = _utc(dt)
    return None if dt is None else dt.replace(microsecond=0).isoformat()


def _latest_feedback():
    """Subquery: the id of each query's latest feedback row."""
    return (select(Feedback.query_id, func.max(Feedback.id).label("fid"))
            .group_by(Feedback.query_id).subquery("latest"))


def _retained_case():
    """Correlated subquery: the case retained by a feedback row, if any."""
    return (select(func.min(Case.id)).where(Case.feedback_id == Feedback.id, Case.origin == "retain")
            .correlate(Feedback).scalar_subquery())


def _status(prediction, fb_label, retained: bool) -> str:
    if fb_label is None:
        status = "-"
    elif fb_label == prediction:
        status = "confirmed"
    else:
        status = f"corrected -> {fb_label}"
    return f"{status}, retained" if retained else status


def history(cb, *, since: datetime | None = None, label: str | None = None, predicted: str | None = None,
            disagreed: bool = False, limit: int | None = 50) -> list[dict]:
    """Past queries, newest first, with their latest expert feedback.

    Args:
        cb: an open CaseBase.
        since: only queries at or after this time (a naive datetime is taken as UTC).
        label: only queries whose latest feedback label is this.
        predicted: only queries predicted as this.
        disagreed: only queries whose latest feedback differs from the prediction.
        limit: at most this many rows (None: all).

    Example:
        >>> rows = history(open_casebase("cases.db"), disagreed=True, limit=20)
    """
    latest = _latest_feedback()
    n_feedback = select(func.count(Feedback.id)).where(Feedback.query_id == Query.id).correlate(Query).scalar_subquery()
    retained = (select(Case.id).where(Case.query_id == Query.id, Case.origin == "retain")
                .correlate(Query).exists())
    stmt = (
        select(Query, Feedback, n_feedback, retained)
        .outerjoin(latest, latest.c.query_id == Query.id)
        .outerjoin(Feedback, Feedback.id == latest.c.fid)
        .order_by(Query.created_at.desc(), Query.id.desc())
    )
    if since is not None:
        stmt = stmt.where(Query.created_at >= _utc(since))
    if label is not None:
        stmt = stmt.where(Feedback.label == label)
    if predicted is not None:
        stmt = stmt.where(Query.prediction == predicted)
    if disagreed:
        stmt = stmt.where(Feedback.id.is_not(None), or_(Query.prediction.is_(None), Feedback.label != Query.prediction))
    if limit is not None:
        stmt = stmt.limit(int(limit))
    with cb.read() as s:
        rows = s.execute(stmt).all()
    out = []
    for q, f, count, kept in rows:
        kept = bool(kept)
        out.append({
            "query_id": q.id, "created_at": _iso(q.created_at), "image": q.image_path, "sha256": q.sha256,
            "patient_id": q.patient_id, "prediction": q.prediction, "confidence": q.confidence,
            "abstained": q.abstained,
            "feedback": None if f is None else {"id": f.id, "label": f.label, "by": f.by, "note": f.note,
                                                "created_at": _iso(f.created_at)},
            "feedback_count": int(count),
            "retained": kept,
            "status": _status(q.prediction, None if f is None else f.label, kept),
        })
    return out


def show(cb, query_id: int) -> dict:
    """A query's full record rebuilt from the case base, as JSON-ready data (maps summarised).

    Args:
        cb: an open CaseBase.
        query_id: the id printed by ``cbr query`` or ``cbr history``.

    Example:
        >>> record = show(open_casebase("cases.db"), 12)
    """
    from cbr.reporting.report import load_record, strip_maps

    record = strip_maps(load_record(cb, query_id))
    record["created_at"] = _iso(_parse_iso(record["created_at"]))
    for f in record["feedback"]:
        f["created_at"] = _iso(_parse_iso(f["created_at"]))
    return record


def _parse_iso(text):
    return None if text is None else datetime.fromisoformat(text)


def _known_labels(s) -> set[str]:
    return set(s.scalars(select(Case.label).where(Case.removed_at.is_(None)).distinct()))


def add_feedback(cb, query_id: int, label: str, *, note: str | None = None, by: str | None = None,
                 retain: bool = False, image=None) -> dict:
    """Record an expert's verdict on a query (revise) and optionally add its image as a case (retain).

    The feedback row is committed first and is never overwritten. Retaining decodes the query's
    image from its recorded path (or ``image``, whose sha256 must be the query's), embeds it with
    every member, stores its map and indexes it, through the same ``CaseWriter`` as ``cbr index``.
    If retaining fails, ``RetainError`` says so; the feedback stays recorded.

    Args:
        cb: an open CaseBase.
        query_id: the query judged.
        label: the expert's label; any string (a label no case has yet starts a new class).
        note, by: free text and the expert's name, stored with the verdict.
        retain: add the query image to the case base with this label.
        image: where the query image is now, when it moved since the query.

    Returns:
        {"feedback_id", "query_id", "label", "prediction", "verdict", "new_class", "retained_case_id",
         "existing_case_id", "members", "messages"}

    Example:
        >>> add_feedback(open_casebase("cases.db"), 12, "tumour", by="dr.x", retain=True)
    """
    label = (label or "").strip()
    if not label:
        raise CbrError("--label is empty; give the expert's label, e.g. --label tumour")
    with cb.write() as s:
        q = s.get(Query, int(query_id))
        if q is None:
            raise NotFoundError(f"no query {query_id} in {cb.display}; list them with `cbr history --db {cb.display}`")
        new_class = label not in _known_labels(s)
        fb = Feedback(query_id=q.id, label=label, note=note, by=by)
        s.add(fb)
        s.flush()
        fid, prediction, q_path, q_sha, q_patient = fb.id, q.prediction, q.image_path, q.sha256, q.patient_id
        previous = s.scalar(select(func.count(Feedback.id)).where(Feedback.query_id == q.id, Feedback.id != fid))
    verdict = "confirmed" if label == prediction else "corrected"
    messages = [f"feedback {fid} on query {query_id}: {verdict}"
                + ("" if verdict == "confirmed" else f" (predicted {prediction or 'nothing (abstained)'}, expert says {label})")]
    if previous:
        messages.append(f"query {query_id} now has {previous + 1} feedback rows; the latest counts, none is overwritten")
    if new_class:
        messages.append(f"{label!r} is a new class: no active case had this label"
                        + (" until now" if retain else "; retain cases with it (--retain) so queries can predict it"))
    result = {"feedback_id": fid, "query_id": int(query_id), "label": label, "prediction": prediction,
              "verdict": verdict, "new_class": new_class, "retained_case_id": None, "existing_case_id": None,
              "members": 0, "messages": messages}
    if retain:
        try:
            result.update(_retain(cb, int(query_id), fid, label, q_path, q_sha, q_patient, image))
        except RetainError:
            raise
        except CbrError as e:
            raise RetainError(fid, int(query_id), str(e)) from None
        messages.extend(result.pop("notes", []))
    return result


def _read_query_image(query_id: int, fid: int, q_path: str, q_sha: str, image):
    from cbr.data.image import read_image

    path = Path(image if image is not None else q_path).expanduser().resolve()
    try:
        img, sha = read_image(path)
    except ImageError as e:
        hint = "give the right file with --image" if image is not None else \
            "if it moved, give it with --image PATH (its sha256 must match)"
        raise RetainError(fid, query_id, f"query image {e.path} cannot be read ({e.reason}); {hint}") from None
    if sha != q_sha:
        which = f"--image {path}" if image is not None else f"the file now at the recorded path {path}"
        raise RetainError(fid, query_id, f"{which} has sha256 {sha[:12]}..., but query {query_id} was made on "
                                         f"an image with sha256 {q_sha[:12]}...; give the original file with --image")
    return img, sha, path


def _case_map_method(s) -> str:
    """Retained cases get their maps with the method the case base's other case maps used."""
    return s.scalar(select(Explanation.method).where(Explanation.role == "case").order_by(Explanation.id.desc()).limit(1)) or "gradcam"


def _retain(cb, query_id: int, fid: int, label: str, q_path: str, q_sha: str, q_patient, image) -> dict:
    from cbr.data.dataset import Record
    from cbr.store.writer import CaseWriter
    from cbr.store.member import load_members, writer_lock

    img, sha, path = _read_query_image(query_id, fid, q_path, q_sha, image)
    notes = []
    with writer_lock(cb):
        with cb.read() as s:
            existing = s.scalar(select(Case).where(Case.sha256 == sha))
            method = _case_map_method(s)
        if existing is not None:
            if existing.removed_at is not None:
                raise RetainError(fid, query_id, f"this image is case {existing.id}, removed on {_iso(existing.removed_at)}"
                                  f" ({existing.removed_reason or 'no reason given'}); removed cases are not re-added")
            if existing.label != label:
                raise RetainError(fid, query_id, f"label conflict: this image already is case {existing.id} labelled "
                                  f"{existing.label!r}, not {label!r}; remove it (`cbr remove {existing.id}`) and "
                                  "retain again to relabel it")
            return {"existing_case_id": existing.id, "notes": [
                f"the image already is case {existing.id} (label {existing.label!r}); not added twice"]}
        members = load_members(cb, persist_repair=True)
        notes.extend(n for m in members for n in m.notes)
        for m in members:
            m.embedder.eval()
        tensors = [m.embedder.preprocess(img).unsqueeze(0) for m in members]
        record = Record(path=str(path), label=label, group=q_patient, sha256=sha,
                        metadata={"retained_from_query": query_id})
        writer = CaseWriter(cb, members, explain=method)
        (case_id,) = writer.add([record], tensors, origin="retain", query_id=query_id, feedback_id=fid)
        writer.maybe_save(force=True)
    notes.append(f"retained as case {case_id} (label {label!r}), indexed in {len(members)} member(s) with its "
                 f"{method} map")
    return {"retained_case_id": case_id, "members": len(members), "notes": notes}


def remove_cases(cb, case_ids, *, reason: str | None = None) -> dict:
    """Take cases out of search in the case base and in every member's index.

    Rows are kept, marked removed (time and reason), so past queries still cite them. Unknown ids
    are refused before anything changes.

    Args:
        cb: an open CaseBase.
        case_ids: case ids, as printed by ``cbr query`` and ``cbr show``.
        reason: why, stored with each case.

    Returns:
        {"removed": [ids], "already": [{"case_id", "removed_at", "reason"}], "members": n, "notes": [...]}

    Example:
        >>> remove_cases(open_casebase("cases.db"), [17, 18], reason="mislabelled")
    """
    import numpy as np

    import index as ix
    from cbr.store.member import load_index, save_index, writer_lock

    wanted = sorted({int(i) for i in case_ids})
    if not wanted:
        raise CbrError("give at least one case id to remove")

    def check(s):
        found = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(wanted)))}
        unknown = [i for i in wanted if i not in found]
        if unknown:
            raise NotFoundError(f"no case {', '.join(map(str, unknown))} in {cb.display}; nothing was removed "
                                "(case ids are listed by `cbr show QUERY_ID` and `cbr export --what cases`)")
        return found

    with cb.read() as s:
        check(s)
    with writer_lock(cb):
        with cb.read() as s:
            model_ids = list(s.scalars(select(IndexManifest.model_id).order_by(IndexManifest.model_id)))
        # Load (and repair) every index before the commit, so that drift found now is not
        # mistaken for, or mixed up with, this removal.
        loaded = [(mid, *load_index(cb, mid, persist_repair=True)) for mid in model_ids]
        notes = [n for *_, ns in loaded for n in ns]
        now = utcnow()
        with cb.write() as s:
            found = check(s)
            already = [{"case_id": c.id, "removed_at": _iso(c.removed_at), "reason": c.removed_reason}
                       for c in found.values() if c.removed_at is not None]
            removed = [c.id for c in found.values() if c.removed_at is None]
            for cid in removed:
                found[cid].removed_at, found[cid].removed_reason = now, reason
        if removed:
            drop = np.asarray(removed, dtype=np.int64)
            for mid, index, kind, _ in loaded:
                ix.remove(index, drop)
                save_index(cb, mid, index, kind)
    return {"removed": removed, "already": already, "members": len(loaded), "notes": notes}


# --- export ------------------------------------------------------------------------------------

def _queries_rows(s):
    latest = _latest_feedback()
    stmt = (select(Query, Feedback.label)
            .outerjoin(latest, latest.c.query_id == Query.id)
            .outerjoin(Feedback, Feedback.id == latest.c.fid)
            .order_by(Query.id))
    for q, fb_label in s.execute(stmt.execution_options(yield_per=1000)):
        yield {"id": q.id, "created_at": _iso(q.created_at), "image": q.image_path, "sha256": q.sha256,
               "patient_id": q.patient_id, "k": q.k, "vote_rule": q.vote_rule, "ensemble": q.ensemble,
               "prediction": q.prediction, "confidence": q.confidence, "abstained": q.abstained,
               "probabilities": q.probabilities, "feedback_label": fb_label}


def _cases_rows(s):
    from cbr.store.schema import Dataset

    stmt = select(Case, Dataset.source).outerjoin(Dataset, Dataset.id == Case.dataset_id).order_by(Case.id)
    for c, source in s.execute(stmt.execution_options(yield_per=1000)):
        yield {"id": c.id, "sha256": c.sha256, "path": c.path, "label": c.label, "group_id": c.group_id,
               "origin": c.origin, "dataset": source, "added_at": _iso(c.added_at), "removed_at": _iso(c.removed_at),
               "removed_reason": c.removed_reason, "metadata": c.meta, "query_id": c.query_id,
               "feedback_id": c.feedback_id}


def _feedback_rows(s):
    stmt = select(Feedback, _retained_case()).order_by(Feedback.id)
    for f, case_id in s.execute(stmt.execution_options(yield_per=1000)):
        yield {"id": f.id, "query_id": f.query_id, "label": f.label, "note": f.note, "by": f.by,
               "created_at": _iso(f.created_at), "retained_case_id": case_id}


# what -> (columns, row generator over a read session)
EXPORTS = {
    "queries": (("id", "created_at", "image", "sha256", "patient_id", "k", "vote_rule", "ensemble", "prediction",
                 "confidence", "abstained", "probabilities", "feedback_label"), _queries_rows),
    "cases": (("id", "sha256", "path", "label", "group_id", "origin", "dataset", "added_at", "removed_at",
               "removed_reason", "metadata", "query_id", "feedback_id"), _cases_rows),
    "feedback": (("id", "query_id", "label", "note", "by", "created_at", "retained_case_id"), _feedback_rows),
}


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


def _write_rows(fh, columns, rows, fmt) -> int:
    n = 0
    if fmt == "csv":
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_csv_cell(r[c]) for c in columns])
            n += 1
        return n
    fh.write("[")
    for r in rows:
        fh.write(("\n" if n == 0 else ",\n") + json.dumps({c: r[c] for c in columns}))
        n += 1
    fh.write("\n]\n" if n else "]\n")
    return n


def export(cb, what: str, fmt: str, out=None) -> int:
    """Write every row of one kind as CSV or JSON, streamed; returns the number of rows.

    CSV holds one header row; JSON-valued columns (probabilities, metadata) are JSON text there.
    JSON is one array of objects. Times are UTC ISO 8601.

    Args:
        cb: an open CaseBase.
        what: ``queries``, ``cases`` or ``feedback`` (see ``EXPORTS`` for the columns).
        fmt: ``csv`` or ``json``.
        out: a file path, written atomically (temp file + rename); None writes to stdout.

    Example:
        >>> export(open_casebase("cases.db"), "cases", "csv", "cases.csv")
    """
    if what not in EXPORTS:
        raise UnknownNameError("export", what, EXPORTS)
    if fmt not in EXPORT_FORMATS:
        raise UnknownNameError("export format", fmt, EXPORT_FORMATS)
    columns, gen = EXPORTS[what]
    if out is None:
        with cb.read() as s:
            return _write_rows(sys.stdout, columns, gen(s), fmt)
    out = Path(out)
    if out.is_dir():
        raise CbrError(f"--out {out} is a folder; give a file name such as {out / (what + '.' + fmt)}")
    if not out.parent.exists():
        raise CbrError(f"folder {out.parent} does not exist; create it or choose another --out")
    from cbr.files import atomic_open

    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        with cb.read() as s:
            return _write_rows(fh, columns, gen(s), fmt)


def rerender_report(cb, query_id: int, out=None, scale: str = "shared") -> str:
    """Re-create a query's self-contained HTML report from the case base; returns its path.

    Works after the files written at query time are gone; a case whose image is gone is shown
    as a placeholder with its stored map.

    Args:
        cb: an open CaseBase.
        query_id: the query.
        out: the report file (or an existing folder); default ``cbr-reports/query-<id>/report.html``
            beside its overlays.
        scale: ``shared`` (one colour scale for the query and its neighbours) or ``per-image``.

    Example:
        >>> rerender_report(open_casebase("cases.db"), 12, "audit/q12.html")
    """
    from cbr.reporting.report import load_record, write_outputs

    if scale not in ("shared", "per-image"):
        raise UnknownNameError("colour scale", scale, ("shared", "per-image"))
    load_record(cb, query_id, with_maps=False)  # unknown id -> NotFoundError before touching files
    if out is None:
        out = Path(DEFAULT_REPORTS) / f"query-{int(query_id)}" / "report.html"
    out = Path(out)
    if out.is_dir():
        return write_outputs(cb, query_id, out, scale=scale)["report"]
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
