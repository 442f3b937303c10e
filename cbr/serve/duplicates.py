"""Near-duplicate neighbours: a case that is the query's own picture, or that picture re-encoded.

A retrieved copy of the query (the same scan exported twice, re-saved, re-compressed) is not
independent evidence, and a reader should see that at once. The test is on pixels, never on the
embedding's cosine: how close two different images' embeddings sit depends on the model (a random
CNN puts distinct images at cosine 0.99), so no cosine threshold means "the same picture" for every
model. Two criteria, fixed by what they mean rather than fitted to any data set:

* the same file content (sha256): ``same image``;
* otherwise the two images, in the model's view (crop, letterbox) shrunk to THUMB x THUMB grey, differ
  by at most NEAR_GREY grey levels on average: ``near duplicate``. Re-encoding (a JPEG at the usual
  qualities, a PNG round trip) or +-2 levels of noise stays well below it; a different scan does not.
"""

from __future__ import annotations

import functools

import numpy as np

from cbr.data.crop import model_view
from cbr.errors import CbrError
from cbr.store.rows import case_locators, query_image_locator

__all__ = ["near_duplicates", "duplicate_flags", "THUMB", "NEAR_GREY"]

THUMB = 32  # pixels on a side of the compared thumbnails: fine detail and noise average out
NEAR_GREY = 2.0  # mean absolute grey-level difference (of 255) still called the same picture


def _thumb(wb, locator: str, crop: str):
    try:
        img, _, _ = wb.decode(locator)
    except CbrError:
        return None  # gone or unreadable: no claim either way
    return np.asarray(model_view(img, THUMB, crop).convert("L"), dtype=np.float32)


@functools.lru_cache(maxsize=64)
def near_duplicates(wb, query_id: int, record_key: tuple) -> dict[int, str]:
    """{case id: "same image" | "near duplicate"} among a query's neighbours (its first member's view).

    ``record_key``: (query sha256, ((case id, sha256), ...)) of the record, which also keys the cache
    (a query's neighbours never change once recorded)."""
    sha, neighbours = record_key
    flags = {cid: "same image" for cid, nsha in neighbours if sha and nsha == sha}
    rest = [cid for cid, _ in neighbours if cid not in flags]
    if not rest:
        return flags
    crop = wb.crop
    query = _thumb(wb, query_image_locator(wb.cb, query_id), crop)
    if query is None:
        return flags
    files = case_locators(wb.cb, rest)
    for cid in rest:
        other = _thumb(wb, files[cid], crop) if cid in files else None
        if other is not None and float(np.mean(np.abs(other - query))) <= NEAR_GREY:
            flags[cid] = "near duplicate"
    return flags


def duplicate_flags(wb, record: dict) -> dict[int, str]:
    """:func:`near_duplicates` of a ``show`` record (its first member's neighbours)."""
    if not record["members"]:
        return {}
    neighbours = tuple((n["case_id"], n.get("sha256")) for n in record["members"][0]["neighbours"])
    return near_duplicates(wb, int(record["query_id"]), (record.get("sha256"), neighbours))
