"""The batch loader shared by indexing and training: decode each record once, apply every
member's preprocessing, and report unusable files instead of failing."""

from __future__ import annotations

import os

from cbr.data.sources import read_source
from cbr.errors import ImageError

__all__ = ["DecodedRecords", "decode_workers", "iter_batches"]


class DecodedRecords:
    """A torch Dataset that decodes each record once and applies every transform to it.

    Items are (index, [one tensor per transform], None) or (index, None, problem reason): a file
    that cannot be used is reported, never fatal. Used by indexing (one transform per member's
    preprocessing) and by training (letterboxed uint8). ``window`` is the VOI window DICOM and
    NIfTI sources are decoded with (the models' own; see cbr.data.windows).
    """

    def __init__(self, records, transforms, window: str = "auto"):
        self.records, self.transforms, self.window = records, list(transforms), window

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        try:
            img, sha, _ = read_source(r.path, window=self.window)
        except ImageError as e:
            return i, None, e.reason
        if sha != r.sha256:
            return i, None, "file changed since the dataset was read; run again"
        return i, [t(img) for t in self.transforms], None


def collate(items):
    """(index, tensors, error) items -> (indexes, stacked tensors, [(index, error)]) of one batch:
    items that failed to decode are set aside with their error, the rest stacked per tensor."""
    import torch

    ok = [(i, t) for i, t, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if not ok:
        return [], None, bad
    n = len(ok[0][1])
    tensors = [torch.stack([t[m] for _, t in ok]) for m in range(n)]
    return [i for i, _ in ok], tensors, bad


def decode_workers(n: int, batch_size: int) -> int:
    """Decoding processes: none for a single batch, 1 on a 2-core machine, else up to 4."""
    if n <= batch_size:
        return 0
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores - 1)


def iter_batches(records, transforms, batch_size: int, num_workers: int | None = None, window: str = "auto"):
    """Yield (record indices, one stacked tensor per transform, [(index, problem reason)]).

    ``transforms`` are callables PIL image -> tensor, e.g. each member's ``preprocess``;
    ``window`` is the VOI window for DICOM and NIfTI sources.
    """
    import torch

    if num_workers is None:
        num_workers = decode_workers(len(records), batch_size)
    loader = torch.utils.data.DataLoader(
        DecodedRecords(records, transforms, window), batch_size=batch_size, shuffle=False,
        num_workers=num_workers if len(records) > batch_size else 0, collate_fn=collate,
    )
    yield from loader
