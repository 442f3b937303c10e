"""Rebuilding an index from the stored embeddings streams them: no read holds them all.

At 10M x 512 the stored embeddings are 10-20 GB, more than the memory of the machine that
serves them, so the rebuild (``cbr index --rebuild``, and the end of ``cbr import``, which trains
the index kind it asked for) reads them a chunk at a time and trains a learning index on an even
sample.
"""

import numpy as np
from sqlalchemy import select

import cbr.store.member as member_module
import index as ix
from cbr.store.casebase import open_casebase
from cbr.store.member import active_embeddings, rebuild_index
from cbr.store.schema import Model


def _spy(monkeypatch, module, name, arg=0):
    """Records the length of positional argument ``arg`` of each call of ``module.name``."""
    sizes, real = [], getattr(module, name)

    def spy(*args, **kw):
        sizes.append(len(args[arg]))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return sizes


def _stored(db):
    """(case base, its model's id, the active case ids, their stored embeddings)."""
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    return (cb, model_id, *active_embeddings(cb, model_id))


def test_the_rebuild_reads_the_embeddings_a_chunk_at_a_time(indexed, monkeypatch):
    cb, model_id, ids, vecs = _stored(indexed)
    monkeypatch.setattr(member_module, "REBUILD_ROWS", 5, raising=False)
    reads = _spy(monkeypatch, member_module, "decode_vectors")
    index = rebuild_index(cb, model_id, "flat")
    assert reads and max(reads) <= 5 and sum(reads) == len(ids)
    assert sorted(ix.ids(index).tolist()) == sorted(ids.tolist())
    _, found = ix.search(index, vecs, 1)
    assert found[:, 0].tolist() == ids.tolist()  # each stored vector is its own nearest


def test_a_learning_index_trains_on_an_even_sample_then_holds_every_case(indexed, monkeypatch):
    cb, model_id, ids, _ = _stored(indexed)
    monkeypatch.setattr(member_module, "REBUILD_ROWS", 4, raising=False)
    monkeypatch.setattr(member_module, "TRAIN_ROWS", 6, raising=False)
    trained = _spy(monkeypatch, ix, "train", arg=1)
    index = rebuild_index(cb, model_id, "ivf")
    assert len(trained) == 1 and trained[0] < len(ids) and trained[0] >= 6
    assert sorted(ix.ids(index).tolist()) == sorted(ids.tolist())
    assert ix.learned(index)
