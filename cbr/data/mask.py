"""Lesion masks: a mask image read and letterboxed exactly like the image it outlines."""

from __future__ import annotations

import numpy as np

__all__ = ["lesion_mask"]


def lesion_mask(path: str, size: int) -> np.ndarray:
    """A mask image letterboxed like the model's input, as a bool array (size, size).

    Raises OSError when the file cannot be read.
    """
    from PIL import Image

    from cbr.data.image import letterbox

    with Image.open(path) as m:
        boxed = letterbox(m.convert("L").convert("RGB"), size)
    return np.asarray(boxed)[:, :, 0] > 127
