"""What training sees: every image decoded and letterboxed once, then augmented per sample.

* **Decode once.** Every image is decoded (:func:`cbr.data.image.read_image`, in DataLoader workers),
  letterboxed to the input size and kept in memory as uint8 (3 x S x S bytes each: 150 KB at
  224 px, so 10,000 images take 1.5 GB). Epochs then cost only the network. Files that cannot
  be decoded are skipped and listed.
* **Augmentation** (training part only, per sample, on the letterboxed uint8 tensor, with
  ``torchvision.transforms.v2``): flips (``FLIPS``, p = 0.5 each; default horizontal only:
  left-right mirroring keeps a brain or a skin lesion plausible, but a mirrored chest X-ray puts
  the heart on the right, so ``--flip none`` is there for anatomy with a side, and ``vertical`` or
  ``both`` for images without an up, such as dermoscopy or histology); rotation within +-10 degrees and
  scale 0.9-1.1 in one affine warp, black fill like the letterbox padding; brightness and
  contrast +-20 %. Saturation (+-10 %) and hue (+-0.02) jitter are added only for colour data:
  a dataset whose sampled images (90 % of them at least) have R == G == B, within JPEG rounding,
  is grayscale, and colour jitter would invent colours its images never have. No crops: lesions
  at the border of a letterboxed image must stay in view.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from tqdm import tqdm

from cbr.data.batches import iter_batches
from cbr.data.crop import model_view
from cbr.data.dataset import Problem
from cbr.errors import UnknownNameError

__all__ = ["AUGMENTATION", "FLIPS", "Augmented", "augmentation_text", "decode_all", "is_grayscale",
           "make_augmentation"]

# What the augmentation does, in words (stored in checkpoints and printed by `cbr train`).
AUGMENTATION = "hflip, rotate +-10 deg, scale 0.9-1.1, brightness/contrast +-20% (+ saturation/hue for colour data)"
# --flip: name -> the torchvision v2 flips applied (each with p = 0.5). "horizontal" is what
# training always did, so it stays the default and existing figures do not move.
FLIPS = {
    "none": (),
    "horizontal": ("RandomHorizontalFlip",),
    "vertical": ("RandomVerticalFlip",),
    "both": ("RandomHorizontalFlip", "RandomVerticalFlip"),
}
_FLIP_WORDS = {"none": "no flip", "horizontal": "hflip", "vertical": "vflip", "both": "hflip, vflip"}
GREY_SAMPLE = 64  # images checked for R == G == B
GREY_TOLERANCE = 1.0  # mean |R-G| + |G-B| in grey levels still counted as grey (JPEG rounding)
GREY_SHARE = 0.9  # a dataset is grayscale when at least this share of the sampled images is grey


def _letterboxed(img, size: int, contrast: str = "none", crop: str = "none"):
    """PIL image -> uint8 (3, size, size): the model's view (crop, contrast normalisation,
    letterbox), as ``Embedder.preprocess`` makes it: the cache training augments from."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(model_view(img, size, crop, contrast))


def decode_all(records, size: int, *, batch_size: int = 32, num_workers=None, progress=False, window: str = "auto",
               contrast: str = "none", crop: str = "none"):
    """Decode and letterbox ``records`` once: (kept indices, uint8 tensor (N, 3, S, S), problems);
    DICOM and NIfTI pixels with the VOI ``window``, and the ``contrast`` and ``crop`` (the model's)."""
    import torch

    kept, tensors, problems = [], [], []
    with tqdm(total=len(records), desc="decoding", unit="img", disable=not progress) as bar:
        for idx, batch, bad in iter_batches(records, [partial(_letterboxed, size=size, contrast=contrast, crop=crop)], batch_size,
                                            num_workers,
                                            window=window):
            problems.extend(Problem(records[i].path, reason) for i, reason in bad)
            if idx:
                kept.extend(idx)
                tensors.extend(batch[0])
            bar.update(len(idx) + len(bad))
    stack = torch.stack(tensors) if tensors else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return kept, stack, problems


def is_grayscale(images, *, sample: int = GREY_SAMPLE, seed: int = 0) -> bool:
    """Whether the sampled uint8 images (N, 3, H, W) are grey (R == G == B within JPEG rounding).

    At least 90 % of them must be: grey archives often hold a few tinted exports (18 of the 228
    brain MRI images), which do not make the modality a colour one.
    """
    n = len(images)
    if n == 0:
        return False
    pick = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    grey = 0
    for i in pick:
        x = images[int(i)].float()
        diff = (x[0] - x[1]).abs().mean() + (x[1] - x[2]).abs().mean()
        grey += float(diff) <= GREY_TOLERANCE
    return grey >= GREY_SHARE * len(pick)


def check_flip(flip: str) -> None:
    """UnknownNameError unless ``flip`` is a name in ``FLIPS``."""
    if flip not in FLIPS:
        raise UnknownNameError("flip", flip, FLIPS)


def augmentation_text(grayscale: bool, flip: str = "horizontal") -> str:
    """What ``make_augmentation(grayscale, flip)`` does, in words (stored in the checkpoint)."""
    text = AUGMENTATION.replace("hflip", _FLIP_WORDS[flip], 1)
    return text.split(" (+")[0] if grayscale else text


def make_augmentation(grayscale: bool, flip: str = "horizontal"):
    """The training augmentation for uint8 (3, S, S) tensors (see the module docstring)."""
    from torchvision.transforms import InterpolationMode, v2

    check_flip(flip)
    jitter = dict(brightness=0.2, contrast=0.2)
    if not grayscale:
        jitter.update(saturation=0.1, hue=0.02)
    return v2.Compose([
        *(getattr(v2, name)(p=0.5) for name in FLIPS[flip]),
        v2.RandomAffine(degrees=10, scale=(0.9, 1.1), interpolation=InterpolationMode.BILINEAR, fill=0),
        v2.ColorJitter(**jitter),
    ])


class Augmented:
    """Cached uint8 images -> (augmented uint8 image, label index).

    With ``masks`` (uint8 (N, 1, S, S)) and ``has`` (bool (N,)), for mask guidance: (image, label,
    mask, has mask), the mask given the very same flip and affine warp as its image (nearest
    neighbour, no colour jitter), or guidance would score the map against the wrong pixels.
    """

    def __init__(self, images, targets, transform, masks=None, has=None):
        self.images, self.targets, self.transform = images, targets, transform
        self.masks, self.has = masks, has

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i]
        if self.masks is not None:
            x, m = _together(self.transform, x, self.masks[i])
            return x, self.targets[i], m, self.has[i]
        return (self.transform(x) if self.transform is not None else x), self.targets[i]


def _together(transform, image, mask):
    """(image, mask) after one draw of ``transform``'s random parameters, applied to both."""
    import torch
    from torchvision import tv_tensors

    if transform is None:
        return image, mask
    x, m = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return x.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)
