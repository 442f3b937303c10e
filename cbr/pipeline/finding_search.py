"""Search by finding: a case's finding regions, each embedded on its own, and queries by region.

A finding is a region of a case image: a connected component of the manifest's lesion mask (its
``mask`` column), or a reviewer's box (``cbr feedback --region``, the serve form). Each is cropped
with a context margin and embedded at the model's full input size, so a small lesion fills the
model's view instead of a few pixels of it; the vectors live in the ``findings`` table and in their
own FAISS index per model (``cbr.store.findings``).

A region query (``cbr query IMG --region x0,y0,x1,y1``, or ``auto``: the lesion localiser's
strongest region) embeds its region the same way and retrieves among the findings, each case
ranked by its best finding's similarity to the region averaged with its image's similarity to the
whole query image (``fused``). Its typicality reads the region's similarities alone, calibrated on
the findings themselves, leave-one-out (its case's patient left out), because a
cropped region is unlike every *whole* image: calibrated on whole images, every drawn region would
come back "out of distribution".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from cbr.data.mask import read_mask
from cbr.data.sources import read_source
from cbr.errors import CbrError, ImageError
from cbr.pipeline.search import Hit
from cbr.pipeline.typicality import TYPICALITY_K, TypicalityCalibration, leave_one_out_scores
from cbr.store.chunks import scalars_in
from cbr.store.findings import (add_findings, build_finding_index, case_findings, cases_with_findings, finding_boxes,
                                finding_kind, finding_rows, findings_of_cases, load_finding_index, save_finding_index)
from cbr.store.member import embeddings_in
from cbr.store.schema import Case, Feedback, Finding, FindingIndex, Model, Query
import index as ix

__all__ = ["CONTEXT_MARGIN", "AUTO", "RegionError", "NoFindingsError", "FindingSet", "parse_region", "mask_boxes", "context_crop",
           "region_vectors", "index_findings", "load_finding_sets", "finding_marks", "search_findings", "check_box",
           "save_findings_index", "rebuild_finding_indexes", "fused"]

LOG = logging.getLogger(__name__)

CONTEXT_MARGIN = 0.25  # context on each side of a finding's crop, as a share of the box's longer side
MIN_COMPONENT_SHARE = 0.1  # a mask component under this share of the largest one is a speck, not a finding
MAX_FINDINGS = 8  # findings per case at most (the largest components)
AUTO = "auto"
CANDIDATES = 3  # a region query's candidates: this many times k from each index at first (deepened until exact)
EMBED_BATCH = 32
WRITE_BATCH = 256  # findings stored per transaction


class RegionError(CbrError):
    """A region that cannot be searched. Its message starts with the CLI's option name,
    ``--region``, which the API's callers know as the field ``region`` (``API_FIELD``)."""

    OPTION, API_FIELD = "--region", "region"

    def in_api_words(self) -> str:
        """The message as an API caller reads it: the field's name for the option's, except inside a
        quoted command (`cbr feedback --region` stays a command)."""
        parts = str(self).split("`")
        return "`".join(p.replace(self.OPTION, self.API_FIELD) if i % 2 == 0 else p for i, p in enumerate(parts))


class NoFindingsError(RegionError):
    """A region query on a case base (or member) that holds no findings."""


@dataclass(frozen=True)
class FindingSet:
    """One member's findings: their index (ids: finding ids) and typicality calibration."""

    index: object
    calibration: TypicalityCalibration | None


def parse_region(text: str | None):
    """``--region``: None, ``"auto"``, or a box (x0, y0, x1, y1) of ints in the image's pixels."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lower() == AUTO:
        return AUTO
    try:
        box = [int(round(float(v))) for v in text.split(",")]
    except (ValueError, OverflowError):  # a word, nan, inf
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1] or min(box) < 0:
        raise RegionError(f"--region {text!r}: give x0,y0,x1,y1 in the image's pixels (x0 < x1, y0 < y1), or 'auto'")
    return tuple(box)


def check_box(box, size, *, clip: bool = False) -> list[int]:
    """``box`` checked against an image of ``size`` (w, h): a box with nothing inside is refused, and
    so is one reaching past the image unless ``clip`` (a localiser's or a reviewer's box, cut to it):
    a drawn box past the edge is usually one in another image's pixels, not to be cut silently."""
    w, h = size
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = [max(0, x0), max(0, y0), min(w, x1), min(h, y1)]
    if inside[2] - inside[0] < 2 or inside[3] - inside[1] < 2:
        raise RegionError(f"--region {list(box)} lies outside the {w}x{h} image; draw it over the image")
    if not clip and inside != [x0, y0, x1, y1]:
        raise RegionError(f"--region {list(box)} reaches past the {w}x{h} image; give x0,y0,x1,y1 with x1 <= {w} "
                       f"and y1 <= {h}, in this image's pixels")
    return inside


