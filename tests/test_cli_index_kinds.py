"""`cbr index --index-type`: kinds that learn from the vectors are trained once on the whole
collection (not on the first batch), on SQLite and PostgreSQL alike."""

import pytest
from sqlalchemy import select

import index as ix
from cbr.store.casebase import open_casebase
from cbr.store.member import load_index
from cbr.store.schema import IndexManifest
from conftest import TINY, invoke

pytestmark = pytest.mark.postgres


def _index_of(db):
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        m = s.scalar(select(IndexManifest))
        kind, model_id = m.kind, m.model_id
    index, _, notes, _ = load_index(cb, model_id)
    cb.close()
    return kind, index, notes


@pytest.mark.slow
def test_ivf_is_learned_and_holds_every_case(runner, phantom_set, db_url):
    result = invoke(runner, "index", phantom_set, "--db", db_url, *TINY, "--workers", "0", "--explain", "none",
                    "--batch-size", "4", "--index-type", "ivf")
    assert result.exit_code == 0, result.output
    kind, index, notes = _index_of(db_url)
    assert kind == "ivf" and ix.learned(index) and index.ntotal == 18 and notes == []


def test_auto_is_exact_on_a_small_collection(runner, phantom_set, db_url):
    result = invoke(runner, "index", phantom_set, "--db", db_url, *TINY, "--workers", "0", "--explain", "none",
                    "--index-type", "auto")
    assert result.exit_code == 0, result.output
    kind, index, _ = _index_of(db_url)
    assert kind == "auto" and not ix.learned(index) and index.ntotal == 18


def test_ivf_pq_on_too_few_vectors_stays_exact_and_says_so(runner, phantom_set, db_url):
    result = invoke(runner, "index", phantom_set, "--db", db_url, *TINY, "--workers", "0", "--explain", "none",
                    "--index-type", "ivf-pq")
    assert result.exit_code == 0, result.output
    assert "index kind 'ivf-pq' stays exact (flat) for now: cannot train this index on 18 vectors" in result.output
    kind, index, _ = _index_of(db_url)
    assert kind == "ivf-pq" and not ix.learned(index) and index.ntotal == 18
    result = invoke(runner, "query", _first_image(phantom_set),
                    "--db", db_url, "--json", "--explain", "none", "--no-record")
    assert result.exit_code == 0, result.output


def _first_image(manifest):
    import csv

    with open(manifest, newline="") as fh:
        return manifest.parent / next(csv.DictReader(fh))["path"]
