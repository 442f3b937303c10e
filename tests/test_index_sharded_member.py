"""`cbr index` builds a large case base's IVF index in the sharded form itself (index.shards):
filled by worker processes that read the stored embeddings from the database, merged into one
lists file (.ivfdata) that queries memory-map. Here the threshold is lowered to a tiny dataset."""

import csv
import json
import os

import faiss
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

import cbr.store.member as member_module
import index as ix
from cbr.errors import CaseBaseError
from cbr.models.embedder import create_embedder
from cbr.store.casebase import open_casebase
from cbr.store.member import StoredChunks, load_index, rebuild_index
from cbr.store.schema import IndexManifest
from conftest import TINY, invoke

pytestmark = pytest.mark.postgres

INDEX = ("--workers", "0", "--explain", "none", "--batch-size", "4", "--index-type", "ivf")


class DyingChunks(StoredChunks):
    """A worker killed outright while it reads its second chunk (spawned workers import this class
    by name)."""

    def __call__(self, chunk):
        if chunk == 1:
            os._exit(3)
        return super().__call__(chunk)


@pytest.fixture
def sharded(monkeypatch):
    """Shard from 10 vectors on, in chunks of 5 case ids (18 phantoms: 4 chunks, 2 workers)."""
    monkeypatch.setattr(member_module, "SHARD_ROWS", 10)
    monkeypatch.setattr(member_module, "REBUILD_ROWS", 5)
    monkeypatch.setattr(member_module, "SHARD_WORKERS", 2)


def _state(db):
    """(case base, model id, index file, its lists files, the loaded index)."""
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        m = s.scalar(select(IndexManifest))
        model_id, path = m.model_id, cb.index_dir / m.path
    return cb, model_id, path, ix.ivfdata_files(path), load_index(cb, model_id)[0]


def _neighbours(runner, db, images, tmp_path):
    out = invoke(runner, "query", *images, "--db", db, "-k", 5, "--json", "--explain", "none", "--no-record",
                 "--out", tmp_path / "reports")
    assert out.exit_code == 0, out.output
    return [[(n["path"], round(n["similarity"], 5)) for n in json.loads(line)["neighbours"]]
            for line in out.output.splitlines()]


@pytest.mark.slow
def test_index_writes_the_merged_form_and_answers_as_the_in_memory_one(runner, phantom_set, query_set, db_url,
                                                                       fresh_db, tmp_path, monkeypatch, sharded):
    with open(query_set, newline="") as fh:
        images = [query_set.parent / row["path"] for row in csv.DictReader(fh)]
    result = invoke(runner, "index", phantom_set, "--db", db_url, *TINY, *INDEX)
    assert result.exit_code == 0, result.output
    cb, model_id, path, lists, index = _state(db_url)
    assert len(lists) == 1 and ix.sharded(index) and index.ntotal == 18
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists), faiss.OnDiskInvertedLists)
    cb.close()
    check = invoke(runner, "db", "check", "--db", db_url, "--json")
    assert check.exit_code == 0 and json.loads(check.stdout)["counts"][f"index_vectors_model_{model_id}"] == 18, \
        check.output
    found = _neighbours(runner, db_url, images, tmp_path)
    os.rename(lists[0], lists[0] + ".away")  # the lists file lost: the check names it
    lost = invoke(runner, "db", "check", "--db", db_url)
    assert lost.exit_code == 1 and "has lost its inverted lists" in lost.output and ".ivfdata" in lost.output
    os.rename(lists[0] + ".away", lists[0])
    # the same kind, built in memory (fresh_db moves $CBR_INDEX_DIR on PostgreSQL: db_url is done with)
    monkeypatch.setattr(member_module, "SHARD_ROWS", 10**9)
    plain = fresh_db("plain")
    assert invoke(runner, "index", phantom_set, "--db", plain, *TINY, *INDEX).exit_code == 0
    cb, _, _, plain_lists, plain_index = _state(plain)
    assert plain_lists == [] and not ix.sharded(plain_index) and plain_index.ntotal == 18
    cb.close()
    assert found == _neighbours(runner, plain, images, tmp_path) and len(found) == len(images) == 3


