"""Refine by region on held-out images, through the serve API (issue 25): how many of the answers
are not "out of distribution", and the same-class precision@k, beside the same images asked whole.

``split`` holds out whole patients (seeded) until N images; the rest train the model and are
indexed with their findings. ``refine`` asks each held-out image whole (``POST /api/queries``),
then refines it with a box around its lesion, the bounding box of its mask, as fractions of the
letterboxed square the page draws (``POST /api/queries/{id}/refine/region``, the page form's path).

    python benchmarks/bench_region_refine.py split ../shared/data/busbra/manifest.csv --n 40 --seed 25 --out DIR
    cbr train DIR/index.csv --images ../shared/data/busbra --group-column patient_id --img-size 112 \\
        --epochs 3 --train-layers 6 --out DIR/model.pt
    cbr index DIR/index.csv --images ../shared/data/busbra --group-column patient_id --model DIR/model.pt \\
        --db DIR/cases.db
    python benchmarks/bench_region_refine.py refine DIR/cases.db DIR/heldout.csv --images ../shared/data/busbra \\
        --out DIR/region.json
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from cbr.serve.app import create_app
from cbr.serve.settings import ServeSettings
from cbr.store.casebase import open_casebase


def split(manifest: str, n: int, seed: int, out: Path, group: str = "patient_id") -> None:
    """Write out/heldout.csv (whole groups, about n images) and out/index.csv (the rest)."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups = sorted({r[group] for r in rows})
    random.Random(seed).shuffle(groups)
    held = []
    for g in groups:
        members = [r for r in rows if r[group] == g]
        if len(held) + len(members) <= n:
            held += members
        if len(held) == n:
            break
    kept = {r[group] for r in held}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("index.csv", [r for r in rows if r[group] not in kept]), ("heldout.csv", held)):
        with open(out / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
    print(f"held out {len(held)} images of {len(kept)} groups; {len(rows) - len(held)} to index")


def lesion_box(mask_path: Path) -> tuple[list[float], list[int]]:
    """The mask's bounding box as fractions of the letterboxed square, and in the image's pixels."""
    m = np.asarray(Image.open(mask_path).convert("L")) > 0
    ys, xs = np.nonzero(m)
    h, w = m.shape
    side = max(w, h)
    ox, oy = (side - w) / 2, (side - h) / 2  # the letterbox padding, as the page draws the square
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    fractions = [round((x0 + ox) / side, 4), round((y0 + oy) / side, 4), round((x1 + ox) / side, 4),
                 round((y1 + oy) / side, 4)]
    return fractions, [x0, y0, x1, y1]


def _summary(answer: dict, label: str) -> dict:
    labels = [n["label"] for n in answer["neighbours"]]
    p = answer["prediction"]
    return {"prediction": p["label"], "ood": bool(p.get("out_of_distribution")), "typicality": p.get("typicality"),
            "neighbours": labels, "p_at_k": sum(x == label for x in labels) / len(labels)}


def refine(db: str, heldout: str, images: str, out: str) -> dict:
    """Ask each held-out image whole, refine it by its lesion's box; write and return the figures."""
    with open(heldout, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cb = open_casebase(db, create=False)
    results = []
    with tempfile.TemporaryDirectory() as data_dir:
        client = TestClient(create_app(cb, ServeSettings(data_dir=data_dir)), base_url="http://127.0.0.1:8765")
        for r in rows:
            image = Path(images) / r["path"]
            box, pixels = lesion_box(Path(images) / r["mask"])
            t0 = time.perf_counter()
            with open(image, "rb") as fh:
                whole = client.post("/api/queries", files={"image": (image.name, fh, "image/png")})
            whole.raise_for_status()
            child = client.post(f"/api/queries/{whole.json()['query_id']}/refine/region", json={"box": box})
            child.raise_for_status()
            results.append({"path": r["path"], "label": r["label"], "box": box, "mask_box_pixels": pixels,
                            "recorded_region": child.json().get("region"), "whole": _summary(whole.json(), r["label"]),
                            "region": _summary(child.json(), r["label"]),
                            "seconds": round(time.perf_counter() - t0, 2)})
    cb.close()
    n = len(results)
    figures = {"n": n, "k": len(results[0]["region"]["neighbours"]) if n else None}
    for way in ("region", "whole"):
        figures[f"{way}_not_ood"] = sum(not x[way]["ood"] for x in results)
        figures[f"{way}_p_at_k"] = sum(x[way]["p_at_k"] for x in results) / max(n, 1)
        figures[f"{way}_accuracy"] = sum(x[way]["prediction"] == x["label"] for x in results) / max(n, 1)
    figures["box_recorded_exactly"] = sum((x["recorded_region"] or {}).get("box") == x["mask_box_pixels"]
                                          for x in results)
    Path(out).write_text(json.dumps({"summary": figures, "results": results}, indent=1))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("split", help="hold out whole patients")
    s.add_argument("manifest")
    s.add_argument("--n", type=int, default=40)
    s.add_argument("--seed", type=int, default=25)
    s.add_argument("--group-column", default="patient_id")
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("refine", help="refine each held-out image by its lesion's box")
    r.add_argument("db")
    r.add_argument("heldout")
    r.add_argument("--images", required=True, help="root folder of the manifest's paths and masks")
    r.add_argument("--out", default="region.json")
    args = ap.parse_args()
    if args.what == "split":
        split(args.manifest, args.n, args.seed, args.out, args.group_column)
    else:
        print(json.dumps(refine(args.db, args.heldout, args.images, args.out), indent=1))


if __name__ == "__main__":
    main()
