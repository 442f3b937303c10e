"""The report's method switch: every explanation method stored for a query, one at a time.

A query has the maps of its query-time method and any added later by ``cbr explain``. When there is
more than one method, each member's report section gets a row of radio buttons, one per method,
and the strip of overlays (query, query class map, neighbours) of the checked one. It is CSS only
(``:checked ~``), so the report stays a single file without scripts.
"""

from __future__ import annotations

import base64
import html
import io

from sqlalchemy import select

from cbr.models.similarity_maps import PAIR_PREFIX
from cbr.store.rows import map_fields
from cbr.store.schema import Explanation
from explain.overlay import render_overlay, shared_vmax

__all__ = ["stored_methods", "switch_fragments"]

TILE = 160  # overlays in the switch are smaller than the main grid's


def stored_methods(cb, query_id: int) -> dict:
    """{model_id: [{"method", "added", "query": {target: map}, "neighbours": {case_id: map}}]}.

    Methods come in the order they were stored (the query-time method first); a method added
    twice shows its latest maps.
    """
    with cb.read() as s:
        rows = s.scalars(select(Explanation).where(Explanation.query_id == int(query_id)).order_by(Explanation.id)).all()
        out: dict = {}
        for e in rows:
            methods = out.setdefault(e.model_id, {})
            entry = methods.setdefault(e.method, {"method": e.method, "added": e.role.endswith("-added"),
                                                  "query": {}, "neighbours": {}})
            if e.case_id is None:
                entry["query"][e.target] = map_fields(e)
            else:
                entry["neighbours"][e.case_id] = map_fields(e)
    return {mid: list(methods.values()) for mid, methods in out.items()}


def _jpeg_tag(img, alt: str) -> str:
    buf = io.BytesIO()
    img.convert("RGB").resize((TILE, TILE)).save(buf, format="JPEG", quality=85)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{data}">'


def _panel(entry, member, images, scale) -> str:
    e = html.escape
    sims = [m for t, m in entry["query"].items() if t.startswith("similarity")] + list(entry["neighbours"].values())
    vmax = shared_vmax([m["map"] for m in sims]) if scale == "shared" and sims else None
    cards = []
    for target, m in entry["query"].items():
        if target.startswith(PAIR_PREFIX):  # a neighbour's region-matching pair: the main grid shows it linked
            continue
        own = None if target.startswith("similarity") else "own"
        over = render_overlay(images[None], m["map"], vmax=None if own else vmax)
        cards.append((over, "query", f"{target}{' (own scale)' if own else ''}, raw max {m['scale']:.3g}"))
    for n in member["neighbours"]:
        m = entry["neighbours"].get(n["case_id"])
        img = images.get(n["case_id"])
        if m is None or img is None:
            continue
        cards.append((render_overlay(img, m["map"], vmax=vmax), f"#{n['rank']} {n['label']}",
                      f"{m['target']}, raw max {m['scale']:.3g}"))
    return "".join(f"<div class='mcard'>{_jpeg_tag(img, title)}<div><b>{e(title)}</b></div>"
                   f"<div class='meta'>{e(caption)}</div></div>" for img, title, caption in cards)


def switch_fragments(cb, record: dict, images: dict, *, scale: str = "shared") -> dict:
    """{model_id: HTML of its method switch}, for members with more than one stored method.

    Args:
        cb: the open CaseBase.
        record: the query's record (cbr.reporting.report.load_record).
        images: {model_id: {None (the query) and case ids -> PIL images in that member's view}}.
        scale: "shared" (one colour scale per method) or "per-image".
    """
    methods = stored_methods(cb, record["query_id"])
    out = {}
    for member in record["members"]:
        mid = member["model_id"]
        entries = methods.get(mid, [])
        if len(entries) < 2:
            continue
        name = f"methods-m{mid}"
        radios, panels, rules = [], [], []
        for i, entry in enumerate(entries, start=1):
            rid = f"{name}-{i}"
            tag = " (added later)" if entry["added"] else " (at query time)"
            radios.append(f"<input type='radio' name='{name}' id='{rid}'{' checked' if i == 1 else ''}>"
                          f"<label for='{rid}'>{html.escape(entry['method'])}{tag}</label>")
            panels.append(f"<div class='mpanel'>{_panel(entry, member, images.get(mid, {}), scale)}</div>")
            rules.append(f"#{name} input:nth-of-type({i}):checked ~ div.mpanel:nth-of-type({i}){{display:flex}}")
        style = ("<style>.mswitch .mpanel{display:none;flex-wrap:wrap;gap:10px;margin-top:8px}"
                 ".mswitch label{margin-right:14px;font-size:.9em}.mcard{width:170px}.mcard img{width:160px;height:160px}"
                 + "".join(rules) + "</style>")
        out[mid] = (f"{style}<h3>Explanation methods</h3><div class='mswitch' id='{name}'>"
                    + "".join(radios) + "".join(panels) + "</div>")
    return out
