"""Reading a query's upload and its options, shared by the JSON API and the browser form.

An upload's format is read from its first bytes, never from its name (a PNG named ``scan.nii.gz``
is a PNG): DICOM, NIfTI-1/2 (plain or gzipped), ``.npz`` (a zip), else an image for Pillow. The
stored file gets the extension of what it is, because the decoders go by it (``.nii.gz``).
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy import or_, select

from cbr.data.dicom import is_dicom
from cbr.data.locator import Source, SourceError
from cbr.errors import CbrError, ImageError
from cbr.store.schema import Query
from cbr.pipeline.finding_search import parse_region, RegionError
from cbr.pipeline.settings import parse_where

__all__ = ["read_upload", "query_options", "check_limits", "MAX_K", "BadValue", "safe_name", "upload_suffix",
           "upload_name", "upload_locator", "upload_recorded", "discard_upload"]

MAX_K = 1000  # as `cbr query -k`
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NIFTI2 = b"n+2\0\r\n\x1a\n"
# what a stored upload's name ends with, per format found in its content
_KNOWN = (".nii.gz", ".nii", ".npz", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
_IMAGE_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"II*\0", ".tif"), (b"MM\0*", ".tif"),
                   (b"BM", ".bmp"), (b"GIF8", ".gif"))


class BadValue(CbrError):
    """A request field has a value cbr cannot use (answered 422, like a validation error)."""


def read_upload(upload, settings) -> bytes:
    """The bytes of an UploadFile, refused (413) beyond ``settings.max_upload_mb``; never more than that read."""
    if upload is None:
        raise BadValue("no image uploaded: send the file in the multipart field 'image'")
    limit = settings.max_upload_bytes
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload too large: this server's limit is {settings.max_upload_mb:g} MiB")
    return data


def safe_name(filename: str | None, fallback: str = "upload") -> str:
    """A file name reduced to letters, digits, dot, dash and underscore (never a path)."""
    name = Path(str(filename or "").replace("\\", "/")).name
    name = _UNSAFE.sub("_", name).strip("._")[:80]
    return name or fallback


def _is_nifti(header: bytes) -> bool:
    return header[344:348] == b"n+1\0" or header[4:12] == _NIFTI2


def upload_suffix(data: bytes) -> str:
    """The extension of what ``data`` is, read from its content: .dcm, .nii.gz, .nii, .npz, or an image's."""
    if is_dicom(data[:132]):
        return ".dcm"
    if data[:2] == b"\x1f\x8b":  # gzip: only a gzipped NIfTI is read as one
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:65536], 548)
        except zlib.error:
            head = b""
        return ".nii.gz" if _is_nifti(head) else ".gz"
    if _is_nifti(data[:548]):
        return ".nii"
    if data[:4] == b"PK\x03\x04":
        return ".npz"
    return next((ext for sig, ext in _IMAGE_SUFFIXES if data.startswith(sig)), ".img")


def upload_name(filename: str | None, suffix: str) -> str:
    """A safe stored name for an upload: its own stem (without any known extension), then ``suffix``."""
    name = safe_name(filename)
    lower = name.lower()
    for ext in _KNOWN:
        if lower.endswith(ext) and len(name) > len(ext):
            name = name[: -len(ext)]
            break
    return name.rstrip("._") + suffix if name.rstrip("._") else "upload" + suffix


def upload_locator(path: Path, data: bytes, part: str | None) -> str:
    """The locator of the image to query in a stored upload: ``part`` (frame=N, axis=A&slice=N,
    split=S&index=N) when given; an ``.npz``'s first image of its first split when not."""
    if part:
        try:
            return Source.parse(f"{path}#{part}").locator
        except SourceError as e:
            raise BadValue(f"part {part[:60]!r}: {str(e).rsplit(': ', 1)[-1]}") from None
    if path.name.endswith(".npz"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = set(z.namelist())
        except (zipfile.BadZipFile, OSError, EOFError):
            raise ImageError(path.name, "not a readable .npz archive") from None
        split = next((s for s in ("test", "val", "train") if f"{s}_images.npy" in names), None)
        if split is None:
            raise ImageError(path.name, "an .npz upload needs test_images, val_images or train_images")
        return Source(str(path), split=split, index=0).locator
    return str(path)


def upload_recorded(cb, path: Path) -> bool:
    """Whether a recorded query's image is this stored upload (or a frame, slice or item of it)."""
    text = str(path)
    with cb.read() as s:
        # a pseudonymised case base records the upload as image_file (image_path is a neutral locator)
        hit = s.scalar(select(Query.id).where(or_(Query.image_path == text,
                                                  Query.image_path.startswith(text + "#", autoescape=True),
                                                  Query.image_file == text,
                                                  Query.image_file.startswith(text + "#", autoescape=True))).limit(1))
    return hit is not None


def discard_upload(path: Path) -> None:
    """Remove a refused upload (and its folder when that is left empty)."""
    try:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    except OSError:
        pass  # the folder holds another upload of the same bytes, or is gone already


def check_limits(settings, k, explain, default_explain) -> None:
    """Refuse (422) a query past the server's limits: more than ``max_k`` neighbours, or an
    explanation method not in ``allow_methods`` (the server's own default is always allowed)."""
    if k is not None and int(k) > settings.max_k:
        raise BadValue(f"k {k}: this server answers at most {settings.max_k} neighbours")
    if explain is not None and explain != default_explain and explain not in settings.methods:
        raise BadValue(f"explain {explain!r} is not allowed on this server; allowed: {', '.join(settings.methods)}")


def query_options(k, vote, explain, where=None, region=None) -> dict:
    """Per-query overrides (None keeps the server's default). The routes' form types check ``k``
    (1 to MAX_K, as ``cbr query -k``), ``vote`` and ``explain`` (the CLI's choices); ``where`` and
    ``region`` (search by finding: "x0,y0,x1,y1" in the image's pixels, or "auto") are parsed here."""
    try:
        pairs = parse_where(where)
    except CbrError as e:
        raise BadValue(str(e).replace("--where", "where", 1)) from None
    try:
        box = parse_region((region or "").strip() or None)
    except RegionError as e:
        raise BadValue(e.in_api_words()) from None
    return {"k": k, "vote": vote or None, "explain": explain or None, "where": pairs, "region": box}
