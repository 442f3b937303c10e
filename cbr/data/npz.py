"""MedMNIST-style ``.npz`` archives: ``{split}_images`` and ``{split}_labels`` arrays.

Decisions:

* Each array index is one case; its locator is ``FILE.npz#split=test&index=17`` (from 0).
* A case's identity is the SHA-256 of its pixels (shape, dtype and bytes), not of the archive, so
  that the same image in two splits (train/test leakage) is caught as a duplicate.
* Labels are integers, shape ``(N,)`` or ``(N, 1)``; class names come from ``--classes`` in label
  order, otherwise the label numbers. Multi-label arrays (ChestMNIST's ``(N, 14)``) and 3D
  volumes (``(N, D, H, W)``) are refused with the reason.
* Arrays are loaded with ``allow_pickle=False``: an archive can never run code.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np

from cbr.data.locator import SPLITS, Source
from cbr.errors import DatasetError, ImageError

__all__ = ["SPLITS", "load_npz", "npz_labels", "item_pixels", "item_sha256", "scan_npz"]

def load_npz(data: bytes, name: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` held in memory (no pickles); raises ImageError if unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ImageError(name, f"not a readable .npz archive ({type(e).__name__})") from None


def _split_arrays(arrays: dict, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    ik, lk = f"{split}_images", f"{split}_labels"
    if ik not in arrays or lk not in arrays:
        have = ", ".join(sorted(arrays)) or "none"
        raise DatasetError(f"{name}: no {ik!r} and {lk!r} arrays (arrays: {have}); choose another --split")
    return arrays[ik], arrays[lk]


def npz_labels(arrays: dict, split: str, name: str, classes: tuple[str, ...] = ()) -> list[str]:
    """The class name of every image of a split; raises DatasetError for unusable arrays."""
    images, labels = _split_arrays(arrays, split, name)
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
    from cbr.data.windows import minmax_to_uint8

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
    import os

    from cbr.data.records import Candidate

    from cbr.data.guard import read_regular

    try:
        data = read_regular(path, shown)
    except ImageError as e:
        raise DatasetError(f"{shown}: {e.reason}") from None
    try:
        arrays = load_npz(data, shown)
    except ImageError as e:
        raise DatasetError(f"{shown}: {e.reason}") from None
    splits = SPLITS if split == "all" else (split,)
    present = [s for s in splits if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    if split == "all" and not present:
        have = ", ".join(sorted(arrays)) or "none"
        raise DatasetError(f"{shown}: no train/val/test _images and _labels arrays (arrays: {have})")
    candidates = []
    archive = os.path.basename(path)
    for s in present if split == "all" else splits:
        labels = npz_labels(arrays, s, shown, classes)
        images = arrays[f"{s}_images"]
        for i, label in enumerate(labels):
            src = Source(path, split=s, index=i)
            meta = {"format": "npz", "archive": archive, "split": s, "index": i}
            candidates.append(Candidate(src.locator, label, None, meta, None, len(candidates),
                                        sha256=item_sha256(images[i])))
    return candidates, []
