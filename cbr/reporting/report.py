"""A query's full record, rebuilt from the case base, and its self-contained HTML report.

Everything here comes from the database: the report can be re-created after the files written at
query time are gone. Images are read from their recorded paths when they still exist; a stored map
is still shown when its image is gone.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
import textwrap

from PIL import Image, ImageDraw
from sqlalchemy import select

from cbr.data.boxes import pixels_to_view
from cbr.data.crop import model_view
from cbr.data.sources import describe_origin, read_source
from cbr.errors import CbrError
from cbr.files import atomic_write
from cbr.reporting.colour_bar import COLOUR_BAR_CSS, colour_bar_html
from cbr.reporting.match_pair import PAIR_CSS, pair_fields, pair_figure, split_pairs
from cbr.reporting.uncertainty import CSS as UNCERTAINTY_CSS
from cbr.reporting.uncertainty import (agreement, answer_lines, conflict_banner, conflict_text, evidence, finding_lines,
                                       finding_notes, set_text,
                                       shows_probabilities)
from cbr.reporting.method_switch import switch_fragments
from cbr.store.reliability import badge_text, reliability_of
from cbr.store.rows import case_locators, get_query, iso, map_fields, query_image_locator
from cbr.store.schema import Case, Explanation, Feedback, Model, Neighbour, Query, Vote
from explain.finding import FINDING
from explain.overlay import render_overlay, render_panel, shared_vmax

__all__ = ["load_record", "write_outputs", "render_html"]

TILE = 224


def load_record(cb, query_id: int, *, with_maps: bool = True, decode_maps: bool = True) -> dict:
    """The full record of a query: prediction, members' votes and neighbours, maps, feedback.

    ``decode_maps=False`` describes each map without its pixels (no numpy), as ``show`` prints it."""
    with cb.read() as s:
        q = get_query(s, cb, query_id)
        votes = s.scalars(select(Vote).where(Vote.query_id == q.id).order_by(Vote.id)).all()
        models = {m.id: m for m in s.scalars(select(Model).where(Model.id.in_([v.model_id for v in votes])))}
        reliability = reliability_of(s, list(models))
        rows = s.execute(
            select(Neighbour, Case).join(Case, Case.id == Neighbour.case_id)
            .where(Neighbour.query_id == q.id).order_by(Neighbour.model_id, Neighbour.rank)
        ).all()
        # The query-time maps; those added later by `cbr explain` are shown by the method switch.
        exps = s.scalars(select(Explanation).where(Explanation.query_id == q.id,
                                                   Explanation.role.in_(("query", "neighbour")))).all() if with_maps else []
        case_ids = [c.id for _, c in rows]
        case_maps = s.scalars(select(Explanation).where(Explanation.case_id.in_(case_ids), Explanation.role == "case")).all() if with_maps and case_ids else []
        feedback = s.scalars(select(Feedback).where(Feedback.query_id == q.id).order_by(Feedback.id)).all()
        # Retained cases are the query's own image (same sha256, indexed): no scan of every case.
        retained = {c.feedback_id: c.id
                    for c in s.scalars(select(Case).where(Case.sha256 == q.sha256, Case.query_id == q.id))}

    pairs, exps = split_pairs(exps)  # region-matching pairs: each neighbour's query-side map and link
    # the localiser's maps (cbr.pipeline.finding): shown as "where is the finding", never as a similarity map
    findings = {(e.model_id, e.case_id): e for e in exps if e.target == FINDING}
    exps = [e for e in exps if e.target != FINDING]
    members = []
    for v in votes:
        m = models[v.model_id]
        neigh = []
        for n, c in rows:
            if n.model_id != v.model_id:
                continue
            sim_map = next((map_fields(e, decode=decode_maps) for e in exps
                            if e.model_id == m.id and e.case_id == c.id), None)
            stored = next((map_fields(e, decode=decode_maps) for e in case_maps
                           if e.model_id == m.id and e.case_id == c.id), None)
            neigh.append({"rank": n.rank, "case_id": c.id, "label": n.label, "similarity": n.similarity,
                          "path": c.path, "sha256": c.sha256, "patient_id": c.group_id, "metadata": c.meta,
                          "removed": c.removed_at is not None, "map": sim_map, "case_map": stored,
                          "finding_map": _finding_fields(findings, m.id, c.id, decode_maps),
                          **pair_fields(pairs, m.id, c.id, decode_maps)})
        query_maps = [map_fields(e, decode=decode_maps) for e in exps if e.model_id == m.id and e.case_id is None]
        members.append({"model_id": m.id, "fingerprint": m.fingerprint, "model": m.source, "backbone": m.backbone,
                        "weights": m.weights, "target_layer": (m.config or {}).get("target_layer") or None,
                        "window": (m.config or {}).get("window", "auto"),
                        "crop": (m.config or {}).get("crop", "none"),
                        "input_size": (m.config or {}).get("input_size"),
                        "typicality": v.typicality, "map_reliability": reliability.get(m.id),
                        "vote": {"label": v.prediction, "confidence": v.confidence, "probabilities": v.probabilities,
                                 "abstained": v.abstained, "abstain_reason": v.abstain_reason},
                        "query_maps": query_maps, "neighbours": neigh,
                        "finding_map": _finding_fields(findings, m.id, None, decode_maps)})
    return {
        "query_id": q.id, "created_at": iso(q.created_at), "image": q.image_path, "sha256": q.sha256,
        "patient_id": q.patient_id, "k": q.k, "vote_rule": q.vote_rule, "ensemble": q.ensemble,
        "explain_method": q.explain_method,
        "prediction": {"label": q.prediction, "confidence": q.confidence, "probabilities": q.probabilities,
                       "abstained": q.abstained, "credibility": q.credibility,
                       "abstain_reason": q.abstain_reason, "typicality": q.typicality,
                       "out_of_distribution": q.out_of_distribution, **_uncertainty(q, members)},
        "notes": list(q.notes or []),
        "members": members, "model_fingerprints": [m["fingerprint"] for m in members],
        "feedback": [{"id": f.id, "label": f.label, "note": f.note, "by": f.by, "created_at": iso(f.created_at),
                      "retained_case_id": retained.get(f.id), "region": f.region} for f in feedback],
        "report": q.report_path,
    }


def _finding_fields(findings: dict, model_id: int, case_id, decode: bool):
    row = findings.get((model_id, case_id))
    return None if row is None else map_fields(row, decode=decode)


def _uncertainty(q, members) -> dict:
    """The prediction set, conflict and calibration stored with the query, and the evidence of its
    first member's neighbours and of its members' votes (an older query has no set: None)."""
    u = q.uncertainty or {}
    pset = u.get("set")
    neighbours = members[0]["neighbours"] if members else []
    answer = None if q.abstained else q.prediction
    out = {"set": pset, "set_text": None if pset is None else set_text(pset), "coverage": u.get("coverage"),
           "conflict": list(u.get("conflict") or []), "calibration": u.get("calibration") or {},
           "finding": u.get("finding") or {}, "nearest_unlike": u.get("nearest_unlike"), "region": u.get("region"),
           "evidence": evidence(answer, [(n["label"], n["similarity"]) for n in neighbours],
                                members=[None if m["vote"]["abstained"] else m["vote"]["label"] for m in members])}
    out["conflict_text"] = conflict_text(out["conflict"], answer)
    out["lines"] = answer_lines(out)  # what the confidence rests on, as the terminal prints it
    out["finding_lines"] = finding_lines(out["finding"], out["nearest_unlike"])  # where the finding is, the contrast
    return out


def strip_maps(record: dict) -> dict:
    """The record as JSON: maps reduced to their method, target, shape and scale."""
    def clean(m):
        return None if m is None else {k: v for k, v in m.items() if k != "map"}

    out = dict(record)
    out["members"] = []
    for mem in record["members"]:
        mem = dict(mem)
        mem["query_maps"] = [clean(m) for m in mem["query_maps"]]
        mem["neighbours"] = [dict(n, map=clean(n["map"]), case_map=clean(n["case_map"]), pair_map=clean(n.get("pair_map")))
                             for n in mem["neighbours"]]
        out["members"].append(mem)
    return out


def _load_image(path: str, window: str = "auto"):
    """The decoded image at ``path`` (each member views it through its own crop), None if unreadable."""
    try:
        return read_source(path, window=window)[0]  # the frame/slice the locator names, as the model saw it
    except CbrError:
        return None


IMAGE_CHANGED = "image changed or missing since indexing"


def _load_case_image(n: dict, window: str, locator: str | None = None):
    """A neighbour's decoded image, read from ``locator`` (its file; ``n["path"]`` when None); None
    when its file is gone or holds other pixels than the ones indexed (its sha256 differs), so that
    nothing is drawn from them."""
    try:
        img, sha, _ = read_source(locator or n["path"], window=window)
    except CbrError:
        return None
    if n.get("sha256") and sha != n["sha256"]:
        return None
    return img


def _placeholder(text: str):
    img = Image.new("RGB", (TILE, TILE), (60, 60, 60))
    ImageDraw.Draw(img).multiline_text((8, TILE // 2 - 12), "\n".join(textwrap.wrap(text, 32)), fill=(230, 230, 230))
    return img


def _jpeg(img) -> bytes:
    # Overlays are for viewing: JPEG encodes ~15x faster than PNG and is ~10x smaller inlined.
    # The raw maps themselves are kept losslessly in the case base.
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _query_map(mem):
    maps = mem["query_maps"]
    sim = [m for m in maps if m["target"].startswith("similarity")]
    return (sim or maps or [None])[0]


def _query_tiles(mem, qimg, qmap, vmax, blobs: dict) -> list:
    """The query's tiles (its similarity map, finding map, class maps), their JPEGs put in ``blobs``."""
    over = render_overlay(qimg, qmap["map"], vmax=vmax) if qmap else qimg
    blobs[("query", mem["model_id"])] = _jpeg(over)
    tiles = [(over, "query")]
    if mem.get("finding_map"):  # where is the finding: the localiser's probabilities, on their own 0-1 scale
        over = render_overlay(qimg, mem["finding_map"]["map"], vmax=1.0)
        blobs[("finding", mem["model_id"])] = _jpeg(over)
        tiles.append((over, "query: finding"))
    for cmap in (m for m in mem["query_maps"] if m["target"].startswith("class:")):
        # Its own scale: a class logit's gradient is not comparable with cosine maps.
        over = render_overlay(qimg, cmap["map"])
        blobs[("class", mem["model_id"])] = _jpeg(over)
        tiles.append((over, f"query: {cmap['target']}"))
    return tiles


