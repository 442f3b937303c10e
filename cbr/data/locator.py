"""Locators: one string naming one image inside a file (see :mod:`cbr.data.sources`).

``path``, ``path#frame=12``, ``path#axis=axial&slice=40``, ``path#volume=2&axis=axial&slice=5``,
``path#split=test&index=17``. Pure string handling: nothing here opens a file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import re
from dataclasses import dataclass, fields

from cbr.errors import CbrError

__all__ = ["Source", "SourceError", "AXIS_NAMES", "SPLITS", "derived_sha256", "pick_indices"]

AXIS_NAMES = ("axial", "coronal", "sagittal")  # NIfTI views (cbr.data.nifti.AXES maps them to array axes)
SPLITS = ("train", "val", "test")  # the splits of a MedMNIST .npz


class SourceError(CbrError):
    """A source option or a locator that cannot be used."""


_KEYS = ("volume", "axis", "slice", "frame", "split", "index")  # canonical order in a locator
_FRAGMENT = re.compile(r"^[a-z]+=[A-Za-z0-9_.-]+(&[a-z]+=[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True)
class Source:
    """One image inside a file. See the module docstring for the locator syntax."""

    path: str
    frame: int | None = None  # DICOM multi-frame: 1-based frame number
    axis: str | None = None  # NIfTI: sagittal | coronal | axial
    slice: int | None = None  # NIfTI: 0-based slice along ``axis``
    volume: int | None = None  # NIfTI 4D: 0-based 3D volume (None for a 3D file)
    split: str | None = None  # npz: train | val | test
    index: int | None = None  # npz: 0-based array index

    @property
    def fragment(self) -> str:
        """The ``key=value&...`` part of the locator ('' for a whole file)."""
        return "&".join(f"{k}={getattr(self, k)}" for k in _KEYS if getattr(self, k) is not None)

    @property
    def locator(self) -> str:
        f = self.fragment
        return f"{self.path}#{f}" if f else self.path

    def __str__(self) -> str:
        return self.locator

    @classmethod
    def parse(cls, text) -> "Source":
        """A locator string (or a plain path) -> Source; raises SourceError for a bad ``#...`` part.

        A ``#`` that is not followed by known ``key=value`` pairs is part of the file name.
        """
        text = os.fspath(text)
        path, sep, frag = text.rpartition("#")
        if not sep or not _FRAGMENT.match(frag):
            return cls(text)
        pairs = dict(p.split("=", 1) for p in frag.split("&"))
        if not set(pairs) <= set(_KEYS):
            return cls(text)  # e.g. "scan#v=2.png": a file name with a '#'
        kw: dict = {}
        for k, v in pairs.items():
            if k in ("axis", "split"):
                kw[k] = v
                continue
            if not v.isdigit():
                raise SourceError(f"{text}: {k}={v} must be a whole number")
            kw[k] = int(v)
        src = cls(path, **kw)
        _check(src, text)
        return src

    def resolved(self) -> "Source":
        """The same source with an absolute file path."""
        return Source(str(Path(self.path).resolve()), **{f.name: getattr(self, f.name) for f in fields(self)[1:]})


def _check(src: Source, text: str) -> None:
    if src.axis is not None and src.axis not in AXIS_NAMES:
        raise SourceError(f"{text}: axis={src.axis}; choose from {', '.join(AXIS_NAMES)}")
    if src.split is not None and src.split not in SPLITS:
        raise SourceError(f"{text}: split={src.split}; choose from {', '.join(SPLITS)}")
    if src.frame is not None and src.frame < 1:
        raise SourceError(f"{text}: frames are numbered from 1")
    kinds = [src.frame is not None, src.slice is not None or src.axis is not None or src.volume is not None,
             src.split is not None or src.index is not None]
    if sum(kinds) > 1:
        raise SourceError(f"{text}: a locator names a DICOM frame, a NIfTI slice or an .npz index, not several")
    if (src.split is None) != (src.index is None):
        raise SourceError(f"{text}: an .npz image needs both split= and index=")


def pick_indices(n: int, rule: str) -> list[int]:
    """0-based indices of ``n`` frames/slices that a rule keeps: all, middle, every:N."""
    if rule == "all":
        return list(range(n))
    if rule == "middle":
        return [n // 2] if n else []
    if rule.startswith("every:") and rule[6:].isdigit() and int(rule[6:]) >= 1:
        return list(range(0, n, int(rule[6:])))
    raise SourceError(f"--slices {rule!r}; choose from all, middle, every:N (N >= 1)")


def derived_sha256(file_sha: str, src: Source) -> str:
    """Identity of one frame or slice of a file: its file's sha256 with the locator part."""
    return hashlib.sha256(f"cbr-source\0{file_sha}\0{src.fragment}".encode()).hexdigest()
