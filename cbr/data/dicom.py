"""DICOM: checking a file at scan time, and decoding one frame to 8-bit pixels.

Decisions:

* A file is DICOM when it has the ``DICM`` marker after its 128-byte preamble, whatever its name.
* Only an allow-list of attributes ever leaves this module (:data:`KEPT`, plus PatientID as the
  patient group and the frame count). Patient names, birth dates, addresses, physicians and every
  other attribute stay inside the parsed dataset and are dropped with it. pydicom's own warnings
  and log records can quote attribute values, so they are silenced, never logged.
* Pixels: modality LUT (rescale slope/intercept: CT in HU), then the VOI window (see
  :mod:`cbr.data.windows`), then MONOCHROME1 is inverted so that dense tissue is always bright.
  Colour: YBR is converted to RGB by pydicom (``as_rgb``), palette colour through its LUT, and
  samples deeper than 8 bits are scaled by their bit depth.
* Multi-frame files decode one frame at a time (frames are numbered from 1, as in DICOM).
* Every refusal is an :class:`~cbr.errors.ImageError` whose reason names the problem: a DICOMDIR,
  an SR or other object without pixels, a missing or unsupported transfer syntax (named),
  truncated pixel data.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np

from cbr.data.windows import DEFAULT_WINDOW, apply_window, centre_width, minmax_to_uint8
from cbr.errors import ImageError

__all__ = ["KEPT", "DicomInfo", "is_dicom", "parse_dicom", "inspect_dicom", "frame_pixels", "decode_dicom_bytes"]

LOG = logging.getLogger(__name__)

# The only attributes copied into a case's metadata.
KEPT = ("Modality", "BodyPartExamined", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

_DICOMDIR_UID = "1.2.840.10008.1.3.10"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage SOP class


def _silence_pydicom() -> None:
    # pydicom logs (and warns about) odd values by quoting them: a malformed PatientName would be
    # printed. Nothing of pydicom's may reach our logs.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


_silence_pydicom()


class DicomInfo:
    """What the dataset reader needs from a DICOM file: no pixels, no identifying attributes."""

    __slots__ = ("frames", "patient_id", "metadata")

    def __init__(self, frames: int, patient_id: str | None, metadata: dict):
        self.frames = frames  # number of frames (1 for a single image)
        self.patient_id = patient_id  # PatientID, stripped; None when absent or blank
        self.metadata = metadata  # the KEPT attributes present, as strings

    def __repr__(self) -> str:  # never show the patient id in a traceback or log
        return f"DicomInfo(frames={self.frames}, metadata={self.metadata})"


def is_dicom(head: bytes) -> bool:
    """Whether bytes start like a DICOM Part 10 file (preamble + ``DICM``)."""
    return head[128:132] == b"DICM"


def parse_dicom(data: bytes, name: str):
    """Parse a whole DICOM file held in memory; raises ImageError when it cannot be parsed."""
    from pydicom import dcmread

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on a damaged file
        # The exception text may quote values; only its type is kept.
        raise ImageError(name, f"truncated or corrupt DICOM file ({type(e).__name__})") from None


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if uid is None:
        return "unknown SOP class"
    name = getattr(uid, "name", str(uid))
    return str(name)


def _check_image(ds, name: str) -> None:
    """Refuse what is not a decodable image, naming why."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import get_expected_length

    meta = ds.file_meta
    if meta.get("MediaStorageSOPClassUID") == _DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        raise ImageError(name, "DICOMDIR (the index of a DICOM media set), not an image; "
                               "index the folder with the image files instead")
    sop = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    if "PixelData" not in ds:
        if sop.startswith(_SR_PREFIX):
            raise ImageError(name, f"structured report ({_sop_name(ds)}), not an image")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageError(name, "float pixel data (parametric map) is not supported")
        raise ImageError(name, f"no pixel data ({_sop_name(ds)}); not an image")
    tsuid = meta.get("TransferSyntaxUID")
    if not tsuid:
        raise ImageError(name, "missing transfer syntax (0002,0010) in the file meta information; "
                               "the pixel encoding is unknown")
    try:
        decoder = get_decoder(tsuid)
        available = decoder.is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageError(name, f"unsupported transfer syntax {getattr(tsuid, 'name', tsuid)} ({tsuid}); "
                               "no pixel decoder is installed for it")
    for attr in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if ds.get(attr) in (None, ""):
            raise ImageError(name, f"missing image attribute {attr}")
    if not tsuid.is_compressed:
        try:
            expected = get_expected_length(ds, "bytes")
        except Exception:  # noqa: BLE001 - inconsistent attributes
            raise ImageError(name, "inconsistent image attributes (rows, columns, bits)") from None
        got = len(ds.PixelData)
        if got < expected:
            raise ImageError(name, f"truncated pixel data ({got} of {expected} bytes)")


