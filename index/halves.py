"""Float16 rows widened to float32 with SIMD: the step a re-rank from stored float16 vectors costs.

numpy 2.4 converted float16 at about 2 ns an element on the x86 machine measured (AVX-512 and
F16C, which numpy's cast did not use): 10,000 rows of d = 512 took 10.2 ms of CPU, against 2.9 ms
for torch's vectorised cast and 0.9 ms when the cast and the inner products go 1,024 rows at a
time, so that the float32 block stays in cache (one thread, rows of the 10M sidecar:
docs/results.md, "The re-rank's float16 cast"). The cast is exact either way: every float16 is a
float32. Importing torch costs a process that has not loaded it yet about 4 s once; every query
process has (the CNN).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_ROWS", "to_float32"]

# Rows widened at a time by a caller that consumes them at once (2 MB of float32 at d = 512).
BLOCK_ROWS = 1024


def to_float32(halves, out=None) -> np.ndarray:
    """The float32 copy of a float16 array (any shape), cast by torch's vectorised kernel.

    Args:
        halves: float16 array; a read-only one (a memory map, ``np.frombuffer`` of bytes) is copied
            first, since torch only wraps writable memory.
        out: optional float32 array of the same shape to write into (a reused buffer).
    """
    import torch

    x = np.asarray(halves)
    if x.dtype != np.float16:
        raise ValueError(f"expected float16 values, got {x.dtype}")
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of shape {x.shape}")
    if x.size:
        if not (x.flags.writeable and x.flags.c_contiguous):
            x = np.array(x, order="C")
        torch.from_numpy(out).copy_(torch.from_numpy(x))
    return out