@pytest.mark.slow
def test_a_build_killed_midway_leaves_the_previous_index(runner, phantom_set, db_url, sharded, monkeypatch):
    assert invoke(runner, "index", phantom_set, "--db", db_url, *TINY, *INDEX).exit_code == 0
    cb, model_id, path, lists, before = _state(db_url)
    files = sorted(os.listdir(cb.index_dir))
    q = np.ascontiguousarray(np.eye(before.d, dtype=np.float32)[:4])
    expected = ix.search(before, q, 5)[1]
    monkeypatch.setattr(member_module, "StoredChunks", DyingChunks)
    with pytest.raises(CaseBaseError, match="the index in force is unchanged"):
        rebuild_index(cb, model_id)
    assert sorted(os.listdir(cb.index_dir)) == files  # no half lists file, shard or work folder left
    again, _, notes, _ = load_index(cb, model_id)
    assert notes == [] and ix.ivfdata_files(path) == lists
    np.testing.assert_array_equal(ix.search(again, q, 5)[1], expected)
    # what a kill -9 of the command itself leaves: the shards' work folder, a generation never switched to
    (cb.index_dir / f".{path.name}.0123.shards").mkdir()
    orphan = cb.index_dir / "model-1-00000000-0123456789ab.faiss"
    orphan.write_bytes(b"x")
    (cb.index_dir / f"{orphan.name}.0123456789ab.ivfdata").write_bytes(b"x")
    cb.close()
    failed = invoke(runner, "index", "--rebuild", "--db", db_url)  # the command: one line, exit 1
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert "the index in force is unchanged" in failed.output.strip().splitlines()[-1]
    assert sorted(os.listdir(cb.index_dir)) == files  # the writer swept them; the live lists stay


@pytest.mark.slow
def test_new_cases_go_into_a_new_generation(runner, phantom_set, query_set, db_url, sharded):
    """An index run that adds cases to a sharded index writes a new generation (its own lists file)
    and removes the old one's files; the one in force is never written in place."""
    assert invoke(runner, "index", phantom_set, "--db", db_url, *TINY, *INDEX).exit_code == 0
    cb, _, old_path, old_lists, _ = _state(db_url)
    cb.close()
    more = invoke(runner, "index", query_set, "--db", db_url, *TINY, *INDEX, "--json")
    assert more.exit_code == 0, more.output
    added = json.loads(more.output)["added"]
    cb, _, path, lists, index = _state(db_url)
    assert added == 3 and ix.sharded(index) and index.ntotal == 18 + added
    assert path != old_path and len(lists) == 1 and lists != old_lists
    assert not old_path.exists() and not any(os.path.exists(f) for f in old_lists)
    cb.close()


@pytest.mark.slow
def test_import_builds_the_merged_form_too(runner, tmp_path, sharded):
    """`cbr import` trains its index kind at the end through the same rebuild: sharded past the threshold."""
    emb = create_embedder("tinycnn", weights="none")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    with open(tmp_path / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "metadata"])
        w.writeheader()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
            w.writerow({"path": f"images/{i}.png", "label": "ab"[i % 2], "group": f"p{i}", "metadata": "{}"})
    np.save(tmp_path / "emb.npy", rng.standard_normal((12, emb.config.embedding_dim)).astype(np.float32))
    db = tmp_path / "cases.db"
    result = invoke(runner, "import", tmp_path / "emb.npy", "--manifest", tmp_path / "rows.csv", *TINY,
                    "--fingerprint", emb.fingerprint, "--index-type", "ivf", "--db", db)
    assert result.exit_code == 0, result.output
    cb, _, _, lists, index = _state(db)
    assert len(lists) == 1 and ix.sharded(index) and index.ntotal == 12
    cb.close()


def test_the_sharded_form_changes_only_in_a_copy(tmp_path):
    """Added and removed vectors go into an in-memory copy of the mapped lists; writing it makes a
    new lists file, and the old generation still reads as before."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(400, dtype=np.int64) * 3 + 1
    trained = ix.build(16, "ivf", n_hint=300)
    ix.train(trained, x[:300], n=300)
    one = ix.unwrapped(trained)
    one.add_with_ids(x[:300], ids[:300])
    ix.write_sharded(one, tmp_path / "a.faiss")
    a = ix.open_index(tmp_path / "a.faiss")
    ix.add(a, x[300:], ids[300:])
    assert ix.remove(a, ids[:10]) == 10 and ix.remove(a, [999_999]) == 0
    ix.write_sharded(a, tmp_path / "b.faiss")
    old, new = ix.open_index(tmp_path / "a.faiss"), ix.open_index(tmp_path / "b.faiss")
    assert old.ntotal == 300 and sorted(ix.ids(old).tolist()) == ids[:300].tolist()
    assert new.ntotal == 390 and sorted(ix.ids(new).tolist()) == ids[10:].tolist()
    _, want = ix.brute_force_search(x[10:], ids[10:], x[20:30], 3, exclude=[[ids[20]]] * 10)
    _, got = ix.search(new, x[20:30], 3, exclude=[[ids[20]]] * 10)
    np.testing.assert_array_equal(got, want)  # IVF-Flat over every list: exact
