"""How an embedding is stored in the case base: float32 (exact; the default) or float16 (half the
bytes: 1 KB instead of 2 KB a case at d=512, 2.5 KB instead of 5 KB at d=1280).

The case base is the source of truth the indexes are rebuilt from, so float16 costs exactness
there: a rebuilt or repaired index holds the vectors rounded to float16 (about 1e-3 of a unit
vector's components, a cosine change below 1e-6 in practice), while the index filled at write time
holds the float32 vectors. Each row is read by its length, so one case base may hold both.
"""

from __future__ import annotations

import numpy as np

import index as ix

__all__ = ["EMBEDDING_DTYPES", "encode_vector", "decode_vectors"]

EMBEDDING_DTYPES = ("float32", "float16")  # numpy dtype names


def encode_vector(vector, dtype: str = "float32") -> bytes:
    """The stored bytes of one embedding (a numpy vector)."""
    return np.asarray(vector).astype(dtype, copy=False).tobytes()


def decode_vectors(blobs: list[bytes], dim: int):
    """float32 (n, dim) from stored rows of either dtype (told apart by their length)."""
    sizes = {len(blob) for blob in blobs}
    if sizes == {2 * dim}:  # a float16 case base: one SIMD cast (a query re-ranks hundreds of rows)
        # joined into a bytearray, which torch can wrap as it is (bytes would be copied once more)
        return ix.to_float32(np.frombuffer(bytearray().join(blobs), dtype=np.float16).reshape(len(blobs), dim))
    if sizes == {4 * dim}:
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()
    out = np.empty((len(blobs), dim), dtype=np.float32)
    for i, blob in enumerate(blobs):
        if len(blob) == 4 * dim:
            out[i] = np.frombuffer(blob, dtype=np.float32)
        elif len(blob) == 2 * dim:
            out[i] = np.frombuffer(blob, dtype=np.float16)
        else:
            raise ValueError(f"a stored embedding of {len(blob)} bytes is neither float32 nor float16 at d={dim}")
    return out
