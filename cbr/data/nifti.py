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
* Memory: the header is read first (its first 540 bytes, inflating no more of a ``.nii.gz``),
  and the decoded size it declares (every dimension x bytes per voxel) must be within
  :func:`cbr.data.guard.check_decoded` before a voxel is inflated. The chosen 3D volume is then
  held once, in its stored type (a view of a ``.nii``'s bytes, or one buffer a ``.nii.gz`` is
  inflated into); reorientation is a view, and only the slice being cut is scaled to float.
* Everything wrong with a file is found at scan time, so it is one problem, never one per slice:
  a bad header, a zero dimension, an unsupported voxel type, a non-finite or singular affine,
  voxel data shorter than the header declares.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zlib

import numpy as np

from cbr.data.guard import check_decoded
from cbr.data.windows import DEFAULT_WINDOW, apply_window, centre_width, minmax_to_uint8
from cbr.errors import ImageError

__all__ = ["AXES", "NIFTI_SUFFIXES", "is_nifti_name", "Volume", "load_volume", "volume_shape", "slice_pixels", "display_name"]

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis of the RAS+ volume each view cuts
NIFTI_SUFFIXES = (".nii", ".nii.gz")

_HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348
_CHUNK = 1 << 22  # voxels per step when a whole volume is scanned (min..max)
_GZIP_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def is_nifti_name(path: str) -> bool:
    """Whether a file name says NIfTI (``.nii`` or ``.nii.gz``, any letter case)."""
    return path.lower().endswith(NIFTI_SUFFIXES)


