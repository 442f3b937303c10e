"""The one place images are decoded and shaped."""

from PIL import Image

__all__ = ["letterbox"]


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
