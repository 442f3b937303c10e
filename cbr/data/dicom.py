"""DICOM: checking a file at scan time, decoding one frame to 8-bit pixels, and writing a simple
single-frame file (``write_dicom``: examples, benchmarks and test data).

Decisions:

* A file is DICOM when it has the ``DICM`` marker after its 128-byte preamble, whatever its name.
* Only an allow-list of attributes ever leaves this module (:data:`KEPT`, plus PatientID as the
  patient group and the frame count). Patient names, birth dates, addresses, physicians and every
  other attribute stay inside the parsed dataset and are dropped with it. pydicom's own warnings
  and log records can quote attribute values, so they are silenced, never logged.
* An allow-listed value is kept only when it obeys its value representation (the VR of the
  standard's data dictionary, not the one the file claims): a CS is at most 16 upper-case letters,
  digits, spaces and underscores; a UI digits and dots, at most 64; LO/SH have their length and no
  control characters; DA/TM/AS/DS/IS their formats (:func:`fits_vr`). Free text typed into a coded
  field (``BodyPartExamined="Chest of SMITH^JOHN"``) is dropped, not copied. A value that obeys its VR
  can still be a name (``"CHEST SMITH"`` is a valid CS); only the allow-list bounds that risk.
* ``BurnedInAnnotation=YES`` is reported (:attr:`DicomInfo.burned_in`); readers refuse such images
  unless told otherwise (:mod:`cbr.data.identity`, :func:`cbr.data.sources.decode_query`).
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

from datetime import datetime
import io
import logging
import re
import warnings
import zlib

import numpy as np

from cbr.data.guard import check_decoded, max_decoded_bytes
from cbr.data.windows import DEFAULT_WINDOW, apply_window, centre_width, minmax_to_uint8
from cbr.errors import ImageError

__all__ = ["KEPT", "BURNED_IN", "DicomInfo", "is_dicom", "parse_dicom", "inspect_dicom", "frame_pixels",
           "decode_dicom_bytes", "fits_vr", "check_dicom_size", "SECONDARY_CAPTURE", "write_dicom",
           "SEGMENTATION_STORAGE"]

LOG = logging.getLogger(__name__)

BURNED_IN = ("burned-in annotation (BurnedInAnnotation=YES): text such as names may be drawn into the pixels; "
             "give --allow-burned-in once it is known to hold none")

# The only attributes copied into a case's metadata.
KEPT = ("Modality", "BodyPartExamined", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

_DICOMDIR_UID = "1.2.840.10008.1.3.10"
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is deflated
_INFLATED_HEAD = 1 << 20  # inflated bytes read for the attributes before a deflated file's pixels
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage SOP class
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # DICOM SEG: a mask (cbr.data.seg), never a case image


def _silence_pydicom() -> None:
    # pydicom logs (and warns about) odd values by quoting them: a malformed PatientName would be
    # printed. Nothing of pydicom's may reach our logs.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


_silence_pydicom()


class DicomInfo:
    """What the dataset reader needs from a DICOM file: no pixels, no identifying attributes."""

    __slots__ = ("frames", "patient_id", "metadata", "burned_in")

    def __init__(self, frames: int, patient_id: str | None, metadata: dict, burned_in: bool = False):
        self.frames = frames  # number of frames (1 for a single image)
        self.patient_id = patient_id  # PatientID, stripped; None when absent or blank
        self.metadata = metadata  # the KEPT attributes present that obey their VR, as strings
        self.burned_in = burned_in  # BurnedInAnnotation=YES: text may be drawn into the pixels

    def __repr__(self) -> str:  # never show the patient id in a traceback or log
        return f"DicomInfo(frames={self.frames}, metadata={self.metadata}, burned_in={self.burned_in})"


_CS = re.compile(r"[A-Z0-9 _]{1,16}")
_UI = re.compile(r"[0-9]+(\.[0-9]+)*")
_DS = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_IS = re.compile(r"[+-]?[0-9]+")
_AS = re.compile(r"[0-9]{3}[DWMY]")
_TM = re.compile(r"([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9]|60)?)?(\.[0-9]{1,6})?")
_TEXT_LENGTH = {"LO": 64, "SH": 16}


def fits_vr(value: str, vr: str) -> bool:
    """Whether ``value`` (one value, as text) obeys the rules of DICOM value representation ``vr``
    (PS3.5 6.2: character repertoire, length, format). A VR without a rule here (a person name,
    free text) never fits: such a value is not copied.

    Example:
        >>> fits_vr("CHEST", "CS"), fits_vr("Chest of SMITH^JOHN", "CS")
        (True, False)
    """
    text = value.strip(" \0") if vr == "UI" else value.strip(" ")
    if vr == "CS":
        return _CS.fullmatch(text) is not None
    if vr == "UI":
        return 0 < len(text) <= 64 and _UI.fullmatch(text) is not None
    if vr in _TEXT_LENGTH:
        return 0 < len(text) <= _TEXT_LENGTH[vr] and text.isprintable() and "\\" not in text
    if vr == "DS":
        return len(text) <= 16 and _DS.fullmatch(text) is not None
    if vr == "IS":
        return len(text) <= 12 and _IS.fullmatch(text) is not None and -2**31 <= int(text) < 2**31
    if vr == "AS":
        return _AS.fullmatch(text) is not None
    if vr == "TM":
        return len(text) <= 16 and _TM.fullmatch(text) is not None
    if vr == "DA":
        return _date(text)
    return False


def _date(text: str) -> bool:
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def is_dicom(head: bytes) -> bool:
    """Whether bytes start like a DICOM Part 10 file (preamble + ``DICM``)."""
    return head[128:132] == b"DICM"


def parse_dicom(data: bytes, name: str):
    """Parse a whole DICOM file held in memory; raises ImageError when it cannot be parsed."""
    from pydicom import dcmread

    check_dicom_size(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on a damaged file
        # The exception text may quote values; only its type is kept.
        raise ImageError(name, f"truncated or corrupt DICOM file ({type(e).__name__})") from None


def _before_pixels(tag, vr, length) -> bool:
    return tag >= 0x7FE00008  # (7FE0,0008) float, (7FE0,0009) double, (7FE0,0010) pixel data


def check_dicom_size(data, name: str) -> None:
    """Refuse a file whose image attributes declare more decoded bytes than the budget
    (Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8), before a pixel is read.

    A deflated file (1.2.840.10008.1.2.1.99) is inflated by pydicom as a whole, so its attributes
    are read from the first MiB inflated here, and then its inflated size is counted, a chunk at a
    time and nothing kept, against the same budget. Damage is left to :func:`parse_dicom` to name.
    """
    from pydicom import dcmread
    from pydicom.filereader import read_dataset, read_preamble

    fp = io.BytesIO(data)
    with warnings.catch_warnings():  # pydicom's warnings quote values
        warnings.simplefilter("ignore")
        try:
            read_preamble(fp, False)
            meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
        except Exception:  # noqa: BLE001 - damaged file meta: parse_dicom names it
            return
        if str(meta.get("TransferSyntaxUID", "")).strip("\0 ") != _DEFLATED:
            _declared_size(_parsed(lambda: dcmread(io.BytesIO(data), stop_before_pixels=True)), name)
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            head = inflater.decompress(memoryview(data)[fp.tell():], _INFLATED_HEAD)
        except zlib.error:
            return  # damaged deflate data: parse_dicom names it
        # attributes past the first MiB (a padded header) leave only the inflated count to judge
        _declared_size(_parsed(lambda: read_dataset(io.BytesIO(head), False, True, stop_when=_before_pixels)), name)
    _count_inflated(inflater, len(head), name)


def _parsed(read):
    """``read()``, or None when the header cannot be parsed (parse_dicom names the damage later)."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - pydicom raises many types on a damaged file
        return None


