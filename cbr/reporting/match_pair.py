"""The report's linked pair: a region of the query and the region of a neighbour it resembles.

With region-matching similarity maps (cbr.models.similarity_maps) each neighbour has two maps, the
query-side one and the neighbour-side one, and a link between them. The report shows both
overlays side by side. A ring marks the query's strongest region on the first and its best match
on the second, with the sentence "this region of the query resembles that region of case N".
The rings are HTML over the images, placed at the link's pixel centres, so they stay sharp and
need no script. Old case bases, whose maps have no link, show the single neighbour map as before.
"""

from __future__ import annotations

import base64
import html

from cbr.models.similarity_maps import DISPLAY_SIZE, MatchLink
from cbr.store.rows import map_fields

__all__ = ["PAIR_CSS", "split_pairs", "pair_fields", "pair_sentence", "pair_figure"]

PAIR_CSS = """
.card.pair{width:476px}.pairimgs{display:flex;gap:8px}.mk{position:relative;width:224px;height:224px}
.marker{position:absolute;width:22px;height:22px;margin:-14px 0 0 -14px;border:3px solid #fff;border-radius:50%;
box-shadow:0 0 0 2px #000,inset 0 0 0 2px #000;pointer-events:none}
.marker span{position:absolute;left:24px;top:-4px;color:#fff;font-weight:700;text-shadow:0 0 3px #000}
.link{font-size:.9em;margin:4px 0}
"""


def split_pairs(rows) -> tuple[dict, list]:
    """({(model_id, case_id): (MatchLink, row)} of the pairs' query-side maps, the other rows)."""
    pairs, rest = {}, []
    for e in rows:
        link = MatchLink.parse(e.target) if e.case_id is None else None
        if link is None:
            rest.append(e)
        else:
            pairs[(e.model_id, link.case_id)] = (link, e)
    return pairs, rest


def pair_fields(pairs: dict, model_id: int, case_id: int, decode: bool = True) -> dict:
    """A neighbour's "match" (the link as ``--json`` gives it, or None) and "pair_map" (the
    query-side map's fields, or None)."""
    link, row = pairs.get((model_id, case_id), (None, None))
    return {"match": None if link is None else link.to_dict(DISPLAY_SIZE),
            "pair_map": None if row is None else map_fields(row, decode=decode)}


def pair_sentence(case_id) -> str:
    """The pair's caption (plain text: escape it where it goes into HTML)."""
    return f"this region of the query resembles that region of case {case_id}"


def _image(data: bytes, alt: str, xy, mark: str, title: str) -> str:
    e = html.escape
    src = base64.b64encode(data).decode()
    return (f"<div class='mk'><img alt=\"{e(alt)}\" src=\"data:image/jpeg;base64,{src}\">"
            f"<div class='marker' style='left:{float(xy[0]):.1f}px;top:{float(xy[1]):.1f}px' title=\"{e(title)}\">"
            f"<span>{e(mark)}</span></div></div>")


def pair_figure(n: dict, query_blob: bytes | None, case_blob: bytes | None) -> str:
    """The linked pair of neighbour ``n`` (a ``load_record`` neighbour with "match"), or "" when it
    has no link or either overlay is missing (the caller then shows its single map)."""
    link = n.get("match")
    if not link or not query_blob or not case_blob:
        return ""
    case = n["case_id"]
    sentence = pair_sentence(case)
    return ("<div class='pairimgs'>"
            + _image(query_blob, f"query, region matching case {case}", link["query_xy"], "A", "this region of the query")
            + _image(case_blob, f"case {case}", link["case_xy"], "A", f"that region of case {case}")
            + f"</div><div class='link'>{html.escape(sentence)} "
            f"<span class='small'>(cosine {float(link['cosine']):.3f})</span></div>")
