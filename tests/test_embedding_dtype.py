"""`cbr index --embedding-dtype float16`: half the bytes per case, and rebuilds still work."""

import numpy as np
import pytest
from sqlalchemy import func, select

from cbr.store.casebase import open_casebase
from cbr.store.encoding import decode_vectors, encode_vector
from cbr.store.member import active_embeddings
from cbr.store.schema import Embedding
from conftest import TINY, invoke

pytestmark = pytest.mark.postgres


def test_rows_of_both_dtypes_decode():
    v = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    out = decode_vectors([encode_vector(v[0], "float32"), encode_vector(v[1], "float16")], 16)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], v[0])
    np.testing.assert_allclose(out[1], v[1], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="neither float32 nor float16"):
        decode_vectors([b"abc"], 16)


def test_rows_of_one_dtype_decode_at_once_to_the_same_values():
    # a float16 case base's rows are widened in one cast (index.to_float32), float32 ones in one copy
    v = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    for dtype in ("float16", "float32"):
        out = decode_vectors([encode_vector(row, dtype) for row in v], 16)
        assert out.dtype == np.float32 and out.flags.writeable and out.shape == v.shape
        np.testing.assert_array_equal(out, v.astype(dtype).astype(np.float32))
    assert decode_vectors([], 16).shape == (0, 16)
    with pytest.raises(ValueError, match="neither float32 nor float16"):
        decode_vectors([encode_vector(v[0], "float16"), b"abc"], 16)


@pytest.mark.slow
def test_float16_halves_the_stored_embedding_and_rebuilds(runner, phantom_set, fresh_db):
    sizes, vectors = {}, {}
    for dtype in ("float32", "float16"):
        db = fresh_db(dtype)
        result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--explain", "none",
                        "--embedding-dtype", dtype)
        assert result.exit_code == 0, result.output
        cb = open_casebase(db, create=False)
        with cb.read() as s:
            sizes[dtype] = s.scalar(select(func.sum(func.length(Embedding.vector))))
            model_id = s.scalar(select(Embedding.model_id))
        vectors[dtype] = active_embeddings(cb, model_id)[1]
        cb.close()
        rebuilt = invoke(runner, "index", "--rebuild", "--db", db)
        assert rebuilt.exit_code == 0, rebuilt.output
    assert sizes["float16"] * 2 == sizes["float32"]
    np.testing.assert_allclose(vectors["float16"], vectors["float32"], atol=1e-3)
