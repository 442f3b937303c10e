"""The one place images are decoded and shaped.

Everything that reads pixels goes through :func:`read_image` (a file) or :func:`decode_image`
(bytes), so every format quirk is handled once and every failure is an :class:`ImageError` whose
reason says what is wrong with the file.

Decisions:

* The format is decided by content (Pillow sniffs the bytes), never by the file name's extension.
  DICOM (the ``DICM`` marker) is decoded by :mod:`cbr.data.dicom` with the file's own window
  (its middle frame when it has several); :func:`cbr.data.sources.read_source` chooses frames,
  slices and windows.
* The result is always mode ``RGB``, upright (EXIF orientation applied), first frame only.
* Alpha is composited on **black**: medical images have black backgrounds and
  :func:`letterbox` pads with black, so transparent areas read as "no tissue".
* 16- and 32-bit data (``I;16``, ``I;16B``, ``I``, ``F``) is **scaled linearly from the image's
  own min..max to 0..255**. Clipping would turn 12-bit data stored in 16-bit containers (CT, MR,
  X-ray exports) into white, and dividing by 256 would leave it near-black.
* Decompression bombs: the decoded size the header declares (width x height x bands x bytes per
  sample) must be within :func:`cbr.data.guard.check_decoded` before the pixels are decoded, and
  high-bit-depth data is scaled a block at a time, in its stored type (no float64 copy).
* Pixel bombs are refused twice: our own ``max_pixels`` check right after ``Image.open`` (only the
  header has been read), and Pillow's ``DecompressionBombError`` (its hard limit, about 1.8e8
  pixels, still applies when ``max_pixels`` is larger). Pillow's softer warning is silenced
  because our limit replaces it.
* Images smaller than ``min_size`` pixels on a side (default 8) are refused: they carry no
  usable detail and are almost always thumbnails, icons or tracking pixels.
* Truncated files fail (``LOAD_TRUNCATED_IMAGES`` stays off): a half image must not be indexed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cbr.data.dicom import decode_dicom_bytes
from cbr.data.guard import check_decoded, open_regular, os_reason, read_regular
from cbr.data.windows import minmax_to_uint8
from cbr.errors import ImageError

__all__ = [
    "MAX_PIXELS",
    "MIN_SIZE",
    "decode_image",
    "check_pillow_size",
    "read_image",
    "sha256_file",
    "letterbox",
]

LOG = logging.getLogger(__name__)

# Our own pixel-bomb limit (width * height). The largest 2D clinical images (full-field digital
# mammograms at about 4096x5625, film digitisers at about 5000x6000) stay under 3e7 pixels, so 5e7
# leaves room while refusing, from the header alone, a 194 KB PNG declaring 10000x10000 16-bit
# pixels: decoding one that large plus torch's own half gigabyte would pass 1 GB resident.
MAX_PIXELS = 50_000_000
MIN_SIZE = 8  # smallest accepted width and height, in pixels

_CHUNK = 1 << 20
# Bytes per decoded sample of Pillow's modes, where not 1 (the decoded-size budget).
_SAMPLE_BYTES = {"1": 1 / 8, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "I;32": 4, "F": 4}

# Leading bytes of formats Pillow can read: a file that starts like an image but fails to open
# is corrupt, not "not an image".
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


def _sci(n: float) -> str:
    """Format a count compactly: 2500000000 -> '2.5e9', 100000000 -> '1e8'."""
    mantissa, exponent = f"{n:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _too_large(w: int, h: int, limit: int) -> str:
    return f"image too large: {w}x{h} = {_sci(w * h)} pixels exceeds the limit of {_sci(limit)}"


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_SIGNATURES):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for alpha and high bit depth)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # Palette transparency (a tRNS index) becomes real alpha before compositing.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")  # premultiplied and grey modes expand to straight RGBA
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, img).convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        # In the stored type, scaled a block at a time: no full-size float64 copy (3.6 GB at 1e8 pixels before).
        grey = Image.fromarray(minmax_to_uint8(np.asarray(img)))
        return grey.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"unsupported image mode {mode}") from e


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    *,
    max_pixels: int = MAX_PIXELS,
    min_size: int = MIN_SIZE,
) -> Image.Image:
    """Decode image bytes into an upright RGB image, or raise :class:`ImageError`.

    Args:
        data: the encoded file content (any format Pillow reads).
        name: what to call the image in error messages (usually its path).
        max_pixels: refuse images with more pixels than this (checked before decoding).
        min_size: refuse images narrower or shorter than this many pixels.

    Example:
        >>> img = decode_image(open("scan.png", "rb").read(), "scan.png")
    """
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    if data[128:132] == b"DICM":  # DICOM decodes in its own module (window: the file's own)

        pixels = decode_dicom_bytes(data, name, max_pixels=max_pixels)
        h, w = pixels.shape[:2]
        if w < min_size or h < min_size:
            raise ImageError(name, f"image is {w}x{h} pixels; too small (minimum {min_size}x{min_size})")
        return Image.fromarray(pixels).convert("RGB")
    with warnings.catch_warnings(record=True) as caught:
        # Pillow warns about odd files it can still read (corrupt EXIF, skipped TIFF tags) and
        # about sizes our max_pixels check already judges: log them instead of flooding stderr.
        warnings.simplefilter("always")
        try:
            return _decode(data, name, max_pixels, min_size)
        finally:
            for w in caught:
                LOG.debug("%s: %s", name, w.message)


def _decode(data: bytes, name: str, max_pixels: int, min_size: int) -> Image.Image:
    """Open, check and load ``data``; see :func:`decode_image`."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(name, _pillow_bomb_reason(e, data, max_pixels)) from None
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise ImageError(name, "truncated or corrupt image data") from None
        raise ImageError(name, "not an image (text or unsupported format)") from None
    except Exception:  # noqa: BLE001 - a plugin choked on a malformed header
        raise ImageError(name, "truncated or corrupt image data") from None
    try:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(name, _too_large(w, h, max_pixels))
        if w < min_size or h < min_size:
            raise ImageError(
                name, f"image is {w}x{h} pixels; too small (minimum {min_size}x{min_size})"
            )
        check_pillow_size(img, name)
        try:
            img.seek(0)  # multi-frame (GIF, TIFF, APNG): the first frame
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageError(name, _pillow_bomb_reason(e, data, max_pixels)) from None
        except MemoryError:
            raise ImageError(name, _too_large(w, h, max_pixels)) from None
        except Exception:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
            raise ImageError(name, "truncated or corrupt image data") from None
        # High-bit images become a new 8-bit image in _to_rgb: turn them in place, saving a full copy.
        in_place = img.mode.startswith("I") or img.mode == "F"
        try:
            upright = ImageOps.exif_transpose(img, in_place=in_place) or img
        except Exception as e:  # noqa: BLE001 - a broken EXIF block must not lose the pixels
            LOG.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
            upright = img if in_place else img.copy()  # img is closed below
        try:
            return _to_rgb(upright)
        except ValueError as e:
            raise ImageError(name, str(e)) from None
    finally:
        img.close()