def _frames(ds) -> int:
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


def inspect_dicom(ds, name: str) -> DicomInfo:
    """Check that a parsed file is a decodable image; return its frame count and kept attributes."""
    _check_image(ds, name)
    metadata = {}
    for key in KEPT:
        value = ds.get(key)
        if value not in (None, ""):
            metadata[key] = str(value).strip()
    pid = ds.get("PatientID")
    pid = str(pid).strip() if pid is not None else ""
    return DicomInfo(_frames(ds), pid or None, metadata)


def _first(value):
    """A multi-valued window attribute's first value."""
    if value is None:
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _levels(ds, values: np.ndarray, window: str, present: np.ndarray | None = None) -> np.ndarray:
    """Grey levels (uint8) of modality-LUT ``values``: the VOI window, then MONOCHROME1 inverted.

    ``present`` masks the values that occur in the image, when ``values`` is a lookup table over
    a range of stored values: min-max scaling must use only those.
    """
    from pydicom.pixels import apply_voi_lut

    def minmax(v):
        seen = v if present is None else v[present]
        seen = seen[np.isfinite(seen)]
        return minmax_to_uint8(v, float(seen.min()), float(seen.max())) if seen.size else np.zeros(v.shape, np.uint8)

    cw = centre_width(window)
    if cw is not None:
        out = apply_window(values, *cw)
    elif window == DEFAULT_WINDOW and _first(ds.get("WindowWidth")):
        c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        out = apply_window(values, c if c is not None else 0.0, w) if w >= 1 else minmax(values)
    elif window == DEFAULT_WINDOW and "VOILUTSequence" in ds:
        out = minmax(np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64))
    else:
        out = minmax(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255 - out
    return out


def _grey(ds, arr: np.ndarray, window: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size:
        # Every step maps one stored value to one grey level: compute them once per distinct
        # stored value (at most 65,536) and index, instead of float maths on every pixel
        # (several times faster on a 512x512 CT slice; bench_formats.py).
        lo, hi = int(arr.min()), int(arr.max())
        idx = np.subtract(arr, lo, dtype=np.int32)
        table = apply_modality_lut(np.arange(lo, hi + 1, dtype=np.int32), ds)
        present = np.bincount(idx.ravel(), minlength=hi - lo + 1) > 0 if centre_width(window) is None else None
        return _levels(ds, np.asarray(table, dtype=np.float64), window, present)[idx]
    return _levels(ds, np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), window)


def _colour(ds, arr: np.ndarray) -> np.ndarray:
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if arr.dtype == np.uint8:
        return arr
    scale = 255.0 / float((1 << bits) - 1)
    return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def frame_pixels(ds, frame: int | None, window: str, name: str, *, max_pixels: int) -> np.ndarray:
    """One frame as uint8, ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    Args:
        ds: a parsed dataset that passed :func:`inspect_dicom`.
        frame: 1-based frame number; None is the middle frame (the only one of a single image).
        window: a canonical window string (:func:`cbr.data.windows.parse_window`).
        name: the file, for error messages.
        max_pixels: refuse frames with more pixels than this before decoding them.
    """
    from pydicom.pixels import pixel_array

    rows, cols, n = int(ds.Rows), int(ds.Columns), _frames(ds)
    if rows * cols > max_pixels:
        raise ImageError(name, f"image too large: {cols}x{rows} pixels exceeds the limit of {max_pixels}")
    if frame is None:
        frame = n // 2 + 1
    if not 1 <= frame <= n:
        raise ImageError(name, f"frame {frame} does not exist (the file has {n} frame{'s' if n > 1 else ''})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=frame - 1 if n > 1 else None)
    except MemoryError:
        raise ImageError(name, f"image too large: {cols}x{rows} pixels") from None
    except Exception as e:  # noqa: BLE001 - decoder plugins raise anything on damaged data
        raise ImageError(name, f"truncated or corrupt pixel data ({type(e).__name__})") from None
    if arr.ndim == 3 and arr.shape[-1] == 3 or ds.PhotometricInterpretation == "PALETTE COLOR":
        return _colour(ds, arr)
    if arr.ndim != 2:
        raise ImageError(name, f"unexpected pixel array shape {arr.shape}")
    return _grey(ds, arr, window)


def decode_dicom_bytes(data: bytes, name: str, *, max_pixels: int, window: str = DEFAULT_WINDOW,
                       frame: int | None = None) -> np.ndarray:
    """Parse, check and decode a DICOM file held in memory: one frame's uint8 pixels."""
    ds = parse_dicom(data, name)
    inspect_dicom(ds, name)
    return frame_pixels(ds, frame, window, name, max_pixels=max_pixels)
