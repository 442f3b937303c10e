"""DICOM SEG lesion masks: a segmentation object read as one bool mask of its image's plane.

Decisions:

* **Reader.** highdicom reads the object (it checks the SEG module and maps frames to segments
  and to the source images they were drawn on), after cbr's own guarded parse: the size budget
  is checked before a pixel is decoded, and damage is named by its type, never by quoting values.
* **Which plane.** A SEG may hold many planes (a volume, several images). The plane whose frames
  reference the case image is taken: its SOPInstanceUID, and its frame for a multi-frame image.
  A SEG of one plane fits any image, a PNG included (how a 2D annotation tool exports a lesion).
  A SEG of several planes, none of them the image, is refused: guessing a slice would put the
  lesion on the wrong image.
* **Segments.** All segments are combined: a finding is any segment's pixel, cbr's masks being
  lesion / not lesion. A FRACTIONAL segment (probability or occupancy) is lesion from 0.5 up.
"""

from __future__ import annotations

import warnings

import numpy as np

from cbr.data.dicom import SEGMENTATION_STORAGE, parse_dicom
from cbr.errors import ImageError

__all__ = ["LESION_FRACTION", "seg_mask"]

LESION_FRACTION = 0.5


def seg_mask(data: bytes, name: str, reference=None) -> np.ndarray:
    """The lesion mask a DICOM SEG file holds for one image, as a bool array (rows, columns).

    Args:
        data: the SEG file's bytes; name: how to name it in an error.
        reference: (SOPInstanceUID, 1-based frame or None) of the case image when it is DICOM,
            else None (then the SEG must hold one plane).

    Raises ImageError (naming ``name`` and the reason) for damage, a DICOM file that is not a SEG,
    or a SEG without this image's plane.
    """
    ds = parse_dicom(data, name)
    sop = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if sop != SEGMENTATION_STORAGE:
        kind = getattr(ds.get("SOPClassUID"), "name", sop or "no SOP class")
        raise ImageError(name, f"a DICOM file but not a segmentation (SEG) object ({kind}); a mask is an image "
                               "(PNG, TIFF, ...) or a DICOM SEG")
    try:
        from highdicom.seg import Segmentation

        with warnings.catch_warnings():  # highdicom's warnings may quote values (names, UIDs)
            warnings.simplefilter("ignore")
            seg = Segmentation.from_dataset(ds, copy=False)
        planes = _planes(ds)
    except Exception as e:  # noqa: BLE001 - highdicom and pydicom raise many types on a malformed object
        raise ImageError(name, f"malformed DICOM SEG ({type(e).__name__}); export it again from the annotation "
                               "tool") from None
    uid, frame = _plane_of(planes, reference, name)
    options = {"rescale_fractional": True, "skip_overlap_checks": True, "dtype": np.float32}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if frame is None:
                arr = seg.get_pixels_by_source_instance([uid], **options)
            else:
                arr = seg.get_pixels_by_source_frame(uid, [frame], **options)
    except Exception as e:  # noqa: BLE001 - as above: a frame table that does not add up
        raise ImageError(name, f"malformed DICOM SEG ({type(e).__name__}); export it again from the annotation "
                               "tool") from None
    return (np.asarray(arr)[0] >= LESION_FRACTION).any(axis=-1)


def _planes(ds) -> list[tuple[str, int | None]]:
    """The distinct source planes the SEG's frames reference: (SOPInstanceUID, frame or None)."""
    planes = set()
    for item in ds.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence") or []:
            for src in derivation.get("SourceImageSequence") or []:
                frames = src.get("ReferencedFrameNumber")
                frames = [None] if frames is None else ([frames] if isinstance(frames, int) else list(frames))
                planes.update((str(src.ReferencedSOPInstanceUID), None if f is None else int(f)) for f in frames)
    return sorted(planes, key=lambda p: (p[0], p[1] or 0))


def _plane_of(planes, reference, name: str) -> tuple[str, int | None]:
    """The plane of ``planes`` that is the image's (``reference``), or the only one."""
    if reference is not None:
        uid, frame = reference
        mine = [p for p in planes if p[0] == uid and p[1] in (None, frame or 1)]
        if mine:
            return mine[0]
    if len(planes) == 1:
        return planes[0]
    if not planes:
        raise ImageError(name, "malformed DICOM SEG (its frames reference no source image); export it again "
                               "from the annotation tool")
    raise ImageError(name, f"a DICOM SEG of {len(planes)} planes, and none of them is this image; give a SEG of "
                           "this image's plane, or index the DICOM images it was drawn on")
