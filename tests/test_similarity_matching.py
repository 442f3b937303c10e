"""Region matching as the query's why-this-neighbour maps: stored pairs, their link, --json, report, serve."""

import html
import json
import re

import numpy as np
import pytest
from sqlalchemy import delete, select, update

from cbr.errors import UnknownNameError
from cbr.models.similarity_maps import (DEFAULT_SIMILARITY_MAP, SIMILARITY_MAPS, MatchLink, check_similarity,
                                        similarity_of, similarity_spec)
from cbr.reporting.match_pair import pair_sentence
from cbr.store.casebase import open_casebase
from cbr.store.schema import Explanation
from conftest import invoke
from explain.matching import region_matches, region_pair
from explain.methods import ATTRIBUTION_METHODS, FAST_METHODS, FUSED_METHODS, METHOD_NAMES
from explain.spec import MAX_SPEC_LENGTH, base_name
from test_serve_api import _ask, client, image, make_client  # noqa: F401 (fixtures)

# The CAM methods a query can make pairs with, from the registry (scorecam runs the whole model per
# channel: slow, and the pair never depends on the CAM method anyway).
PAIR_METHODS = sorted(FAST_METHODS) + sorted(FUSED_METHODS)


def _acts(seed, shape=(6, 5, 4)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# -- explain.matching: the pair and its link --------------------------------------------------

def test_an_image_matched_to_itself_links_each_location_to_itself():
    a = _acts(0)
    _, _, match = region_matches(a, a)
    np.testing.assert_array_equal(match.ravel(), np.arange(match.size))
    pair = region_pair(a, a)
    assert pair.query_cell == pair.neighbour_cell
    assert pair.cosine == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(pair.query_map, pair.neighbour_map)


@pytest.mark.parametrize("seed", range(5))
def test_the_link_points_from_the_query_maps_argmax_to_its_best_match(seed):
    q, n = _acts(seed), _acts(seed + 100, (6, 3, 7))
    pair = region_pair(q, n)
    query_map, neighbour_map, match = region_matches(q, n)
    np.testing.assert_array_equal(pair.query_map, query_map)
    np.testing.assert_array_equal(pair.neighbour_map, neighbour_map)
    assert pair.query_cell == np.unravel_index(query_map.argmax(), query_map.shape)
    assert pair.neighbour_cell == divmod(int(match[pair.query_cell]), n.shape[2])
    # the cosine of the two linked locations' activation vectors, by hand
    u, v = q[:, pair.query_cell[0], pair.query_cell[1]], n[:, pair.neighbour_cell[0], pair.neighbour_cell[1]]
    assert pair.cosine == pytest.approx(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)), abs=1e-5)


def test_the_link_lands_on_a_planted_region():
    q, n = np.zeros((4, 5, 5), np.float32) + 0.01, np.zeros((4, 5, 5), np.float32) + 0.01
    q[:, 1, 3] = n[:, 4, 0] = [3, 1, 0, 2]  # the same feature, strong, at different places
    pair = region_pair(q, n)
    assert (pair.query_cell, pair.neighbour_cell) == ((1, 3), (4, 0))


# -- the link as stored and as --json gives it -------------------------------------------------

def test_link_target_round_trips_and_gives_pixel_centres():
    link = MatchLink(812, (0, 6), (7, 7), (3, 1), (7, 7), 0.91234)
    assert link.target() == "match:812 q=0,6/7x7 n=3,1/7x7 cos=0.9123"
    back = MatchLink.parse(link.target())
    assert back == MatchLink(812, (0, 6), (7, 7), (3, 1), (7, 7), 0.9123)
    # cell j of w covers [j, j + 1) * 224 / w: its centre
    assert back.query_xy() == [208.0, 16.0] and back.case_xy() == [48.0, 112.0]
    assert back.to_dict() == {"query_xy": [208.0, 16.0], "case_xy": [48.0, 112.0], "cosine": 0.9123, "image_size": 224}
    assert back.case_xy(320) == [68.6, 160.0]
    for other in ("similarity:query", "similarity:neighbours", "class:match:1", "embedding", "match:x q=1"):
        assert MatchLink.parse(other) is None


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_records_its_similarity_variant_in_its_spec(method):
    matched = similarity_spec(method, "matching")
    assert len(matched) <= MAX_SPEC_LENGTH and base_name(matched) == method
    if method in ATTRIBUTION_METHODS:  # attributions explain the global cosine from the pixels
        assert matched == method and similarity_of(matched) == "cosine"
    else:
        assert matched == f"{method}(sim=match)" and similarity_of(matched) == "matching"
    assert similarity_spec(method, "cosine") == method and similarity_of(method) == "cosine"  # old rows
    assert similarity_of(None) == "cosine"


