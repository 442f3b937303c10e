"""Exporting queries, cases or feedback as CSV or JSON, streamed, for analysis outside cbr."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

from sqlalchemy import func, select

from cbr.errors import CbrError, UnknownNameError
from cbr.files import atomic_open, is_stdout
from cbr.pipeline.audit.regions import region_rows
from cbr.pipeline.audit.trail import latest_feedback
from cbr.store.rows import iso
from cbr.store.schema import Case, Dataset, Feedback, Query

# SQLAlchemy and the schema are imported by the row generators, when rows are read: the CLI's
# --what choices (EXPORTS) come from here, and `cbr export --help` should not pay for them.
__all__ = ["EXPORTS", "EXPORT_FORMATS", "export"]

EXPORT_FORMATS = ("csv", "json")


def _queries_rows(s):
    latest = latest_feedback()
    stmt = (select(Query, Feedback.label)
            .outerjoin(latest, latest.c.query_id == Query.id)
            .outerjoin(Feedback, Feedback.id == latest.c.fid)
            .order_by(Query.id))
    for q, fb_label in s.execute(stmt.execution_options(yield_per=1000)):
        yield {"id": q.id, "created_at": iso(q.created_at), "image": q.image_path, "sha256": q.sha256,
               "patient_id": q.patient_id, "k": q.k, "vote_rule": q.vote_rule, "ensemble": q.ensemble,
               "prediction": q.prediction, "confidence": q.confidence, "abstained": q.abstained,
               "probabilities": q.probabilities, "feedback_label": fb_label, "abstain_reason": q.abstain_reason,
               "typicality": q.typicality, "out_of_distribution": q.out_of_distribution}


def _cases_rows(s):
    stmt = select(Case, Dataset.source).outerjoin(Dataset, Dataset.id == Case.dataset_id).order_by(Case.id)
    for c, source in s.execute(stmt.execution_options(yield_per=1000)):
        yield {"id": c.id, "sha256": c.sha256, "path": c.path, "label": c.label, "group_id": c.group_id,
               "origin": c.origin, "dataset": source, "added_at": iso(c.added_at), "removed_at": iso(c.removed_at),
               "removed_reason": c.removed_reason, "metadata": c.meta, "query_id": c.query_id,
               "feedback_id": c.feedback_id}


def _feedback_rows(s):
    retained_case = (select(func.min(Case.id)).where(Case.feedback_id == Feedback.id, Case.origin == "retain")
                     .correlate(Feedback).scalar_subquery())
    stmt = select(Feedback, retained_case).order_by(Feedback.id)
    for f, case_id in s.execute(stmt.execution_options(yield_per=1000)):
        yield {"id": f.id, "query_id": f.query_id, "label": f.label, "note": f.note, "by": f.by,
               "created_at": iso(f.created_at), "retained_case_id": case_id, "region": f.region}


def _regions_rows(s):
    return region_rows(s)


# what -> (columns, row generator over a read session)
EXPORTS = {
    "queries": (("id", "created_at", "image", "sha256", "patient_id", "k", "vote_rule", "ensemble", "prediction",
                 "confidence", "abstained", "probabilities", "feedback_label", "abstain_reason", "typicality",
                 "out_of_distribution"), _queries_rows),
    "cases": (("id", "sha256", "path", "label", "group_id", "origin", "dataset", "added_at", "removed_at",
               "removed_reason", "metadata", "query_id", "feedback_id"), _cases_rows),
    "feedback": (("id", "query_id", "label", "note", "by", "created_at", "retained_case_id", "region"),
                 _feedback_rows),
    # each reviewed query's latest expert box, with its latest verdict (cbr.pipeline.audit.regions)
    "regions": (("query_id", "feedback_id", "image", "label", "patient_id", "region"), _regions_rows),
}


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        v = json.dumps(v, sort_keys=True)
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        # OWASP's advice: a leading single quote makes the cell text; the csv module quotes the
        # cell and doubles any quote inside it. Numbers are written as numbers and never touched.
        return "'" + v
    return v


def _write_rows(fh, columns, rows, fmt) -> int:
    n = 0
    rows = iter(rows)
    first = next(rows, None)  # read before writing anything: a damaged table fails before the header
    if first is not None:
        rows = itertools.chain([first], rows)
    if fmt == "csv":
        # Every text cell quoted (OWASP), so that a CR inside one can never split a row; numbers bare.
        csv.writer(fh, lineterminator="\n").writerow(columns)  # our own names: plain
        w = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
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
    JSON is one array of objects. Times are UTC ISO 8601. In CSV, a text cell that a spreadsheet
    would run as a formula (it starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return)
    gets a leading single quote and every text cell is quoted, as OWASP recommends; JSON keeps
    every value as it is.

    Args:
        cb: an open CaseBase.
        what: ``queries``, ``cases`` or ``feedback`` (see ``EXPORTS`` for the columns).
        fmt: ``csv`` or ``json``.
        out: a file path, written atomically (temp file + rename), or a FIFO written through; None or
            ``-`` writes to stdout. A device, socket or symbolic link is refused (``OutputError``).

    Example:
        >>> export(open_casebase("cases.db"), "cases", "csv", "cases.csv")
    """
    if what not in EXPORTS:
        raise UnknownNameError("export", what, EXPORTS)
    if fmt not in EXPORT_FORMATS:
        raise UnknownNameError("export format", fmt, EXPORT_FORMATS)
    columns, gen = EXPORTS[what]
    if out is None or is_stdout(out):
        with cb.read() as s:
            return _write_rows(sys.stdout, columns, gen(s), fmt)
    out = Path(out)
    if out.is_dir():
        raise CbrError(f"--out {out} is a folder; give a file name such as {out / (what + '.' + fmt)}")
    if not out.parent.exists():
        raise CbrError(f"folder {out.parent} does not exist; create it or choose another --out")
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        with cb.read() as s:
            return _write_rows(fh, columns, gen(s), fmt)
