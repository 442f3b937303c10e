"""Finding rows and the findings' FAISS index: stored, saved and checked like the image index,
and of the same kind as that model's image index (``cbr index --index-type``).

The ``findings`` rows (one per region of a case, per model) are the source of truth: the index
file is a cache keyed by finding id, written under a new generation name and switched in a
transaction, its checksum checked on load. A missing or altered file is rebuilt in memory from the
rows (and saved by the next writer), never trusted.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

import numpy as np
from sqlalchemy import select

from cbr.store.chunks import rows_in
from cbr.store.encoding import decode_vectors, encode_vector
from cbr.store.generation import folder_tag
from cbr.store.schema import Case, Finding, FindingIndex, IndexManifest, utcnow
import index as ix

__all__ = ["add_findings", "finding_rows", "cases_with_findings", "finding_boxes", "save_finding_index",
           "load_finding_index", "findings_of_cases", "finding_kind", "build_finding_index", "case_findings"]

LOG = logging.getLogger(__name__)


def add_findings(cb, model_id: int, rows) -> int:
    """Store ``rows`` [(case_id, source, box, vector)] of one model in one transaction; returns how many."""
    rows = list(rows)
    with cb.write() as s:
        s.add_all(Finding(case_id=int(c), model_id=int(model_id), source=src, box=[int(v) for v in box],
                          vector=encode_vector(np.asarray(vec, dtype=np.float32))) for c, src, box, vec in rows)
    return len(rows)


def cases_with_findings(s, model_id: int, source: str) -> set[int]:
    """Ids of the cases that already have findings of ``source`` under ``model_id``."""
    return set(s.scalars(select(Finding.case_id).where(Finding.model_id == model_id, Finding.source == source)))


def finding_rows(s, model_id: int, dim: int):
    """(finding ids, float32 vectors, {finding id: group}) of the active cases' findings of a model;
    a finding's group is its case's patient (else the case), which leave-one-out leaves out whole."""
    rows = s.execute(select(Finding.id, Finding.vector, Case.id, Case.group_id)
                     .join(Case, Case.id == Finding.case_id)
                     .where(Finding.model_id == model_id, Case.removed_at.is_(None)).order_by(Finding.id)).all()
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32), {}
    ids = np.asarray([r[0] for r in rows], dtype=np.int64)
    vecs = decode_vectors([r[1] for r in rows], dim)
    groups = {int(r[0]): (f"patient:{r[3]}" if r[3] is not None else f"case:{r[2]}") for r in rows}
    return ids, vecs, groups


def finding_kind(s, model_id: int) -> str:
    """The index kind of a model's findings: its image index's (``cbr index --index-type``), else flat."""
    return s.scalar(select(IndexManifest.kind).where(IndexManifest.model_id == model_id)) or "flat"


def build_finding_index(dim: int, kind: str, ids, vecs):
    """(index of ``kind`` holding the findings' vectors, note or None): a kind that cannot be
    trained on this few findings (``ivf-pq`` on a few hundred) stays exact until there are more."""
    try:
        index = ix.build(dim, kind, n_hint=len(ids))
        if len(ids):
            ix.add(index, vecs, ids)
        return index, None
    except (ValueError, RuntimeError) as e:
        index = ix.build(dim, "flat")
        if len(ids):
            ix.add(index, vecs, ids)
        return index, f"findings index kind {kind!r} stays exact (flat) for now: {str(e).split(' (')[0]}"


def finding_boxes(s, ids) -> dict:
    """{finding id: (case row, box, source)} of active cases, for these finding ids."""
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    rows = s.execute(select(Finding.id, Finding.box, Finding.source, Case).join(Case, Case.id == Finding.case_id)
                     .where(Finding.id.in_(ids), Case.removed_at.is_(None))).all()
    return {int(fid): (case, list(box), src) for fid, box, src, case in rows}


def case_findings(s, model_id: int, case_ids, dim: int):
    """(case ids, boxes, float32 vectors) of every finding of these active cases under a model, in
    finding id order: a region query rescores each candidate case's findings exactly."""
    case_ids = sorted({int(c) for c in case_ids})
    if not case_ids:
        return np.empty(0, dtype=np.int64), [], np.empty((0, dim), dtype=np.float32)
    q = select(Finding.id, Finding.case_id, Finding.box, Finding.vector).join(Case, Case.id == Finding.case_id) \
        .where(Finding.model_id == model_id, Case.removed_at.is_(None))
    rows = sorted(rows_in(s, q, Finding.case_id, case_ids), key=lambda r: r[0])
    if not rows:
        return np.empty(0, dtype=np.int64), [], np.empty((0, dim), dtype=np.float32)
    return (np.asarray([r[1] for r in rows], dtype=np.int64), [list(r[2]) for r in rows],
            decode_vectors([r[3] for r in rows], dim))


def findings_of_cases(s, model_id: int, case_ids) -> list[int]:
    """Finding ids of these cases under a model (a query leaves its own image's and patient's out)."""
    case_ids = [int(c) for c in case_ids]
    if not case_ids:
        return []
    return sorted(s.scalars(select(Finding.id).where(Finding.model_id == model_id, Finding.case_id.in_(case_ids))))


def save_finding_index(cb, model_id: int, index, k: int, scores) -> None:
    """Write a new generation of a model's findings index with its calibration scores, switch the row
    to it, then drop the old file. Callers hold the writer lock (``cbr.store.member.writer_lock``)."""
    cb.index_dir.mkdir(parents=True, exist_ok=True)
    name = f"findings-{int(model_id)}-{folder_tag(cb.index_dir)}-{uuid.uuid4().hex[:12]}.faiss"
    checksum = ix.save(index, cb.index_dir / name)
    scores = [float(x) for x in np.sort(np.asarray(scores, dtype=np.float64))]
    old = None
    with cb.write() as s:
        row = s.scalar(select(FindingIndex).where(FindingIndex.model_id == model_id))
        if row is None:
            s.add(FindingIndex(model_id=model_id, path=name, checksum=checksum, ntotal=index.ntotal, k=k, scores=scores))
        else:
            old = row.path
            row.path, row.checksum, row.ntotal, row.k, row.scores, row.updated_at = (
                name, checksum, index.ntotal, k, scores, utcnow())
    if old and old != name:
        with contextlib.suppress(OSError):
            (cb.index_dir / old).unlink()


def load_finding_index(cb, model_id: int, dim: int):
    """(index, k, sorted calibration scores, notes) of a model's findings; None when it has none.

    A file that is missing or does not match its checksum is rebuilt in memory from the stored rows."""
    with cb.read() as s:
        row = s.scalar(select(FindingIndex).where(FindingIndex.model_id == model_id))
        if row is None:
            return None
        name, checksum, k, scores = row.path, row.checksum, row.k, np.asarray(row.scores, dtype=np.float64)
    path = cb.index_dir / name
    notes = []
    try:
        if ix.checksum(path) != checksum:
            raise ValueError("does not match its checksum")
        index = ix.load(path)
    except (OSError, ValueError, RuntimeError) as e:
        note = f"findings index {path} of model {model_id} cannot be used ({e}); rebuilt from the stored findings"
        LOG.warning(note)
        notes.append(note)
        with cb.read() as s:
            ids, vecs, _ = finding_rows(s, model_id, dim)
            kind = finding_kind(s, model_id)
        index, told = build_finding_index(dim, kind, ids, vecs)
        notes.extend([told] if told else [])
    return index, k, scores, notes

