"""Map reliability: how often a model's maps hit the lesion, measured against masks and kept
with the model, so that every map it draws can say how far it may be trusted."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import delete, select

from cbr.store.rows import iso
from cbr.store.schema import MapReliability

__all__ = ["Reliability", "store_reliability", "reliability_of", "badge_text", "guess_verdict", "on_finding_floor", "NOT_MEASURED",
           "GUESS_MARGIN", "GUESS_WORDS", "NO_BETTER"]

NOT_MEASURED = "maps of this model were not measured against lesion masks"
ON_FINDING_QUANTILE = 0.1  # the on-finding warning fires below this quantile of the masked cases' shares
GUESS_MARGIN = 0.10  # a map kind must beat the better trivial guess's pointing game by this much
NO_BETTER = "no better than a guess"
GUESS_WORDS = {"centre": "a centre guess", "mean_mask": "the mean training mask"}


@dataclass(frozen=True)
class Reliability:
    """One measurement of a model's maps (see ``MapReliability``)."""

    pointing_game: float  # share of masked images whose map maximum lies in the lesion
    n: int  # masked images measured
    method: str  # explanation method
    layer: str  # CAM layer, "" = the last block
    target: str  # class | similarity | embedding
    source: str  # evaluate | index
    centre: float | None = None  # pointing game of a point at the image centre, on the same images
    mean_mask: float | None = None  # pointing game of the training masks' mean map, on the same images
    on_finding_floor: float | None = None  # the calibrated evidence.on_finding threshold


def on_finding_floor(shares) -> dict | None:
    """The on-finding threshold calibrated on masked cases: the ``ON_FINDING_QUANTILE`` quantile of the
    shares of the class maps' mass on the true lesion (None without shares)."""
    if not shares:
        return None
    return {"n": len(shares), "median": float(np.median(shares)),
            "floor": float(np.quantile(shares, ON_FINDING_QUANTILE)), "quantile": ON_FINDING_QUANTILE}


def guess_verdict(pointing: float, baselines: dict) -> dict:
    """How a map's pointing game compares with the guesses ({name: {"pointing_game": ...}} or
    {name: value}): {"best_guess", "best_guess_pointing_game", "margin", "no_better_than_a_guess"}."""
    values = {k: (v.get("pointing_game") if isinstance(v, dict) else v) for k, v in (baselines or {}).items()}
    values = {k: float(v) for k, v in values.items() if v is not None}
    if not values:
        return {"best_guess": None, "best_guess_pointing_game": None, "margin": None, "no_better_than_a_guess": None}
    best = max(values, key=values.get)
    margin = float(pointing) - values[best]
    return {"best_guess": best, "best_guess_pointing_game": values[best], "margin": margin,
            "no_better_than_a_guess": bool(margin < GUESS_MARGIN)}


def store_reliability(cb, model_id: int, measured: Reliability) -> None:
    """Keep ``measured`` as ``model_id``'s reliability, replacing an earlier measurement."""
    with cb.write() as s:
        s.execute(delete(MapReliability).where(MapReliability.model_id == model_id))
        fields = asdict(measured)
        guesses = {k: fields.pop(k) for k in ("centre", "mean_mask", "on_finding_floor")}
        s.add(MapReliability(model_id=model_id, **fields,
                             baselines={k: v for k, v in guesses.items() if v is not None} or None))


def reliability_of(session, model_ids) -> dict:
    """{model_id: the ``map_reliability`` JSON dict, or None when never measured}."""
    ids = list(model_ids)
    found = {r.model_id: r for r in session.scalars(select(MapReliability).where(MapReliability.model_id.in_(ids)))}
    out = {}
    for mid in ids:
        r = found.get(mid)
        out[mid] = None if r is None else {
            "pointing_game": round(float(r.pointing_game), 4), "n": int(r.n), "method": r.method,
            "layer": r.layer or "last", "target": r.target, "source": r.source, "measured_at": iso(r.created_at),
            "baselines": {k: round(float(v), 4) for k, v in (r.baselines or {}).items()
                          if k in GUESS_WORDS and v is not None},
            "on_finding_floor": (r.baselines or {}).get("on_finding_floor")}
        if out[mid] is not None:
            out[mid].update(guess_verdict(out[mid]["pointing_game"], out[mid]["baselines"]))
    return out


def badge_text(reliability: dict | None) -> str:
    """One line for a reader of the maps: "maps of this model hit the lesion in 78% of 420 masked cases"."""
    if not reliability:
        return NOT_MEASURED
    r = reliability
    where = "" if r["target"] == "finding" else f", {r['method']} at " + (
        "the last block" if r["layer"] in ("", "last") else r["layer"])
    text = f"maps hit the lesion in {100 * r['pointing_game']:.0f}% of {r['n']} masked cases"
    guesses = r.get("baselines") or {}
    if guesses:
        text += " (" + ", ".join(f"{GUESS_WORDS[k]}: {100 * v:.0f}%" for k, v in sorted(guesses.items())) + ")"
    text += f" [{r['target']} maps{where}]"
    if r.get("no_better_than_a_guess"):
        text += f": {NO_BETTER}"
    return text
