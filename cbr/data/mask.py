"""Lesion masks: a mask image read and letterboxed exactly like the image it outlines."""

from __future__ import annotations

import numpy as np

__all__ = ["lesion_mask"]


def lesion_mask(path: str, size: int) -> np.ndarray:
    """A mask image letterboxed like the model's input, as a bool array (size, size).

    Raises OSError when the file cannot be read (a FIFO, a device or an oversized file included).
    """
    import io

    from PIL import Image

    from cbr.data.guard import read_regular
    from cbr.data.image import letterbox
    from cbr.errors import ImageError

    try:
        data = read_regular(path)  # never open() a FIFO or device: it would block or never end
    except ImageError as e:
        raise OSError(f"{e.path}: {e.reason}") from None
    with Image.open(io.BytesIO(data)) as m:
        boxed = letterbox(m.convert("L").convert("RGB"), size)
    return np.asarray(boxed)[:, :, 0] > 127
