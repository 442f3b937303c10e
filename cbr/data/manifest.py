"""The CSV-manifest reader: rows ``path,label[,patient_id][,metadata...]`` -> candidates and problems.

Manifest paths are tried against each ``images`` root in order, then the CSV's folder. A path
without its extension (HAM10000's ``image_id``) also matches ``<path>.<ext>`` for the usual image
extensions, in any letter case. A missing mask is a warning, not a reason to drop the image: the
record is kept without the ``mask`` key and a problem with ``skipped=False`` says so.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass

from cbr.data.records import IMAGE_EXTENSIONS, Candidate, Problem, printable_path, printable_text, valid_utf8
from cbr.errors import DatasetError

__all__ = ["scan_manifest", "MAX_CELL_CHARS"]

MAX_CELL_CHARS = 131072  # a longer cell is a broken or hostile row (Python's csv default field limit)


@dataclass(frozen=True)
class _Columns:
    """Where a manifest's fields are: the header, and the index of each column cbr reads."""

    header: list[str]
    path: int
    label: int
    group: int | None
    metadata: list[tuple[int, str]]


def scan_manifest(csv_path, given, path_column, label_column, group_column, roots):
    """Read a CSV manifest into candidates and problems (see the module docstring for the rules).

    Args:
        csv_path: the manifest file.
        given: the path as the user gave it (for messages).
        path_column, label_column: the columns of the image path and the label.
        group_column: the patient column; None = ``patient_id`` if there is one.
        roots: folders to look for the images in, before the CSV's own folder.
    """
    shown = printable_path(given)
    rows = _read_rows(csv_path, shown)
    start = next((i for i, row in enumerate(rows) if any(c.strip() for c in row)), None)
    if start is None:
        raise DatasetError(
            f"{shown} is empty; it needs a header row with columns "
            f"{path_column!r} and {label_column!r}"
        )
    columns = _columns(rows[start], shown, path_column, label_column, group_column)
    bases = roots + [os.path.dirname(csv_path)]
    bases = list(dict.fromkeys(bases))  # the CSV's folder may also be an images root
    listings: dict[str, dict[str, list[str]]] = {}
    candidates: list[Candidate] = []
    problems: list[Problem] = []
    for index in range(start + 1, len(rows)):
        row, rowno = rows[index], index + 1  # spreadsheet numbering: the header is row 1
        if not any(c.strip() for c in row):
            continue
        found = _read_row(row, rowno, columns, shown, bases, listings, problems)
        if found is not None:
            candidates.append(Candidate(*found, rowno, len(candidates)))
    return candidates, problems


def _read_rows(csv_path, shown: str) -> list[list[str]]:
    """The manifest's rows as lists of cells; an unreadable or malformed file raises DatasetError."""
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
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # one huge cell skips its row (below), not the manifest
    try:
        return list(reader)
    except csv.Error as e:
        raise DatasetError(f"{shown}: malformed CSV at line {reader.line_num}: {e}") from None
    finally:
        csv.field_size_limit(limit)


def _columns(first: list[str], shown: str, path_column, label_column, group_column) -> _Columns:
    """The header row's columns; a missing or repeated column raises DatasetError."""
    header = [h.strip() or f"column {j + 1}" for j, h in enumerate(first)]
    for name in header:
        if header.count(name) > 1:
            raise DatasetError(
                f"{shown} has the column {printable_text(name)!r} more than once; rename one"
            )
    columns = ", ".join(printable_text(h) for h in header)
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
    return _Columns(header, pi, li, gi, [(j, h) for j, h in enumerate(header) if j not in (pi, li, gi)])


def _read_row(row, rowno: int, columns: _Columns, shown: str, bases, listings, problems):
    """One data row -> (path, label, group, metadata), or None with its problem appended."""
    header, n = columns.header, len(columns.header)
    looked_in = ", ".join(printable_path(b) for b in bases)
    big = max(row, key=len)
    if len(big) > MAX_CELL_CHARS:
        where = f"column {header[row.index(big)]!r}" if row.index(big) < len(header) else "a cell"
        problems.append(Problem(shown, f"row {rowno}: {where} holds {len(big)} characters (limit "
                                       f"{MAX_CELL_CHARS}); row skipped"))
        return None
    if len(row) > n and any(c.strip() for c in row[n:]):
        problems.append(
            Problem(
                shown,
                f"row {rowno}: has {len(row)} cells but the header has {n}; "
                "quote cells that contain commas",
            )
        )
        return None
    row = row + [""] * (n - len(row))
    cell = row[columns.path].strip()
    if not cell:
        problems.append(Problem(shown, f"row {rowno}: empty {header[columns.path]!r} cell"))
        return None
    path = _resolve(cell, bases, listings)
    if path is None:
        problems.append(Problem(cell, f"row {rowno}: file not found (looked in: {looked_in})"))
        return None
    if not valid_utf8(path):
        reason = f"row {rowno}: file name is not valid UTF-8; rename it"
        problems.append(Problem(printable_path(path), reason))
        return None
    label = row[columns.label].strip()
    if not label:
        problems.append(Problem(path, f"row {rowno}: blank label in column {header[columns.label]!r}"))
        return None
    group = (row[columns.group].strip() or None) if columns.group is not None else None
    metadata = {h: row[j] for j, h in columns.metadata if row[j] != ""}
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
    return path, label, group, metadata


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
