"""Why-this-neighbour maps: the ``SIMILARITY_MAPS`` registry, the region-matching pair of a query
and each neighbour, and the link stored with it.

Two variants explain why a neighbour was retrieved:

- ``matching`` (the default): region matching on the last block's activations (explain.matching).
  Each location of the query is matched to its most similar location in the neighbour, and the
  other way round. This gives two linked maps: "this region of the query resembles that region of
  case N". On real lesion masks its pointing game beat every global-cosine CAM (issue 14:
  HAM10000 0.70 against 0.64; phantoms 0.43 against 0.37).
- ``cosine``: a CAM of the cosine of the two global embeddings. It explains global resemblance.

Every stored map records its variant in its method spec, in the spec's own notation
(explain.spec): ``layercam(sim=match)``. A bare ``layercam`` is a global-cosine map, as every map
stored before region matching existed, so old rows read as they always did. Attribution methods
(lime, ...) explain the global cosine from the pixels whatever the variant.

The pair's query-side map is stored as a query map (no case id) whose target carries the link:
``match:812 q=2,3/7x7 n=4,1/7x7 cos=0.9123``. That is the neighbour's case id, the (row, col)
of the query map's maximum in its grid, the (row, col) it matches best in the neighbour's grid,
and their cosine. The neighbour-side map keeps the target ``similarity:query``. Nothing in the
schema changes: the link is part of what the map explains, as ``class:X`` names its class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cbr.errors import UnknownNameError
from explain.matching import region_matches, region_pair
from explain.methods import is_attribution

__all__ = ["SIMILARITY_MAPS", "DEFAULT_SIMILARITY_MAP", "MatchLink", "check_similarity", "similarity_spec",
           "similarity_of", "pair_maps", "DISPLAY_SIZE"]

# name -> what its maps explain; the order is the CLI's (the default first).
SIMILARITY_MAPS = {
    "matching": "region matching at the last block: which region of the query resembles which region of the case",
    "cosine": "a CAM of the cosine of the two global embeddings: global resemblance",
}
DEFAULT_SIMILARITY_MAP = "matching"
MATCH_PARAM = "(sim=match)"  # appended to a CAM method's spec: its similarity maps are region matches
PAIR_PREFIX = "match:"  # target of a pair's query-side map
DISPLAY_SIZE = 224  # side of the letterboxed images the report shows; the link's pixels are on it

_TARGET = re.compile(r"^match:(\d+) q=(\d+),(\d+)/(\d+)x(\d+) n=(\d+),(\d+)/(\d+)x(\d+) cos=(-?[0-9.]+)$")


def check_similarity(name: str) -> str:
    """``name`` if it is a ``SIMILARITY_MAPS`` variant, else UnknownNameError listing them."""
    if name not in SIMILARITY_MAPS:
        raise UnknownNameError("similarity map", name, SIMILARITY_MAPS)
    return name


def _matches(spec: str, similarity: str) -> bool:
    return similarity == "matching" and not is_attribution(spec)


def similarity_spec(spec: str, similarity: str) -> str:
    """The method spec recorded with a query's maps: ``layercam(sim=match)`` for a CAM with
    region-matching similarity maps; the bare spec for the cosine variant and for attributions."""
    check_similarity(similarity)
    return f"{spec}{MATCH_PARAM}" if _matches(spec, similarity) else spec


def similarity_of(spec: str | None) -> str:
    """The variant a stored spec's similarity maps were made with (old, bare specs: ``cosine``)."""
    return "matching" if str(spec or "").endswith(MATCH_PARAM) else "cosine"


def _cell_xy(cell, grid, size: int) -> list[float]:
    # Maps are upsampled with pixel centres aligned (explain.overlay.upsample): cell j of w spans
    # [j, j + 1) * size / w, so its centre is (j + 0.5) * size / w.
    (row, col), (h, w) = cell, grid
    return [round((col + 0.5) * size / w, 1), round((row + 0.5) * size / h, 1)]


