"""Where is the finding: the lesion localiser's maps of a query and its neighbours, the region it
marks, and how much of the class map's mass lies on that region (``evidence.on_finding``).

A model trained on images with masks carries a localiser (:mod:`cbr.models.localiser`); its map is
the default "where is the finding" map. The finding region is its strongest connected region
(``explain.finding.strongest_region``), a box in the model's view of the image (its crop, then
letterbox, ``input_size`` pixels a side). Without a localiser, cbr says so and shows the class
and similarity maps.
"""

from __future__ import annotations

import numpy as np

from cbr.lazy_import import LazyModule
from explain.finding import FINDING, region_box, share_on, strongest_region
from explain.overlay import upsample

__all__ = ["FINDING", "NO_LOCALISER", "OFF_FINDING", "load_localisers", "finding_maps", "finding_of", "on_finding",
           "finding_evidence"]

models_localiser = LazyModule("cbr.models.localiser")  # torch-bound: loads on first use

NO_LOCALISER = ("no lesion localiser: the model was trained without lesion masks (a 'mask' column); "
                "its {maps} maps show what the model used, not where the finding is")
OFF_FINDING = "this answer rests mostly on evidence outside the finding"


def load_localisers(members) -> dict:
    """{model_id: its ``Localiser``} of the members whose checkpoint carries one (its payload was
    read with the member's model, ``Embedder.localiser_payload``)."""
    return {m.model_id: models_localiser.load_localiser(m.embedder.localiser_payload, m.embedder.trunk,
                                                        m.label).to(m.embedder.device)
            for m in members if m.embedder.localiser_payload}


def finding_maps(localiser, model_id: int, xq, xn, cases) -> dict:
    """The localiser's maps: {(model_id, None, FINDING): the query's, (model_id, case_id, FINDING): each
    neighbour's}; ``xq`` (1, 3, S, S) and ``xn`` (n, 3, S, S, or None) preprocessed as the model's,
    ``cases`` the neighbours' case rows (or ids) in ``xn``'s order."""
    import torch

    case_ids = [getattr(c, "id", c) for c in cases]
    x = xq if xn is None or not len(case_ids) else torch.cat([xq, xn])
    probs = localiser.probabilities(x.to(next(localiser.parameters()).device))
    out = {(model_id, None, FINDING): probs[0]}
    out.update({(model_id, cid, FINDING): p for cid, p in zip(case_ids, probs[1:])})
    return out


def finding_of(prob, input_size: int) -> dict | None:
    """The finding a localiser map marks, in the model's view (``input_size`` pixels a side):
    {box [x0, y0, x1, y1], area (share of the image), probability (the map's maximum)}; None when
    the map marks nothing."""
    region = strongest_region(_upsampled(prob, input_size))
    box = region_box(region)
    if box is None:
        return None
    return {"box": box, "area": round(float(region.mean()), 6), "probability": round(float(np.max(prob)), 6),
            "source": "localiser"}


def on_finding(class_map, prob, input_size: int) -> float | None:
    """The share of the class map's mass on the localiser's finding region (None: no region or no mass)."""
    return share_on(class_map, strongest_region(_upsampled(prob, input_size)))


def _upsampled(prob, size: int):
    return upsample(prob, size)


def finding_evidence(maps: dict, model_id: int, label, input_size: int, floor: float | None, *,
                     has_localiser: bool) -> dict:
    """What the answer says about the finding (``--json``: ``finding``).

    Args:
        maps: the query's raw maps ({(model_id, case_id or None, target): map}).
        model_id: the member whose maps are read (the first); label: the answer (None: abstained).
        input_size: its input side; floor: the calibrated on-finding threshold (None: not measured).
        has_localiser: whether that member carries a localiser.

    Returns:
        {"localiser": bool, "box", "area", "probability" (the finding, None without one),
        "on_finding" (share of the class map's mass on it), "on_finding_floor", "warning"}.
    """
    out = {"localiser": has_localiser, "box": None, "area": None, "probability": None, "on_finding": None,
           "on_finding_floor": floor, "warning": None}
    prob = maps.get((model_id, None, FINDING))
    if prob is None:
        # name the maps there are: a model without a classifier head (ImageNet weights) has no class map
        has_class = any(k[0] == model_id and k[1] is None and str(k[2]).startswith("class:") for k in maps)
        out["note"] = (NO_LOCALISER.format(maps="class and similarity" if has_class else "similarity")
                       if not has_localiser else None)
        return out
    found = finding_of(prob, input_size)
    if found is not None:
        out.update({k: found[k] for k in ("box", "area", "probability")})
    cmap = maps.get((model_id, None, f"class:{label}")) if label is not None else None
    if found is not None and cmap is not None:
        share = on_finding(cmap, prob, input_size)
        out["on_finding"] = None if share is None else round(share, 6)
        if share is not None and floor is not None and share < floor:
            out["warning"] = OFF_FINDING
    return out
