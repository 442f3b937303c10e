"""Map reliability: how often a model's maps hit the lesion, measured against masks and kept
with the model, so that every map it draws can say how far it may be trusted."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import delete, select

from cbr.store.rows import iso
from cbr.store.schema import MapReliability

__all__ = ["Reliability", "store_reliability", "reliability_of", "badge_text", "NOT_MEASURED"]

NOT_MEASURED = "maps of this model were not measured against lesion masks"


@dataclass(frozen=True)
class Reliability:
    """One measurement of a model's maps (see ``MapReliability``)."""

    pointing_game: float  # share of masked images whose map maximum lies in the lesion
    n: int  # masked images measured
    method: str  # explanation method
    layer: str  # CAM layer, "" = the last block
    target: str  # class | similarity | embedding
    source: str  # evaluate | index


def store_reliability(cb, model_id: int, measured: Reliability) -> None:
    """Keep ``measured`` as ``model_id``'s reliability, replacing an earlier measurement."""
    with cb.write() as s:
        s.execute(delete(MapReliability).where(MapReliability.model_id == model_id))
        s.add(MapReliability(model_id=model_id, **asdict(measured)))


def reliability_of(session, model_ids) -> dict:
    """{model_id: the ``map_reliability`` JSON dict, or None when never measured}."""
    ids = list(model_ids)
    found = {r.model_id: r for r in session.scalars(select(MapReliability).where(MapReliability.model_id.in_(ids)))}
    out = {}
    for mid in ids:
        r = found.get(mid)
        out[mid] = None if r is None else {
            "pointing_game": round(float(r.pointing_game), 4), "n": int(r.n), "method": r.method,
            "layer": r.layer or "last", "target": r.target, "source": r.source, "measured_at": iso(r.created_at)}
    return out


def badge_text(reliability: dict | None) -> str:
    """One line for a reader of the maps: "maps of this model hit the lesion in 78% of 420 masked cases"."""
    if not reliability:
        return NOT_MEASURED
    r = reliability
    return (f"maps of this model hit the lesion in {100 * r['pointing_game']:.0f}% of {r['n']} masked cases "
            f"({r['target']} maps, {r['method']} at {'the last block' if r['layer'] in ('', 'last') else r['layer']})")