def test_unknown_similarity_map_names_the_choices():
    assert DEFAULT_SIMILARITY_MAP == "matching" and check_similarity("cosine") == "cosine"
    with pytest.raises(UnknownNameError, match="choose from cosine, matching"):
        check_similarity("global")
    assert list(SIMILARITY_MAPS) == ["matching", "cosine"]


# -- a query: what is stored is explain.matching's pair -----------------------------------------

def _query(db, query_image, tmp_path, **config):
    from cbr.pipeline.query import Searcher

    cb = open_casebase(db, create=False)
    searcher = Searcher(cb, k=3, out_dir=str(tmp_path / "reports"), **config)
    return cb, searcher, searcher.query(query_image)


def _rows(cb, query_id):
    with cb.read() as s:
        rows = s.scalars(select(Explanation).where(Explanation.query_id == query_id).order_by(Explanation.id)).all()
        return [(r.role, r.case_id, r.method, r.target, r) for r in rows]


def _decoded(row):
    from explain.rawmap import decode_map

    return decode_map(row.data, (row.height, row.width), row.scale)


@pytest.mark.slow
@pytest.mark.parametrize("method", PAIR_METHODS)
def test_stored_pair_maps_and_link_equal_explain_matching(indexed, query_set, tmp_path, method):
    import torch

    from cbr.data.sources import read_source

    query_image = sorted((query_set.parent / "images").iterdir())[0]
    cb, searcher, answer = _query(indexed, query_image, tmp_path, explain=method)
    emb = searcher.members[0].embedder

    def last_block(path):
        x = emb.preprocess(read_source(str(path), window=emb.config.window)[0]).unsqueeze(0)
        with torch.no_grad():
            return emb.features(x)[0][0].numpy()

    q = last_block(query_image)
    rows = _rows(cb, answer.query_id)
    assert {m for _, _, m, _, _ in rows} == {f"{method}(sim=match)"}
    assert len(answer.neighbours) == 3
    for n in answer.neighbours:
        pair = region_pair(q, last_block(n["path"]))
        side = next(r for role, cid, _, t, r in rows if cid == n["case_id"] and role == "neighbour")
        assert side.target == "similarity:query"
        np.testing.assert_allclose(_decoded(side), pair.neighbour_map, atol=2e-3 * pair.neighbour_map.max() + 1e-6)
        (link, query_side), = [(MatchLink.parse(t), r) for role, cid, _, t, r in rows
                               if cid is None and (MatchLink.parse(t) or MatchLink(0, 0, 0, 0, 0, 0)).case_id == n["case_id"]]
        np.testing.assert_allclose(_decoded(query_side), pair.query_map, atol=2e-3 * pair.query_map.max() + 1e-6)
        assert (link.query_cell, link.case_cell) == (pair.query_cell, pair.neighbour_cell)
        assert link.cosine == pytest.approx(pair.cosine, abs=1e-4)
        assert n["match"] == link.to_dict()
    # the query's own map matches all neighbours at once; the answer's raw maps leave the pairs out
    assert "similarity:neighbours" in answer.raw_maps
    assert not any(t.startswith("match:") for t in answer.raw_maps)


def test_cosine_variant_stores_the_old_rows_and_no_link(indexed, query_set, tmp_path):
    query_image = sorted((query_set.parent / "images").iterdir())[0]
    cb, _, answer = _query(indexed, query_image, tmp_path, explain="gradcam", similarity_map="cosine")
    rows = _rows(cb, answer.query_id)
    assert {m for _, _, m, _, _ in rows} == {"gradcam"}
    assert not any(t.startswith("match:") for _, _, _, t, _ in rows)
    assert all(n["match"] is None for n in answer.neighbours)


def test_pairs_only_for_the_neighbours_that_get_maps(indexed, query_set, tmp_path):
    query_image = sorted((query_set.parent / "images").iterdir())[0]
    cb, _, answer = _query(indexed, query_image, tmp_path, explain_neighbours=1)
    assert [n["match"] is not None for n in answer.neighbours] == [True, False, False]
    assert sum(t.startswith("match:") for _, _, _, t, _ in _rows(cb, answer.query_id)) == 1


# -- the CLI: --json and the report --------------------------------------------------------------

def _report_pairs(text):
    """[(query marker xy, case marker xy)] of the report's linked pairs, in order."""
    marks = re.findall(r"<div class='marker' style='left:([0-9.]+)px;top:([0-9.]+)px' title=\"([^\"]+)\">", text)
    return [(marks[i], marks[i + 1]) for i in range(0, len(marks), 2)]