def write_outputs(cb, query_id: int, out_dir, *, images: dict | None = None, scale: str = "shared",
                  report_name: str = "report.html") -> dict:
    """Write a query's overlays, panel and ``report.html`` into ``out_dir``; return their paths.

    ``images`` maps None (the query) and case ids to decoded images already in memory;
    anything missing is read from its recorded path. Each member's maps are drawn on its own view
    of them (``model_view``: its crop, then letterbox), the geometry its maps were computed in.
    """
    record = load_record(cb, query_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = dict(images or {})
    if None not in images:
        images[None] = _load_image(query_image_locator(cb, query_id))  # its file, when shown neutrally
    paths, blobs, viewed = {}, {}, {}
    unusable = set()  # case ids whose file is gone or changed since indexing
    # the files to read (a pseudonymised DICOM case is shown under a neutral locator, never its file)
    files = case_locators(cb, [n["case_id"] for mem in record["members"] for n in mem["neighbours"]])
    for mem in record["members"]:
        views = viewed.setdefault(mem["model_id"], {})

        def view(key, crop=mem.get("crop", "none"), views=views):
            if key not in views and images.get(key) is not None:
                views[key] = model_view(images[key], TILE, crop)
            return views.get(key)

        qmap = _query_map(mem)
        nmaps = [(n, n["map"] or n["case_map"]) for n in mem["neighbours"]]
        pair_maps = [n.get("pair_map") for n in mem["neighbours"]]
        all_maps = [m["map"] for m in [qmap] + [m for _, m in nmaps] + pair_maps if m is not None]
        vmax = shared_vmax(all_maps) if scale == "shared" and all_maps else None
        qimg = view(None) or _placeholder("query image unavailable")
        blobs[("plain", mem["model_id"])] = _jpeg(qimg)  # the image as it is, beside its overlays
        tiles = _query_tiles(mem, qimg, qmap, vmax, blobs)
        for n, m in nmaps:
            if n["case_id"] not in images and n["case_id"] not in unusable:
                img = _load_case_image(n, mem.get("window", "auto"), files.get(n["case_id"]))
                if img is None:
                    unusable.add(n["case_id"])
                else:
                    images[n["case_id"]] = img
            n["image_status"] = IMAGE_CHANGED if n["case_id"] in unusable else "ok"
            img = view(n["case_id"])
            if img is None:  # never drawn from other pixels: a map belongs to the indexed ones
                img, m = _placeholder(IMAGE_CHANGED), None
            over = render_overlay(img, m["map"], vmax=vmax) if m else img
            blobs[("neighbour", mem["model_id"], n["case_id"])] = _jpeg(over)
            blobs[("nplain", mem["model_id"], n["case_id"])] = _jpeg(img)
            if n.get("finding_map") and m is not None:  # where its finding is, by the same localiser
                blobs[("nfinding", mem["model_id"], n["case_id"])] = _jpeg(
                    render_overlay(img, n["finding_map"]["map"], vmax=1.0))
            if n.get("pair_map") and m is not None:  # the query side of the linked pair
                blobs[("pair", mem["model_id"], n["case_id"])] = _jpeg(render_overlay(qimg, n["pair_map"]["map"], vmax=vmax))
            tiles.append((over, f"#{n['rank']} {n['label']} {n['similarity']:.3f}"))
        blobs[("panel", mem["model_id"])] = _jpeg(render_panel(tiles, tile_size=TILE))
        _outline_region(record["prediction"].get("region"), mem, images, blobs)
    first = record["members"][0]["model_id"] if record["members"] else None
    for key, data in blobs.items():
        suffix = "" if key[1] == first else f"-m{key[1]}"
        name = {"query": f"query{suffix}.jpg", "panel": f"panel{suffix}.jpg", "class": f"query-class{suffix}.jpg",
                "plain": f"query-plain{suffix}.jpg",
                "finding": f"query-finding{suffix}.jpg"}.get(key[0]) or f"{key[0]}-c{key[2]}{suffix}.jpg"
        path = out / name
        atomic_write(path, data, durable=False)
        paths[key] = str(path)
        if key[1] == first and key[0] in ("query", "panel", "class"):
            paths[key[0]] = str(path)
    report = out / report_name

    viewed = {mid: {None: views.get(None) or _placeholder("query image unavailable"), **views}
              for mid, views in viewed.items()}
    switch = switch_fragments(cb, record, viewed, scale=scale)
    atomic_write(report, render_html(record, blobs, scale=scale, switch=switch).encode(), durable=False)
    paths["report"] = str(report)
    with cb.write() as s:
        s.get(Query, int(query_id)).report_path = str(report.resolve())
    return paths


def _outlined(img, box, crop: str) -> bytes:
    """The plain tile of ``img`` (its model view) with ``box`` (its pixels) outlined."""
    tile = model_view(img, TILE, crop)
    ImageDraw.Draw(tile).rectangle(pixels_to_view(box, img, TILE, crop), outline=(0, 255, 255), width=2)
    return _jpeg(tile)


def _outline_region(region, mem: dict, images: dict, blobs: dict) -> None:
    """A region query (search by finding): its box outlined on the query's plain tile, and each
    neighbour's own finding box on that neighbour's."""
    if not region:
        return
    mid, crop = mem["model_id"], mem.get("crop", "none")
    if images.get(None) is not None:
        blobs[("plain", mid)] = _outlined(images[None], region["box"], crop)
    for n in mem["neighbours"]:
        box = (region.get("findings") or {}).get(str(mid), {}).get(str(n["case_id"]))
        if box and images.get(n["case_id"]) is not None and n.get("image_status") == "ok":
            blobs[("nplain", mid, n["case_id"])] = _outlined(images[n["case_id"]], box, crop)


def _img_tag(data: bytes | None, alt: str) -> str:
    if not data:
        return f'<div class="missing">{html.escape(alt)}: no image</div>'
    return f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">'


def _probs_table(probs: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v:.3f}</td>"
        f'<td><div class="bar" style="width:{max(0.0, min(1.0, v)) * 200:.0f}px"></div></td></tr>'
        for k, v in sorted(probs.items(), key=lambda kv: -kv[1])
    )
    return f"<table class='probs'><tr><th>class</th><th>probability</th><th></th></tr>{rows}</table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:28px}table{border-collapse:collapse}
