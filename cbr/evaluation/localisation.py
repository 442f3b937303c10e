"""Do the query maps point at the lesion? Pointing game, energy pointing game and IoU, each beside
two trivial guesses on the same images.

When records carry a ``mask`` (metadata) and ``explain`` is not ``none``, every map of the query
(the lesion localiser's "finding" map when the model has one, the class map of the predicted class
when it has a head, the similarity map to its neighbours) is scored against the mask, in the
model's view of the image (its crop, then letterbox). Images with an empty mask (no lesion) are
left out: there is nothing to point at.

The guesses (``baselines``): a point at the image centre (``explain.finding.centre_map``) and the
mean of the training masks (``priors``, per fold). A map kind that does not beat the better guess
by ``GUESS_MARGIN`` is marked ``no_better_than_a_guess`` (cbr.store.reliability.guess_verdict).
The headline figures are those of the map a user sees by default: the finding map when there is
one, else the class map.
"""

from __future__ import annotations

import logging

import numpy as np

from cbr.data.mask import lesion_mask
from cbr.store.reliability import guess_verdict, on_finding_floor, Reliability
from explain.finding import centre_map, share_on
from explain.metrics import energy_pointing_game, iou, pointing_game

__all__ = ["localisation", "reliability_from"]

LOG = logging.getLogger(__name__)


def _block(rows) -> dict:
    return {"n": len(rows), "pointing_game": float(np.mean([r[1] for r in rows])),
            "energy_pointing_game": float(np.mean([r[2] for r in rows])),
            "iou": float(np.mean([r[3] for r in rows]))}


def _row(label, raw, mask) -> tuple:
    return label, pointing_game(raw, mask), energy_pointing_game(raw, mask), iou(raw, mask)


def _mask_of(o, input_size: int, model):
    mask_path = o.record.metadata.get("mask") if o.record.metadata else None
    if not mask_path or not o.maps:
        return None
    try:
        mask = lesion_mask(mask_path, input_size, crop=getattr(model, "crop", "none"), image=o.record.path,
                           window=getattr(model, "window", "auto"))
    except OSError as e:
        LOG.warning("%s: mask unreadable (%s); left out of the localisation figures", mask_path, e)
        return None
    return mask if mask.any() else None


def _score(outcomes, input_size: int, model, priors: dict) -> tuple[dict, dict, list]:
    """({map kind: rows}, {baseline: rows}, on-finding shares of the class maps on the true masks)."""
    scored: dict[str, list] = {}
    guesses: dict[str, list] = {}
    shares = []
    centre = centre_map(input_size)
    for o in outcomes:
        mask = _mask_of(o, input_size, model)
        if mask is None:
            continue
        for target, raw in o.maps.items():
            scored.setdefault(target.split(":", 1)[0], []).append(_row(o.record.label, raw, mask))
            if target.startswith("class:"):
                shares.append(share_on(raw, mask))
        guesses.setdefault("centre", []).append(_row(o.record.label, centre, mask))
        prior = priors.get(o.fold)
        if prior is not None:
            guesses.setdefault("mean_mask", []).append(_row(o.record.label, prior, mask))
    return scored, guesses, [s for s in shares if s is not None]


def localisation(outcomes, input_size: int, model=None, priors: dict | None = None) -> dict | None:
    """The localisation figures of the outcomes' maps, by map kind and class, beside the guesses
    (None: no mask).

    Args:
        outcomes: evaluated queries with their raw maps.
        input_size: the model's input side.
        model: the ``ModelConfig`` whose maps these are (its ``crop`` and ``window`` place the
            masks); None: no crop.
        priors: {fold: the mean of that fold's training masks (S, S)}: the mean-mask guess.
    """
    scored, guesses, shares = _score(outcomes, input_size, model, priors or {})
    if not scored:
        return None
    baselines = {name: _block(rows) for name, rows in guesses.items()}
    by_map = {}
    for kind, rows in scored.items():
        b = _block(rows)
        b["per_class"] = {c: _block([r for r in rows if r[0] == c]) for c in sorted({r[0] for r in rows})}
        b.update(guess_verdict(b["pointing_game"], baselines))
        by_map[kind] = b
    primary = next((k for k in ("finding", "class") if k in by_map), sorted(by_map)[0])
    return {"map": primary, **by_map[primary], "by_map": by_map, "baselines": baselines,
            "on_finding": on_finding_floor(shares)}


def reliability_from(figures: dict | None, method: str, layer: str):
    """The ``Reliability`` to keep with the model whose maps ``figures`` (from localisation) scored."""
    if not figures or not figures.get("n"):
        return None
    base = figures.get("baselines") or {}
    floor = figures.get("on_finding") or {}
    return Reliability(pointing_game=float(figures["pointing_game"]), n=int(figures["n"]), method=method,
                       layer=layer, target=figures["map"], source="evaluate",
                       centre=(base.get("centre") or {}).get("pointing_game"),
                       mean_mask=(base.get("mean_mask") or {}).get("pointing_game"),
                       on_finding_floor=floor.get("floor"))
