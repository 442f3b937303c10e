"""Metadata-aware retrieval: `--where key=value` in `cbr query`, `cbr evaluate` and the serve API."""

import csv
import json

import numpy as np
import pytest

from conftest import TINY, invoke


def _images(manifest):
    with open(manifest, newline="") as fh:
        return [manifest.parent / r["path"] for r in csv.DictReader(fh)]


def _query(runner, db, image, *args):
    result = invoke(runner, "query", image, "--db", db, "--explain", "none", "--no-record", "-k", "4", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.slow
def test_where_restricts_neighbours_to_matching_metadata(runner, indexed, query_set):
    image = _images(query_set)[0]
    everything = _query(runner, indexed, image)
    only = _query(runner, indexed, image, "--where", "slice=1")
    assert {n["metadata"]["slice"] for n in everything["neighbours"]} == {"0", "1"} or everything["neighbours"]
    assert len(only["neighbours"]) == 4
    assert all(n["metadata"]["slice"] == "1" for n in only["neighbours"])
    assert any("restricted to the 9 active case(s) with metadata slice=1" in n for n in only["notes"])
    # Exact: the filtered neighbours are the best-ranked slice=1 cases of the unfiltered ranking.
    deep = _query(runner, indexed, image, "-k", "18")
    best = [n["case_id"] for n in deep["neighbours"] if n["metadata"]["slice"] == "1"][:4]
    assert [n["case_id"] for n in only["neighbours"]] == best


def test_where_with_two_keys_and_no_match(runner, indexed, query_set):
    image = _images(query_set)[0]
    both = _query(runner, indexed, image, "--where", "slice=0", "--where", "patient_id=P003")
    assert both["neighbours"] == []  # patient_id is not metadata (it is the group): nothing matches
    assert both["prediction"]["abstained"] and both["prediction"]["abstain_reason"] == "no_neighbours"
    assert any("no active case has metadata patient_id=P003, slice=0" in n for n in both["notes"])


@pytest.mark.parametrize("bad, message", [("slice", "--where 'slice': write key=value"),
                                          ("=1", "--where '=1': write key=value")])
def test_where_that_is_not_key_value_is_one_line_error(runner, indexed, query_set, bad, message):
    result = invoke(runner, "query", _images(query_set)[0], "--db", indexed, "--explain", "none", "--where", bad)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_where_twice_with_different_values_is_refused():
    from cbr.errors import CbrError
    from cbr.pipeline.settings import QueryConfig, parse_where

    assert parse_where(["b=2", "a=1", "a=1"]) == (("a", "1"), ("b", "2"))
    assert QueryConfig(where={"site": "back"}).where == (("site", "back"),)
    with pytest.raises(CbrError, match="given twice"):
        parse_where(["a=1", "a=2"])


@pytest.mark.slow
def test_evaluate_where_keeps_every_neighbour_in_the_filter(phantom_set, tmp_path):
    from cbr.evaluation import EvalConfig, evaluate_casebase
    from cbr.pipeline.index import index_dataset
    from cbr.store.casebase import open_casebase

    cb = open_casebase(tmp_path / "cases.db")
    index_dataset(cb, phantom_set, models=["tinycnn"], weights="none", explain="none", num_workers=0)
    m = evaluate_casebase(cb, phantom_set, EvalConfig(k=3, where=["slice=0"]))
    cb.close()
    assert m["n"] == 18 and np.isfinite(m["balanced_accuracy"])
    assert EvalConfig(where=["slice=0"]).where == (("slice", "0"),)


@pytest.mark.slow
def test_evaluate_cli_accepts_where(runner, phantom_set, indexed, tmp_path):
    result = invoke(runner, "evaluate", phantom_set, "--db", indexed, "--where", "slice=1", "-k", "3",
                    "--out", tmp_path / "ev", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["n"] == 18
    bad = invoke(runner, "evaluate", phantom_set, "--db", indexed, "--where", "slice")
    assert bad.exit_code == 1 and "write key=value" in bad.output


@pytest.mark.slow
def test_serve_api_where(indexed, query_set, tmp_path):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase

    cb = open_casebase(indexed, create=False)
    try:
        client = TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve")), base_url="http://127.0.0.1:8765")
        image = _images(query_set)[0]
        with open(image, "rb") as fh:
            r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")},
                            data={"where": ["slice=1"], "k": "3", "explain": "none"})
        assert r.status_code == 200, r.text
        assert [n["metadata"]["slice"] for n in r.json()["neighbours"]] == ["1", "1", "1"]
        with open(image, "rb") as fh:
            r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")}, data={"where": "slice"})
        assert r.status_code == 422 and "where 'slice': write key=value" in r.json()["detail"]
    finally:
        cb.close()
