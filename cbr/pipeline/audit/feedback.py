"""Expert feedback on a query (the CBR revise step) and retaining its image as a case (retain).

Feedback rows are never overwritten: each verdict is a new row with its time, and the latest
counts. Retaining goes through the same ``CaseWriter`` as ``cbr index``: the case base commits
first, then every member's index is saved as a new generation under the writer lock, so a crash in
between is repaired from the stored embeddings on the next open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from cbr.data.dataset import Record
from cbr.data.guard import open_regular
from cbr.data.sources import moved_to, read_source, Source
from cbr.data.text import clean_label, clean_note, confusable_with, lookalike_note
from cbr.errors import CbrError, ImageError
from cbr.pipeline.calibration import recalibrate
from cbr.pipeline.finding_search import index_findings
from cbr.pipeline.search import active_classes
from cbr.store.member import load_members, writer_lock
from cbr.pipeline.audit.trail import query_window
from cbr.store.rows import get_query, iso
from cbr.store.schema import Case, Explanation, Feedback
from cbr.store.writer import CaseWriter

__all__ = ["RetainError", "NewClassError", "add_feedback", "parse_region"]


class RetainError(CbrError):
    """Feedback was recorded but its image could not be retained as a case."""

    def __init__(self, feedback_id: int, query_id: int, reason: str):
        self.feedback_id, self.query_id, self.reason = feedback_id, query_id, reason
        super().__init__(
            f"feedback {feedback_id} on query {query_id} is recorded, but the image was not retained: {reason}"
        )


class NewClassError(CbrError):
    """A verdict's label is no class of the case base and a new class was not confirmed; nothing is recorded."""

    def __init__(self, label: str, classes):
        self.label, self.classes = label, sorted(classes)
        lookalike = confusable_with(label, classes)
        self.lookalike = None if lookalike is None else lookalike_note(label, lookalike)
        super().__init__(f"--label {label!r} is not a class of the case base ({', '.join(self.classes) or 'none yet'})"
                         + (f"; {self.lookalike}" if self.lookalike else "")
                         + "; check the spelling, or confirm a new class with --new-class")


@dataclass(frozen=True)
class _Judged:
    """The query a feedback row judged, as retaining needs it (read inside the feedback transaction)."""

    query_id: int
    feedback_id: int
    label: str  # the expert's label
    path: str  # where the query image is read from (its recorded file)
    sha256: str
    patient: str | None
    shown: str | None = None  # its neutral locator, in a pseudonymised case base: the retained case's path

    def refuse(self, reason: str) -> RetainError:
        return RetainError(self.feedback_id, self.query_id, reason)


def add_feedback(cb, query_id: int, label: str, *, note: str | None = None, by: str | None = None,
                 retain: bool = False, image=None, region=None, allow_new_class: bool = True) -> dict:
    """Record an expert's verdict on a query (revise) and optionally add its image as a case (retain).

    The feedback row is committed first and is never overwritten. Retaining decodes the query's
    image from its recorded path (or ``image``, whose sha256 must be the query's), embeds it with
    every member, stores its map and indexes it, through the same ``CaseWriter`` as ``cbr index``.
    If retaining fails, ``RetainError`` says so; the feedback stays recorded.

    Args:
        cb: an open CaseBase.
        query_id: the query judged.
        label: the expert's label; any string (a label no case has yet starts a new class).
        note, by: free text and the expert's name, stored with the verdict.
        retain: add the query image to the case base with this label.
        image: where the query image is now, when it moved since the query.
        region: the expert's box on the query image, "x0,y0,x1,y1" or 4 numbers in its pixels
            (``parse_region``); stored with the verdict, exported as a lesion mask (cbr.pipeline.audit.regions).
        allow_new_class: False refuses (``NewClassError``, nothing recorded) a label no active case
            has, so a typo does not start a class; the CLI and the page ask for an explicit confirmation.

    Returns:
        {"feedback_id", "query_id", "label", "prediction", "verdict", "new_class", "retained_case_id",
         "existing_case_id", "members", "messages", "region"}

    Example:
        >>> add_feedback(open_casebase("cases.db"), 12, "tumour", by="dr.x", retain=True)
    """
    label = clean_label(label or "", "--label")  # NFC, no control characters: it may become a case's label
    if not label:
        raise CbrError("--label is empty; give the expert's label, e.g. --label tumour")
    note = None if note is None else clean_note(note, "--note")
    by = None if by is None else (clean_label(by, "--by") or None)
    region = parse_region(region)  # a bad box is refused before anything is recorded
    if retain and image is not None:
        _check_image_file(image)  # before anything is recorded: a FIFO or device would block the retain
    with cb.write() as s:
        q = get_query(s, cb, query_id)
        classes = active_classes(s)
        new_class = label not in classes
        if new_class and not allow_new_class:
            raise NewClassError(label, classes)
        fb = Feedback(query_id=q.id, label=label, note=note, by=by, region=region)
        s.add(fb)
        s.flush()
        fid, prediction = fb.id, q.prediction
        judged = _Judged(int(query_id), fid, label, q.readable_image, q.sha256, q.patient_id,
                         q.image_path if q.image_file else None)
        previous = s.scalar(select(func.count(Feedback.id)).where(Feedback.query_id == q.id, Feedback.id != fid))
    verdict = "confirmed" if label == prediction else "corrected"
    messages = [f"feedback {fid} on query {query_id}: {verdict}"
                + ("" if verdict == "confirmed" else f" (predicted {prediction or 'nothing (abstained)'}, expert says {label})")]
    if region is not None:
        messages.append(f"expert region x {region[0]}-{region[2]}, y {region[1]}-{region[3]} kept with the verdict")
    if previous:
        messages.append(f"query {query_id} now has {previous + 1} feedback rows; the latest counts, none is overwritten")
    if new_class:
        messages.append(f"{label!r} is a new class: no active case had this label"
                        + (" until now" if retain else "; retain cases with it (--retain) so queries can predict it"))
        lookalike = confusable_with(label, classes)
        if lookalike is not None:
            messages.append(f"warning: {lookalike_note(label, lookalike)}")
    result = {"feedback_id": fid, "query_id": int(query_id), "label": label, "prediction": prediction,
              "verdict": verdict, "new_class": new_class, "retained_case_id": None, "existing_case_id": None,
              "members": 0, "messages": messages, "region": region}
    if retain:
        try:
            result.update(_retain(cb, judged, image))
        except RetainError:
            raise
        except CbrError as e:
            raise RetainError(fid, int(query_id), str(e)) from None
        messages.extend(result.pop("notes", []))
    return result


