"""NIfTI volumes (``.nii``, ``.nii.gz``): their shape at scan time, and one slice as 8-bit pixels.

Decisions:

* Volumes are reoriented to the closest canonical (RAS+) orientation first, so ``axial``,
  ``coronal`` and ``sagittal`` mean the same anatomy whatever the scanner's storage order, and a
  slice is rotated so that anterior (axial, sagittal) or superior (coronal) is at the top.
* Slices are numbered from 0 along the chosen axis of the reoriented volume.
* A 4D volume (fMRI, DWI) gives one 3D volume: ``--volume N`` (from 0), default the first.
* Windows: ``auto`` uses the header's ``cal_min``/``cal_max`` display range when it is set, else
  the volume's min..max (the whole volume's, so that slices of one volume share one grey scale);
  presets and ``C,W`` apply to the stored values after the header's scaling (HU for CT).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from cbr.data.windows import DEFAULT_WINDOW, apply_window, centre_width, minmax_to_uint8
from cbr.errors import ImageError

__all__ = ["AXES", "NIFTI_SUFFIXES", "is_nifti_name", "Volume", "load_volume", "volume_shape", "slice_pixels", "display_name"]

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis of the RAS+ volume each view cuts
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_name(path: str) -> bool:
    """Whether a file name says NIfTI (``.nii`` or ``.nii.gz``, any letter case)."""
    return path.lower().endswith(NIFTI_SUFFIXES)


class Volume:
    """One 3D volume of a NIfTI file, reoriented to RAS+, with its display range."""

    __slots__ = ("data", "cal", "volumes", "_range")

    def __init__(self, data: np.ndarray, cal: tuple[float, float] | None, volumes: int):
        self.data = data  # float32 (X, Y, Z), RAS+
        self.cal = cal  # (cal_min, cal_max) when the header sets a display range
        self.volumes = volumes  # 3D volumes in the file (1 unless 4D)
        self._range = None

    def minmax(self) -> tuple[float, float]:
        """The volume's finite min..max, computed once."""
        if self._range is None:
            finite = self.data[np.isfinite(self.data)]
            self._range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return self._range

    def count(self, axis: str) -> int:
        """Number of slices along a view's axis."""
        return int(self.data.shape[AXES[axis]])


def _image(data: bytes, name: str):
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, ValueError):
            raise ImageError(name, "truncated or corrupt gzip data") from None
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except Exception:  # noqa: BLE001 - nibabel raises HeaderDataError, ValueError, ...
            continue
    raise ImageError(name, "not a NIfTI-1 or NIfTI-2 volume (bad header)")


def load_volume(data: bytes, name: str, volume: int = 0) -> Volume:
    """Parse a NIfTI file held in memory and load one 3D volume of it.

    Raises ImageError for a bad header, a 2D image or more than 4 dimensions, a missing volume
    index, or pixel data shorter than the header says.
    """
    import nibabel as nib

    img = _image(data, name)
    shape = img.shape
    if len(shape) < 3 or len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise ImageError(name, f"a NIfTI volume must be 3D or 4D; this one has shape {tuple(shape)}")
    volumes = int(shape[3]) if len(shape) >= 4 else 1
    if not 0 <= volume < volumes:
        raise ImageError(name, f"volume {volume} does not exist (the file has {volumes}); choose --volume 0..{volumes - 1}")
    try:
        canonical = nib.as_closest_canonical(img)
        dataobj = canonical.dataobj
        arr = dataobj[..., volume] if len(shape) >= 4 else dataobj[...]
        arr = np.asarray(arr, dtype=np.float32).reshape(arr.shape[:3])
    except MemoryError:
        raise ImageError(name, f"volume too large to load: shape {tuple(shape)}") from None
    except Exception as e:  # noqa: BLE001 - short data, bad affine, odd dtype
        raise ImageError(name, f"truncated or corrupt volume data ({type(e).__name__})") from None
    header = img.header
    lo, hi = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
    return Volume(arr, (lo, hi) if hi > lo else None, volumes)


def slice_pixels(vol: Volume, axis: str, index: int, window: str, name: str) -> np.ndarray:
    """One slice as uint8 ``(H, W)``, upright (see the module docstring)."""
    n = vol.count(axis)
    if not 0 <= index < n:
        raise ImageError(name, f"{axis} slice {index} does not exist (the volume has {n}: 0..{n - 1})")
    plane = np.take(vol.data, index, axis=AXES[axis])
    plane = np.rot90(plane)  # first remaining axis left-to-right, second bottom-to-top
    cw = centre_width(window)
    if cw is not None:
        return np.ascontiguousarray(apply_window(plane, *cw))
    if window == DEFAULT_WINDOW and vol.cal is not None:
        return np.ascontiguousarray(minmax_to_uint8(plane, *vol.cal))
    return np.ascontiguousarray(minmax_to_uint8(plane, *vol.minmax()))


def display_name(path: str) -> str:
    """A volume's name without its NIfTI suffix."""
    base = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def volume_shape(data: bytes, name: str) -> tuple[tuple[int, int, int], int]:
    """``((X, Y, Z) after reorientation to RAS+, number of 3D volumes)``, from the header only."""
    import nibabel as nib

    img = _image(data, name)
    shape = img.shape
    if len(shape) < 3 or len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise ImageError(name, f"a NIfTI volume must be 3D or 4D; this one has shape {tuple(shape)}")
    ornt = nib.io_orientation(img.affine)
    canonical = [0, 0, 0]
    for i in range(3):
        canonical[int(ornt[i, 0])] = int(shape[i])
    return tuple(canonical), int(shape[3]) if len(shape) >= 4 else 1
