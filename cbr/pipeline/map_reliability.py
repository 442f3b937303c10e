"""``cbr index`` with lesion masks: how often the stored case maps hit the lesion, per model.

When some records of an indexed dataset carry a ``mask`` and the cases were explained, the
pointing game of each model's stored case maps (the labelled class's map with a head, the
embedding map without) against those masks is kept with the model (cbr.store.reliability): the
badge every later map of that model shows. Empty masks (no lesion) are left out.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from cbr.data.mask import lesion_mask
from cbr.models.maps import map_layer
from cbr.store.reliability import badge_text, Reliability, reliability_of, store_reliability
from cbr.store.rows import map_fields
from cbr.store.schema import Case, Explanation
from explain.metrics import pointing_game
from explain.spec import base_name

__all__ = ["measure_case_maps"]

LOG = logging.getLogger(__name__)


def measure_case_maps(cb, members, records, method: str) -> list[str]:
    """Measure and store each member's case-map pointing game on ``records`` with masks.

    Returns one note per measured model ("maps of ... hit the lesion in ...").
    """
    masked = {r.sha256: r.metadata["mask"] for r in records if (r.metadata or {}).get("mask")}
    if not masked:
        return []
    notes = []
    with cb.read() as s:
        cases = dict(s.execute(select(Case.sha256, Case.id).where(Case.sha256.in_(list(masked)))).all())
    by_case = {case_id: masked[sha] for sha, case_id in cases.items()}
    images = {r.sha256: r.path for r in records}  # with a crop, a mask's box is its image's
    image_of = {case_id: images[sha] for sha, case_id in cases.items()}
    for m in members:
        size = m.embedder.config.input_size
        with cb.read() as s:
            rows = s.scalars(select(Explanation).where(
                Explanation.model_id == m.model_id, Explanation.role == "case",
                Explanation.case_id.in_(list(by_case)))).all()
            maps = [(r.case_id, map_fields(r)) for r in rows if base_name(r.method) == base_name(method)]
        hits, targets = [], set()
        for case_id, fields in maps:
            try:
                cfg = m.embedder.config
                mask = lesion_mask(by_case[case_id], size, crop=cfg.crop, image=image_of[case_id], window=cfg.window)
            except OSError as e:
                LOG.warning("%s: mask unreadable (%s); left out of the map reliability", by_case[case_id], e)
                continue
            if mask.any():
                hits.append(pointing_game(fields["map"], mask))
                targets.add(fields["target"].split(":", 1)[0])
        if not hits:
            continue
        target = "class" if "class" in targets else sorted(targets)[0]
        store_reliability(cb, m.model_id, Reliability(pointing_game=sum(hits) / len(hits), n=len(hits), method=method,
                                                      layer=map_layer(m.embedder, method), target=target,
                                                      source="index"))
        with cb.read() as s:
            notes.append(f"{m.label}: {badge_text(reliability_of(s, [m.model_id])[m.model_id])}")
    return notes
