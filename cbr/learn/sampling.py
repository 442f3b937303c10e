"""How training batches are drawn (``SAMPLERS``): a seeded shuffle, or class-balanced draws.

* ``shuffle``: every training image once per epoch, in a seeded random order. Class imbalance is
  corrected in the loss: cross-entropy weighted by n / (K * n_class).
* ``balanced``: each draw picks an image with probability proportional to 1 / n_class, so every
  class is drawn equally often in expectation (``WeightedRandomSampler``, with replacement, as
  many draws per epoch as there are training images). Rare classes then also appear in most
  batches, which SupCon needs (an image without another of its class in the batch has no
  positive). The loss is then **unweighted**: the sampler has already equalised the classes, and
  weighting the loss as well would correct twice (effective class share proportional to
  1 / n_class, so the rarest class would dominate).

Both draw from a ``torch.Generator`` seeded with the run's seed: same seed and data, same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cbr.errors import UnknownNameError

__all__ = ["SAMPLERS", "Sampler", "get_sampler", "draw_weights"]


def draw_weights(targets) -> list[float]:
    """Per image, 1 / (number of training images of its class): each class has the same total."""
    counts: dict[int, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    return [1.0 / counts[t] for t in targets]


def _shuffle(targets, generator) -> dict:
    return {"shuffle": True, "generator": generator}


def _balanced(targets, generator) -> dict:
    from torch.utils.data import WeightedRandomSampler

    sampler = WeightedRandomSampler(draw_weights(targets), num_samples=len(targets), replacement=True,
                                    generator=generator)
    return {"sampler": sampler}


@dataclass(frozen=True)
class Sampler:
    """One way of drawing batches."""

    loader_options: Callable  # (training targets, seeded torch.Generator) -> DataLoader keyword arguments
    weighted_loss: bool  # whether cross-entropy still weights classes by n / (K * n_class)


SAMPLERS = {
    "shuffle": Sampler(_shuffle, weighted_loss=True),
    "balanced": Sampler(_balanced, weighted_loss=False),
}


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; UnknownNameError lists the choices."""
    if name not in SAMPLERS:
        raise UnknownNameError("sampler", name, SAMPLERS)
    return SAMPLERS[name]
