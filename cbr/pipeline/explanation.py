"""The explain step of a query: similarity maps of the query and its neighbours, and the query's
class map when the model has a head.

The query's activations come from its embedding pass, so the maps of the query and its k
neighbours need one trunk pass over the neighbours and one batched backward pass through the
small pooling head (see explain.cam). With a CAM method and ``similarity="matching"`` (the
default) the similarity maps are region-matching pairs instead (cbr.models.similarity_maps): no
backward pass at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from cbr.data.sources import read_source
from cbr.errors import CbrError
from cbr.models.maps import compute_maps
from cbr.models.similarity_maps import DEFAULT_SIMILARITY_MAP, pair_maps, similarity_of, similarity_spec
from cbr.pipeline.finding import finding_maps
from explain.methods import is_attribution
from explain.spec import resolve_spec
from explain.targets import ClassTarget, SimilarityTarget

__all__ = ["Features", "MapRequest", "embed_query", "query_maps", "IMAGE_OK", "IMAGE_CHANGED", "IMAGE_MISSING"]

# A neighbour's file as read again at query time (``--json``: ``neighbours[].image_status``).
IMAGE_OK = "ok"
IMAGE_CHANGED = "image changed or missing since indexing"
IMAGE_MISSING = IMAGE_CHANGED  # one wording for both: either way its pixels are not the indexed ones


class Features(NamedTuple):
    """One member's view of the query image: its input tensor, CAM-layer activations, embedding."""

    x: object  # (1, 3, H, W) preprocessed input
    acts: object  # CAM-layer activations of x
    vector: object  # (1, D) float32 numpy embedding, L2-normalised


@dataclass(frozen=True)
class MapRequest:
    """Which maps a query asks for."""

    method: str  # an explanation method name (explain.methods.METHOD_NAMES)
    budget: int | None = None  # cap on the model evaluations of each attribution map (explain.spec)
    neighbours: int | None = None  # similarity maps for the top n neighbours only (None: all)
    similarity: str = DEFAULT_SIMILARITY_MAP  # SIMILARITY_MAPS: region matching, or a CAM of the global cosine


def embed_query(members, img) -> list[Features]:
    """Embed a decoded image with every member, keeping the activations for its maps."""
    import torch

    out = []
    for m in members:
        x = m.embedder.preprocess(img).unsqueeze(0)
        with torch.no_grad():
            acts, e = m.embedder.cam_features(x)
        out.append(Features(x, acts, e.float().numpy()))
    return out


def query_maps(members, features, hits, final, request: MapRequest, notes: list, *, meter=None,
               status: dict | None = None, localisers: dict | None = None) -> tuple[dict, dict]:
    """Raw maps of a query and its neighbours, and the neighbours' decoded images.

    Args:
        members: the loaded ``Member``s; features: their ``Features`` of the query.
        hits: per member, its ``search.Hit``s.
        final: the ensemble's vote (the class map explains its label).
        request: the method, its budget and how many neighbours get maps (the query's map still
            explains its similarity to the mean of all its neighbours).
        notes: gets a line for each neighbour whose image cannot be read (its stored map is shown).
        meter: a ``map_meter.MapMeter`` that counts (and shows) the attribution maps' cost.
        status: gets {case_id: IMAGE_OK, IMAGE_CHANGED or IMAGE_MISSING} for every neighbour whose
            file was read again; a changed or missing one gets no map (never from other pixels).
        localisers: {model_id: its lesion localiser}: adds the "finding" map of the query and of
            every readable neighbour (cbr.pipeline.finding).

    Returns:
        ({(model_id, case_id or None for the query, target): raw map}, {case_id: decoded image (the
        report views it through each member's crop)});
        with region matching, each pair's query-side map comes as (model_id, None, its link's target)
        (cbr.models.similarity_maps.MatchLink).
    """
    import torch

    method, budget, neighbours = request.method, request.budget, request.neighbours
    maps, images = {}, {}
    for m, (xq, aq, eq), h in zip(members, features, hits):
        emb = m.embedder
        spec = resolve_spec(method, emb.config.input_size, budget)
        track = meter is not None and is_attribution(spec)
        if track:
            has_class = emb.head is not None and final.label in emb.config.class_names
            meter.start(1 + len(h[:neighbours]) + has_class, spec)
        xs, cases = _readable(emb, h, notes, status, images)
        if cases:
            xn = torch.stack(xs)
            with torch.no_grad():
                an, en = emb.cam_features(xn)
            en_np = en.float().numpy()
            top = {hit.case.id for hit in h[:neighbours]}
            keep = [i for i, c in enumerate(cases) if c.id in top]
        if (localisers or {}).get(m.model_id) is not None:
            maps.update(finding_maps(localisers[m.model_id], m.model_id, xq, xn if cases else None, cases))
        if cases and _matching(spec, request.similarity):
            pairs = pair_maps(emb, aq, an, [c.id for c in cases], paired={cases[i].id for i in keep})
            maps.update({(m.model_id, cid, target): r for (cid, target), r in pairs.items()})
        elif cases:
            cases = [cases[i] for i in keep]
            query_target = SimilarityTarget(en_np.mean(axis=0))
            neighbour_target = SimilarityTarget(eq[0])
            targets = [query_target] + [neighbour_target for _ in cases]
            raw = compute_maps(emb, torch.cat([xq, xn[keep]]), torch.cat([aq, an[keep]]), targets, False, spec,
                               progress=meter.callback() if track else None)
            maps[(m.model_id, None, "similarity:neighbours")] = raw[0]
            for c, r in zip(cases, raw[1:]):
                maps[(m.model_id, c.id, "similarity:query")] = r
        if emb.head is not None and final.label in emb.config.class_names:
            i = emb.config.class_names.index(final.label)
            raw = compute_maps(emb, xq, aq, [ClassTarget(i)], True, spec,
                               progress=meter.callback() if track else None)
            maps[(m.model_id, None, f"class:{final.label}")] = raw[0]
    return maps, images


def _readable(emb, hits, notes: list, status: dict | None, images: dict) -> tuple[list, list]:
    """(preprocessed inputs, case rows) of the neighbours whose file still holds the indexed pixels;
    their decoded images go into ``images``, the others get a note and a status (see query_maps)."""
    xs, cases = [], []
    for c, _ in hits:
        try:
            # a frame/slice, as indexed (a neutral locator is shown, its file is read)
            nimg, sha, _ = read_source(c.readable_locator, window=emb.config.window)
        except CbrError as e:
            if status is not None:
                status[c.id] = IMAGE_MISSING
            notes.append(f"case {c.id}: image unavailable for its map ({e}); its stored map is shown")
            continue
        if c.sha256 and sha != c.sha256:
            if status is not None:
                status[c.id] = IMAGE_CHANGED
            notes.append(f"case {c.id}: {IMAGE_CHANGED} (its file {c.path} now has other content); no map is "
                         "computed from it; the vote uses its stored label and embedding")
            continue
        if status is not None:
            status[c.id] = IMAGE_OK
        images.setdefault(c.id, nimg)
        xs.append(emb.preprocess(nimg))
        cases.append(c)
    return xs, cases


def _matching(spec: str, similarity: str) -> bool:
    """Whether a query's similarity maps are region matches (CAM methods under ``matching``);
    attribution methods explain the global cosine from the pixels whatever the variant."""
    return similarity_of(similarity_spec(spec, similarity)) == "matching"