_REGION_HOW = "give --region x0,y0,x1,y1 in image pixels with x0 < x1 and y0 < y1, e.g. --region 40,32,120,96"


def parse_region(value) -> list[int] | None:
    """``"x0,y0,x1,y1"`` (or 4 numbers) -> [x0, y0, x1, y1] of non-negative whole pixels; None stays None.

    Raises CbrError naming ``--region`` for anything else.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        nums = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise CbrError(f"--region {value!r}: not four numbers; {_REGION_HOW}") from None
    if len(nums) != 4 or not all(math.isfinite(n) and n == int(n) and n >= 0 for n in nums):
        raise CbrError(f"--region {value!r}: four whole, non-negative pixel numbers; {_REGION_HOW}")
    x0, y0, x1, y1 = (int(n) for n in nums)
    if not (x0 < x1 and y0 < y1):
        raise CbrError(f"--region {value!r}: an empty box; {_REGION_HOW}")
    return [x0, y0, x1, y1]


def _check_image_file(image) -> None:
    """Refuse a ``--image`` that is not a regular file within the size cap, recording nothing."""
    try:
        with open_regular(Path(Source.parse(image).path).expanduser()):  # "cine.dcm#frame=12": the file
            pass
    except ImageError as e:
        raise CbrError(f"--image {e}; nothing was recorded") from None


def _read_query_image(j: _Judged, image, window: str = "auto"):
    src = Source.parse(moved_to(j.path, image)).resolved()  # the recorded frame, slice or .npz index
    path = src.locator
    try:
        img, sha, _ = read_source(src, window=window)
    except ImageError as e:
        hint = "give the right file with --image" if image is not None else \
            "if it moved, give it with --image PATH (its sha256 must match)"
        raise j.refuse(f"query image {e.path} cannot be read ({e.reason}); {hint}") from None
    if sha != j.sha256:
        which = f"--image {path}" if image is not None else f"the file now at the recorded path {path}"
        raise j.refuse(f"{which} has sha256 {sha[:12]}..., but query {j.query_id} was made on an image with "
                       f"sha256 {j.sha256[:12]}...; give the original file with --image")
    return img, sha, path


def _case_map_method(s) -> str:
    """Retained cases get their maps with the method the case base's other case maps used."""
    return s.scalar(select(Explanation.method).where(Explanation.role == "case").order_by(Explanation.id.desc()).limit(1)) or "gradcam"


def _retain(cb, j: _Judged, image) -> dict:
    img, sha, path = _read_query_image(j, image, query_window(cb, j.query_id))
    notes = []
    with writer_lock(cb):
        with cb.read() as s:
            existing = s.scalar(select(Case).where(Case.sha256 == sha))
            method = _case_map_method(s)
        if existing is not None:
            if existing.removed_at is not None:
                raise j.refuse(f"this image is case {existing.id}, removed on {iso(existing.removed_at)}"
                               f" ({existing.removed_reason or 'no reason given'}); removed cases are not re-added")
            if existing.label != j.label:
                raise j.refuse(f"label conflict: this image already is case {existing.id} labelled "
                               f"{existing.label!r}, not {j.label!r}; remove it (`cbr remove {existing.id}`) and "
                               "retain again to relabel it")
            return {"existing_case_id": existing.id, "notes": [
                f"the image already is case {existing.id} (label {existing.label!r}); not added twice"]}
        members = load_members(cb, persist_repair=True)
        notes.extend(n for m in members for n in m.notes)
        for m in members:
            m.embedder.eval()
        tensors = [m.embedder.preprocess(img).unsqueeze(0) for m in members]
        record = Record(path=str(path), label=j.label, group=j.patient, sha256=sha,
                        metadata={"retained_from_query": j.query_id}, shown=j.shown if image is None else None)
        writer = CaseWriter(cb, members, explain=method)
        (case_id,) = writer.add([record], tensors, origin="retain", query_id=j.query_id, feedback_id=j.feedback_id)
        writer.maybe_save(force=True)
        # A new case changes the votes' and typicality's calibration: recompute it now.
        recalibrated = recalibrate(cb, [(m.model_id, m.index) for m in members])
        recalibrated += index_findings(cb, members)  # the reviewer's box becomes a finding of the new case
    notes.append(f"retained as case {case_id} (label {j.label!r}), indexed in {len(members)} member(s) with its "
                 f"{method} map")
    notes.extend(recalibrated)
    return {"retained_case_id": case_id, "members": len(members), "notes": notes}
