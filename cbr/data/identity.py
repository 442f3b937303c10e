"""What each candidate file is: its images (one, or a DICOM's frames, or a NIfTI's slices), their
sha256 identities and patient groups, and which of them are duplicates.

Decisions:

* The content decides the format, never the extension: a file with the DICOM marker is DICOM;
  ``.nii``/``.nii.gz`` names are NIfTI; everything else is left to the image decoder.
* A DICOM file is parsed once here (tags only leave through :func:`cbr.data.dicom.inspect_dicom`),
  so a DICOMDIR, an SR, a file without pixels, a missing or unsupported transfer syntax and
  truncated pixel data are listed as problems before anything is embedded.
* Patient groups: the manifest's patient column when it has one, else DICOM PatientID, else (for
  NIfTI) the volume file's path inside the dataset. With ``--pseudonymise KEY`` every patient id
  (DICOM or manifest) becomes HMAC-SHA256(KEY, id): stable across runs, so grouping still works,
  and the id itself is never stored (:mod:`cbr.data.pseudonyms`).
* With ``--pseudonymise`` a DICOM image is also *shown* under a neutral locator,
  ``dicom:<sha256 of its SOPInstanceUID>[#frame=N]``, never its file name (names and birth dates
  are often in it: ``Doe^John_19450317.dcm``); the file itself is kept only to re-read pixels.
* A DICOM with ``BurnedInAnnotation=YES`` (text drawn into the pixels) is skipped unless
  ``--allow-burned-in``.
* Duplicates (same sha256): with the same label the first by path is kept; with different labels
  every copy is dropped, since we cannot tell which label is right. Distinct files with the same
  DICOM SOPInstanceUID (and frame) are the same instance stored twice: the first is kept.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict

from tqdm import tqdm

from cbr.data import dicom, nifti
from cbr.data.guard import read_regular
from cbr.data.pseudonyms import key_id, neutral_file_locator, neutral_locator, pseudonym, stored_patient_id
from cbr.data.image import sha256_file
from cbr.data.records import DUPLICATE, Candidate, Problem, Record, file_problem
from cbr.data.sources import derived_sha256, file_head, pick_indices, Source, SourceSpec
from cbr.errors import ImageError

# pseudonym, stored_patient_id and key_id are cbr.data.pseudonyms', named here too for older callers
__all__ = ["hash_and_dedupe", "pseudonym", "stored_patient_id", "key_id", "natural_key"]


def natural_key(path: str):
    """Sort key that puts frame 2 before frame 10 (numbers compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _dicom_items(c: Candidate, spec, name: str):
    data = read_regular(c.path, name)
    file_sha = hashlib.sha256(data).hexdigest()
    info = dicom.inspect_dicom(dicom.parse_dicom(data, name), name)
    if info.burned_in and not spec.allow_burned_in:
        raise ImageError(name, dicom.BURNED_IN)
    group = stored_patient_id(c.group if c.group is not None else info.patient_id, spec.pseudonymise)
    meta = {**c.metadata, "format": "dicom", **info.metadata}
    uid = info.metadata.get("SOPInstanceUID")
    if info.frames == 1:
        shown = neutral_locator(uid, file_sha) if spec.pseudonymise else None
        return [(Candidate(c.path, c.label, group, meta, c.row, c.order, shown=shown), file_sha)]
    frames = range(info.frames) if spec.frames == "all" else pick_indices(info.frames, "middle")
    items = []
    for i in frames:
        src = Source(c.path, frame=i + 1)
        m = dict(meta, frame=i + 1, frames=info.frames)
        shown = neutral_locator(uid, file_sha, i + 1) if spec.pseudonymise else None
        items.append((Candidate(src.locator, c.label, group, m, c.row, c.order, shown=shown),
                      derived_sha256(file_sha, src)))
    return items


def _nifti_items(c: Candidate, spec, top: str, name: str):
    data = read_regular(c.path, name)
    file_sha = hashlib.sha256(data).hexdigest()
    shape, volumes = nifti.volume_shape(data, name)
    if spec.volume >= volumes:
        raise ImageError(name, f"volume {spec.volume} does not exist (the file has {volumes}); "
                               f"choose --volume 0..{volumes - 1}")
    n = shape[nifti.AXES[spec.axis]]
    # the volume is the patient unless a manifest says otherwise (its path hashed like any patient id)
    group = stored_patient_id(c.group if c.group is not None else os.path.relpath(c.path, top), spec.pseudonymise)  # the volume is the patient unless a manifest says otherwise
    shown_file = neutral_file_locator("nifti", file_sha) if spec.pseudonymise else nifti.display_name(c.path)
    meta = {**c.metadata, "format": "nifti", "volume_file": shown_file, "axis": spec.axis, "slices": n}
    if volumes > 1:
        meta.update(volume=spec.volume, volumes=volumes)
    items = []
    for i in pick_indices(n, spec.slices):
        src = Source(c.path, axis=spec.axis, slice=i, volume=spec.volume if volumes > 1 else None)
        shown = neutral_file_locator("nifti", file_sha, src.fragment) if spec.pseudonymise else None
        items.append((Candidate(src.locator, c.label, group, dict(meta, slice=i), c.row, c.order, shown=shown),
                      derived_sha256(file_sha, src)))
    return items


def _items(c: Candidate, spec, top: str):
    """[(candidate, sha256)] for one found file; raises ImageError with the reason to skip it."""
    if c.sha256 is not None:
        return [(c, c.sha256)]
    reason = file_problem(c.path)
    if reason is not None:
        raise ImageError(c.path, reason)
    head = file_head(c.path, c.path)
    try:
        if dicom.is_dicom(head):
            return _dicom_items(c, spec, c.path)
        if nifti.is_nifti_name(c.path):
            return _nifti_items(c, spec, top, c.path)
    except OSError as e:
        raise ImageError(c.path, f"cannot read file ({e.strerror or e})") from None
    if c.path.lower().endswith(".npz") and head.startswith(b"PK"):
        raise ImageError(c.path, "an .npz archive is indexed on its own: cbr index FILE.npz [--split ...]")
    sha = sha256_file(c.path)
    if spec is not None and spec.pseudonymise:  # the file's name and folders are never shown
        c = Candidate(c.path, c.label, stored_patient_id(c.group, spec.pseudonymise), c.metadata, c.row, c.order,
                      shown=neutral_file_locator("image", sha))
    return [(c, sha)]


def hash_and_dedupe(candidates, problems, progress, spec=None, top: str = "") -> tuple[list[Record], list[Problem]]:
    """Hash every candidate (expanding DICOM frames and NIfTI slices), then drop duplicates.

    Problems met while hashing are appended to ``problems``; duplicate and conflict reports are
    returned, in path order, with the records (sorted by path, frames and slices in number order).
    """
    spec = spec or SourceSpec()
    hashed: list[tuple[Candidate, str]] = []
    bar = tqdm(candidates, desc="hashing", unit="file", disable=None if progress else True)
    for c in bar:
        try:
            hashed.extend(_items(c, spec, top))
        except ImageError as e:
            problems.append(Problem(c.path, c.at + e.reason))

    hashed.sort(key=lambda t: (natural_key(t[0].path), t[0].order))
    by_sha: dict[str, list[Candidate]] = defaultdict(list)
    for c, digest in hashed:
        by_sha[digest].append(c)
    kept: list[Record] = []
    more: list[Problem] = []
    for digest, copies in by_sha.items():
        labels = {c.label for c in copies}
        if len(labels) > 1:
            for c in copies:
                other = next(o for o in copies if o.label != c.label)
                where = f" ({other.at.rstrip(': ')})" if other.row is not None else ""
                more.append(Problem(c.path, f"{c.at}label conflict: same image as {other.path}{where} "
                                            f"labelled {c.label!r} vs {other.label!r}"))
            continue
        first = copies[0]
        # recorded under its real path, as a query of the same file is (a link inside the data folder
        # would otherwise show one image under two paths); problems keep the names the scan met
        kept.append(Record(Source.parse(first.path).resolved().locator, first.label, first.group, first.metadata,
                           digest, shown=first.shown))
        for c in copies[1:]:
            if c.path == first.path:
                reason = f"{c.at}listed again; duplicate of {first.at.rstrip(': ')}"
            else:
                where = f" ({first.at.rstrip(': ')})" if first.row is not None else ""
                reason = f"{c.at}duplicate of {first.path}{where}"
            more.append(Problem(c.path, reason, kind=DUPLICATE))
    kept.sort(key=lambda r: natural_key(r.path))
    kept, same_instance = _same_sop_instance(kept)
    more.extend(same_instance)
    more.sort(key=lambda p: natural_key(p.path))
    return kept, more


def _same_sop_instance(records: list[Record]) -> tuple[list[Record], list[Problem]]:
    """Keep the first of several files holding the same DICOM instance (SOPInstanceUID + frame)."""
    first: dict = {}
    kept, dups = [], []
    for r in records:
        uid = r.metadata.get("SOPInstanceUID") if r.metadata.get("format") == "dicom" else None
        if uid is None:
            kept.append(r)
            continue
        key = (uid, r.metadata.get("frame"))
        if key in first:
            dups.append(Problem(r.path, f"duplicate SOPInstanceUID {uid}: the same DICOM instance as "
                                        f"{first[key].path}", kind=DUPLICATE))
            continue
        first[key] = r
        kept.append(r)
    return kept, dups
