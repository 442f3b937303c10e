"""index/shards: IVF shards filled by worker processes, merged on disk, memory-mapped; the merged
index answers exactly like one process's, filtered search included, and a failed build never
replaces the index."""

import os
import shutil

import faiss
import numpy as np
import pytest

import index
from index import shards
from index_data import faiss_one_thread, recall  # noqa: F401 - the fixture applies to this module

D = 32
N = 3000
CHUNKS = 6
NLIST = 16
K = 10


class Chunks:
    """Chunk c of a fixed data set, regenerated from its seed in whichever process asks (the
    workers are spawned: they import this class by name). Ids are sparse, not row numbers."""

    def __init__(self, die_at=None, fail_at=None):
        self.die_at, self.fail_at = die_at, fail_at

    def __call__(self, chunk):
        if chunk == self.die_at:
            os._exit(3)  # a worker killed outright, mid-build
        if chunk == self.fail_at:
            raise ValueError(f"chunk {chunk} is unreadable")
        per = N // CHUNKS
        rng = np.random.default_rng([7, chunk])
        centres = np.random.default_rng(1).standard_normal((20, D)).astype(np.float32)
        x = centres[rng.integers(0, 20, per)] + 0.6 * rng.standard_normal((per, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, (np.arange(chunk * per, (chunk + 1) * per, dtype=np.int64) * 7 + 3)


def everything():
    parts = [Chunks()(c) for c in range(CHUNKS)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def trained(factory):
    """``factory`` trained on half the data. PQ factories end in ``np`` (no polysemous training),
    as index.vectors trains PQ: polysemous training only reorders the codes, at 100 times the cost."""
    x, _ = everything()
    ix = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    ix.train(x[::2])  # a sample, as at scale
    return ix


def single_process(ix):
    """The reference: the same trained index filled by one process."""
    one = faiss.clone_index(ix)
    for c in range(CHUNKS):
        one.add_with_ids(*Chunks()(c))
    return one


@pytest.fixture(scope="module")
def flat_build(tmp_path_factory):
    ix = trained(f"IVF{NLIST},Flat")
    path = tmp_path_factory.mktemp("shards") / "cases.index"
    merged = shards.build_sharded(ix, shards.ShardPlan(Chunks(), CHUNKS, workers=2), path)
    return ix, path, merged


@pytest.mark.slow
@pytest.mark.parametrize("factory", [f"IVF{NLIST},Flat", f"IVF{NLIST},PQ8np"])
def test_merged_equals_one_process(tmp_path, factory):
    ix = trained(factory)
    merged = shards.build_sharded(ix, shards.ShardPlan(Chunks(), CHUNKS, workers=3), tmp_path / "m.index")
    one = single_process(ix)
    assert merged.ntotal == one.ntotal == N
    q = everything()[0][::50]
    for nprobe in (2, NLIST):
        merged.nprobe = one.nprobe = nprobe
        Dm, Im = merged.search(q, K)
        Do, Io = one.search(q, K)
        np.testing.assert_allclose(Dm, Do, rtol=1e-6, atol=1e-6)
        if factory.endswith("Flat"):
            np.testing.assert_array_equal(Im, Io)
        else:  # equal PQ codes tie, and ties may come in either order
            assert recall(Im, Io) >= 0.97


@pytest.mark.slow
def test_merged_matches_brute_force_with_filters(flat_build):
    """Same image and same patient excluded, and an allow-list, on the merged bare IVF: with every
    list probed, exactly the brute-force answer."""
    _, _, merged = flat_build
    merged.nprobe = NLIST
    x, ids = everything()
    q = x[::37]
    own = ids[::37]
    exclude = [{int(i), int(i) + 7, int(i) - 7} for i in own]  # the image and its "patient"
    allow = ids[np.random.default_rng(2).random(len(ids)) < 0.4]
    for kw in ({}, {"exclude": exclude}, {"allow": allow}, {"exclude": exclude, "allow": allow}):
        D, I = index.search(merged, q, K, **kw)
        Dref, Iref = index.brute_force_search(x, ids, q, K, **kw)
        np.testing.assert_array_equal(I, Iref)
        np.testing.assert_allclose(D, Dref, rtol=1e-5, atol=1e-5)
        if "exclude" in kw:
            assert not any(set(row) & e for row, e in zip(I.tolist(), exclude))
        if "allow" in kw:
            assert np.isin(I, allow).all()


def test_merged_lists_are_memory_mapped_read_only(flat_build):
    _, path, merged = flat_build
    data = shards.ivfdata_path(merged)
    assert os.path.dirname(data) == os.path.dirname(str(path))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    with open("/proc/self/maps") as f:
        maps = [line for line in f if line.rstrip().endswith(data)]
    assert maps and all(line.split()[1].startswith("r-") for line in maps)
    # The index file is the quantizer only; the codes and ids are in the mapped file.
    assert os.path.getsize(path) < os.path.getsize(data)
    assert os.path.getsize(data) >= N * (D * 4 + 8)


def test_index_and_lists_move_together(flat_build, tmp_path):
    _, path, merged = flat_build
    for f in (path, shards.ivfdata_path(merged)):
        shutil.copy(f, tmp_path)
    moved = shards.load_sharded(tmp_path / path.name)
    assert shards.ivfdata_path(moved).startswith(str(tmp_path))
    q = everything()[0][:5]
    np.testing.assert_array_equal(moved.search(q, K)[1], merged.search(q, K)[1])


@pytest.mark.slow
@pytest.mark.parametrize("plan, message", [
    (shards.ShardPlan(Chunks(die_at=3), CHUNKS, workers=2), "died"),
    (shards.ShardPlan(Chunks(fail_at=4), CHUNKS, workers=2), "chunk 4 is unreadable"),
])
def test_a_failed_worker_never_replaces_the_index(tmp_path, plan, message):
    ix = trained(f"IVF{NLIST},Flat")
    path = tmp_path / "cases.index"
    first = shards.build_sharded(ix, shards.ShardPlan(Chunks(), 3, workers=2), path)
    before = sorted(os.listdir(tmp_path))
    q = everything()[0][:8]
    expected = first.search(q, K)
    with pytest.raises(shards.ShardBuildError, match=message):
        shards.build_sharded(ix, plan, path)
    assert sorted(os.listdir(tmp_path)) == before  # no shard, work folder or lists file left
    again = shards.load_sharded(path)
    assert again.ntotal == first.ntotal == 3 * (N // CHUNKS)
    np.testing.assert_array_equal(again.search(q, K)[1], expected[1])


@pytest.mark.slow
def test_a_crash_while_merging_never_replaces_the_index(tmp_path, monkeypatch):
    """The merged lists half written when the merge dies: the old index stays, and the half file goes."""
    ix = trained(f"IVF{NLIST},Flat")
    path = tmp_path / "cases.index"
    shards.build_sharded(ix, shards.ShardPlan(Chunks(), 2, workers=2), path)
    before = sorted(os.listdir(tmp_path))

    def half_merge(merged, shard_paths, ivfdata):
        with open(ivfdata, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError("disk full")

    monkeypatch.setattr(shards, "_merge", half_merge)
    with pytest.raises(OSError, match="disk full"):
        shards.build_sharded(ix, shards.ShardPlan(Chunks(), CHUNKS, workers=2), path)
    assert sorted(os.listdir(tmp_path)) == before
    assert shards.load_sharded(path).ntotal == 2 * (N // CHUNKS)


def test_a_shard_half_written_is_never_a_shard(tmp_path, monkeypatch):
    """A worker that dies while writing its shard leaves no file under the shard's name."""
    ix = trained(f"IVF{NLIST},Flat")
    index.save(ix, tmp_path / "trained.index")

    def half_write(ix, name):
        with open(name, "wb") as f:
            f.write(b"IwPQ" + b"\0" * 100)
        raise OSError("killed")

    monkeypatch.setattr(faiss, "write_index", half_write)  # index.storage imports faiss when it saves
    with pytest.raises(OSError, match="killed"):
        shards.fill(tmp_path / "trained.index", tmp_path / "shard-000.index",
                    shards.ShardPlan(Chunks(), CHUNKS, workers=2), 0)
    assert sorted(os.listdir(tmp_path)) == ["trained.index"]


def test_refuses_an_index_that_is_not_trained_ivf(tmp_path):
    with pytest.raises(ValueError, match="trained IVF"):
        shards.build_sharded(faiss.IndexFlatIP(D), shards.ShardPlan(Chunks(), 1), tmp_path / "x")
    with pytest.raises(index.IndexFileError):
        shards.load_sharded(tmp_path / "missing.index")


@pytest.mark.slow
def test_filters_on_a_rotated_sharded_index(tmp_path):
    """An OPQ rotation in front of the IVF (what the 10M benchmark builds): the filtered answer is
    the unfiltered one with the excluded (or not allowed) ids dropped, as the filter runs in the scan."""
    merged = shards.build_sharded(trained(f"OPQ8_32,IVF{NLIST},PQ8np"),
                                  shards.ShardPlan(Chunks(), CHUNKS, workers=2), tmp_path / "o.index")
    assert isinstance(merged, faiss.IndexPreTransform)
    faiss.extract_index_ivf(merged).nprobe = 4
    x, ids = everything()
    q = x[::97]
    _, Iwide = index.search(merged, q, 40)
    exclude = [set(row[:3].tolist()) for row in Iwide]
    allow = ids[::2]
    for kw, keep in (({"exclude": exclude}, lambda r, i: i not in exclude[r]),
                     ({"allow": allow}, lambda r, i: i in set(allow.tolist()))):
        _, I = index.search(merged, q, K, **kw)
        for r in range(len(q)):
            expected = [i for i in Iwide[r] if i >= 0 and keep(r, i)][:K]
            assert I[r].tolist()[:len(expected)] == expected
