"""Training on cached features of the frozen blocks (``--train-layers N --cache-draws D``).

With the leading blocks frozen (``--train-layers``), their output depends only on the input image:
they run in eval mode (BatchNorm statistics frozen, no dropout) and their weights never change.
So each image's frozen features are computed once per augmentation draw, before the first
epoch, and every epoch trains the later blocks and the head on the cache: epoch e uses draw
(e - 1) mod D of every image. An epoch then costs the later blocks' forward and backward pass
only, which is what makes a 15-epoch budget fit a 2-core machine.

The price: D augmentation draws per image instead of a fresh one every epoch (D = epochs gives
every epoch its own draws, as uncached training has), and D x N x the frozen output's size of
memory (float16: MobileNetV2 with 5 trained blocks at 224 px keeps 96 x 14 x 14 values, 37 KB
per image and draw). The validation images (never augmented) are cached once as well.
"""

from __future__ import annotations

import contextlib

__all__ = ["CACHE_DTYPE", "FeatureDraws", "as_float", "bypass", "cached_features", "frozen_features"]

# Storage type of the cached features; float16 halves the memory, and the trainable blocks see
# the features in float32 (tests set float32 to compare with uncached training exactly).
CACHE_DTYPE = "float16"


def _passthrough(x):
    return x


@contextlib.contextmanager
def bypass(frozen):
    """Within the block, the ``frozen`` modules pass their input through: the model starts from
    cached features. Their parameters and state_dict keys stay where they are."""
    try:
        for m in frozen:
            m.forward = _passthrough  # an instance attribute: nn.Module.__call__ looks it up first
        yield
    finally:
        for m in frozen:
            m.__dict__.pop("forward", None)


def frozen_features(model, frozen, x):
    """The frozen leading blocks' output for a normalised image batch ``x`` (no autograd).

    ``frozen`` are the first trunk stages in execution order (``trainer.trunk_stages``), so
    running them one after the other is the trunk's own computation up to the last of them.
    """
    import torch

    with torch.no_grad():
        h = model._prepare(x)
        for m in frozen:
            h = m(h)
    return h


def as_float(device):
    """Cached features -> the float32 batch the trainable blocks take (what ``normalise`` is for pixels)."""
    import torch

    return lambda f: f.to(device=device, dtype=torch.float32)


def cached_features(model, frozen, images, normalise, batch_size: int):
    """The frozen blocks' output for uint8 ``images`` (N, 3, S, S), stored on the CPU as ``CACHE_DTYPE``."""
    import torch

    dtype = getattr(torch, CACHE_DTYPE)
    for m in frozen:
        m.eval()
    parts = [frozen_features(model, frozen, normalise(images[s:s + batch_size])).to("cpu", dtype).contiguous()
             for s in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else images


class FeatureDraws:
    """A dataset of cached frozen features: ``draws`` augmentation draws of every training image.

    Args:
        model: the Embedder being trained.
        frozen: its frozen leading stages (in eval mode while the cache is built).
        dataset: the augmented training set (``cbr.learn.augmentation.Augmented``): item i is a
            fresh random draw of image i, label i.
        draws: augmentation draws per image (at least 1).
        normalise: uint8 batch -> normalised float batch on the model's device.
        batch_size: images per forward pass while caching.
    """

    def __init__(self, model, frozen, dataset, draws: int, normalise, batch_size: int):
        import torch

        self.targets = list(dataset.targets)
        self.draw = 0
        # one draw = every image through the augmentation once (the global RNG, as uncached epochs)
        self.features = [cached_features(model, frozen, torch.stack([torch.as_tensor(dataset[i][0])
                                                                     for i in range(len(dataset))]),
                                         normalise, batch_size)
                         for _ in range(max(int(draws), 1))]

    @property
    def draws(self) -> int:
        return len(self.features)

    def set_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based) reads draw (epoch - 1) mod ``draws``."""
        self.draw = (int(epoch) - 1) % self.draws

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.features[self.draw][i], self.targets[i]
