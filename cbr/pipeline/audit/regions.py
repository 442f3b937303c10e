"""Expert boxes drawn during review: checked when feedback carries one, exported as lesion masks.

A region is a box ``[x0, y0, x1, y1]`` on the query image, in its decoded pixels (x1 and y1
exclusive, like a slice). ``cbr feedback --region`` stores it with the verdict (checked by
:func:`cbr.pipeline.audit.feedback.parse_region`);
``export_regions`` writes each reviewed query's box as a mask image beside a manifest with a
``mask`` column, which ``cbr train --mask-guidance`` reads like any other lesion mask.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

import numpy as np

from sqlalchemy import func, select

from cbr.data.sources import read_source, Source
from cbr.errors import CbrError, ImageError
from cbr.files import atomic_open
from cbr.pipeline.audit.trail import latest_feedback, query_window
from cbr.store.schema import Feedback, Query

__all__ = ["export_regions", "region_rows", "REGION_COLUMNS"]

REGION_COLUMNS = ("path", "label", "patient", "mask", "query_id", "feedback_id")


def _boxes(s):
    """(query, label of its latest verdict, latest feedback row with a region) per reviewed query."""
    latest = latest_feedback()
    boxed = (select(Feedback.query_id, func.max(Feedback.id).label("bid")).where(Feedback.region.is_not(None))
             .group_by(Feedback.query_id).subquery("boxed"))
    verdict = Feedback.__table__.alias("verdict")
    stmt = (select(Query, verdict.c.label, Feedback)
            .join(boxed, boxed.c.query_id == Query.id).join(Feedback, Feedback.id == boxed.c.bid)
            .join(latest, latest.c.query_id == Query.id).join(verdict, verdict.c.id == latest.c.fid)
            .order_by(Query.id))
    yield from s.execute(stmt)


def region_rows(s):
    """The boxes as export rows (``cbr export --what regions``): one per reviewed query with a box."""
    for q, label, fb in _boxes(s):
        yield {"query_id": q.id, "feedback_id": fb.id, "image": q.image_path, "label": label,
               "patient_id": q.patient_id, "region": list(fb.region)}


def export_regions(cb, out_dir) -> dict:
    """Write every reviewed query's latest expert box as a mask, and a training manifest.

    Each query counts once: its latest box, with the label of its latest verdict. The mask has
    the decoded query image's size (the box is clipped to it). A query image that cannot be read
    or whose sha256 changed since the query is listed in ``problems`` and left out.

    Args:
        cb: an open CaseBase.
        out_dir: a folder (created); gets ``masks/feedback-<id>.png``, ``images/`` for images
            that only exist as a frame or slice of a file, and ``regions.csv`` (``REGION_COLUMNS``).

    Returns:
        {"manifest", "rows", "problems": [{"query_id", "reason"}]}

    Example:
        >>> export_regions(open_casebase("cases.db"), "boxes")   # then: cbr train boxes/regions.csv --mask-guidance 1
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CbrError(f"--out {out}: is a file; give a folder for the masks and regions.csv")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    with cb.read() as s:
        # read from its file; a query shown under a neutral locator (pseudonymised) gets a PNG copy,
        # so that its file name does not reach the exported manifest
        boxes = [(q.id, q.readable_image, q.sha256, q.patient_id, label, fb.id, list(fb.region),
                  q.image_file is not None) for q, label, fb in _boxes(s)]
    rows, problems = [], []
    for qid, path, sha, patient, label, fid, (x0, y0, x1, y1), neutral in boxes:
        try:
            img, got, src = read_source(Source.parse(path).resolved(), window=query_window(cb, qid))
        except ImageError as e:
            problems.append({"query_id": qid, "reason": f"{e.path}: {e.reason}"})
            continue
        except CbrError as e:  # a recorded locator that no longer parses
            problems.append({"query_id": qid, "reason": str(e)})
            continue
        if got != sha:
            problems.append({"query_id": qid, "reason": f"{path}: the image changed since query {qid} (sha256)"})
            continue
        w, h = img.size
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[min(y0, h):min(y1, h), min(x0, w):min(x1, w)] = 255
        if not mask.any():
            problems.append({"query_id": qid, "reason": f"box {[x0, y0, x1, y1]} lies outside the {w}x{h} image"})
            continue
        mask_path = out / "masks" / f"feedback-{fid}.png"
        with atomic_open(mask_path, "wb") as fh:
            Image.fromarray(mask).save(fh, format="PNG")
        image_path = src.path
        if src.locator != src.path or neutral:  # a frame or slice: the manifest needs an image file of its own
            (out / "images").mkdir(exist_ok=True)
            image_path = out / "images" / f"query-{qid}.png"
            with atomic_open(image_path, "wb") as fh:
                img.save(fh, format="PNG")
        rows.append({"path": str(Path(image_path).resolve()), "label": label, "patient": patient or "",
                     "mask": str(mask_path.resolve()), "query_id": qid, "feedback_id": fid})
    manifest = out / "regions.csv"
    with atomic_open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=REGION_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return {"manifest": str(manifest), "rows": len(rows), "problems": problems}