def mask_boxes(path: str, image_size, image=None) -> list[list[int]]:
    """Finding boxes of a lesion mask (an image or a DICOM SEG), in its image's pixels: one per
    connected component (specks left out, the ``MAX_FINDINGS`` largest kept); [] for an empty mask.
    ``image``: the image's locator (it picks a multi-plane SEG's plane). Raises OSError when unreadable."""
    from scipy import ndimage

    mask = read_mask(path, image=image)
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = [i for i in np.argsort(-sizes)[:MAX_FINDINGS] if sizes[i] >= MIN_COMPONENT_SHARE * sizes.max()]
    sx, sy = image_size[0] / mask.shape[1], image_size[1] / mask.shape[0]  # a mask of another size is scaled
    boxes = []
    for sl in (ndimage.find_objects(labels)[i] for i in keep):
        ys, xs = sl
        boxes.append([int(xs.start * sx), int(ys.start * sy), int(np.ceil(xs.stop * sx)), int(np.ceil(ys.stop * sy))])
    return boxes


def context_crop(img, box, margin: float = CONTEXT_MARGIN):
    """The finding ``box`` of ``img`` with ``margin`` of context on each side, squared where the image allows."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = img.size
    box = (max(0, int(cx - side / 2)), max(0, int(cy - side / 2)), min(w, int(np.ceil(cx + side / 2))),
           min(h, int(np.ceil(cy + side / 2))))
    return img.crop(box)


def region_vectors(embedder, img, boxes) -> np.ndarray:
    """(n, D) float32 unit embeddings of ``boxes`` of ``img``, each crop at the model's full input size."""
    import torch

    out = []
    for start in range(0, len(boxes), EMBED_BATCH):
        x = torch.stack([embedder.preprocess(context_crop(img, b)) for b in boxes[start:start + EMBED_BATCH]])
        out.append(embedder.embed(x).float().numpy())
    return np.concatenate(out) if out else np.empty((0, embedder.config.embedding_dim), dtype=np.float32)


def _mask_todo(s, model_id: int, shas) -> list:
    """(case, "mask", None) of the active cases among ``shas`` with a mask and no mask findings yet."""
    if not shas:
        return []
    done = cases_with_findings(s, model_id, "mask")
    cases = scalars_in(s, select(Case).where(Case.removed_at.is_(None)), Case.sha256, sorted(shas))
    return [(c, "mask", None) for c in sorted(cases, key=lambda c: c.id)
            if c.id not in done and (c.meta or {}).get("mask")]


def _feedback_todo(s, model_id: int) -> list:
    """(case, "feedback", [boxes]) of reviewers' boxes on queries whose image is an active case (a
    retained query, or one of a case's own image), not yet stored as findings."""
    rows = s.execute(select(Feedback.region, Query.sha256).join(Query, Query.id == Feedback.query_id)
                     .where(Feedback.region.is_not(None)).order_by(Feedback.id)).all()
    if not rows:
        return []
    by_sha = {c.sha256: c for c in scalars_in(s, select(Case).where(Case.removed_at.is_(None)), Case.sha256,
                                                  sorted({sha for _, sha in rows}))}
    done = cases_with_findings(s, model_id, "feedback")
    boxes: dict = {}
    for region, sha in rows:
        case = by_sha.get(sha)
        if case is not None and case.id not in done and list(region) not in boxes.setdefault(case.id, []):
            boxes[case.id].append([int(v) for v in region])
    return [(case, "feedback", boxes[case.id]) for case in by_sha.values() if boxes.get(case.id)]


def _embed_case(member, case, source: str, boxes, problems: list):
    """[(case id, source, box, vector)] of one case's findings; unreadable files go to ``problems``."""
    cfg = member.embedder.config
    try:
        img = read_source(case.readable_locator, window=cfg.window)[0]
        if boxes is None:
            boxes = mask_boxes(case.meta["mask"], img.size, case.readable_locator)
        else:
            boxes = [check_box(b, img.size, clip=True) for b in boxes]
    except (OSError, ImageError, CbrError) as e:
        problems.append(f"case {case.id}: its {source} finding was not embedded ({getattr(e, 'reason', e)})")
        return []
    vecs = region_vectors(member.embedder, img, boxes)
    return [(case.id, source, b, v) for b, v in zip(boxes, vecs)]


