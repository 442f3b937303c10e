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

from cbr.data.records import IMAGE_EXTENSIONS, Candidate, Problem, printable_path, printable_text, valid_utf8
from cbr.errors import DatasetError

__all__ = ["scan_manifest", "MAX_CELL_CHARS"]

MAX_CELL_CHARS = 131072  # a longer cell is a broken or hostile row (Python's csv default field limit)


def scan_manifest(csv_path, given, path_column, label_column, group_column, roots):
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
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # one huge cell skips its row (below), not the manifest
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DatasetError(f"{shown}: malformed CSV at line {reader.line_num}: {e}") from None
    finally:
        csv.field_size_limit(limit)

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
    meta_cols = [(j, h) for j, h in enumerate(header) if j not in (pi, li, gi)]

    bases = roots + [os.path.dirname(csv_path)]
    bases = list(dict.fromkeys(bases))  # the CSV's folder may also be an images root
    looked_in = ", ".join(printable_path(b) for b in bases)
    listings: dict[str, dict[str, list[str]]] = {}
    candidates: list[Candidate] = []
    problems: list[Problem] = []
    n = len(header)
    for index in range(start + 1, len(rows)):
        row, rowno = rows[index], index + 1  # spreadsheet numbering: the header is row 1
        if not any(c.strip() for c in row):
            continue
        big = max(row, key=len)
        if len(big) > MAX_CELL_CHARS:
            where = f"column {header[row.index(big)]!r}" if row.index(big) < len(header) else "a cell"
            problems.append(Problem(shown, f"row {rowno}: {where} holds {len(big)} characters (limit "
                                           f"{MAX_CELL_CHARS}); row skipped"))
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
        candidates.append(Candidate(path, label, group, metadata, rowno, len(candidates)))
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
