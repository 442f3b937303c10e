"""Dataset readers: class folders or a CSV manifest -> :class:`Record`s and :class:`Problem`s.

Readers never decode pixels (that happens once, at embedding time, through
:func:`cbr.data.image.read_image`). They check that each file exists, is readable and not empty,
hash it, and report everything they skip as a :class:`Problem` with a reason, so that one bad
file never stops an import.

Decisions:

* Hidden files and folders (dot names) and OS clutter (``Thumbs.db``, ``desktop.ini``) are
  skipped silently.
* Names that are not valid UTF-8 are skipped: the case base stores paths as text.
* Symbolic links are followed; a link back into a folder being scanned is a reported loop, and
  a folder reached a second time through another link is reported and not scanned again.
* Manifest paths are tried against each ``images`` root in order, then the CSV's folder. A path
  without its extension (HAM10000's ``image_id``) also matches ``<path>.<ext>`` for the usual
  image extensions, in any letter case.
* A missing mask is a warning, not a reason to drop the image: the record is kept without the
  ``mask`` key and a :class:`Problem` with ``skipped=False`` says so.
* Duplicates (same SHA-256): with the same label the first by path is kept; with different
  labels every copy is dropped, since we cannot tell which label is right.
* Problems are listed in discovery order (sorted walk or manifest row order), then the
  duplicate and conflict reports in path order.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field

from cbr.errors import DatasetError, ImageError
from cbr.data.image import sha256_file

__all__ = ["ManifestSpec", "IMAGE_EXTENSIONS", "Record", "Problem", "Scan", "read_dataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_CLUTTER = frozenset({"thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Record:
    """One usable image."""

    path: str  # absolute path
    label: str
    group: str | None  # patient / group id, None when the source has no groups
    metadata: dict  # JSON-serialisable: manifest columns as strings; "mask" is an absolute path
    sha256: str


@dataclass(frozen=True)
class Problem:
    """A file the reader skipped (or, with ``skipped=False``, used with a warning)."""

    path: str
    reason: str
    skipped: bool = True


@dataclass
class Scan:
    """What a reader found."""

    source: str  # absolute path of the folder or CSV
    kind: str  # "folder" | "manifest"
    records: list[Record]  # usable, de-duplicated, sorted by path
    problems: list[Problem] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """The distinct labels of the records, sorted."""
        return sorted({r.label for r in self.records})


@dataclass
class _Candidate:
    path: str
    label: str
    group: str | None
    metadata: dict
    row: int | None  # manifest row (the header is row 1), None for folders
    order: int

    @property
    def at(self) -> str:
        return f"row {self.row}: " if self.row is not None else ""


def printable_path(path) -> str:
    """A printable path, even when the name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so that an error stays on one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def valid_utf8(path: str) -> bool:
    """Whether a name can be stored as text (os functions give undecodable bytes as surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os functions return undecodable bytes as lone surrogates
        return False
    return True


def _looks_like_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _file_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as an image file, or None when it can (pixels unchecked)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read file ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not an image"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"  # FIFOs and devices would block or never end
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


@dataclass(frozen=True)
class ManifestSpec:
    """How to read a CSV manifest (ignored for class folders)."""

    path_column: str = "path"  # the column holding image paths
    label_column: str = "label"  # the column holding labels
    group_column: str | None = None  # patient/group ids; default ``patient_id`` when present
    images: tuple[str, ...] = ()  # folders manifest paths are relative to, before the CSV's own

    def to_dict(self) -> dict:
        """JSON-ready, as stored with a dataset row."""
        return {"path_column": self.path_column, "label_column": self.label_column,
                "group_column": self.group_column, "images": [str(i) for i in self.images]}


def read_dataset(source, manifest: ManifestSpec | None = None, *, progress: bool = False) -> Scan:
    """Read a class-folder dataset or a CSV manifest.

    Args:
        source: a folder laid out as ``DATA/<label>/**/<image>``, or a ``.csv`` manifest.
        manifest: the manifest's columns and image folders (default ``ManifestSpec()``).
        progress: show a progress bar while hashing (only on a terminal).

    Raises:
        DatasetError: the source cannot be read at all (missing, wrong kind, missing column).

    Example:
        >>> scan = read_dataset("data/ham10000.csv", ManifestSpec(path_column="image_id",
        ...                     label_column="dx", images=("data/images",)))
        >>> len(scan.records), [p.reason for p in scan.problems][:3]
    """
    m = manifest or ManifestSpec()
    given = os.fspath(source)
    src = os.path.abspath(given)
    if os.path.isdir(src):
        kind = "folder"
        candidates, problems = _scan_folder(src)
    elif os.path.isfile(src) and src.lower().endswith(".csv"):
        kind = "manifest"
        candidates, problems = _scan_manifest(
            src, given, m.path_column, m.label_column, m.group_column, _roots(m.images)
        )
    elif not os.path.exists(src):
        raise DatasetError(
            f"{printable_path(given)}: no such folder or file; give a folder of class folders "
            "(DATA/<label>/<image>) or a .csv manifest"
        )
    else:
        raise DatasetError(
            f"{printable_path(given)}: not a folder or a .csv manifest; give a folder of class folders "
            "(DATA/<label>/<image>) or a .csv manifest"
        )
    records, more = _hash_and_dedupe(candidates, problems, progress)
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


# -- class folders ---------------------------------------------------------------------------


def _scan_folder(top: str) -> tuple[list[_Candidate], list[Problem]]:
    candidates: list[_Candidate] = []
    problems: list[Problem] = []
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except PermissionError:
        raise DatasetError(f"{printable_path(top)}: permission denied; cannot list the folder") from None
    top_real = os.path.realpath(top)
    visited = {top_real}
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        if not valid_utf8(name):
            problems.append(
                Problem(printable_path(entry.path), "folder or file name is not valid UTF-8; rename it")
            )
            continue
        if _is_dir(entry):
            if _looks_like_image_name(name):
                problems.append(Problem(entry.path, "is a directory, not an image"))
                continue
            real = os.path.realpath(entry.path)
            if real in visited:
                problems.append(Problem(entry.path, _seen_reason(real, (top_real,))))
                continue
            visited.add(real)
            _walk_class(entry.path, name, (top_real, real), visited, candidates, problems)
        elif name.lower() not in _CLUTTER:
            problems.append(
                Problem(entry.path, "not in a class folder; move it into DATA/<label>/")
            )
    return candidates, problems


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links
    except OSError:  # a link loop: reported when the "file" is checked
        return False


def _seen_reason(real: str, chain: tuple[str, ...]) -> str:
    if real in chain:
        return f"symbolic link loop (points back to {printable_path(real)}); not followed"
    return f"folder already scanned through another link ({printable_path(real)}); not scanned again"


def _walk_class(class_dir, label, chain, visited, candidates, problems) -> None:
    """Depth-first, sorted walk of one class folder, following links but never looping."""
    stack = [(class_dir, chain)]
    while stack:
        folder, chain = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except PermissionError:
            problems.append(Problem(printable_path(folder), "permission denied (folder)"))
            continue
        except OSError as e:
            problems.append(Problem(printable_path(folder), f"cannot read folder ({e.strerror or e})"))
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower() in _CLUTTER:
                continue
            if not valid_utf8(entry.path):
                problems.append(
                    Problem(printable_path(entry.path), "file name is not valid UTF-8; rename it")
                )
                continue
            if not _is_dir(entry):
                candidates.append(_Candidate(entry.path, label, None, {}, None, len(candidates)))
                continue
            if _looks_like_image_name(name):
                problems.append(Problem(entry.path, "is a directory, not an image"))
                continue
            real = os.path.realpath(entry.path)
            if real in visited:
                problems.append(Problem(entry.path, _seen_reason(real, chain)))
                continue
            visited.add(real)
            subfolders.append((entry.path, chain + (real,)))
        stack.extend(reversed(subfolders))


# -- CSV manifests ---------------------------------------------------------------------------


def _scan_manifest(csv_path, given, path_column, label_column, group_column, roots):
    shown = printable_path(given)
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except PermissionError:
        raise DatasetError(f"{shown}: permission denied") from None
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{shown} is not UTF-8 text (bad byte at offset {e.start}); save it as 'CSV UTF-8'"
        ) from None
    except OSError as e:
        raise DatasetError(f"{shown}: cannot read ({e.strerror or e})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DatasetError(f"{shown}: malformed CSV at line {reader.line_num}: {e}") from None

    start = next((i for i, row in enumerate(rows) if any(c.strip() for c in row)), None)
    if start is None:
        raise DatasetError(
            f"{shown} is empty; it needs a header row with columns "
            f"{path_column!r} and {label_column!r}"
        )
    header = [h.strip() or f"column {j + 1}" for j, h in enumerate(rows[start])]
    for name in header:
        if header.count(name) > 1:
            raise DatasetError(
                f"{shown} has the column {_printable(name)!r} more than once; rename one"
            )
    columns = ", ".join(_printable(h) for h in header)
    for col, option in ((path_column, "--path-column"), (label_column, "--label-column")):
        if col not in header:
            raise DatasetError(
                f"{shown} has no column {col!r} (columns: {columns}); choose it with {option}"
            )
    if group_column is None:
        group_column = "patient_id" if "patient_id" in header else None
    elif group_column not in header:
        raise DatasetError(
            f"{shown} has no column {group_column!r} (columns: {columns}); "
            "choose it with --group-column"
        )
    pi, li = header.index(path_column), header.index(label_column)
    gi = header.index(group_column) if group_column is not None else None
    meta_cols = [(j, h) for j, h in enumerate(header) if j not in (pi, li, gi)]

    bases = roots + [os.path.dirname(csv_path)]
    bases = list(dict.fromkeys(bases))  # the CSV's folder may also be an images root
    looked_in = ", ".join(printable_path(b) for b in bases)
    listings: dict[str, dict[str, list[str]]] = {}
    candidates: list[_Candidate] = []
    problems: list[Problem] = []
    n = len(header)
    for index in range(start + 1, len(rows)):
        row, rowno = rows[index], index + 1  # spreadsheet numbering: the header is row 1
        if not any(c.strip() for c in row):
            continue
        if len(row) > n and any(c.strip() for c in row[n:]):
            problems.append(
                Problem(
                    shown,
                    f"row {rowno}: has {len(row)} cells but the header has {n}; "
                    "quote cells that contain commas",
                )
            )
            continue
        row = row + [""] * (n - len(row))
        cell = row[pi].strip()
        if not cell:
            problems.append(Problem(shown, f"row {rowno}: empty {path_column!r} cell"))
            continue
        path = _resolve(cell, bases, listings)
        if path is None:
            problems.append(Problem(cell, f"row {rowno}: file not found (looked in: {looked_in})"))
            continue
        if not valid_utf8(path):
            reason = f"row {rowno}: file name is not valid UTF-8; rename it"
            problems.append(Problem(printable_path(path), reason))
            continue
        label = row[li].strip()
        if not label:
            problems.append(Problem(path, f"row {rowno}: blank label in column {label_column!r}"))
            continue
        group = (row[gi].strip() or None) if gi is not None else None
        metadata = {h: row[j] for j, h in meta_cols if row[j] != ""}
        if "mask" in metadata:
            mask = _resolve(metadata["mask"].strip(), bases, listings)
            if mask is not None and os.path.isfile(mask) and valid_utf8(mask):
                metadata["mask"] = mask
            else:
                problems.append(
                    Problem(
                        path,
                        f"row {rowno}: mask {metadata.pop('mask')!r} not found "
                        f"(looked in: {looked_in}); the image is kept without a mask",
                        skipped=False,
                    )
                )
        candidates.append(_Candidate(path, label, group, metadata, rowno, len(candidates)))
    return candidates, problems


def _resolve(cell: str, bases: list[str], listings: dict) -> str | None:
    """The absolute path a manifest cell names, or None; see the module docstring for the rules."""
    variants = [cell]
    if "\\" in cell and os.sep == "/":  # a manifest written on Windows
        variants.append(cell.replace("\\", "/"))
    for v in variants:
        for c in [v] if os.path.isabs(v) else [os.path.join(b, v) for b in bases]:
            if os.path.lexists(c):
                return os.path.abspath(c)
            hit = _with_extension(c, listings)
            if hit is not None:
                return hit
    return None


def _with_extension(path: str, listings: dict) -> str | None:
    folder, stem = os.path.split(path)
    if not stem:
        return None
    if folder not in listings:  # list each folder once: HAM10000 has 10,000 files in one
        by_lower: dict[str, list[str]] = defaultdict(list)
        try:
            for name in sorted(os.listdir(folder)):
                by_lower[name.lower()].append(name)
        except OSError:
            pass
        listings[folder] = by_lower
    for ext in IMAGE_EXTENSIONS:
        for name in listings[folder].get((stem + ext).lower(), ()):
            if name.startswith(stem):  # the extension's case may differ, the name's may not
                return os.path.abspath(os.path.join(folder, name))
    return None


# -- hashing and duplicates ------------------------------------------------------------------


def _hash_and_dedupe(candidates, problems, progress):
    from tqdm import tqdm  # imported here: cbr's CLI start-up stays fast

    hashed: list[tuple[_Candidate, str]] = []
    bar = tqdm(candidates, desc="hashing", unit="file", disable=None if progress else True)
    for c in bar:
        reason = _file_problem(c.path)
        if reason is None:
            try:
                hashed.append((c, sha256_file(c.path)))
                continue
            except ImageError as e:
                reason = e.reason
        problems.append(Problem(c.path, c.at + reason))

    hashed.sort(key=lambda t: (t[0].path, t[0].order))
    by_sha: dict[str, list[_Candidate]] = defaultdict(list)
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
                more.append(
                    Problem(
                        c.path,
                        f"{c.at}label conflict: same image as {other.path}{where} "
                        f"labelled {c.label!r} vs {other.label!r}",
                    )
                )
            continue
        first = copies[0]
        kept.append(Record(first.path, first.label, first.group, first.metadata, digest))
        for c in copies[1:]:
            if c.path == first.path:
                reason = f"{c.at}listed again; duplicate of {first.at.rstrip(': ')}"
            else:
                where = f" ({first.at.rstrip(': ')})" if first.row is not None else ""
                reason = f"{c.at}duplicate of {first.path}{where}"
            more.append(Problem(c.path, reason))
    kept.sort(key=lambda r: r.path)
    more.sort(key=lambda p: p.path)
    return kept, more