@pytest.mark.postgres
def test_cli_json_carries_the_link_and_the_report_shows_the_linked_pair(runner, indexed, query_set, tmp_path):
    query_image = sorted((query_set.parent / "images").iterdir())[0]
    result = invoke(runner, "query", query_image, "--db", indexed, "-k", 3, "--json", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    links = [n["match"] for n in answer["members"][0]["neighbours"]]
    assert all(set(link) == {"query_xy", "case_xy", "cosine", "image_size"} for link in links)
    assert all(0 <= v <= 224 for link in links for v in link["query_xy"] + link["case_xy"])
    text = open(answer["report"], encoding="utf-8").read()
    for n in answer["neighbours"]:
        assert html.escape(pair_sentence(n["case_id"])) in text
    pairs = _report_pairs(text)
    assert len(pairs) == 3
    for (q, c), n in zip(pairs, answer["neighbours"]):
        assert [float(q[0]), float(q[1])] == n["match"]["query_xy"] and q[2] == "this region of the query"
        assert [float(c[0]), float(c[1])] == n["match"]["case_xy"] and c[2] == f"that region of case {n['case_id']}"
    assert (tmp_path / "out" / f"query-{answer['query_id']}" / f"pair-c{answer['neighbours'][0]['case_id']}.jpg").is_file()
    # `cbr show --json` gives the link and describes the pair map without its pixels
    shown = json.loads(invoke(runner, "show", answer["query_id"], "--db", indexed, "--json").output)
    first = shown["members"][0]["neighbours"][0]
    assert first["match"] == links[0] and "map" not in first["pair_map"]


def test_cli_similarity_map_cosine_and_unknown(runner, indexed, query_set, tmp_path):
    query_image = sorted((query_set.parent / "images").iterdir())[0]
    result = invoke(runner, "query", query_image, "--db", indexed, "-k", 2, "--json", "--similarity-map", "cosine",
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert [n["match"] for n in answer["neighbours"]] == [None, None]
    assert "this region of the query" not in open(answer["report"], encoding="utf-8").read()
    bad = invoke(runner, "query", query_image, "--db", indexed, "--similarity-map", "global")
    assert bad.exit_code == 2 and "'global' is not one of 'matching', 'cosine'" in bad.output


def test_a_case_base_with_maps_stored_before_region_matching_still_renders(runner, indexed, query_set, tmp_path):
    """Rows as every query stored them before: bare CAM specs, no pair rows."""
    query_image = sorted((query_set.parent / "images").iterdir())[0]
    answer = json.loads(invoke(runner, "query", query_image, "--db", indexed, "-k", 2, "--json",
                               "--out", tmp_path / "out").output)
    cb = open_casebase(indexed, create=False)
    with cb.write() as s:
        s.execute(delete(Explanation).where(Explanation.query_id == answer["query_id"],
                                            Explanation.target.like("match:%")))
        s.execute(update(Explanation).where(Explanation.query_id == answer["query_id"]).values(method="layercam"))
    cb.close()
    result = invoke(runner, "report", answer["query_id"], "--db", indexed, "--out", tmp_path / "again.html")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "again.html").read_text(encoding="utf-8")
    assert "this region of the query" not in report and "map: similarity:query" in report
    shown = json.loads(invoke(runner, "show", answer["query_id"], "--db", indexed, "--json").output)
    assert [n["match"] for n in shown["members"][0]["neighbours"]] == [None, None]


def test_explain_adds_the_methods_own_maps_to_a_matched_query_and_pairs_to_one_without(indexed, query_set, tmp_path):
    from cbr.pipeline.addendum import add_explanation

    query_image = sorted((query_set.parent / "images").iterdir())[0]
    cb, _, matched = _query(indexed, query_image, tmp_path)
    added = add_explanation(cb, matched.query_id, "gradcam")
    assert added.method == "gradcam" and not any(m["target"].startswith("match:") for m in added.maps)
    _, _, plain = _query(indexed, query_image, tmp_path, explain="none")
    added = add_explanation(cb, plain.query_id, "gradcam")
    assert added.method == "gradcam(sim=match)"
    assert sum(m["target"].startswith("match:") for m in added.maps) == 3


# -- cbr serve's query page ------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_query_page_shows_the_pair_and_sentence(client, image):  # noqa: F811
    a = _ask(client, image, k=2)
    qid, mid = a["query_id"], a["members"][0]["model_id"]
    page = client.get(f"/queries/{qid}").text
    for n in a["neighbours"]:
        link, case = n["match"], n["case_id"]
        assert html.escape(pair_sentence(case)) in page
        assert f'data-similarity="/api/queries/{qid}/neighbours/{case}/maps/pair.png?member={mid}"' in page
        for who, xy in (("query", link["query_xy"]), ("case", link["case_xy"])):
            svg = re.search(rf'<svg class="markers ring" id="marker-{who}-{mid}-{case}".*?</svg>', page).group(0)
            assert f'cx="{xy[0]}" cy="{xy[1]}"' in svg
        r = client.get(f"/api/queries/{qid}/neighbours/{case}/maps/pair.png", params={"member": mid})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert client.get(f"/api/queries/{qid}/maps/pair.png").status_code == 404  # a pair belongs to a neighbour
