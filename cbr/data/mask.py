"""Lesion masks: a mask image read and letterboxed exactly like the image it outlines."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cbr.data.crop import crop_box, mask_view
from cbr.data.guard import read_regular
from cbr.data.image import check_pillow_size
from cbr.data.records import printable_path
from cbr.data.sources import read_source
from cbr.errors import ImageError

__all__ = ["lesion_mask"]


def lesion_mask(path: str, size: int, *, crop: str = "none", image=None, window: str = "auto") -> np.ndarray:
    """A mask image in the model's view of its image, as a bool array (size, size).

    Args:
        path: the mask image file.
        size: the model's input side.
        crop: the model's ``crop`` (``cbr.data.crop.CROPS``): the box is the one ``crop`` cuts from
            the mask's *image*, so that the mask lines up with the maps of that image.
        image: the mask's image (a decoded PIL image, or its path or locator, decoded with
            ``window``); needed only when ``crop`` is not "none".
        window: the model's VOI window, to decode ``image`` as the model did.

    Raises OSError when the mask (or, with a crop, its image) cannot be read (a FIFO, a device
    or an oversized file included).
    """
    try:
        data = read_regular(path)  # never open() a FIFO or device: it would block or never end
        box = image_size = None
        if crop != "none":
            if image is None:
                raise ValueError(f"lesion_mask with crop={crop!r} needs the mask's image")
            if not isinstance(image, Image.Image):
                image = read_source(image, window=window)[0]
            box, image_size = crop_box(image, crop), image.size
    except ImageError as e:
        raise OSError(f"{e.path}: {e.reason}") from None
    with Image.open(io.BytesIO(data)) as m:
        try:
            check_pillow_size(m, printable_path(path))  # a mask can be a decompression bomb too
        except ImageError as e:
            raise OSError(f"{e.path}: {e.reason}") from None
        boxed = mask_view(m.convert("L").convert("RGB"), size, box, image_size)
    return np.asarray(boxed)[:, :, 0] > 127
