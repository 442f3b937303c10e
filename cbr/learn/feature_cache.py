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
per image and draw). Validation images are not cached: they run through the whole model.
"""

from __future__ import annotations

import contextlib

__all__ = ["CACHE_DTYPE", "FeatureDraws", "bypass", "frozen_features"]

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
        dtype = getattr(torch, CACHE_DTYPE)
        for m in frozen:
            m.eval()
        cached = []
        for _ in range(max(int(draws), 1)):
            parts = []
            for s in range(0, len(dataset), batch_size):
                xb = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(s, min(s + batch_size, len(dataset)))])
                parts.append(frozen_features(model, frozen, normalise(xb)).to("cpu", dtype).contiguous())
            cached.append(torch.cat(parts))
        self.features = cached

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
