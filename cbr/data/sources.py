"""Image sources: where a case's pixels come from, and the one function that decodes any of them.

A :class:`Source` is a file plus, when the file holds several images, which one: a DICOM frame,
a NIfTI slice, an ``.npz`` array index. It is written as one string, the *locator*, which is what
a case stores as its path (no schema change) and what ``cbr query`` accepts::

    /data/ct/IM0001                          a single-frame DICOM (or any PNG/JPEG)
    /data/us/cine.dcm#frame=12               frame 12 (from 1, as DICOM numbers them)
    /data/mri/sub-01.nii.gz#axis=axial&slice=40        slice 40 (from 0) along the axis
    /data/fmri/run.nii.gz#volume=2&axis=axial&slice=5  of the third 3D volume of a 4D file
    /data/pneumoniamnist.npz#split=test&index=17       array index 17 (from 0) of a split

A locator without its ``#...`` part, given to ``cbr query``, means the middle frame or slice.

Identity: a case's sha256 must tell apart the images of one file, and re-reading it must give the
same hash. A single image keeps its file's sha256 (so a copy of the file is a duplicate); a frame
or slice hashes the file's sha256 with its locator part; an ``.npz`` image hashes its pixels.

:func:`read_source` is what every reader of pixels calls (indexing, training, queries, reports).
Decoding per format lives in :mod:`cbr.data.dicom`, :mod:`cbr.data.nifti`, :mod:`cbr.data.npz`;
plain images go to :func:`cbr.data.image.read_image`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, fields, replace

from cachetools import LRUCache
from PIL import Image

from cbr.data import dicom, nifti, npz
from cbr.data.dicom import is_dicom
from cbr.data.guard import map_regular, open_regular, read_regular
from cbr.data.image import MAX_PIXELS, MIN_SIZE, read_image
from cbr.data.locator import AXIS_NAMES, SPLITS, Source, SourceError, derived_sha256, pick_indices
from cbr.data.nifti import is_nifti_name
from cbr.data.pseudonyms import key_id, neutral_file_locator, neutral_locator
from cbr.data.windows import DEFAULT_WINDOW, parse_window
from cbr.errors import ImageError, ModelMismatchError

__all__ = ["Source", "SourceSpec", "SourceError", "FRAMES", "SLICE_RULES", "SPLIT_CHOICES", "read_source",
           "decode_query", "check_window", "dicom_patient_id", "moved_to", "derived_sha256", "pick_indices",
           "describe_origin", "file_head", "is_clinical", "refuse_burned_in",
           "dicom_neutral_locator", "neutral_source_locator", "dicom_reference"]

FRAMES = ("all", "middle")
SLICE_RULES = ("all", "middle", "every:N")
SPLIT_CHOICES = SPLITS + ("all",)


@dataclass(frozen=True)
class SourceSpec:
    """Which images of DICOM, NIfTI and ``.npz`` files become cases, and how they are decoded."""

    window: str | None = None  # VOI window (cbr.data.windows); None = the model's own (default auto)
    frames: str = "all"  # multi-frame DICOM: every frame a case, or only the middle one
    slices: str = "all"  # NIfTI: all | middle | every:N
    axis: str = "axial"  # NIfTI: the axis slices are cut along
    volume: int = 0  # NIfTI 4D: which 3D volume (from 0)
    split: str = "train"  # npz: train | val | test | all
    classes: tuple[str, ...] = ()  # npz: class names in label order (default the label numbers)
    pseudonymise: str | None = None  # HMAC key for patient ids; never stored or shown
    allow_burned_in: bool = False  # DICOM: accept BurnedInAnnotation=YES (text drawn into the pixels)

    def __post_init__(self):
        if self.window is not None:
            object.__setattr__(self, "window", parse_window(self.window))
        if self.frames not in FRAMES:
            raise SourceError(f"--frames {self.frames!r}; choose from {', '.join(FRAMES)}")
        pick_indices(1, self.slices)  # validates the rule
        if self.axis not in AXIS_NAMES:
            raise SourceError(f"--axis {self.axis!r}; choose from {', '.join(AXIS_NAMES)}")
        if self.volume < 0:
            raise SourceError(f"--volume {self.volume}: volumes are numbered from 0")
        if self.split not in SPLIT_CHOICES:
            raise SourceError(f"--split {self.split!r}; choose from {', '.join(SPLIT_CHOICES)}")
        if len(set(self.classes)) != len(self.classes) or any(not c for c in self.classes):
            raise SourceError("--classes: give distinct, non-empty names, comma-separated, in label order")
        if self.pseudonymise is not None and not self.pseudonymise:
            raise SourceError("--pseudonymise: the key must not be empty")

    def __repr__(self) -> str:  # the key must never reach a log or a traceback
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pseudonymise"}
        return f"SourceSpec({shown}, pseudonymised={self.pseudonymise is not None})"

    def to_dict(self) -> dict:
        """JSON-ready, as stored with a dataset row: the key itself is left out; its ``key_id`` (a keyed
        hash that cannot give it back) lets a later run tell a wrong key from the right one."""
        return {"window": self.window, "frames": self.frames, "slices": self.slices, "axis": self.axis,
                "volume": self.volume, "split": self.split, "classes": list(self.classes),
                "pseudonymised": self.pseudonymise is not None,
                "key_id": key_id(self.pseudonymise) if self.pseudonymise else None,
                "allow_burned_in": self.allow_burned_in}


# -- reading files, with a small cache so that the slices of one volume load it once -----------

_CACHE: LRUCache = LRUCache(maxsize=2)


def _display(path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _stat(path: str, name: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as e:
        raise ImageError(name, f"cannot read file ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(name, "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    if st.st_size == 0:
        raise ImageError(name, "empty file (0 bytes)")
    return st


def _read(path: str, name: str) -> bytes:
    return read_regular(path, name)  # a regular file within the size cap: never a FIFO or device


def file_head(path: str, name: str, n: int = 132) -> bytes:
    """The first ``n`` bytes of a regular, non-empty file (ImageError otherwise)."""
    _stat(path, name)
    with open_regular(path, name) as (f, _):
        try:
            return f.read(n)
        except OSError as e:
            raise ImageError(name, f"cannot read file ({e.strerror or e})") from None


def _cached(path: str, name: str, kind, load, *, mapped: bool = False):
    """``load(bytes) -> value``, cached per (file, size, mtime, kind); returns (file sha256, value).

    ``mapped``: ``load`` gets a read-only memory map instead, and the file is not hashed (an
    archive's images are identified by their pixels), so only the pages it touches are read.
    """
    st = _stat(path, name)
    key = (path, st.st_size, st.st_mtime_ns, kind)
    entry = _CACHE.get(key)  # a hit becomes the most recently used
    if entry is None and mapped:
        entry = _CACHE[key] = (None, load(map_regular(path, name)))
    elif entry is None:
        data = _read(path, name)
        entry = _CACHE[key] = (hashlib.sha256(data).hexdigest(), load(data))
    return entry


def _to_pil(arr, name: str, max_pixels: int, min_size: int):
    h, w = arr.shape[:2]
    if h * w > max_pixels:
        raise ImageError(name, f"image too large: {w}x{h} pixels exceeds the limit of {max_pixels}")
    if w < min_size or h < min_size:
        raise ImageError(name, f"image is {w}x{h} pixels; too small (minimum {min_size}x{min_size})")
    return Image.fromarray(arr).convert("RGB")


def _dicom_loader(name: str):
    def load(data):
        ds = dicom.parse_dicom(data, name)
        return ds, dicom.inspect_dicom(ds, name)

    return load


def _dicom_info(source):
    """The DicomInfo of a DICOM source (None for another format), from :func:`read_source`'s parse cache."""
    src = source if isinstance(source, Source) else Source.parse(source)
    name = _display(src.locator)
    if src.split is not None or not dicom.is_dicom(file_head(src.path, name)):
        return None
    return _cached(src.path, name, "dicom", _dicom_loader(name))[1][1]


def dicom_patient_id(source) -> str | None:
    """The PatientID of a DICOM source (None for another format, or when the tag is absent or blank).

    Read from the same parse cache as :func:`read_source`, so a query just decoded is not read twice.
    """
    info = _dicom_info(source)
    return info.patient_id if info is not None else None


def dicom_reference(source) -> tuple[str, int | None] | None:
    """(SOPInstanceUID, 1-based frame or None) of a DICOM ``source``: what a DICOM SEG's frames
    reference; None for another format or a file without the UID."""
    info = _dicom_info(source)
    uid = info.metadata.get("SOPInstanceUID") if info is not None else None
    if uid is None:
        return None
    src = source if isinstance(source, Source) else Source.parse(source)
    return uid, src.frame


def dicom_neutral_locator(source, sha256: str) -> str | None:
    """The neutral locator a pseudonymised case base shows for a decoded DICOM ``source`` (its
    hashed SOPInstanceUID and frame, :func:`cbr.data.pseudonyms.neutral_locator`); None for
    another format. ``sha256``: the image's, as :func:`read_source` gave it."""
    info = _dicom_info(source)
    if info is None:
        return None
    src = source if isinstance(source, Source) else Source.parse(source)
    return neutral_locator(info.metadata.get("SOPInstanceUID"), sha256, src.frame)


def neutral_source_locator(source, sha256: str) -> str:
    """How a pseudonymised case base shows a decoded ``source`` of any format: a DICOM image under
    its hashed SOPInstanceUID (:func:`dicom_neutral_locator`), any other under its kind and
    content hash (:func:`cbr.data.pseudonyms.neutral_file_locator`) and the part of the file it is.
    ``sha256``: the image's, as :func:`read_source` gave it."""
    shown = dicom_neutral_locator(source, sha256)
    if shown is not None:
        return shown
    src = source if isinstance(source, Source) else Source.parse(source)
    kind = "nifti" if is_nifti_name(src.path) else "npz" if src.split is not None else "image"
    return neutral_file_locator(kind, sha256, src.fragment)


def refuse_burned_in(source, spec: SourceSpec | None = None) -> None:
    """Refuse a DICOM query marked ``BurnedInAnnotation=YES`` unless ``spec.allow_burned_in``.

    Raises:
        ImageError: naming the file, the attribute and ``--allow-burned-in``.
    """
    if spec is not None and spec.allow_burned_in:
        return
    info = _dicom_info(source)
    if info is not None and info.burned_in:
        src = source if isinstance(source, Source) else Source.parse(source)
        raise ImageError(_display(src.locator), dicom.BURNED_IN)


def read_source(source, *, window: str = DEFAULT_WINDOW, axis: str = "axial", volume: int = 0,
                max_pixels: int | None = None, min_size: int | None = None):
    """Decode one image of any supported format: ``(RGB PIL image, sha256, resolved Source)``.

    Args:
        source: a locator string, a path, or a :class:`Source`.
        window: canonical VOI window for DICOM and NIfTI (ignored for other formats).
        axis, volume: for a NIfTI locator without them (a query of a whole volume).
        max_pixels, min_size: as for :func:`cbr.data.image.read_image`.

    The resolved Source names the frame or slice that was decoded (the middle one when the
    locator named none); its locator and the sha256 identify the image as ``cbr index`` does.

    Raises:
        ImageError: the file is missing, unreadable, not an image, or the frame/slice/index does
            not exist; the reason says which.

    Example:
        >>> img, sha, src = read_source("ct/IM0001", window="ct-lung")
        >>> img, sha, src = read_source("brain.nii.gz#axis=axial&slice=40")
    """
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    min_size = MIN_SIZE if min_size is None else min_size
    src = source if isinstance(source, Source) else Source.parse(source)
    name = _display(src.locator)
    path = src.path
    if src.split is not None:
        key = f"{src.split}_images"  # only this array is read, and of it only the image's pages when stored
        _, arrays = _cached(path, name, ("npz", key), lambda d: npz.load_npz(d, name, (key,)), mapped=True)
        pixels = npz.item_pixels(arrays, src.split, src.index, name)
        sha = npz.item_sha256(arrays[f"{src.split}_images"][src.index])
        return _to_pil(pixels, name, max_pixels, min_size), sha, src
    head = file_head(path, name)
    if dicom.is_dicom(head):
        if src.slice is not None or src.axis is not None or src.volume is not None:
            raise ImageError(name, "a DICOM file has frames, not slices; use #frame=N")

        file_sha, (ds, info) = _cached(path, name, "dicom", _dicom_loader(name))
        frame = (src.frame or info.frames // 2 + 1) if info.frames > 1 or src.frame else None
        pixels = dicom.frame_pixels(ds, frame, window, name, max_pixels=max_pixels)
        out = Source(path, frame=frame if info.frames > 1 else None)
        sha = file_sha if info.frames == 1 else derived_sha256(file_sha, out)
        return _to_pil(pixels, name, max_pixels, min_size), sha, out
    if nifti.is_nifti_name(path):
        if src.frame is not None:
            raise ImageError(name, "a NIfTI volume has slices, not frames; use #axis=axial&slice=N")
        vol_index = src.volume if src.volume is not None else volume
        file_sha, vol = _cached(path, name, ("nifti", vol_index), lambda d: nifti.load_volume(d, name, vol_index))
        ax = src.axis or axis
        index = src.slice if src.slice is not None else vol.count(ax) // 2
        pixels = nifti.slice_pixels(vol, ax, index, window, name)
        out = Source(path, axis=ax, slice=index, volume=vol_index if vol.volumes > 1 else None)
        return _to_pil(pixels, name, max_pixels, min_size), derived_sha256(file_sha, out), out
    if path.lower().endswith(".npz"):
        raise ImageError(name, "name the image inside the archive: FILE.npz#split=test&index=N")
    if src.fragment:
        raise ImageError(name, f"#{src.fragment} only applies to DICOM, NIfTI and .npz files")
    img, sha = read_image(path, max_pixels=max_pixels, min_size=min_size)
    return img, sha, src


def moved_to(recorded: str, given=None) -> str:
    """The locator to re-read a recorded image from: ``given`` (a file the user says it moved to),
    with the recorded frame, slice or index when ``given`` names none; else ``recorded``.

    Example:
        >>> moved_to("/old/cine.dcm#frame=12", "/new/cine.dcm")
        '/new/cine.dcm#frame=12'
    """
    if given is None:
        return recorded
    new, old = Source.parse(os.path.expanduser(os.fspath(given))), Source.parse(recorded)
    return replace(old, path=new.path).locator if not new.fragment and old.fragment else new.locator


def describe_origin(metadata: dict | None) -> str | None:
    """Where a case came from, for people: "CT series 1.2.3, frame 12 of 30", "volume sub-01,
    axial slice 40 of 155", "pneumoniamnist.npz, test image 17"; None for a plain image file."""
    m = metadata or {}
    fmt = m.get("format")
    if fmt == "dicom":
        parts = [" ".join(p for p in (m.get("Modality"), "series") if p) + f" {m.get('SeriesInstanceUID', '?')}"]
        if m.get("frame") is not None:
            parts.append(f"frame {m['frame']} of {m.get('frames', '?')}")
        return ", ".join(parts)
    if fmt == "nifti":
        text = f"volume {m.get('volume_file', '?')}, {m.get('axis', '?')} slice {m.get('slice', '?')} of {m.get('slices', '?')}"
        if m.get("volume") is not None:
            text += f" (3D volume {m['volume']} of {m.get('volumes', '?')})"
        return text
    if fmt == "npz":
        return f"{m.get('archive', '?')}, {m.get('split', '?')} image {m.get('index', '?')}"
    return None


def is_clinical(path: str) -> bool:
    """Whether a plain path (no locator) names a DICOM, NIfTI or ``.npz`` file (by content or name)."""
    if is_nifti_name(path) or path.lower().endswith(".npz"):
        return True

    try:
        with open_regular(path) as (f, _):
            return is_dicom(f.read(132))
    except (OSError, ImageError):
        return False


def check_window(window: str | None, windows, what: str = "query") -> None:
    """Refuse a ``--window`` other than the models' own (``windows``: each member's); None passes.

    Raises:
        ModelMismatchError: naming both windows and what to do instead.
    """
    distinct = sorted(set(windows)) or [DEFAULT_WINDOW]
    if window is not None and any(w != window for w in distinct):
        raise ModelMismatchError(
            f"--window {window}: the case base's models decode DICOM/NIfTI with window "
            f"{', '.join(distinct)} (part of their preprocessing); {what} without --window, or index with "
            f"--window {window} first")


def decode_query(image, windows, spec: SourceSpec | None = None):
    """Decode a query image with the window of the models that will embed it.

    Args:
        image: a path or locator (``cbr query`` argument).
        windows: the window of every member model (``config.window``).
        spec: the query's ``SourceSpec``: its ``window`` (when given) must be the models' own;
            its ``axis``/``volume`` pick the slice of a whole NIfTI volume.

    Returns ``(RGB image, sha256, resolved Source)``.

    Raises:
        ModelMismatchError: the query asks for another window than the models were built with, or
            the members disagree and the image is DICOM or NIfTI.
        ImageError: a DICOM marked BurnedInAnnotation=YES without ``spec.allow_burned_in``.
    """
    spec = spec or SourceSpec()
    src = Source.parse(image) if not isinstance(image, Source) else image
    distinct = sorted(set(windows)) or [DEFAULT_WINDOW]
    window = distinct[0]
    check_window(spec.window, windows)
    if len(distinct) > 1 and (src.fragment or is_clinical(src.path)):
        raise ModelMismatchError(
            f"the members decode DICOM/NIfTI with different windows ({', '.join(distinct)}); choose the "
            "members of one window with --model")
    refuse_burned_in(src, spec)
    return read_source(src, window=window, axis=spec.axis, volume=spec.volume)
