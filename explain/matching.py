"""Region-matching similarity maps: which part of the query resembles which part of a neighbour.

The global similarity of two cases is the cosine of their pooled embeddings, so a CAM of it
explains global resemblance and may light up background the two images share. Region matching
compares locations instead: every location of the query's activation map is matched to its most
similar location in the neighbour's map (dense cosine correspondence, as in dense retrieval and
"this looks like that" networks). A location's score is that best cosine times the location's
activation norm relative to the image's strongest: a weak, featureless location (plain skin,
air) matches anything but carries no evidence, and the norm keeps it low.
"""

import numpy as np

from typing import NamedTuple

__all__ = ["region_matches", "region_pair", "RegionPair", "matching_maps"]

_EPS = 1e-8


def _locations(acts):
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim != 3:
        raise ValueError(f"activations must be (C, h, w), got shape {acts.shape}")
    flat = acts.reshape(acts.shape[0], -1).T  # (h*w, C)
    norms = np.linalg.norm(flat, axis=1)
    return flat / np.maximum(norms, _EPS)[:, None], norms


def _correspondence(query_acts, neighbour_acts):
    """(cosine matrix (h*w, h2*w2), query map, neighbour map), the maps flat."""
    a, na = _locations(query_acts)
    b, nb = _locations(neighbour_acts)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"channel counts differ: {a.shape[1]} and {b.shape[1]}")
    cos = a @ b.T
    strength_a = na / max(float(na.max()), _EPS)
    strength_b = nb / max(float(nb.max()), _EPS)
    return cos, np.maximum(cos.max(axis=1), 0) * strength_a, np.maximum(cos.max(axis=0), 0) * strength_b


def region_matches(query_acts, neighbour_acts):
    """Dense correspondence between two activation maps.

    Args:
        query_acts: (C, h, w) activations of the query at the CAM layer.
        neighbour_acts: (C, h2, w2) activations of the neighbour at the same layer.

    Returns:
        (query_map (h, w), neighbour_map (h2, w2), match (h, w) int): each map is the best
        cosine of a location to any location of the other image times its relative activation
        norm, clipped at 0; match[i, j] is the flat index in the neighbour's (h2, w2) grid of
        the location query (i, j) resembles most, so the two maps can be linked.

    Example:
        >>> q, n, match = region_matches(acts[0], acts[3])
        >>> divmod(match[np.unravel_index(q.argmax(), q.shape)], n.shape[1])  # where it points
    """
    cos, query_map, neighbour_map = _correspondence(query_acts, neighbour_acts)
    h, w = np.asarray(query_acts).shape[1:]
    h2, w2 = np.asarray(neighbour_acts).shape[1:]
    match = cos.argmax(axis=1).reshape(h, w)
    return (query_map.reshape(h, w).astype(np.float32), neighbour_map.reshape(h2, w2).astype(np.float32),
            match.astype(np.int64))


class RegionPair(NamedTuple):
    """Two linked maps: the query's strongest region and the neighbour's region it resembles most."""

    query_map: np.ndarray  # (h, w), as region_matches
    neighbour_map: np.ndarray  # (h2, w2), as region_matches
    query_cell: tuple  # (row, col) of the query map's maximum
    neighbour_cell: tuple  # (row, col) in the neighbour's grid of the location query_cell matches best
    cosine: float  # the cosine of those two locations' activation vectors


def region_pair(query_acts, neighbour_acts) -> RegionPair:
    """region_matches plus the link shown with the pair: the query map's maximum (first in row
    order on a tie) and its best-matching location in the neighbour.

    Example:
        >>> pair = region_pair(acts[0], acts[3])
        >>> pair.query_cell, pair.neighbour_cell, round(pair.cosine, 3)
        ((2, 3), (4, 1), 0.912)
    """
    cos, query_map, neighbour_map = _correspondence(query_acts, neighbour_acts)
    h, w = np.asarray(query_acts).shape[1:]
    h2, w2 = np.asarray(neighbour_acts).shape[1:]
    strongest = int(query_map.argmax())
    best = int(cos[strongest].argmax())
    return RegionPair(query_map.reshape(h, w).astype(np.float32), neighbour_map.reshape(h2, w2).astype(np.float32),
                      divmod(strongest, int(w)), divmod(best, int(w2)), float(cos[strongest, best]))


def matching_maps(query_acts, neighbour_acts):
    """Query-side region-matching maps for a batch: (B, C, h, w) twice -> (B, h, w) float32.

    Row i matches query i against neighbour i (see region_matches).
    """
    query_acts, neighbour_acts = np.asarray(query_acts), np.asarray(neighbour_acts)
    if query_acts.ndim != 4 or query_acts.shape[0] != neighbour_acts.shape[0]:
        raise ValueError(f"need two (B, C, h, w) batches of one B, got {query_acts.shape} and {neighbour_acts.shape}")
    if query_acts.shape[0] == 0:
        return np.zeros((0, *query_acts.shape[2:]), dtype=np.float32)
    return np.stack([region_matches(q, n)[0] for q, n in zip(query_acts, neighbour_acts)])
