"""Do the query maps point at the lesion? Pointing game, energy pointing game and IoU.

When records carry a ``mask`` (metadata) and ``explain`` is not ``none``, the query's map (the
class map of the predicted class when the model has a head, else the similarity map to its
neighbours) is scored against the mask, in the model's view of the image (its crop, then letterbox). Images with an empty mask
(no lesion) are left out: there is nothing to point at.
"""

from __future__ import annotations

import logging

import numpy as np

from cbr.data.mask import lesion_mask
from cbr.store.reliability import Reliability
from explain.metrics import energy_pointing_game, iou, pointing_game

__all__ = ["localisation", "reliability_from"]

LOG = logging.getLogger(__name__)


def _block(rows) -> dict:
    return {"n": len(rows), "pointing_game": float(np.mean([r[1] for r in rows])),
            "energy_pointing_game": float(np.mean([r[2] for r in rows])),
            "iou": float(np.mean([r[3] for r in rows]))}


def localisation(outcomes, input_size: int, model=None) -> dict | None:
    """The localisation figures of the outcomes' maps, by map kind and class (None: no mask).

    ``model``: the ``ModelConfig`` whose maps these are (its ``crop`` and ``window`` place the
    masks); None: no crop."""
    scored: dict[str, list[tuple[str, bool, float, float]]] = {}
    for o in outcomes:
        mask_path = o.record.metadata.get("mask") if o.record.metadata else None
        if not mask_path or not o.maps:
            continue
        try:
            mask = lesion_mask(mask_path, input_size, crop=getattr(model, "crop", "none"), image=o.record.path,
                               window=getattr(model, "window", "auto"))
        except OSError as e:
            LOG.warning("%s: mask unreadable (%s); left out of the localisation figures", mask_path, e)
            continue
        if not mask.any():
            continue
        for target, raw in o.maps.items():
            kind = target.split(":", 1)[0]
            scored.setdefault(kind, []).append(
                (o.record.label, pointing_game(raw, mask), energy_pointing_game(raw, mask), iou(raw, mask)))
    if not scored:
        return None
    by_map = {}
    for kind, rows in scored.items():
        b = _block(rows)
        b["per_class"] = {c: _block([r for r in rows if r[0] == c]) for c in sorted({r[0] for r in rows})}
        by_map[kind] = b
    primary = "class" if "class" in by_map else sorted(by_map)[0]
    return {"map": primary, **by_map[primary], "by_map": by_map}


def reliability_from(figures: dict | None, method: str, layer: str):
    """The ``Reliability`` to keep with the model whose maps ``figures`` (from localisation) scored."""
    if not figures or not figures.get("n"):
        return None
    return Reliability(pointing_game=float(figures["pointing_game"]), n=int(figures["n"]), method=method,
                       layer=layer, target=figures["map"], source="evaluate")