def _declared_size(ds, name: str) -> None:
    if ds is None:
        return
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        bits, samples = int(ds.get("BitsAllocated") or 0), int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return  # inconsistent attributes: refused by name when the image is checked
    dims = (rows, cols) + ((frames,) if frames > 1 else ()) + ((samples,) if samples > 1 else ())
    check_decoded(name, dims, bits / 8)


def _count_inflated(inflater, done: int, name: str) -> None:
    cap, total = max_decoded_bytes(), done
    try:
        while total <= cap:
            chunk = inflater.decompress(inflater.unconsumed_tail, 1 << 24)
            if not chunk and not inflater.unconsumed_tail:
                break
            total += len(chunk)
    except zlib.error:
        return  # damaged deflate data: parse_dicom names it
    if total > cap:
        check_decoded(name, (), 1, what="the deflated dataset inflates past", max_bytes=cap)


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
    if sop == SEGMENTATION_STORAGE:  # its frames are a lesion's bits: indexed, it would be a black-and-white case
        raise ImageError(name, "segmentation (SEG) object, not an image; give it as its image's mask (the "
                               "manifest's 'mask' column)")
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
    from pydicom.datadict import dictionary_VR
    from pydicom.multival import MultiValue

    _check_image(ds, name)
    metadata = {}
    for key in KEPT:
        with warnings.catch_warnings():  # pydicom's warning about a bad value quotes the value
            warnings.simplefilter("ignore")
            value = ds.get(key)
        # Every kept attribute has one value (VM 1): several are not a value cbr can trust.
        if value in (None, "") or isinstance(value, (MultiValue, list, tuple)):
            continue
        text = str(value).strip()
        if fits_vr(text, dictionary_VR(key)):
            metadata[key] = text
    pid = ds.get("PatientID")
    pid = str(pid).strip() if pid is not None else ""
    burned = str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES"
    return DicomInfo(_frames(ds), pid or None, metadata, burned)


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
        # arr - lo in the unsigned type of arr's width: exact (0 <= arr - lo < 2**bits, modular
        # arithmetic), and no wider than arr itself.
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        idx = arr.view(unsigned) - unsigned.type(lo % (1 << 8 * arr.dtype.itemsize))
        table = apply_modality_lut(np.arange(lo, hi + 1, dtype=np.int32), ds)
        present = _present(idx, hi - lo + 1) if centre_width(window) is None else None
        return _lookup(_levels(ds, np.asarray(table, dtype=np.float64), window, present), idx)
    return _levels(ds, np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), window)


