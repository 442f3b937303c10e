"""The class-folder reader: ``DATA/<label>/**/<file>`` -> candidates and problems.

Hidden files and folders (dot names) and OS clutter (``Thumbs.db``, ``desktop.ini``) are skipped
silently; names that are not valid UTF-8 are reported. Symbolic links are followed; a link back
into a folder being scanned is a reported loop, and a folder reached a second time through
another link is reported and not scanned again. Every other file is a candidate, whatever its
extension (DICOM archives often have none): its content decides later. The top folder is resolved
(as a query's path is), so a data set given through a link is recorded under its real folder, the
one its images are queried from; links inside it keep their names, as the scan reports them.
"""

from __future__ import annotations

import os

from cbr.data.records import CLUTTER, Candidate, Problem, looks_like_image_name, printable_path, valid_utf8
from cbr.errors import DatasetError

__all__ = ["scan_folder"]


def scan_folder(top: str) -> tuple[list[Candidate], list[Problem]]:
    candidates: list[Candidate] = []
    problems: list[Problem] = []
    top = os.path.realpath(top)  # DATA given through a link: its cases under the folder queries resolve to
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
            if looks_like_image_name(name):
                problems.append(Problem(entry.path, "is a directory, not an image"))
                continue
            real = os.path.realpath(entry.path)
            if real in visited:
                problems.append(Problem(entry.path, _seen_reason(real, (top_real,))))
                continue
            visited.add(real)
            _walk_class(entry.path, name, (top_real, real), visited, candidates, problems)
        elif name.lower() not in CLUTTER:
            problems.append(Problem(entry.path, _stray_reason(name)))
    return candidates, problems


def _stray_reason(name: str) -> str:
    """A file beside the class folders: a note (README, SOURCE.txt) is ignored; an image is misplaced.
    A name without an extension may be a DICOM file, so it counts as an image."""
    if "." in name and not looks_like_image_name(name):
        return "ignored: a file beside the class folders that is not named like an image (a note, a licence)"
    return "an image outside the class folders; move it into the folder of its label"


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
            if name.startswith(".") or name.lower() in CLUTTER:
                continue
            if not valid_utf8(entry.path):
                problems.append(
                    Problem(printable_path(entry.path), "file name is not valid UTF-8; rename it")
                )
                continue
            if not _is_dir(entry):
                candidates.append(Candidate(entry.path, label, None, {}, None, len(candidates)))
                continue
            if looks_like_image_name(name):
                problems.append(Problem(entry.path, "is a directory, not an image"))
                continue
            real = os.path.realpath(entry.path)
            if real in visited:
                problems.append(Problem(entry.path, _seen_reason(real, chain)))
                continue
            visited.add(real)
            subfolders.append((entry.path, chain + (real,)))
        stack.extend(reversed(subfolders))