td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top;font-size:.92em}
.bar{height:10px;background:#3a7bd5}.pred{font-size:1.3em;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:14px}.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:240px}
.card img{width:224px;height:224px}.meta{font-size:.8em;color:#555;word-break:break-all}
.missing{width:224px;height:224px;background:#444;color:#eee;display:flex;align-items:center;justify-content:center}
.warn{color:#a40}.small{font-size:.85em;color:#555}
.badge{display:inline-block;font-size:.85em;background:#eef;border:1px solid #99c;border-radius:4px;padding:2px 8px}
.ood{background:#b00020;color:#fff;font-weight:600;font-size:1.1em;padding:12px 16px;border-radius:6px;margin:12px 0}
"""


def _typicality(p: dict) -> str:
    return "" if p.get("typicality") is None else f" &nbsp; typicality {p['typicality']:.3g}"


def _ood_banner(p: dict) -> str:
    """The banner of an out-of-distribution query: it comes before anything else is read."""
    if not p.get("out_of_distribution"):
        return ""
    what = ("no diagnosis is given" if p["abstained"] else
            "the vote below was asked for with --answer-anyway and must not be trusted")
    return (f"<div class='ood'>This image is unlike every case in this case base (typicality {p['typicality']:.3g}); "
            f"{what}. The nearest cases are shown for the audit.</div>")


def _map_origin(record: dict) -> str:
    """Where the maps come from: each member's real CAM layer and the query's method."""
    method = html.escape(str(record.get("explain_method") or "none"))
    layers = "; ".join(
        f"{html.escape(m['model'])}: layer <code>{html.escape(m['target_layer'])}</code>" if m.get("target_layer")
        else f"{html.escape(m['model'])}: the last convolutional block" for m in record["members"])
    return f"query maps by <b>{method}</b>, CAMs at {layers or 'no layer'}; attributions from the input pixels"


def _region_line(region) -> str:
    """What a region query searched (search by finding), and how its boxes are drawn."""
    if not region:
        return ""
    box = ", ".join(str(int(v)) for v in region["box"])
    return (f"<p class='evidence'>Search by finding: the region [{box}] ({html.escape(str(region['source']))}), "
            "outlined in cyan on the query; each neighbour is a case whose own finding, outlined on it, "
            "is nearest.</p>")


def _region_cell(region) -> str:
    return ",".join(str(int(v)) for v in region) if region else ""


def _scale_text(scale: str) -> str:
    if scale == "shared":
        return "one scale for the query and its neighbours: red is the largest value among their maps"
    return "own scale: red is this map's largest value"


def _neighbour_card(n: dict, mid: int, blobs: dict, predicted: str | None, scale: str) -> str:
    """One neighbour: its plain image beside its overlay (or its linked pair), a colour bar, its facts."""
    e = html.escape
    m = n["map"] or n["case_map"]
    meta = ", ".join(f"{e(str(k))}={e(str(val))}" for k, val in (n["metadata"] or {}).items())
    origin = describe_origin(n["metadata"])  # "CT series ..., frame 12 of 30", "volume ..., slice 40 of 155"
    plain = _img_tag(blobs.get(("nplain", mid, n["case_id"])), f"case {n['case_id']}, plain")
    pair = pair_figure(n, blobs.get(("pair", mid, n["case_id"])), blobs.get(("neighbour", mid, n["case_id"])))
    if pair:  # the pair's two overlays, then the two plain images under them
        head = ("<div class='card pair'>" + pair + "<div class='plainrow'>"
                + _img_tag(blobs.get(("plain", mid)), "query, plain") + plain + "</div><div class='meta'>plain images</div>")
    else:
        head = ("<div class='card duo'><div class='imgs'>" + plain
                + _img_tag(blobs.get(("neighbour", mid, n["case_id"])), f"case {n['case_id']}") + "</div>")
    # a case's stored map (no similarity map recorded) has its own scale
    bar = colour_bar_html(_scale_text(scale if n["map"] else "per-image")) if m else ""
    return (head + bar
            + f"<div><b class='{agreement(n['label'], predicted)}'>#{n['rank']} "
              f"{e(n['label'])}</b> similarity {n['similarity']:.3f}</div>"
            + (f"<div class='warn'>{e(n['image_status'])}</div>" if n.get("image_status") not in (None, "ok") else "")
            + f"<div class='meta'>case {n['case_id']}{' (removed since)' if n['removed'] else ''}"
            + f"{' &middot; patient ' + e(str(n['patient_id'])) if n['patient_id'] else ''}<br>{e(n['path'])}"
            + (f"<br><b>{e(origin)}</b>" if origin else "")
            + (f"<br>{meta}" if meta else "")
            + (f"<br>map: {e(m['target'])}, raw max {m['scale']:.4g}" if m else "<br>no map")
            + (f"<br>finding:<br>{_img_tag(blobs[('nfinding', mid, n['case_id'])], 'finding of case ' + str(n['case_id']))}"
               if blobs.get(("nfinding", mid, n["case_id"])) else "")
            + "</div></div>")


def render_html(record: dict, blobs: dict, *, scale: str = "shared", switch: dict | None = None) -> str:
    """The report as one HTML string: images inlined, no scripts, no network.

    ``switch``: {model_id: HTML} of the members' method switches (cbr.reporting.method_switch)."""
    e = html.escape
    p = record["prediction"]
    label = "abstained" if p["abstained"] else e(str(p["label"]))
    cred = "" if p["credibility"] is None else f" &nbsp; credibility {p['credibility']:.3f}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cbr query {record['query_id']}</title><style>{CSS}{PAIR_CSS}{UNCERTAINTY_CSS}{COLOUR_BAR_CSS}</style></head><body>",
        f"<h1>cbr query {record['query_id']}</h1>",
        f"<p class='small'>{e(record['created_at'] or '')} &middot; image {e(record['image'])}"
        f"{' &middot; patient ' + e(str(record['patient_id'])) if record['patient_id'] else ''}</p>",
        conflict_banner(p.get("conflict"), p["label"]), _ood_banner(p),
        f"<p class='pred'>Diagnosis: {label} &nbsp; confidence {p['confidence']:.3f}{cred}{_typicality(p)}</p>",
        "".join(f"<p class='evidence'>{e(line)}</p>" for line in answer_lines(p)),
        "".join(f"<p class='evidence'>{e(line)}</p>" for line in p.get("finding_lines") or []),
        # the on-finding warning, or that no localiser marks the finding (stored with the finding, not the notes)
        "".join(f"<p class='warn'>{e(line)}</p>" for line in finding_notes(p.get("finding"))),
        _region_line(p.get("region")),
        "".join(f"<p class='warn'>Note: {e(n)}</p>" for n in record.get("notes", [])
                if not n.startswith("out of distribution:")),
        _probs_table(p["probabilities"]) if shows_probabilities(p) else "",
        f"<p class='small'>vote rule <b>{e(record['vote_rule'])}</b>, k = {record['k']}, ensemble "
        f"<b>{e(record['ensemble'])}</b>, explanations <b>{e(record['explain_method'])}</b> "
        f"({'shared' if scale == 'shared' else 'per-image'} colour scale)</p>",
    ]
    for mem in record["members"]:
        mid = mem["model_id"]
        v = mem["vote"]
        parts.append(f"<h2>Member: {e(mem['model'])}</h2><p class='small'>backbone {e(mem['backbone'])}, weights "
                     f"{e(mem['weights'])}, fingerprint <code>{e(mem['fingerprint'])}</code>; vote "
                     f"{e(str(v['label']))} ({v['confidence']:.3f})</p>"
                     f"<p class='badge'>{e(badge_text(mem.get('map_reliability')))}</p>")
        qmap = _query_map(mem)
        parts.append("<div class='grid'><div class='card duo'><div class='imgs'>"
                     + _img_tag(blobs.get(("plain", mid)), "query, plain") + _img_tag(blobs.get(("query", mid)), "query")
                     + f"</div><div><b>query</b>: plain, and with its map</div><div class='meta'>map: "
                     + (f"{e(qmap['target'])}, raw max {qmap['scale']:.4g}" if qmap else "none") + "</div>"
                     + (colour_bar_html(_scale_text(scale)) if qmap else "") + "</div>")
        if blobs.get(("finding", mid)):
            parts.append("<div class='card'>" + _img_tag(blobs.get(("finding", mid)), "query finding map")
                         + "<div><b>query</b>: where is the finding</div><div class='meta'>lesion localiser "
                         "(probability 0-1)</div></div>")
        for cmap in (m for m in mem["query_maps"] if m["target"].startswith("class:")):
            parts.append("<div class='card'>" + _img_tag(blobs.get(("class", mid)), "query class map")
                         + f"<div><b>query</b>: why {e(cmap['target'][6:])}</div><div class='meta'>map: "
                         f"{e(cmap['target'])} (own scale), raw max {cmap['scale']:.4g}</div>"
                         + colour_bar_html("own scale: red is this map's largest value") + "</div>")
        for n in mem["neighbours"]:
            parts.append(_neighbour_card(n, mid, blobs, None if p["abstained"] else p["label"], scale))
        parts.append("</div>")
        parts.append((switch or {}).get(mid, ""))
    if record["feedback"]:
        rows = "".join(f"<tr><td>{e(f['created_at'] or '')}</td><td>{e(f['label'])}</td><td>{e(f['by'] or '')}</td>"
                       f"<td style='white-space:pre-wrap'>{e(f['note'] or '')}</td><td>{_region_cell(f.get('region'))}</td>"
                       f"<td>{f['retained_case_id'] or ''}</td></tr>" for f in record["feedback"])
        parts.append(f"<h2>Expert feedback</h2><table><tr><th>time</th><th>label</th><th>by</th><th>note</th>"
                     f"<th>lesion box (x0,y0,x1,y1 px)</th><th>retained as case</th></tr>{rows}</table>")
    parts.append("<p class='small'>Generated by cbr from the case base; each map's method and parameters are "
                 f"recorded with it ({_map_origin(record)}); raw maps are upsampled for display.</p></body></html>")
    return "".join(parts)