_ROWS_AT_ONCE = 1 << 20  # pixels per step of the lookups below


def _steps(arr: np.ndarray):
    step = max(1, _ROWS_AT_ONCE // max(1, arr[0].size)) if arr.ndim > 1 else _ROWS_AT_ONCE
    return range(0, len(arr), step), step


def _present(idx: np.ndarray, n: int) -> np.ndarray:
    """Which of ``n`` table entries occur in ``idx``, a block at a time (bincount copies to 64 bits)."""
    seen = np.zeros(n, dtype=bool)
    starts, step = _steps(idx)
    for i in starts:
        seen |= np.bincount(idx[i:i + step].ravel(), minlength=n)[:n] > 0
    return seen


def _lookup(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]``, a block of rows at a time (fancy indexing first copies the whole index to 64 bits)."""
    out = np.empty(idx.shape + table.shape[1:], dtype=table.dtype)
    starts, step = _steps(idx)
    for i in starts:
        out[i:i + step] = table[idx[i:i + step]]
    return out


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
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:  # one grey level per stored value
        levels = np.arange(1 << 8 * arr.dtype.itemsize, dtype=np.float64)
        return _lookup(np.clip(np.rint(levels * scale), 0, 255).astype(np.uint8), arr)
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


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def write_dicom(path, pixels: np.ndarray, *, sop_class: str = SECONDARY_CAPTURE, transfer_syntax: str | None = None,
                **attributes) -> None:
    """Write ``pixels`` as a single-frame MONOCHROME2 DICOM file (Part 10, with its preamble), with
    fresh UIDs.

    Args:
        path: the file to write.
        pixels: rows x columns of unsigned (or signed) 8- or 16-bit integers; BitsAllocated,
            BitsStored and HighBit follow the dtype unless ``attributes`` say otherwise.
        sop_class: its SOP Class UID [default: Secondary Capture].
        transfer_syntax: a compressed transfer syntax UID to encode the pixels with (e.g. pydicom's
            ``RLELossless``); None: explicit VR little endian, uncompressed.
        **attributes: data elements by keyword, set last (``Modality="CT"``, ``RescaleIntercept=-1024``,
            ``BitsStored=12``, ``BurnedInAnnotation="YES"``, ...).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
