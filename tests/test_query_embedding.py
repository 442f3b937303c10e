"""`cbr query --embedding`: answering vectors computed elsewhere, without an image or a model run."""

import json

import numpy as np
from sqlalchemy import func, select

import index as ix
from cbr.pipeline.query import Searcher
from cbr.store.casebase import open_casebase
from cbr.store.member import active_embeddings
from cbr.store.schema import Model, Query
from conftest import invoke


def _stored(db):
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    ids, vecs = active_embeddings(cb, model_id)
    return cb, ids, vecs


def _queries(cb) -> int:
    with cb.read() as s:
        return s.scalar(select(func.count(Query.id)))


def test_a_stored_case_s_embedding_finds_that_case_first_and_is_recorded(runner, indexed, tmp_path):
    cb, ids, vecs = _stored(indexed)
    path = tmp_path / "q.npy"
    np.save(path, np.stack([vecs[3], 2.5 * vecs[7]]))  # any length: normalised before the search
    before = _queries(cb)
    r = invoke(runner, "query", "--embedding", str(path), "--db", str(indexed), "--explain", "none", "-k", "3",
               "--json")
    assert r.exit_code == 0, r.output
    answers = [json.loads(line) for line in r.output.splitlines()]
    assert [a["image"] for a in answers] == [f"{path}#row=0", f"{path}#row=1"]
    for a, case in zip(answers, (ids[3], ids[7])):
        first = a["members"][0]["neighbours"][0]
        assert first["case_id"] == int(case)
        assert abs(first["similarity"] - 1.0) < 1e-5
        assert len(a["members"][0]["neighbours"]) == 3
    assert _queries(cb) == before + 2


def test_the_same_neighbours_as_searching_the_index_with_that_vector(indexed):
    cb, ids, vecs = _stored(indexed)
    searcher = Searcher(cb, k=4, explain="none")
    answer = searcher.query_embedding([vecs[0]], name="v", record=False)
    index = searcher.members[0].index
    _, want = ix.search(index, vecs[:1] / np.linalg.norm(vecs[0]), 4)
    assert [n["case_id"] for n in answer.members[0]["neighbours"]] == [int(i) for i in want[0]]
    assert answer.query_id is None and set(answer.timings) >= {"search", "vote", "database"}


def test_refusals_are_one_line(runner, indexed, tmp_path):
    _, _, vecs = _stored(indexed)
    good, wrong_dim, text = tmp_path / "q.npy", tmp_path / "short.npy", tmp_path / "not.npy"
    np.save(good, vecs[0])
    np.save(wrong_dim, vecs[0][:5])
    text.write_text("not an array")
    db = str(indexed)
    cases = [
        (["--embedding", str(good), "--db", db], "--explain none"),  # the default explains: no image here
        (["--embedding", str(wrong_dim), "--db", db, "--explain", "none"], "dimensions"),
        (["--embedding", str(text), "--db", db, "--explain", "none"], "not a readable .npy"),
        (["--embedding", str(tmp_path / "missing.npy"), "--db", db, "--explain", "none"], "not a readable .npy"),
        (["--db", db, "--explain", "none"], "IMAGES or --embedding"),
        (["--embedding", str(good), "--db", db, "--explain", "none", "--region", "1,1,5,5"], "--region needs"),
    ]
    for args, says in cases:
        r = invoke(runner, "query", *args)
        assert r.exit_code != 0, (args, r.output)
        assert says in r.output, (args, r.output)
        assert "Traceback" not in r.output
