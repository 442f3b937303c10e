"""Dataset readers: class folders, a CSV manifest or an ``.npz`` archive -> :class:`Record`s and
:class:`Problem`s.

Readers never decode pixels (that happens once, at embedding time, through
:func:`cbr.data.sources.read_source`). They check that each file exists, is readable and not
empty, hash it, split DICOM files into frames and NIfTI volumes into slices (see
:mod:`cbr.data.identity`), and report everything they skip as a :class:`Problem` with a reason,
so that one bad file never stops an import.

The pieces: :mod:`cbr.data.records` (what a reader produces), :mod:`cbr.data.folders`,
:mod:`cbr.data.manifest` and :mod:`cbr.data.npz` (the readers), :mod:`cbr.data.identity` (hashing,
frames and slices, duplicates). Problems are listed in discovery order (sorted walk or manifest
row order), then the duplicate and conflict reports in path order.
"""

from __future__ import annotations

import os

from cbr.data.folders import scan_folder
from cbr.data.identity import hash_and_dedupe
from cbr.data.manifest import scan_manifest
from cbr.data.npz import scan_npz
from cbr.data.records import (
    DUPLICATE,
    IMAGE_EXTENSIONS,
    ManifestSpec,
    Problem,
    Record,
    Scan,
    printable_path,
    valid_utf8,
)
from cbr.data.sources import SourceSpec
from cbr.data.text import check_candidates
from cbr.errors import DatasetError

__all__ = ["ManifestSpec", "IMAGE_EXTENSIONS", "Record", "Problem", "DUPLICATE", "Scan", "read_dataset",
           "printable_path", "valid_utf8"]

_KINDS = "a folder of class folders (DATA/<label>/<image>), a .csv manifest or an .npz archive"


def read_dataset(source, manifest: ManifestSpec | None = None, *, progress: bool = False, sources=None) -> Scan:
    """Read a class-folder dataset, a CSV manifest or a MedMNIST-style ``.npz`` archive.

    Args:
        source: a folder laid out as ``DATA/<label>/**/<image>``, a ``.csv`` manifest, or an
            ``.npz`` with ``{split}_images`` and ``{split}_labels`` arrays.
        manifest: the manifest's columns and image folders (default ``ManifestSpec()``).
        progress: show a progress bar while hashing (only on a terminal).
        sources: a :class:`cbr.data.sources.SourceSpec`: which DICOM frames, NIfTI slices and
            ``.npz`` split become records, and the patient-id key (default ``SourceSpec()``).

    Raises:
        DatasetError: the source cannot be read at all (missing, wrong kind, missing column).

    Example:
        >>> scan = read_dataset("data/ham10000.csv", ManifestSpec(path_column="image_id",
        ...                     label_column="dx", images=("data/images",)))
        >>> len(scan.records), [p.reason for p in scan.problems][:3]
        >>> scan = read_dataset("pneumoniamnist.npz", sources=SourceSpec(split="test"))
    """
    m = manifest or ManifestSpec()
    spec = sources or SourceSpec()
    given = os.fspath(source)
    src = os.path.abspath(given)
    top = src
    if os.path.isdir(src):
        kind = "folder"
        candidates, problems = scan_folder(src)
    elif os.path.isfile(src) and src.lower().endswith(".csv"):
        kind = "manifest"
        top = os.path.dirname(src)
        candidates, problems = scan_manifest(
            src, given, m.path_column, m.label_column, m.group_column, _roots(m.images)
        )
    elif os.path.isfile(src) and src.lower().endswith(".npz"):
        kind = "npz"
        candidates, problems = scan_npz(src, printable_path(given), spec.split, spec.classes)
    elif not os.path.exists(src):
        raise DatasetError(f"{printable_path(given)}: no such folder or file; give {_KINDS}")
    else:
        raise DatasetError(f"{printable_path(given)}: not a folder, a .csv manifest or an .npz archive; give {_KINDS}")

    candidates, refused = check_candidates(candidates)  # NFC; no control characters in labels or ids
    problems = problems + refused
    records, more = hash_and_dedupe(candidates, problems, progress, spec, top)
    return Scan(source=src, kind=kind, records=records, problems=problems + more)


def _roots(images) -> list[str]:
    if isinstance(images, (str, bytes, os.PathLike)):
        images = [images]
    roots = []
    for root in images:
        r = os.path.abspath(os.fspath(root))
        if not os.path.isdir(r):
            raise DatasetError(f"{printable_path(root)}: images folder not found; check --images")
        roots.append(r)
    return roots
