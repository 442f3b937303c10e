"""What dataset readers produce: :class:`Record`s (usable images) and :class:`Problem`s (skipped
files with a reason), gathered in a :class:`Scan`; plus the name checks every reader shares."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

__all__ = ["IMAGE_EXTENSIONS", "ManifestSpec", "Record", "Problem", "DUPLICATE", "Scan", "Candidate", "printable_path",
           "printable_text", "valid_utf8", "file_problem", "looks_like_image_name"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
CLUTTER = frozenset({"thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Record:
    """One usable image."""

    path: str  # absolute path
    label: str
    group: str | None  # patient / group id, None when the source has no groups
    metadata: dict  # JSON-serialisable: manifest columns as strings; "mask" is an absolute path
    sha256: str
    shown: str | None = None  # what is stored and shown instead of ``path`` (a neutral DICOM locator)


DUPLICATE = "duplicate"  # Problem.kind of a second copy of an image already kept


@dataclass(frozen=True)
class Problem:
    """A file the reader skipped (or, with ``skipped=False``, used with a warning)."""

    path: str
    reason: str
    skipped: bool = True
    kind: str = "unusable"  # or DUPLICATE: the same image (sha256) is kept under another path or row


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
class Candidate:
    """A file (or an image inside one) a reader found, before hashing and de-duplication."""

    path: str
    label: str
    group: str | None
    metadata: dict
    row: int | None  # manifest row (the header is row 1), None for folders
    order: int
    sha256: str | None = None  # known already (an array image); None: hashed from the file
    shown: str | None = None  # see Record.shown

    @property
    def at(self) -> str:
        return f"row {self.row}: " if self.row is not None else ""


def printable_path(path) -> str:
    """A printable path, even when the name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def printable_text(text: str) -> str:
    """``text`` with control characters escaped, so that an error stays on one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def valid_utf8(path: str) -> bool:
    """Whether a name can be stored as text (os functions give undecodable bytes as surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # os functions return undecodable bytes as lone surrogates
        return False
    return True


def looks_like_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def file_problem(path: str) -> str | None:
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
