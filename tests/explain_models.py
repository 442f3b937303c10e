"""Tiny random-init CNNs for the explain tests: trunk (B, 3, 32, 32) -> (B, 16, 8, 8)."""

import contextlib

import torch
from torch import nn

CHANNELS = 16
CLASSES = 3


def make_trunk(seed=0):
    """Three Conv/BN/ReLU blocks; batch-norm statistics set by a few training-mode passes."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
    )
    # Non-trivial running statistics, so eval-mode batch norm is not the identity.
    with torch.no_grad():
        for _ in range(3):
            trunk(torch.rand(8, 3, 32, 32))
    return trunk.eval()


def make_embedder_head():
    """Global average pool + flatten: the un-normalised embedding."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def make_classifier_head(seed=0):
    """Pool + flatten + Linear: class logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, CLASSES)).eval()


def make_images(n, seed=0, size=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: on a small shared machine, two intra-op threads fighting for
    busy cores make these tiny models 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
