"""MedMNIST-style ``.npz`` archives: ``{split}_images`` and ``{split}_labels`` arrays.

Decisions:

* Each array index is one case; its locator is ``FILE.npz#split=test&index=17`` (from 0).
* A case's identity is the SHA-256 of its pixels (shape, dtype and bytes), not of the archive, so
  that the same image in two splits (train/test leakage) is caught as a duplicate.
* Labels are integers, shape ``(N,)`` or ``(N, 1)``; class names come from ``--classes`` in label
  order, otherwise the label numbers. Multi-label arrays (ChestMNIST's ``(N, 14)``) and 3D
  volumes (``(N, D, H, W)``) are refused with the reason.
* Arrays are read with ``allow_pickle=False``: an archive can never run code.
* Memory: each member's ``.npy`` header is read first, without inflating its data, and the
  decoded size it declares must be within :func:`cbr.data.guard.check_decoded`; the zip entry's
  own size must match it (a member cannot inflate past its header). Only the arrays needed are
  read: a member stored uncompressed (``np.savez``) is a view of the archive's pages (memory
  mapped, so only the images touched are read), a compressed one is inflated once.
"""

from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import struct
import zipfile

import numpy as np

from cbr.data.guard import check_decoded, map_regular
from cbr.data.locator import SPLITS, Source
from cbr.data.records import Candidate
from cbr.data.windows import minmax_to_uint8
from cbr.errors import DatasetError, ImageError

__all__ = ["SPLITS", "npz_names", "load_npz", "npz_labels", "item_pixels", "item_sha256", "scan_npz"]

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
               RuntimeError, struct.error)  # RuntimeError: an encrypted member


class _MappedFile:
    """A memory map as a file for zipfile: ``mmap`` has no ``seekable()`` before Python 3.13."""

    def __init__(self, mapped: mmap.mmap):
        self._mapped = mapped

    def seekable(self) -> bool:
        return True

    def __getattr__(self, attr):  # read, seek, tell
        return getattr(self._mapped, attr)


