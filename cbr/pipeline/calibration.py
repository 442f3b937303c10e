"""Calibration of the credibility vote: held-out neighbour labels, searched as a new patient's
query would be (leaving out the case itself and every case of its patient)."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from cbr.store.schema import Calibration, Case

__all__ = ["calibrate", "has_calibration", "CALIBRATION_CASES", "CALIBRATION_K"]

CALIBRATION_CASES = 500
CALIBRATION_K = 50


def has_calibration(cb, model_id: int) -> bool:
    """Whether the model has a stored calibration."""
    with cb.read() as s:
        return s.scalar(select(Calibration.id).where(Calibration.model_id == model_id)) is not None


def calibrate(cb, model_id: int, index, *, max_cases: int = CALIBRATION_CASES, k_max: int = CALIBRATION_K,
              seed: int = 0) -> int:
    """Store held-out neighbour labels for the credibility vote; returns the number of rows.

    Each calibration case is searched against the rest of the case base, excluding itself and
    every case of its patient, as a new patient's query would be.
    """
    import index as ix

    from cbr.store.member import active_embeddings

    ids, vecs = active_embeddings(cb, model_id)
    if len(ids) < 2:
        return 0
    with cb.read() as s:
        meta = {c.id: (c.label, c.group_id) for c in s.scalars(select(Case).where(Case.id.in_(ids.tolist())))}
    by_group: dict = {}
    for cid, (_, g) in meta.items():
        if g is not None:
            by_group.setdefault(g, []).append(cid)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ids), size=min(max_cases, len(ids)), replace=False))
    exclude = []
    for p in pick:
        cid = int(ids[p])
        g = meta[cid][1]
        exclude.append(by_group.get(g, [cid]) if g is not None else [cid])
    _, I = ix.search(index, vecs[pick], min(k_max, len(ids) - 1), exclude=exclude)
    rows = [[meta[int(ids[p])][0], [meta[int(j)][0] for j in I[n] if j >= 0 and int(j) in meta]]
            for n, p in enumerate(pick)]
    with cb.write() as s:
        row = s.scalar(select(Calibration).where(Calibration.model_id == model_id))
        if row is None:
            s.add(Calibration(model_id=model_id, rows=rows))
        else:
            row.rows = rows
    return len(rows)