def index_findings(cb, members, masked=()) -> list[str]:
    """Embed and store the finding regions not stored yet of every member: the mask components of the
    cases whose sha256 is in ``masked`` (the records just indexed: an empty mask is read once per
    run, not on every later one), and reviewers' boxes on retained queries; then save each member's
    findings index and its leave-one-out typicality calibration.

    Callers hold the writer lock. Returns notes: how many findings were added, files left out.
    """
    notes = []
    for m in members:
        with cb.read() as s:
            todo = _mask_todo(s, m.model_id, masked) + _feedback_todo(s, m.model_id)
            has_index = s.scalar(select(FindingIndex.id).where(FindingIndex.model_id == m.model_id)) is not None
        problems, added, rows = [], 0, []
        for i, (case, source, boxes) in enumerate(todo):
            rows.extend(_embed_case(m, case, source, boxes, problems))
            if len(rows) >= WRITE_BATCH or i == len(todo) - 1:  # one transaction per batch, not per case
                added += add_findings(cb, m.model_id, rows)
                rows = []
        notes.extend(problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else []))
        if added or (not has_index and todo):
            n = save_findings_index(cb, m.model_id, m.embedder.config.embedding_dim, notes)
            notes.append(f"findings of model {m.model_id}: {added} added, {n} searchable (search them with "
                         "`cbr query IMG --region x0,y0,x1,y1`)")
    return notes


def save_findings_index(cb, model_id: int, dim: int, notes: list) -> int:
    """Build a model's findings index afresh from the stored rows, of its image index's kind,
    calibrate it leave-one-out, save it; returns how many findings it holds. Callers hold the
    writer lock."""
    with cb.read() as s:
        ids, vecs, groups = finding_rows(s, model_id, dim)
        kind = finding_kind(s, model_id)
    index, told = build_finding_index(dim, kind, ids, vecs)
    notes.extend([told] if told else [])
    scores = leave_one_out_scores(index, ids, vecs, groups, k=TYPICALITY_K)
    save_finding_index(cb, model_id, index, TYPICALITY_K, scores)
    return int(index.ntotal)


def rebuild_finding_indexes(cb) -> list[str]:
    """``cbr index --rebuild``: every model's findings index written again from the stored findings
    (no image is read), of its image index's kind, and calibrated again. Returns notes."""
    with cb.read() as s:
        rows = s.execute(select(Model.id, Model.config).where(
            Model.id.in_(select(FindingIndex.model_id)) | Model.id.in_(select(Finding.model_id)))
            .order_by(Model.id)).all()
    notes = []
    for model_id, config in rows:
        n = save_findings_index(cb, model_id, int(config["embedding_dim"]), notes)
        notes.append(f"findings index of model {model_id} rebuilt: {n} findings")
    return notes


def load_finding_sets(cb, members) -> tuple[dict, list[str]]:
    """({model_id: FindingSet} of the members with findings, notes on indexes rebuilt in memory)."""
    out, notes = {}, []
    for m in members:
        loaded = load_finding_index(cb, m.model_id, m.embedder.config.embedding_dim)
        if loaded is None:
            continue
        index, k, scores, told = loaded
        notes.extend(told)
        out[m.model_id] = FindingSet(index, TypicalityCalibration(k, scores) if len(scores) else None)
    return out, notes


def finding_marks(cb) -> dict:
    """{model_id: checksum} of the saved findings indexes: a change means they must be loaded again."""
    with cb.read() as s:
        return dict(s.execute(select(FindingIndex.model_id, FindingIndex.checksum)).all())