@dataclass(frozen=True)
class MatchLink:
    """The link of a pair: the query's strongest region and the region of case ``case_id`` it matches."""

    case_id: int
    query_cell: tuple[int, int]  # (row, col) of the query-side map's maximum
    query_grid: tuple[int, int]  # (h, w) of the query-side map
    case_cell: tuple[int, int]  # (row, col) in the neighbour's grid that query_cell resembles most
    case_grid: tuple[int, int]  # (h, w) of the neighbour-side map
    cosine: float  # cosine of the two locations' activation vectors

    def target(self) -> str:
        """The target text the pair's query-side map is stored with (parse reads it back)."""
        (qr, qc), (qh, qw), (nr, nc), (nh, nw) = self.query_cell, self.query_grid, self.case_cell, self.case_grid
        return f"{PAIR_PREFIX}{self.case_id} q={qr},{qc}/{qh}x{qw} n={nr},{nc}/{nh}x{nw} cos={self.cosine:.4f}"

    @classmethod
    def parse(cls, target: str) -> "MatchLink | None":
        """The link a stored target names, or None for any other target (class, similarity, ...)."""
        m = _TARGET.match(str(target))
        if m is None:
            return None
        v = [int(g) for g in m.groups()[:9]]
        return cls(v[0], (v[1], v[2]), (v[3], v[4]), (v[5], v[6]), (v[7], v[8]), float(m.group(10)))

    def query_xy(self, size: int = DISPLAY_SIZE) -> list[float]:
        """[x, y] of the query's region on the letterboxed query image of side ``size``."""
        return _cell_xy(self.query_cell, self.query_grid, size)

    def case_xy(self, size: int = DISPLAY_SIZE) -> list[float]:
        """[x, y] of the matched region on the letterboxed case image of side ``size``."""
        return _cell_xy(self.case_cell, self.case_grid, size)

    def to_dict(self, size: int = DISPLAY_SIZE) -> dict:
        """As ``--json`` gives it: pixel centres on the ``size``-pixel letterboxed images."""
        return {"query_xy": self.query_xy(size), "case_xy": self.case_xy(size), "cosine": round(self.cosine, 4),
                "image_size": size}


def _last_block(embedder, acts):
    """The trunk output from the CAM-layer activations ``cam_features`` gave (region matching was
    measured at the last block, whatever layer the model's CAMs use)."""
    import torch

    split = embedder.cam_split()
    if split is None or not embedder.config.target_layer:
        return acts  # cam_features gave the trunk output itself
    with torch.no_grad():
        return split[1](acts)


def pair_maps(embedder, query_acts, neighbour_acts, case_ids, paired=None) -> dict:
    """Region-matching maps of a query and its neighbours, keyed as query_maps stores them.

    Args:
        embedder: the member's embedder (to reach its last block from the CAM layer).
        query_acts: (1, C, h, w) CAM-layer activations of the query (torch).
        neighbour_acts: (N, C, h, w) those of the neighbours, in ``case_ids`` order.
        case_ids: the neighbours' case ids.
        paired: the case ids that get a pair (None: all); the query's own map matches them all.

    Returns:
        {(None, "similarity:neighbours"): the query against all neighbours' locations at once,
         (case_id, "similarity:query"): each neighbour-side map,
         (None, link target): each pair's query-side map}
    """
    # embedder.grid: a vision transformer's tokens as its patch grid (a CNN's activations as they are).
    q = embedder.grid(_last_block(embedder, query_acts))[0].float().cpu().numpy()
    ns = embedder.grid(_last_block(embedder, neighbour_acts)).float().cpu().numpy()
    out = {}
    if len(ns):
        # One neighbour's locations after another along the width: the best match over all of them.
        out[(None, "similarity:neighbours")] = region_matches(q, np.concatenate(list(ns), axis=2))[0]
    for case_id, n in zip(case_ids, ns):
        if paired is not None and case_id not in paired:
            continue
        pair = region_pair(q, n)
        link = MatchLink(int(case_id), tuple(map(int, pair.query_cell)), pair.query_map.shape,
                         tuple(map(int, pair.neighbour_cell)), pair.neighbour_map.shape, pair.cosine)
        out[(case_id, "similarity:query")] = pair.neighbour_map
        out[(None, link.target())] = pair.query_map
    return out
