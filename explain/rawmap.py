"""The storage form of a raw map: float16 values in [0, 1] and the raw magnitude beside them.

numpy only, so that reading a stored map (``cbr show``, ``cbr report``) imports neither torch
nor grad-cam.
"""

import numpy as np

__all__ = ["encode_map", "decode_map"]


def encode_map(raw):
    """Storage form of a raw map: (float16 bytes of raw / scale, shape, scale).

    scale = raw.max() (0 for an all-zero map), so the stored values lie in [0, 1] where float16
    is precise, and the raw magnitude comes back from decode_map. A 7x7 map takes 98 bytes.
    """
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2:
        raise ValueError(f"a raw map is 2-D, got shape {raw.shape}")
    if not np.all(np.isfinite(raw)):
        raise ValueError("raw map contains NaN or infinity")
    scale = float(raw.max()) if raw.size else 0.0
    if scale > 0:
        stored = raw / scale
    else:
        scale = 0.0
        stored = np.zeros_like(raw)
    data = stored.astype("<f2").tobytes()
    return data, (int(raw.shape[0]), int(raw.shape[1])), scale


def decode_map(data, shape, scale):
    """Inverse of encode_map: a float32 raw map of `shape`."""
    h, w = (int(n) for n in shape)
    if len(data) != 2 * h * w:
        raise ValueError(f"{len(data)} bytes cannot hold a float16 map of shape {(h, w)}")
    stored = np.frombuffer(data, dtype="<f2").reshape(h, w)
    return stored.astype(np.float32) * np.float32(scale)