def search_findings(s, member, fset: FindingSet, crop, whole, k: int, exclude_cases,
                    allow_cases=None) -> tuple[list, dict, list]:
    """(hits, {case id: its best finding's box}, similarities) of a region query on one member.

    The hits are the k cases with findings ranked by ``fused``: the region's (``crop``) cosine to the
    case's best finding, averaged with the whole query image's (``whole``) cosine to the case's image;
    a hit's similarity is that mean. The similarities are the region's to its nearest findings, best
    first (typicality reads them as its calibration, on findings alone, did). Never a finding of
    ``exclude_cases``, nor of a removed case; with ``allow_cases``, hits only among those (the
    similarities stay all findings').

    Args:
        s: an open read session; member: has ``index`` (its image index) and ``model_id``.
        fset: the member's findings; crop, whole: (1, D) unit embeddings of the region and the image.
    """
    exclude = findings_of_cases(s, member.model_id, exclude_cases)
    crop, whole = (np.asarray(v, dtype=np.float32).reshape(1, -1) for v in (crop, whole))
    D, I = ix.search(fset.index, crop, max(k, TYPICALITY_K) * MAX_FINDINGS + 5, exclude=[exclude])
    active = finding_boxes(s, [int(i) for i in I[0] if i >= 0])
    sims = [float(d) for i, d in zip(I[0], D[0]) if int(i) in active]
    ranked = _fused(s, member, fset, (crop, whole), k, (exclude, exclude_cases), allow_cases, nearest=(D, I))
    cases = {c.id: c for c in scalars_in(s, select(Case), Case.id, [c for c, _, _ in ranked])}
    return [Hit(cases[c], score) for c, score, _ in ranked], {c: box for c, _, box in ranked}, sims


def fused(finding_similarity, image_similarity):
    """A region query's score of a case: the mean of its two cosines.

    Why the mean: both are cosines of L2-normalised embeddings of the same model, so they share one
    scale and the mean needs no weight or constant fitted to any data set (cbr is measured on data
    it never saw). Reciprocal-rank fusion would also need none beyond its k=60, but it throws the
    margins away: a case far ahead on one view counts as one rank ahead. The crop alone loses the
    context the whole image carries (and the model learnt on whole images); the image alone does not
    look at the finding. Exact rescoring of the mean also lets the candidate search prove it missed
    nothing (``_fused``)."""
    return (finding_similarity + image_similarity) / 2


def _fused(s, member, fset, queries, k: int, exclude, allow, nearest=None) -> list:
    """[(case id, fused score, its best finding's box)] of the k best cases, best first (ties: lower id).

    Candidates: the cases of the region's nearest findings and the image's nearest cases, CANDIDATES x
    k of each, rescored exactly from the stored vectors. A case in neither list scores at most the
    mean of the two lists' last similarities (the threshold algorithm's bound); while the k-th score
    is below it, both lists go deeper. Exact for exact (flat) indexes. ``nearest``: (D, I) of a
    search of the region already made (with the same exclusions); a depth it covers is read from
    it, not searched again."""
    (crop, whole), (excluded_findings, excluded_cases) = queries, exclude
    dim, skip = crop.shape[1], set(int(c) for c in excluded_cases)
    allowed = None if allow is None else set(int(c) for c in allow)
    depth = CANDIDATES * k
    while True:
        if nearest is not None and nearest[1].shape[1] >= depth:
            Df, If = nearest[0][:, :depth], nearest[1][:, :depth]
        else:
            Df, If = ix.search(fset.index, crop, depth, exclude=[excluded_findings])
        Di, Ii = ix.search(member.index, whole, depth, exclude=[sorted(skip)], allow=allow)
        found = scalars_in(s, select(Finding.case_id), Finding.id, [int(i) for i in If[0] if i >= 0])
        cands = {int(c) for c in found} | {int(i) for i in Ii[0] if i >= 0}
        cands = {c for c in cands - skip if allowed is None or c in allowed}
        owners, boxes, vecs = case_findings(s, member.model_id, cands, dim)
        best: dict = {}
        for c, box, sim in zip(owners.tolist(), boxes, (vecs @ crop[0]).tolist()):
            if c not in best or sim > best[c][0]:
                best[c] = (sim, box)
        ids, images = embeddings_in(s, member.model_id, list(best), dim=dim)
        image_sims = dict(zip(ids.tolist(), (images @ whole[0]).tolist() if len(ids) else []))
        ranked = sorted(((c, fused(f, image_sims[c]), box) for c, (f, box) in best.items() if c in image_sims),
                        key=lambda t: (-t[1], t[0]))[:k]
        # a list that came back short holds everything it can: nothing unseen can beat the candidates
        done = If[0][-1] < 0 or Ii[0][-1] < 0 or depth >= max(fset.index.ntotal, member.index.ntotal)
        if done or (len(ranked) == k and ranked[-1][1] >= fused(float(Df[0][-1]), float(Di[0][-1]))):
            return ranked
        depth *= 4
