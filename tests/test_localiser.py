"""Issue 25: maps judged against trivial guesses, the lesion localiser trained on the masks users
have, ``evidence.on_finding`` and the nearest unlike neighbour."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cbr.cli import cli
from cbr.evaluation.localisation import localisation
from cbr.store.reliability import badge_text, guess_verdict, NO_BETTER, on_finding_floor, Reliability
from explain.finding import centre_map, region_box, share_on, strongest_region

TINY_TRAIN = ["--backbone", "tinycnn", "--weights", "none", "--epochs", "2", "--img-size", "48", "--batch-size", "8",
              "--workers", "0"]


# --- the guesses ---------------------------------------------------------------------------------

def test_centre_map_peaks_at_the_centre():
    m = centre_map(9)
    assert np.unravel_index(np.argmax(m), m.shape) == (4, 4)
    assert m[0, 0] < 0.05 * m[4, 4]


def test_strongest_region_keeps_the_component_of_the_maximum():
    p = np.zeros((8, 8), dtype=np.float32)
    p[1:3, 1:3] = 0.9  # the strongest blob
    p[5:8, 5:8] = 0.6  # a larger but weaker one
    region = strongest_region(p)
    assert int(region.sum()) == 4 and region_box(region) == [1, 1, 3, 3]


def test_strongest_region_of_a_faint_map_uses_half_its_maximum():
    p = np.zeros((6, 6), dtype=np.float32)
    p[2, 2], p[2, 3], p[5, 5] = 0.3, 0.2, 0.1
    assert region_box(strongest_region(p)) == [2, 2, 4, 3]
    assert not strongest_region(np.zeros((4, 4))).any() and region_box(np.zeros((4, 4), bool)) is None


def test_share_on_a_region():
    raw = np.zeros((4, 4), dtype=np.float32)
    raw[0, 0], raw[3, 3] = 3.0, 1.0
    region = np.zeros((4, 4), dtype=bool)
    region[0, 0] = True
    assert share_on(raw, region) == pytest.approx(0.75)
    assert share_on(np.zeros((4, 4)), region) is None and share_on(raw, np.zeros((4, 4), bool)) is None


def test_guess_verdict_needs_a_margin_of_a_tenth():
    base = {"centre": {"pointing_game": 0.18}, "mean_mask": {"pointing_game": 0.30}}
    v = guess_verdict(0.35, base)
    assert v["best_guess"] == "mean_mask" and v["margin"] == pytest.approx(0.05) and v["no_better_than_a_guess"]
    assert not guess_verdict(0.41, base)["no_better_than_a_guess"]
    assert guess_verdict(0.5, {})["no_better_than_a_guess"] is None


def test_on_finding_floor_is_a_low_quantile():
    floor = on_finding_floor([0.1 * i for i in range(11)])
    assert floor["n"] == 11 and floor["floor"] == pytest.approx(0.1) and floor["median"] == pytest.approx(0.5)
    assert on_finding_floor([]) is None


def _outcome(tmp_path, name, label, box, maps, fold=1):
    """An evaluated query whose 8x8 mask is ``box`` (x0, y0, x1, y1) and whose raw maps are given."""
    mask = np.zeros((8, 8), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    path = tmp_path / f"{name}.png"
    Image.fromarray(mask).save(path)
    record = SimpleNamespace(metadata={"mask": str(path)}, label=label, path=str(path))
    return SimpleNamespace(record=record, maps=maps, fold=fold)


def _peak(y, x):
    m = np.zeros((8, 8), dtype=np.float32)
    m[y, x] = 1.0
    return m


def test_localisation_shows_each_map_beside_the_guesses(tmp_path):
    # two lesions at the centre, two in a corner; the finding map hits all four, the class map one
    prior = np.zeros((8, 8), dtype=np.float32)
    prior[0:2, 0:2] = 1.0  # the training masks' mean: the corner
    outs = [_outcome(tmp_path, "a", "x", (3, 3, 5, 5), {"finding": _peak(4, 4), "class:x": _peak(0, 7)}),
            _outcome(tmp_path, "b", "x", (3, 3, 5, 5), {"finding": _peak(3, 3), "class:x": _peak(0, 7)}),
            _outcome(tmp_path, "c", "y", (0, 0, 2, 2), {"finding": _peak(1, 1), "class:y": _peak(7, 7)}),
            _outcome(tmp_path, "d", "y", (0, 0, 2, 2), {"finding": _peak(0, 0), "class:y": _peak(0, 0)})]
    loc = localisation(outs, 8, priors={1: prior})
    assert loc["map"] == "finding" and loc["n"] == 4 and loc["pointing_game"] == 1.0
    assert loc["baselines"]["centre"]["pointing_game"] == 0.5  # the centre pixel lies in the two central lesions
    assert loc["baselines"]["mean_mask"]["pointing_game"] == 0.5
    assert loc["by_map"]["class"]["pointing_game"] == 0.25
    assert loc["by_map"]["class"]["no_better_than_a_guess"] is True
    assert loc["by_map"]["finding"]["no_better_than_a_guess"] is False
    assert loc["by_map"]["finding"]["margin"] == pytest.approx(0.5)
    assert loc["on_finding"]["n"] == 4  # the class maps' shares on the true lesions


def test_badge_reads_beside_the_centre_guess():
    rel = {"pointing_game": 0.15, "n": 180, "method": "layercam", "layer": "last", "target": "class",
           "baselines": {"centre": 0.18}, **guess_verdict(0.15, {"centre": 0.18})}
    text = badge_text(rel)
    assert text.startswith("maps hit the lesion in 15% of 180 masked cases (a centre guess: 18%)")
    assert text.endswith(NO_BETTER)


def test_reliability_keeps_the_guesses(tmp_path):
    from cbr.store.casebase import open_casebase
    from cbr.store.reliability import reliability_of, store_reliability
    from cbr.store.schema import Model

    cb = open_casebase(tmp_path / "c.db")
    try:
        with cb.write() as s:
            s.add(Model(fingerprint="a" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={}))
        store_reliability(cb, 1, Reliability(0.9, 50, "layercam", "", "finding", "evaluate", centre=0.4,
                                              mean_mask=0.5, on_finding_floor=0.2))
        with cb.read() as s:
            rel = reliability_of(s, [1])[1]
        assert rel["baselines"] == {"centre": 0.4, "mean_mask": 0.5} and rel["on_finding_floor"] == 0.2
        assert rel["no_better_than_a_guess"] is False and rel["best_guess"] == "mean_mask"
        assert "(the mean training mask: 50%, a centre guess: 40%)" in badge_text(rel) or \
            "(a centre guess: 40%, the mean training mask: 50%)" in badge_text(rel)
    finally:
        cb.close()


def test_upgrade_to_0010_keeps_older_measurements(tmp_path):
    """Additive migration: a measurement stored before 0010 has no guesses and still reads."""
    from sqlalchemy import inspect

    from cbr.store.casebase import open_casebase, upgrade
    from cbr.store.reliability import reliability_of
    from cbr.store.schema import Model

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0009")
    cb = open_casebase(url, migrate=False)
    with cb.engine.begin() as conn:
        assert "baselines" not in {c["name"] for c in inspect(conn).get_columns("map_reliability")}
        conn.exec_driver_sql("INSERT INTO models (id, fingerprint, backbone, weights, source, config, created_at) "
                             "VALUES (1, 'f', 'tinycnn', 'none', 'tinycnn', '{}', '2026-12-01')")
        conn.exec_driver_sql("INSERT INTO map_reliability (model_id, pointing_game, n, method, layer, target, source, "
                             "created_at) VALUES (1, 0.5, 10, 'layercam', '', 'class', 'index', '2026-12-01')")
    cb.close()
    upgrade(url)
    cb = open_casebase(url)
    try:
        with cb.read() as s:
            assert s.get(Model, 1) is not None
            rel = reliability_of(s, [1])[1]
        assert rel["pointing_game"] == 0.5 and rel["baselines"] == {} and rel["no_better_than_a_guess"] is None
        assert badge_text(rel).startswith("maps hit the lesion in 50% of 10 masked cases [class maps")
    finally:
        cb.close()


# --- the localiser ------------------------------------------------------------------------------

def test_localiser_fits_the_tiny_trunk_and_predicts_a_map():
    import torch

    from cbr.models.embedder import create_embedder
    from cbr.models.localiser import build_localiser, load_localiser, localiser_payload

    emb = create_embedder("tinycnn", weights="none", input_size=48)
    loc = build_localiser(emb.trunk, 48)
    assert loc.taps == [10, 14]  # the last block at stride 4, then at stride 8
    probs = loc.probabilities(torch.zeros(2, 3, 48, 48))
    assert probs.shape == (2, 12, 12) and ((probs >= 0) & (probs <= 1)).all()
    again = load_localiser(localiser_payload(loc), emb.trunk, "x.pt")
    assert np.allclose(again.probabilities(torch.ones(1, 3, 48, 48)), loc.probabilities(torch.ones(1, 3, 48, 48)))
    assert load_localiser(None, emb.trunk, "x.pt") is None


def test_a_localiser_that_does_not_fit_says_so():
    from cbr.errors import CbrError
    from cbr.models.embedder import create_embedder
    from cbr.models.localiser import build_localiser, load_localiser, localiser_payload

    emb = create_embedder("tinycnn", weights="none", input_size=48)
    payload = localiser_payload(build_localiser(emb.trunk, 48))
    payload["taps"] = [3, 7]
    with pytest.raises(CbrError, match="lesion localiser does not fit"):
        load_localiser(payload, emb.trunk, "x.pt")


@pytest.fixture(scope="module")
def trained(localised_template):
    """A tinycnn checkpoint trained on the phantoms (which have masks), and a case base indexed with it."""
    return localised_template


@pytest.mark.slow
def test_train_with_masks_carries_a_localiser(trained):
    from cbr.models.checkpoint import read_checkpoint

    loc = trained.train["localiser"]
    assert loc["masks"] > 0 and loc["epochs_run"] == 2 and "Dice" in loc["loss"]
    payload = read_checkpoint(trained.ckpt)[3]["localiser"]
    assert payload["input_size"] == 48 and tuple(payload["mean_mask"].shape) == (48, 48)
    # the index-time badge stands beside the guesses measured on the same cases
    assert "a centre guess:" in trained.index_output


@pytest.mark.slow
def test_train_without_masks_says_there_is_no_localiser(runner, tmp_path, phantom_set):
    import csv

    rows = list(csv.DictReader(open(phantom_set)))
    plain = phantom_set.parent / "no_masks.csv"
    with open(plain, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "patient_id"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("path", "label", "patient_id")} for r in rows)
    r = runner.invoke(cli, ["train", str(plain), "--out", str(tmp_path / "m.pt"), *TINY_TRAIN])
    assert r.exit_code == 0, r.output
    assert "localiser:    none (no lesion masks" in r.output
    r = runner.invoke(cli, ["train", str(phantom_set), "--out", str(tmp_path / "n.pt"), *TINY_TRAIN, "--no-localiser",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["localiser"] is None


@pytest.mark.slow
def test_query_json_has_the_finding_and_the_nearest_unlike(runner, trained, query_set, tmp_path):
    import shutil

    shutil.copytree(trained.db.parent, tmp_path / "w")
    db = tmp_path / "w" / "cases.db"
    image = next(p for p in sorted((query_set.parent / "images").iterdir()))
    r = runner.invoke(cli, ["query", str(image), "--db", str(db), "-k", "3", "--no-record", "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)
    f = a["finding"]
    assert f["localiser"] is True
    if f["box"] is not None:
        x0, y0, x1, y1 = f["box"]
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
    assert a["prediction"]["evidence"]["on_finding"] == f["on_finding"]
    unlike = a["nearest_unlike"]
    assert unlike is not None and unlike["label"] != a["prediction"]["label"]
    # the nearest unlike case is the nearest of all cases with another label
    assert unlike["similarity"] >= max([n["similarity"] for n in a["neighbours"]
                                        if n["label"] != a["prediction"]["label"]], default=-1)


@pytest.mark.slow
def test_answer_that_rests_off_the_finding_is_warned(runner, trained, query_set, tmp_path):
    """A calibrated floor above every possible share makes the warning fire; with none it stays silent."""
    import shutil

    from cbr.store.casebase import open_casebase
    from cbr.store.reliability import Reliability, store_reliability

    work = tmp_path / "w"
    shutil.copytree(trained.db.parent, work)
    cb = open_casebase(work / "cases.db")
    store_reliability(cb, 1, Reliability(0.9, 10, "layercam", "", "finding", "evaluate", centre=0.2,
                                         on_finding_floor=1.01))
    cb.close()
    image = sorted((query_set.parent / "images").iterdir())[0]
    r = runner.invoke(cli, ["query", str(image), "--db", str(work / "cases.db"), "-k", "3", "--no-record", "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)
    if a["finding"]["on_finding"] is not None:
        assert a["finding"]["warning"] == "this answer rests mostly on evidence outside the finding"
        assert a["finding"]["warning"] in a["notes"]
    quiet = runner.invoke(cli, ["query", str(image), "--db", str(work / "cases.db"), "-k", "3", "--no-record",
                                "--explain", "none", "--json"])
    assert json.loads(quiet.output)["finding"] == {}  # no maps, nothing said about the finding
    text = runner.invoke(cli, ["query", str(image), "--db", str(work / "cases.db"), "-k", "3", "--no-record"])
    assert "nearest case of another label: case" in text.output
    assert "maps hit the lesion in 90% of 10 masked cases (a centre guess: 20%)" in text.output


@pytest.mark.slow
def test_report_and_serve_page_show_the_finding_and_the_contrast(runner, trained, query_set, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase

    shutil.copytree(trained.db.parent, tmp_path / "w")
    db = tmp_path / "w" / "cases.db"
    image = sorted((query_set.parent / "images").iterdir())[0]
    r = runner.invoke(cli, ["query", str(image), "--db", str(db), "-k", "3", "--json", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)
    html = open(a["report"], encoding="utf-8").read()
    assert "nearest case of another label: case" in html and "where is the finding" in html
    assert (tmp_path / "r" / f"query-{a['query_id']}" / "query-finding.jpg").is_file()
    cb = open_casebase(db, create=False)
    try:
        client = TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve")), base_url="http://127.0.0.1")
        page = client.get(f"/queries/{a['query_id']}").text
        assert "nearest case of another label: case" in page
    finally:
        cb.close()


def test_nearest_unlike_searches_beyond_the_hits(indexed):
    """With no case of another label among the hits, the nearest one is searched among all cases of the
    other labels: the same as brute force over the stored embeddings, the query's own case left out."""
    from sqlalchemy import select

    from cbr.pipeline.contrast import nearest_unlike
    from cbr.store.casebase import open_casebase
    from cbr.store.member import embeddings_in, load_members
    from cbr.store.schema import Case

    cb = open_casebase(indexed, create=False)
    try:
        (member,) = load_members(cb)
        with cb.read() as s:
            ids, vecs = embeddings_in(s, member.model_id)
            labels = dict(s.execute(select(Case.id, Case.label)).all())
            query_id = int(ids[0])
            vector = vecs[:1].astype("float32")
            found = nearest_unlike(s, member, vector, [], labels[query_id], [query_id])
            assert nearest_unlike(s, member, vector, [], None, [query_id]) is None  # an abstention has none
        sims = vecs @ vector[0]
        others = [(float(sims[i]), int(c)) for i, c in enumerate(ids) if labels[int(c)] != labels[query_id]]
        best_sim, best_id = max(others)
        assert found["case_id"] == best_id and found["label"] != labels[query_id]
        assert found["similarity"] == pytest.approx(best_sim, abs=1e-4) and found["margin"] is None
    finally:
        cb.close()


@pytest.mark.slow
def test_a_searcher_reads_its_checkpoint_once(trained, monkeypatch):
    """The member's embedder and its lesion localiser come from one read of the checkpoint file."""
    import torch

    from cbr.pipeline.query import Searcher
    from cbr.store.casebase import open_casebase

    reads, load = [], torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    searcher = Searcher(open_casebase(trained.db, create=False), k=3, explain="none")
    assert list(searcher.localisers) == [m.model_id for m in searcher.members]  # the localiser was loaded
    assert reads.count(str(trained.ckpt)) == 1, reads