class Volume:
    """One 3D volume of a NIfTI file, reoriented to RAS+ (a view), with its scaling and display range."""

    __slots__ = ("data", "cal", "volumes", "scaling", "_range")

    def __init__(self, data: np.ndarray, cal: tuple[float, float] | None, volumes: int, scaling=(None, None)):
        self.data = data  # (X, Y, Z) RAS+, in the stored voxel type (scaled when a slice is cut)
        self.cal = cal  # (cal_min, cal_max) when the header sets a display range
        self.volumes = volumes  # 3D volumes in the file (1 unless 4D)
        self.scaling = scaling  # the header's (slope, intercept), (None, None) for none
        self._range = None

    def scaled(self, raw: np.ndarray) -> np.ndarray:
        """Stored voxels -> float32 values after the header's scaling (as nibabel scales them)."""
        from nibabel.volumeutils import apply_read_scaling

        return np.asarray(apply_read_scaling(raw, *self.scaling), dtype=np.float32)

    def minmax(self) -> tuple[float, float]:
        """The volume's finite min..max after scaling, computed once, a slab at a time."""
        if self._range is None:
            lo, hi = math.inf, -math.inf
            step = max(1, _CHUNK // max(1, self.data.shape[0] * self.data.shape[1]))
            for k in range(0, self.data.shape[2], step):
                slab = self.scaled(self.data[:, :, k:k + step])
                finite = slab[np.isfinite(slab)]
                if finite.size:
                    lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            self._range = (lo, hi) if lo <= hi else (0.0, 0.0)
        return self._range

    def count(self, axis: str) -> int:
        """Number of slices along a view's axis."""
        return int(self.data.shape[AXES[axis]])


def _header(data, name: str):
    """``(header, gzipped)``: the header alone, inflating no more than its own bytes."""
    import nibabel as nib

    gz = bytes(data[:2]) == b"\x1f\x8b"
    if gz:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                head = f.read(_HEADER_BYTES)
        except _GZIP_ERRORS:
            raise ImageError(name, "truncated or corrupt gzip data") from None
    else:
        head = bytes(data[:_HEADER_BYTES])
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            return cls.from_fileobj(io.BytesIO(head), check=True), gz
        except Exception:  # noqa: BLE001 - nibabel raises HeaderDataError, ValueError, ...
            continue
    raise ImageError(name, "not a NIfTI-1 or NIfTI-2 volume (bad header)")


def _layout(hdr, name: str):
    """``(shape, dtype, data offset, orientation)`` from a header, refusing what cannot be sliced."""
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(hdr.get_data_offset())
    except Exception:  # noqa: BLE001 - a forged dim[0] or datatype
        raise ImageError(name, "not a NIfTI-1 or NIfTI-2 volume (bad header)") from None
    if len(shape) < 3 or len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise ImageError(name, f"a NIfTI volume must be 3D or 4D; this one has shape {shape}")
    if min(shape) <= 0:
        raise ImageError(name, f"empty volume: shape {shape} has a zero dimension")
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise ImageError(name, f"unsupported voxel type {dtype} (integer or real voxels only)")
    check_decoded(name, shape, dtype.itemsize)
    affine = hdr.get_best_affine()
    if not np.isfinite(affine).all():
        raise ImageError(name, "the affine (voxel-to-world matrix) is not finite (NaN or infinite values); "
                               "fix the header's sform/qform")
    try:
        ornt = nib.io_orientation(affine)
    except Exception:  # noqa: BLE001 - LinAlgError and kin on a degenerate matrix
        ornt = np.full((3, 2), np.nan)
    if not np.isfinite(ornt).all():
        raise ImageError(name, "the affine (voxel-to-world matrix) is singular: an axis has no direction; "
                               "fix the header's sform/qform")
    return shape, dtype, offset, ornt


def _voxels(data, name: str, gz: bool, start: int, nbytes: int, *, keep: bool = True):
    """``nbytes`` of voxel data from byte ``start`` (of the inflated file): a view of ``data``, or
    one buffer it is inflated into; ``keep=False`` only checks that they are all there."""
    if not gz:
        if len(data) < start + nbytes:
            raise ImageError(name, f"truncated volume data ({max(0, len(data) - start)} of {nbytes} bytes)")
        return memoryview(data)[start:start + nbytes] if keep else None
    buf = bytearray(nbytes) if keep else None
    scratch = memoryview(bytearray(1 << 20))
    got, skip = 0, start
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            while skip and (n := f.readinto(scratch[:min(skip, len(scratch))])):
                skip -= n  # inflated and discarded: the header, earlier volumes
            while not skip and got < nbytes:
                n = f.readinto(memoryview(buf)[got:] if keep else scratch[:min(len(scratch), nbytes - got)])
                if not n:
                    break
                got += n
    except _GZIP_ERRORS:
        raise ImageError(name, "truncated or corrupt gzip data") from None
    if got < nbytes:
        raise ImageError(name, f"truncated volume data ({got} of {nbytes} bytes)")
    return buf


def load_volume(data, name: str, volume: int = 0) -> Volume:
    """Parse a NIfTI file held in memory and load one 3D volume of it.

    Raises ImageError for a bad header, a 2D image or more than 4 dimensions, a missing volume
    index, a decoded size past the budget, or pixel data shorter than the header says.
    """
    from nibabel.orientations import apply_orientation

    hdr, gz = _header(data, name)
    shape, dtype, offset, ornt = _layout(hdr, name)
    volumes = int(shape[3]) if len(shape) >= 4 else 1
    if not 0 <= volume < volumes:
        raise ImageError(name, f"volume {volume} does not exist (the file has {volumes}); choose --volume 0..{volumes - 1}")
    count = math.prod(shape[:3])
    raw = _voxels(data, name, gz, offset + volume * count * dtype.itemsize, count * dtype.itemsize)
    arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape[:3], order="F")
    slope, inter = hdr.get_slope_inter()
    lo, hi = float(hdr.get("cal_min", 0) or 0), float(hdr.get("cal_max", 0) or 0)
    return Volume(apply_orientation(arr, ornt), (lo, hi) if hi > lo else None, volumes, (slope, inter))


def slice_pixels(vol: Volume, axis: str, index: int, window: str, name: str) -> np.ndarray:
    """One slice as uint8 ``(H, W)``, upright (see the module docstring)."""
    n = vol.count(axis)
    if not 0 <= index < n:
        raise ImageError(name, f"{axis} slice {index} does not exist (the volume has {n}: 0..{n - 1})")
    plane = vol.scaled(np.take(vol.data, index, axis=AXES[axis]))
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


def volume_shape(data, name: str) -> tuple[tuple[int, int, int], int]:
    """``((X, Y, Z) after reorientation to RAS+, number of 3D volumes)``, checking the whole file.

    The header's decoded size is checked against the budget first; then the voxel data is checked
    to be all there (a ``.nii.gz`` is inflated a chunk at a time, nothing kept), so that a bad
    file is one problem at scan time.
    """
    hdr, gz = _header(data, name)
    shape, dtype, offset, ornt = _layout(hdr, name)
    _voxels(data, name, gz, offset, math.prod(shape) * dtype.itemsize, keep=False)
    canonical = [0, 0, 0]
    for i in range(3):
        canonical[int(ornt[i, 0])] = int(shape[i])
    return tuple(canonical), int(shape[3]) if len(shape) >= 4 else 1