def check_pillow_size(img: Image.Image, name: str) -> None:
    """Refuse an opened (not yet loaded) Pillow image whose decoded size is past the budget:
    width x height x bands x bytes per sample (:func:`cbr.data.guard.check_decoded`)."""
    w, h = img.size
    bands = len(img.getbands())
    check_decoded(name, (w, h, bands) if bands > 1 else (w, h), _SAMPLE_BYTES.get(img.mode, 1))


def _pillow_bomb_reason(e: Exception, data: bytes, max_pixels: int) -> str:
    """Pillow refused the size before we saw it: recover it from the PNG header or the message."""
    limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return _too_large(w, h, limit)
    digits = [int(t) for t in str(e).replace("(", " ").split() if t.isdigit()]
    if digits:
        return f"image too large: {_sci(digits[0])} pixels exceeds the limit of {_sci(limit)}"
    return "image too large (refused as a possible decompression bomb)"


def read_image(
    path, *, max_pixels: int = MAX_PIXELS, min_size: int = MIN_SIZE
) -> tuple[Image.Image, str]:
    """Read a file once and return ``(upright RGB image, sha256 hex of its bytes)``.

    Raises :class:`ImageError` with a reason (file not found, permission denied, empty,
    not an image, truncated, too large, too small...). A DICOM file gives its middle frame with
    its own window; :func:`cbr.data.sources.read_source` reads any frame, NIfTI slice or ``.npz``
    image, with any window.
    """
    data = read_regular(path, _display(path))  # regular files within the size cap only: never a FIFO
    digest = hashlib.sha256(data).hexdigest()
    return decode_image(data, _display(path), max_pixels=max_pixels, min_size=min_size), digest


def sha256_file(path) -> str:
    """SHA-256 hex digest of a file, read in chunks; raises :class:`ImageError` if unreadable."""
    h = hashlib.sha256()
    with open_regular(path, _display(path)) as (f, _):
        try:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        except OSError as e:
            raise ImageError(_display(path), os_reason(e)) from None
    return h.hexdigest()


def _display(path) -> str:
    """A printable form of a path, even when its name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def letterbox(img: Image.Image, size: int, fill: int = 0) -> Image.Image:
    """Pad ``img`` to a square (centred, ``fill`` colour) and resize it to ``size`` x ``size``.

    Padding rather than cropping keeps lesions at the image edges.
    """
    img = img.convert("RGB")
    w, h = img.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (fill, fill, fill))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    if side != size:
        img = img.resize((size, size), Image.BILINEAR)
    return img