def _archive(data, name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(_MappedFile(data) if isinstance(data, mmap.mmap) else io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise ImageError(name, f"not a readable .npz archive ({type(e).__name__})") from None


def npz_names(data, name: str) -> list[str]:
    """The arrays of an ``.npz`` (its ``.npy`` members, without the suffix), reading no array."""
    with _archive(data, name) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def _layout(z: zipfile.ZipFile, info: zipfile.ZipInfo):
    """``(shape, fortran order, dtype, header bytes)`` of a member, from its ``.npy`` header alone."""
    fmt = np.lib.format
    with z.open(info) as fh:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return tuple(shape), fortran, dtype, fh.tell()


def _read_member(data, z: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    shape, fortran, dtype, header = _layout(z, info)
    member = info.filename
    if dtype.hasobject:
        raise ImageError(name, f"{member} holds Python objects (pickles); only numeric arrays are read")
    check_decoded(name, shape, dtype.itemsize)
    declared = math.prod(shape) * dtype.itemsize
    if info.file_size > header + declared:
        raise ImageError(name, f"{member} holds {info.file_size} bytes but its header declares "
                               f"{header + declared}; refused (a zip bomb or a damaged archive)")
    if info.file_size < header + declared:
        raise ImageError(name, f"{member} is truncated ({info.file_size} of {header + declared} bytes)")
    order = "F" if fortran else "C"
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        at = info.header_offset
        name_len, extra_len = struct.unpack("<HH", bytes(data[at + 26:at + 30]))
        start = at + 30 + name_len + extra_len + header
        if start + declared > len(data):
            raise ImageError(name, f"{member} is truncated")
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start)
        return flat.reshape(shape, order=order)
    with z.open(info) as fh:  # inflated once; its size was checked above
        return np.lib.format.read_array(fh, allow_pickle=False)


def load_npz(data, name: str, keys=None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (default all) of an ``.npz`` held in memory or mapped (no pickles).

    Raises ImageError if the archive is unreadable or an array is past the decoded-size budget.
    """
    with _archive(data, name) as z:
        try:
            members = {n.filename[:-4]: n for n in z.infolist() if n.filename.endswith(".npy")}
            wanted = members if keys is None else [k for k in keys if k in members]
            return {k: _read_member(data, z, members[k], name) for k in wanted}
        except _ZIP_ERRORS as e:
            raise ImageError(name, f"not a readable .npz archive ({type(e).__name__})") from None


def _split_arrays(arrays: dict, split: str, name: str, names=None) -> tuple[np.ndarray, np.ndarray]:
    ik, lk = f"{split}_images", f"{split}_labels"
    if ik not in arrays or lk not in arrays:
        have = ", ".join(sorted(arrays if names is None else names)) or "none"
        raise DatasetError(f"{name}: no {ik!r} and {lk!r} arrays (arrays: {have}); choose another --split")
    return arrays[ik], arrays[lk]


def npz_labels(arrays: dict, split: str, name: str, classes: tuple[str, ...] = (), names=None) -> list[str]:
    """The class name of every image of a split; raises DatasetError for unusable arrays.

    ``names``: every array of the archive (for the message when the split's are missing).
    """
    images, labels = _split_arrays(arrays, split, name, names)
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        raise DatasetError(f"{name}: {split}_images has shape {images.shape}; 3D volumes are not supported")
    if images.ndim not in (3, 4):
        raise DatasetError(f"{name}: {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetError(f"{name}: {split}_labels has shape {labels.shape}; multi-label arrays are not supported")
    if len(labels) != len(images):
        raise DatasetError(f"{name}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise DatasetError(f"{name}: {split}_labels must be integers from 0")
    if classes and labels.size and int(labels.max()) >= len(classes):
        raise DatasetError(f"{name}: labels go up to {int(labels.max())} but --classes names {len(classes)} "
                           f"classes; give one name per label, in label order")
    return [classes[int(v)] if classes else str(int(v)) for v in labels]


def item_pixels(arrays: dict, split: str, index: int, name: str) -> np.ndarray:
    """One image as uint8 ``(H, W)`` or ``(H, W, 3)``."""
    key = f"{split}_images"
    if key not in arrays:
        raise ImageError(name, f"no {key!r} array in the archive")
    images = arrays[key]
    if not 0 <= index < len(images):
        raise ImageError(name, f"index {index} does not exist ({split} has {len(images)} images: 0..{len(images) - 1})")
    img = images[index]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or img.ndim == 3 and img.shape[-1] != 3:
        raise ImageError(name, f"image shape {img.shape} is not (H, W) or (H, W, 3)")
    return img if img.dtype == np.uint8 else minmax_to_uint8(img)


def item_sha256(pixels: np.ndarray) -> str:
    """Identity of an array image: its shape, dtype and bytes."""
    h = hashlib.sha256(f"cbr-array\0{pixels.shape}\0{pixels.dtype.str}\0".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def scan_npz(path: str, shown: str, split: str = "train", classes: tuple[str, ...] = ()):
    """The images of one or all splits of an archive as candidates (identities from their pixels).

    Raises DatasetError when the archive or the split's arrays cannot be used.
    """
    try:
        data = map_regular(path, shown)
        names = npz_names(data, shown)
        splits = SPLITS if split == "all" else (split,)
        present = [s for s in splits if f"{s}_images" in names or f"{s}_labels" in names]
        if split == "all" and not present:
            have = ", ".join(sorted(names)) or "none"
            raise DatasetError(f"{shown}: no train/val/test _images and _labels arrays (arrays: {have})")
        used = present if split == "all" else splits
        arrays = load_npz(data, shown, [f"{s}_{kind}" for s in used for kind in ("images", "labels")])
    except ImageError as e:
        raise DatasetError(f"{shown}: {e.reason}") from None
    candidates = []
    archive = os.path.basename(path)
    for s in used:
        labels = npz_labels(arrays, s, shown, classes, names)
        images = arrays[f"{s}_images"]
        for i, label in enumerate(labels):
            src = Source(path, split=s, index=i)
            meta = {"format": "npz", "archive": archive, "split": s, "index": i}
            candidates.append(Candidate(src.locator, label, None, meta, None, len(candidates),
                                        sha256=item_sha256(images[i])))
    return candidates, []
