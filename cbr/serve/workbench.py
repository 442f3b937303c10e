"""The warm side of ``cbr serve``: one loaded Searcher per process, uploads, and refinements.

Every query goes through :class:`Workbench`, which holds the ensemble members loaded once and
answers one query at a time under a lock (a forward pass already uses every core; running two at
once only makes both slower). Reads of the audit trail do not take the lock: they are short
database transactions, as in the CLI.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from pathlib import Path
import time

from PIL import Image
import numpy as np
from sqlalchemy import select

from cbr.data.crop import crop_box as view_box
from cbr.data.image import MIN_SIZE
from cbr.data.sources import SourceSpec, read_source
from cbr.errors import CbrError, ImageError
from cbr.files import atomic_write
from cbr.pipeline.audit.feedback import add_feedback
from cbr.pipeline.finding_search import NoFindingsError
from cbr.pipeline.patient import check_key
from cbr.pipeline.query import Searcher
from cbr.serve.lineage import record_refinement
from cbr.store.location import sqlite_file
from cbr.serve.lanes import Busy, Lane, is_expensive
from cbr.serve.uploads import check_limits, discard_upload, upload_locator, upload_name, upload_recorded, upload_suffix
from cbr.store.member import active_embeddings
from cbr.store.rows import get_query
from cbr.store.schema import Explanation

__all__ = ["Workbench", "RefineError", "default_data_dir", "stored_map_method", "letterbox_to_pixels"]

LOG = logging.getLogger(__name__)
ROCCHIO = (1.0, 0.75, 0.25)  # weights of the query, the relevant centroid and the irrelevant centroid
EXPLAIN_QUEUE = 2  # expensive explanations running or waiting at once
DECODE_WAIT = 60.0  # seconds an upload waits for a decoding slot before it is refused (503)


class RefineError(CbrError):
    """A refinement cannot be made (an empty box, no example marked...)."""


def default_data_dir(cb) -> Path:
    """Uploads live beside a SQLite case base (``cases.db.serve``), else in ``./cbr-serve``."""
    path = sqlite_file(cb.url)
    return path.with_name(path.name + ".serve") if path is not None else Path.cwd() / "cbr-serve"


class Workbench:
    """A case base with its members loaded once, answering queries one at a time.

    Args:
        cb: an open CaseBase.
        settings: a ServeSettings (query defaults, data folder).
        searcher: an already loaded Searcher (tests, benchmarks); built from ``settings`` if None.
    """

    def __init__(self, cb, settings, searcher=None):
        # A pseudonymised case base needs its key before anything is loaded (one line at start-up).
        check_key(cb, settings.pseudonymise, "serve")
        self.cb, self.settings = cb, settings
        self.sources = SourceSpec(pseudonymise=settings.pseudonymise, allow_burned_in=settings.allow_burned_in)
        self.data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir(cb)
        self.uploads = self.data_dir / "uploads"
        self.reports = self.data_dir / "reports"
        # the server's explanation limits travel with every query (explain_budget, explain_neighbours)
        limits = {"explain_budget": settings.explain_budget, "explain_neighbours": settings.explain_neighbours}
        if searcher is None:
            searcher = Searcher(cb, models=settings.models or None, k=settings.k, vote=settings.vote,
                                explain=settings.explain or stored_map_method(cb), out_dir=str(self.reports),
                                **limits)
        else:  # same members, reports in our folder
            searcher = searcher.with_options(out_dir=str(self.reports), **limits)
        self.retrieval = Lane(cb, searcher)
        self.lock = self.retrieval.lock  # the retrieval lane's: refinements embed with its members
        self._explainer = None  # the explanation lane, made on first use
        self._making = threading.Lock()
        # expensive explanations waiting or running; more are refused (503) rather than left to
        # take every worker thread of the server
        self._explain_slots = threading.BoundedSemaphore(EXPLAIN_QUEUE)
        self._decodes = threading.BoundedSemaphore(settings.max_decodes)

    @property
    def searcher(self):
        return self.retrieval.searcher

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

    def save_upload(self, data: bytes, filename: str | None, part: str | None = None) -> str:
        """Check an upload by decoding it, then keep it as ``uploads/<sha>/<name>``; its locator.

        The format comes from the content (the stored name gets its extension); the decode runs
        through a bounded semaphore (``max_decodes`` at once). A refused upload is not kept. The
        stored file is the query's recorded image: reports, refinements and retain read it.
        """
        return self._store(data, filename, part)[0]

    def _store(self, data: bytes, filename: str | None, part: str | None) -> tuple[str, Path | None]:
        """(locator, the path if this call created the file else None)."""
        # In a pseudonymised case base the upload's own name (often a patient's name and birth date)
        # is neither kept nor recorded: the stored file is "upload" plus its format's extension.
        shown_name = "upload" if self.settings.pseudonymise else filename
        path = self.uploads / hashlib.sha256(data).hexdigest()[:24] / upload_name(shown_name, upload_suffix(data))
        created = not path.exists()
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic (never half written) but not fsynced: the case base's SQLite runs WAL with
            # synchronous=NORMAL, so a power cut may lose its last commits as well; an fsync here
            # cost 15-35 ms a query on a busy disk, most of the HTTP overhead.
            atomic_write(path, data, durable=False)
        path = path.resolve()
        try:
            locator = upload_locator(path, data, part)
            self.decode(locator)  # raises ImageError: not an image, a bomb, too small, truncated
        except BaseException:
            if created:
                discard_upload(path)
            raise
        return locator, (path if created else None)

    def decode(self, locator: str):
        """Decode an image (``read_source``) while holding one of the ``max_decodes`` slots."""
        if not self._decodes.acquire(timeout=DECODE_WAIT):
            raise Busy("the server is busy decoding other uploads; try again in a minute")
        try:
            return read_source(locator, window=self.window)
        finally:
            self._decodes.release()

    def ask_upload(self, data: bytes, filename: str | None, part: str | None = None, **query):
        """Check the limits, keep the upload (:meth:`save_upload`) and answer it (:meth:`query`);
        the file is removed again when the query fails before recording it."""
        check_limits(self.settings, query.get("k"), query.get("explain"), self.searcher.explain)
        locator, created = self._store(data, filename, part)
        try:
            return self.query(locator, **query)
        except BaseException:
            if created is not None and not upload_recorded(self.cb, created):
                discard_upload(created)
            raise

    def query(self, image, *, patient: str | None = None, k: int | None = None, vote: str | None = None,
              explain: str | None = None, vectors=None, where=(), patient_stored: bool = False, region=None):
        """Answer and record one query (an image already on disk); returns the Answer.

        Refused (BadValue) past the server's limits. A query asking for an expensive explanation
        runs in the explanation lane, so that retrieval never waits for it.
        ``where``: (key, value) pairs; only cases whose metadata match are retrieved.
        ``patient``: as typed (hashed with the case base's key), unless ``patient_stored`` (a
        recorded query's, for a refinement). ``region``: search by finding (a pixel box, or "auto")."""
        check_limits(self.settings, k, explain, self.searcher.explain)
        kw = {"patient": patient, "k": k, "vote": vote, "explain": explain, "vectors": vectors, "where": where,
              "sources": self.sources, "patient_stored": patient_stored, "region": region}
        if not is_expensive(explain or self.searcher.explain):
            return self.retrieval.query(image, **kw)
        if not self._explain_slots.acquire(blocking=False):
            raise Busy(f"the server is already running {EXPLAIN_QUEUE} expensive explanations; try again later, "
                       "or ask for a CAM method")
        try:
            return self._explanation_lane().query(image, **kw)
        finally:
            self._explain_slots.release()

    def _explanation_lane(self) -> Lane:
        with self._making:
            if self._explainer is None:
                self._explainer = self.retrieval.copy()
            return self._explainer

    def warm_up(self) -> float:
        """Answer one synthetic image without recording it, so the first reviewer does not pay for
        torch's first forward and backward passes and the lazy imports; returns the seconds spent."""
        t0 = time.perf_counter()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "warm-up.png"
        noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        with self.lock:
            self.searcher.query(path, record=False, sources=self.sources)
        return time.perf_counter() - t0

    def _refresh_indexes(self) -> None:
        self.retrieval.refresh()

    # --- refinements ---------------------------------------------------------------------------

    def _parent(self, query_id: int):
        with self.cb.read() as s:
            q = get_query(s, self.cb, query_id)
            return q.readable_image, q.patient_id, q.k, q.vote_rule, q.explain_method

    def refine_region(self, query_id: int, box) -> tuple:
        """Query the part of a query's image inside ``box`` and record it as its child.

        Args:
            query_id: the parent query.
            box: (x0, y0, x1, y1) as fractions (0..1) of the square the reviewer sees (the first
                member's view: its crop, letterboxed); it is mapped back onto the original pixels.

        Returns:
            (answer, detail) where detail is the refinement as recorded.
        """
        path, patient, k, vote, explain = self._parent(query_id)
        try:
            img, _, _ = self.decode(path)  # a DICOM frame or NIfTI slice, as queried
        except ImageError as e:
            raise RefineError(f"query {query_id}'s image cannot be read ({e.reason}); it cannot be refined") from None

        seen = view_box(img, self.crop) or (0, 0) + img.size  # the part of the image the square shows
        x0, y0, x1, y1 = letterbox_to_pixels(box, (seen[2] - seen[0], seen[3] - seen[1]))
        crop_box = (x0 + seen[0], y0 + seen[1], x1 + seen[0], y1 + seen[1])
        crop = img.crop(crop_box)

        if min(crop.size) < MIN_SIZE:
            raise RefineError(f"the box is {crop.size[0]}x{crop.size[1]} pixels of the image; draw one at least "
                              f"{MIN_SIZE}x{MIN_SIZE}")

        detail = {"kind": "region", "parent_id": int(query_id), "box": [round(float(v), 4) for v in box],
                  "pixels": list(crop_box)}
        options = {"patient": patient, "k": k, "vote": vote, "explain": explain, "patient_stored": True}
        try:  # search by finding: the box of the parent's own image among the cases' findings
            answer = self.query(path, region=list(crop_box), **options)
        except NoFindingsError:  # a case base without findings: the box's pixels as an image of its own
            buf = io.BytesIO()
            crop.save(buf, format="PNG")
            child = self.save_upload(buf.getvalue(), f"{Path(path).stem[:40]}-region-{'-'.join(map(str, crop_box))}.png")
            answer = self.query(child, **options)
        self._link(answer, detail)
        return answer, detail

    def refine_example(self, query_id: int, relevant, irrelevant) -> tuple:
        """Re-query with the query vector moved toward relevant cases and away from the others (Rocchio).

        q' = a q + b mean(relevant) - c mean(irrelevant), per member, with (a, b, c) = ROCCHIO;
        it is recorded as a child of ``query_id``, on the same image.
        """
        relevant = sorted({int(i) for i in relevant})
        irrelevant = sorted({int(i) for i in irrelevant} - set(relevant))
        if not relevant and not irrelevant:
            raise RefineError("mark at least one neighbour as relevant or not relevant to refine by example")
        path, patient, k, vote, explain = self._parent(query_id)
        try:
            img, _, _ = self.decode(path)
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
        answer = self.query(Path(path), patient=patient, k=k, vote=vote, explain=explain, vectors=vectors,
                            patient_stored=True)
        self._link(answer, detail)
        return answer, detail

    def _link(self, answer, detail) -> None:
        record_refinement(self.cb, answer.query_id, detail)
        answer.notes.append(f"refinement of query {detail['parent_id']} ({detail['kind']})")

    # --- feedback ------------------------------------------------------------------------------

    def feedback(self, query_id: int, label: str, *, note=None, by=None, retain=False, region=None,
                 allow_new_class: bool = False) -> dict:
        """``cbr feedback``: a new verdict row (never overwritten), optionally retaining the image; a label
        no case has yet needs ``allow_new_class`` (``NewClassError`` otherwise, nothing recorded)."""
        result = add_feedback(self.cb, query_id, label, note=note, by=by, retain=retain, region=region,
                              allow_new_class=allow_new_class)
        if retain:
            with self.lock:
                self._refresh_indexes()
        return result


def stored_map_method(cb, default: str = "gradcam") -> str:
    """The CAM method of the case base's stored case maps (the newest), else ``default``."""
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
