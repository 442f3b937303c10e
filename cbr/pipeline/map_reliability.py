"""``cbr index`` with lesion masks: how often the stored case maps hit the lesion, per model.

When some records of an indexed dataset carry a ``mask`` and the cases were explained, the
pointing game of each model's stored case maps (the labelled class's map with a head, the
embedding map without) against those masks is kept with the model (cbr.store.reliability): the
badge every later map of that model shows. Empty masks (no lesion) are left out.
"""

from __future__ import annotations

import logging

import numpy as np
from sqlalchemy import select

from cbr.data.mask import lesion_mask
from cbr.models.maps import map_layer
from cbr.store.chunks import rows_in, scalars_in
from cbr.store.reliability import badge_text, on_finding_floor, Reliability, reliability_of, store_reliability
from cbr.store.rows import map_fields
from cbr.store.schema import Case, Explanation
from explain.finding import centre_map, share_on
from explain.metrics import pointing_game
from explain.spec import base_name

__all__ = ["measure_case_maps"]

LOG = logging.getLogger(__name__)


def _scored(m, maps, by_case: dict, image_of: dict) -> dict | None:
    """The pointing game of ``maps`` [(case_id, map fields)] against their masks, beside a centre
    point and the masks' mean map on the same cases, and the on-finding floor of the class maps."""
    size, cfg = m.embedder.config.input_size, m.embedder.config
    rows, targets = [], set()
    for case_id, fields in maps:
        try:
            mask = lesion_mask(by_case[case_id], size, crop=cfg.crop, image=image_of[case_id], window=cfg.window)
        except OSError as e:
            LOG.warning("%s: mask unreadable (%s); left out of the map reliability", by_case[case_id], e)
            continue
        if mask.any():
            rows.append((fields, mask))
            targets.add(fields["target"].split(":", 1)[0])
    if not rows:
        return None
    prior, centre = np.mean([mk for _, mk in rows], axis=0), centre_map(size)
    shares = [share_on(f["map"], mk) for f, mk in rows if f["target"].startswith("class:")]
    floor = on_finding_floor([x for x in shares if x is not None])
    return {"pointing_game": float(np.mean([pointing_game(f["map"], mk) for f, mk in rows])), "n": len(rows),
            "target": "class" if "class" in targets else sorted(targets)[0],
            "centre": float(np.mean([pointing_game(centre, mk) for _, mk in rows])),
            "mean_mask": float(np.mean([pointing_game(prior, mk) for _, mk in rows])),
            "on_finding_floor": None if floor is None else floor["floor"]}


def measure_case_maps(cb, members, records, method: str) -> list[str]:
    """Measure and store each member's case-map pointing game on ``records`` with masks.

    Returns one note per measured model ("maps of ... hit the lesion in ...").
    """
    masked = {r.sha256: r.metadata["mask"] for r in records if (r.metadata or {}).get("mask")}
    if not masked:
        return []
    notes = []
    with cb.read() as s:
        cases = dict(rows_in(s, select(Case.sha256, Case.id), Case.sha256, masked))
    by_case = {case_id: masked[sha] for sha, case_id in cases.items()}
    images = {r.sha256: r.path for r in records}  # with a crop, a mask's box is its image's
    image_of = {case_id: images[sha] for sha, case_id in cases.items()}
    for m in members:
        with cb.read() as s:
            rows = scalars_in(s, select(Explanation).where(Explanation.model_id == m.model_id,
                                                           Explanation.role == "case"), Explanation.case_id, by_case)
            maps = [(r.case_id, map_fields(r)) for r in rows if base_name(r.method) == base_name(method)]
        scored = _scored(m, maps, by_case, image_of)
        if scored is None:
            continue
        store_reliability(cb, m.model_id, Reliability(method=method, layer=map_layer(m.embedder, method),
                                                      source="index", **scored))
        with cb.read() as s:
            notes.append(f"{m.label}: {badge_text(reliability_of(s, [m.model_id])[m.model_id])}")
    return notes
