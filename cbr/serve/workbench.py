"""The warm side of ``cbr serve``: one loaded Searcher per process, uploads, and refinements.

Every query goes through :class:`Workbench`, which holds the ensemble members loaded once and
answers one query at a time under a lock (a forward pass already uses every core; running two at
once only makes both slower). Reads of the audit trail do not take the lock: they are short
database transactions, as in the CLI.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path

from sqlalchemy import select

from cbr.errors import CbrError, ImageError
from cbr.store.schema import IndexManifest

__all__ = ["Workbench", "RefineError", "default_data_dir", "safe_name"]

LOG = logging.getLogger(__name__)
ROCCHIO = (1.0, 0.75, 0.25)  # weights of the query, the relevant centroid and the irrelevant centroid
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RefineError(CbrError):
    """A refinement cannot be made (an empty box, no example marked...)."""


def default_data_dir(cb) -> Path:
    """Uploads live beside a SQLite case base (``cases.db.serve``), else in ``./cbr-serve``."""
    from cbr.store.casebase import _sqlite_file

    path = _sqlite_file(cb.url)
    return path.with_name(path.name + ".serve") if path is not None else Path.cwd() / "cbr-serve"


def safe_name(filename: str | None, fallback: str = "upload") -> str:
    """A file name reduced to letters, digits, dot, dash and underscore (never a path)."""
    name = Path(str(filename or "").replace("\\", "/")).name
    name = _UNSAFE.sub("_", name).strip("._")[:80]
    return name or fallback


class Workbench:
    """A case base with its members loaded once, answering queries one at a time.

    Args:
        cb: an open CaseBase.
        settings: a ServeSettings (query defaults, data folder).
        searcher: an already loaded Searcher (tests, benchmarks); built from ``settings`` if None.
    """

    def __init__(self, cb, settings, searcher=None):
        from cbr.pipeline.query import Searcher

        self.cb, self.settings = cb, settings
        self.data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir(cb)
        self.uploads = self.data_dir / "uploads"
        self.reports = self.data_dir / "reports"
        if searcher is None:
            searcher = Searcher(cb, models=settings.models or None, k=settings.k, vote=settings.vote,
                                explain=settings.explain or stored_map_method(cb), out_dir=str(self.reports))
        elif Path(searcher.config.out_dir).resolve() != self.reports.resolve():
            searcher = searcher.with_options(out_dir=str(self.reports))  # same members, reports in our folder
        self.searcher = searcher
        self.lock = threading.RLock()
        self._variants = {}
        self._manifests = self._current_manifests()

    @property
    def members(self) -> list:
        return self.searcher.members

    @property
    def window(self) -> str:
        """The VOI window the members decode DICOM/NIfTI with (one per case base: ``cbr index`` refuses two)."""
        return self.members[0].embedder.config.window if self.members else "auto"

    @property
    def crop(self) -> str:
        """The crop the first member views images with: the page's query square is that view."""
        return self.members[0].embedder.config.crop if self.members else "none"

    # --- queries -------------------------------------------------------------------------------

    def save_upload(self, data: bytes, filename: str | None) -> Path:
        """Check an upload with the guarded decoder, then keep it as ``uploads/<sha>/<name>``.

        The stored file is the query's recorded image: reports, refinements and retain read it.
        """
        from cbr.data.image import decode_image
        from cbr.files import atomic_write

        name = safe_name(filename)
        decode_image(data, name)  # raises ImageError: not an image, pixel bomb, too small, truncated
        folder = self.uploads / hashlib.sha256(data).hexdigest()[:24]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if not path.exists():
            # Atomic (never half written) but not fsynced: the case base's SQLite runs WAL with
            # synchronous=NORMAL, so a power cut may lose its last commits as well; an fsync here
            # cost 15-35 ms a query on a busy disk, most of the HTTP overhead.
            atomic_write(path, data, durable=False)
        return path.resolve()

    def _searcher(self, k=None, vote=None, explain=None, where=()):
        own = (self.searcher.k, self.searcher.vote_name, self.searcher.explain, self.searcher.config.where)
        key = (k or own[0], vote or own[1], explain or own[2], tuple(where) or own[3])
        if key == own:
            return self.searcher
        if key not in self._variants:
            self._variants[key] = self.searcher.with_options(k=key[0], vote=key[1], explain=key[2], where=key[3])
        return self._variants[key]

    def query(self, image: Path, *, patient: str | None = None, k: int | None = None, vote: str | None = None,
              explain: str | None = None, vectors=None, where=()):
        """Answer and record one query (an image already on disk); returns the Answer.

        ``where``: (key, value) pairs; only cases whose metadata match are retrieved."""
        with self.lock:
            self._refresh_indexes()
            searcher = self._searcher(k, vote, explain, where)
            if vectors is None:
                answer = searcher.query(image, patient=patient)
            else:
                answer = searcher.query_vectors(image, vectors, patient=patient)
        return answer

    def warm_up(self) -> float:
        """Answer one synthetic image without recording it, so the first reviewer does not pay for
        torch's first forward and backward passes and the lazy imports; returns the seconds spent."""
        import time

        import numpy as np
        from PIL import Image

        t0 = time.perf_counter()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "warm-up.png"
        noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        with self.lock:
            self.searcher.query(path, record=False)
        import cbr.reporting.report  # noqa: F401 - the first recorded query renders a report
        import explain.overlay  # noqa: F401
        return time.perf_counter() - t0

    def _current_manifests(self) -> dict:
        with self.cb.read() as s:
            return {mid: path for mid, path in s.execute(select(IndexManifest.model_id, IndexManifest.path))}

    def _refresh_indexes(self) -> None:
        """Reload a member's index when a writer (retain here, or another cbr process) saved a new one."""
        from cbr.store.member import load_index

        now = self._current_manifests()
        if now == self._manifests:
            return
        for m in self.members:
            if now.get(m.model_id) != self._manifests.get(m.model_id):
                m.index, m.kind, notes = load_index(self.cb, m.model_id)
                for n in notes:
                    LOG.warning("%s", n)
        self._manifests = now

    # --- refinements ---------------------------------------------------------------------------

    def _parent(self, query_id: int):
        from cbr.store.rows import get_query

        with self.cb.read() as s:
            q = get_query(s, self.cb, query_id)
            return q.image_path, q.patient_id, q.k, q.vote_rule, q.explain_method

    def refine_region(self, query_id: int, box) -> tuple:
        """Query the part of a query's image inside ``box`` and record it as its child.

        Args:
            query_id: the parent query.
            box: (x0, y0, x1, y1) as fractions (0..1) of the square the reviewer sees (the first
                member's view: its crop, letterboxed); it is mapped back onto the original pixels.

        Returns:
            (answer, detail) where detail is the refinement as recorded.
        """
        from cbr.data.sources import read_source

        path, patient, k, vote, explain = self._parent(query_id)
        try:
            img, _, _ = read_source(path, window=self.window)  # a DICOM frame or NIfTI slice, as queried
        except ImageError as e:
            raise RefineError(f"query {query_id}'s image cannot be read ({e.reason}); it cannot be refined") from None
        from cbr.data.crop import crop_box as view_box

        seen = view_box(img, self.crop) or (0, 0) + img.size  # the part of the image the square shows
        x0, y0, x1, y1 = letterbox_to_pixels(box, (seen[2] - seen[0], seen[3] - seen[1]))
        crop_box = (x0 + seen[0], y0 + seen[1], x1 + seen[0], y1 + seen[1])
        crop = img.crop(crop_box)
        from cbr.data.image import MIN_SIZE

        if min(crop.size) < MIN_SIZE:
            raise RefineError(f"the box is {crop.size[0]}x{crop.size[1]} pixels of the image; draw one at least "
                              f"{MIN_SIZE}x{MIN_SIZE}")
        import io

        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        stem = Path(path).stem[:40]
        child = self.save_upload(buf.getvalue(), f"{stem}-region-{'-'.join(map(str, crop_box))}.png")
        detail = {"kind": "region", "parent_id": int(query_id), "box": [round(float(v), 4) for v in box],
                  "pixels": list(crop_box)}
        answer = self.query(child, patient=patient, k=k, vote=vote, explain=explain)
        self._link(answer, detail)
        return answer, detail

    def refine_example(self, query_id: int, relevant, irrelevant) -> tuple:
        """Re-query with the query vector moved toward relevant cases and away from the others (Rocchio).

        q' = a q + b mean(relevant) - c mean(irrelevant), per member, with (a, b, c) = ROCCHIO;
        it is recorded as a child of ``query_id``, on the same image.
        """
        import numpy as np

        from cbr.data.sources import read_source
        from cbr.store.member import active_embeddings

        relevant = sorted({int(i) for i in relevant})
        irrelevant = sorted({int(i) for i in irrelevant} - set(relevant))
        if not relevant and not irrelevant:
            raise RefineError("mark at least one neighbour as relevant or not relevant to refine by example")
        path, patient, k, vote, explain = self._parent(query_id)
        try:
            img, _, _ = read_source(path, window=self.window)
        except ImageError as e:
            raise RefineError(f"query {query_id}'s image cannot be read ({e.reason}); it cannot be refined") from None
        a, b, c = ROCCHIO
        vectors = []
        for m in self.members:
            with self.lock:  # the members' modules are shared with the query path
                q = m.embedder.embed(m.embedder.preprocess(img).unsqueeze(0)).float().numpy()[0]
            v = a * q
            for ids, w in ((relevant, b), (irrelevant, -c)):
                if ids:
                    found, vecs = active_embeddings(self.cb, m.model_id, ids)
                    if len(found):
                        v = v + w * vecs.mean(axis=0)
            vectors.append(v.astype(np.float32))
        detail = {"kind": "example", "parent_id": int(query_id), "relevant": relevant, "irrelevant": irrelevant,
                  "weights": list(ROCCHIO)}
        answer = self.query(Path(path), patient=patient, k=k, vote=vote, explain=explain, vectors=vectors)
        self._link(answer, detail)
        return answer, detail

    def _link(self, answer, detail) -> None:
        from cbr.serve.lineage import record_refinement

        record_refinement(self.cb, answer.query_id, detail)
        answer.notes.append(f"refinement of query {detail['parent_id']} ({detail['kind']})")

    # --- feedback ------------------------------------------------------------------------------

    def feedback(self, query_id: int, label: str, *, note=None, by=None, retain=False, region=None) -> dict:
        """``cbr feedback``: a new verdict row (never overwritten), optionally retaining the image."""
        from cbr.pipeline.audit import add_feedback

        result = add_feedback(self.cb, query_id, label, note=note, by=by, retain=retain, region=region)
        if retain:
            with self.lock:
                self._refresh_indexes()
        return result


def stored_map_method(cb, default: str = "gradcam") -> str:
    """The CAM method of the case base's stored case maps (the newest), else ``default``."""
    from cbr.store.schema import Explanation

    with cb.read() as s:
        method = s.scalar(select(Explanation.method).where(Explanation.role == "case")
                          .order_by(Explanation.id.desc()).limit(1))
    return method or default


def letterbox_to_pixels(box, size) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) fractions of the letterboxed square -> a pixel box inside the original image."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RefineError("a box is four numbers x0, y0, x1, y1 between 0 and 1") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise RefineError("a box is four numbers x0, y0, x1, y1 between 0 and 1")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    w, h = size
    side = max(w, h)
    ox, oy = (side - w) / 2, (side - h) / 2  # letterbox padding, as cbr.data.image.letterbox centres it
    px0, px1 = max(0, round(x0 * side - ox)), min(w, round(x1 * side - ox))
    py0, py1 = max(0, round(y0 * side - oy)), min(h, round(y1 * side - oy))
    if px1 <= px0 or py1 <= py0:
        raise RefineError("the box lies outside the image (on the black padding); draw it over the image")
    return int(px0), int(py0), int(px1), int(py1)
