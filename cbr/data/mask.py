"""Lesion masks: a mask image or DICOM SEG, read and letterboxed exactly like the image it outlines."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from cbr.data.crop import crop_box, mask_view
from cbr.data.dicom import is_dicom
from cbr.data.guard import read_regular
from cbr.data.image import check_pillow_size
from cbr.data.records import printable_path
from cbr.data.seg import seg_mask
from cbr.data.sources import dicom_reference, read_source
from cbr.errors import CbrError, ImageError

__all__ = ["lesion_mask", "read_mask"]


def _grey(path, image) -> np.ndarray:
    """The mask in its own pixels as uint8 grey (0-255; a SEG's lesion is 255)."""
    name = printable_path(path)
    try:
        data = read_regular(path)  # never open() a FIFO or device: it would block or never end
        if is_dicom(data[:132]):
            reference = dicom_reference(image) if isinstance(image, (str, os.PathLike)) else None
            return seg_mask(data, name, reference).astype(np.uint8) * 255
        with Image.open(io.BytesIO(data)) as m:
            check_pillow_size(m, name)  # a mask can be a decompression bomb too
            return np.asarray(m.convert("L"))
    except ImageError as e:
        raise OSError(f"{e.path}: {e.reason}") from None
    except CbrError as e:  # an image locator that cannot name a DICOM plane
        raise OSError(f"{name}: {e}") from None


def read_mask(path, *, image=None) -> np.ndarray:
    """A lesion mask file as a bool array in its own pixels (rows, columns).

    Args:
        path: an image (lesion where its grey level is over 127) or a DICOM SEG (:mod:`cbr.data.seg`).
        image: the case image's path or locator: it picks the plane of a SEG that holds several.

    Raises OSError naming the file and the reason (unreadable, damaged, a SEG without the image's plane).
    """
    return _grey(path, image) > 127


def lesion_mask(path: str, size: int, *, crop: str = "none", image=None, window: str = "auto") -> np.ndarray:
    """A mask (an image or a DICOM SEG) in the model's view of its image, as a bool array (size, size).

    Args:
        path: the mask file.
        size: the model's input side.
        crop: the model's ``crop`` (``cbr.data.crop.CROPS``): the box is the one ``crop`` cuts from
            the mask's *image*, so that the mask lines up with the maps of that image.
        image: the mask's image (a decoded PIL image, or its path or locator, decoded with
            ``window``); needed when ``crop`` is not "none", and a path picks a SEG's plane.
        window: the model's VOI window, to decode ``image`` as the model did.

    Raises OSError when the mask (or, with a crop, its image) cannot be read (a FIFO, a device
    or an oversized file included).
    """
    grey = _grey(path, image)
    box = image_size = None
    if crop != "none":
        if image is None:
            raise ValueError(f"lesion_mask with crop={crop!r} needs the mask's image")
        try:
            if not isinstance(image, Image.Image):
                image = read_source(image, window=window)[0]
            box, image_size = crop_box(image, crop), image.size
        except ImageError as e:
            raise OSError(f"{e.path}: {e.reason}") from None
    boxed = mask_view(Image.fromarray(grey).convert("RGB"), size, box, image_size)
    return np.asarray(boxed)[:, :, 0] > 127
