"""The weighted vote's temperature: fitted by NLL on the calibration slice, stored, reported, used."""

import json
import math

import numpy as np
import pytest
from sqlalchemy import select

from cbr.pipeline.temperature import DEFAULT_TEMPERATURE, fit_temperature, temperature_for, vote_nll
from cbr.pipeline.vote import weighted
from conftest import invoke


def _rows(seed, n=300, k=10, sharp=0.05):
    """Calibration rows whose neighbours' labels follow a weighted vote at temperature ``sharp``."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        sims = np.sort(rng.uniform(0.3, 0.9, k))[::-1]
        w = np.exp((sims - sims[0]) / sharp)
        true = "a" if rng.random() < 0.5 else "b"
        other = "b" if true == "a" else "a"
        # the nearest neighbours are right more often, as in a good embedding
        labels = [true if rng.random() < 0.35 + 0.6 * wi / w.max() else other for wi in w]
        rows.append([true, labels, sims.round(6).tolist()])
    return rows


def test_nll_matches_the_weighted_vote():
    rows = _rows(0, n=20, k=5)
    sims = np.array([r[2] for r in rows])
    same = np.array([[lab == r[0] for lab in r[1]] for r in rows])
    for t in (0.01, 0.07, 0.5):
        expected = -np.mean([math.log(max(weighted(r[1], r[2], ["a", "b"], temperature=t).probabilities[r[0]], 1e-6))
                             for r in rows])
        assert vote_nll(sims, same, t) == pytest.approx(expected, rel=1e-9)


def test_fit_finds_the_grid_minimum():
    rows = _rows(1)
    fit = fit_temperature(rows, 10)
    sims = np.array([r[2] for r in rows])
    same = np.array([[lab == r[0] for lab in r[1]] for r in rows])
    grid = np.exp(np.linspace(math.log(0.002), math.log(2.0), 2000))
    best = min(vote_nll(sims, same, t) for t in grid)
    assert fit["nll"] <= best + 1e-4
    assert fit["nll"] <= fit["nll_default"]
    assert fit["k"] == 10 and fit["n"] == 300 and 0.002 <= fit["value"] <= 2.0


def test_fit_uses_only_the_first_k_neighbours():
    rows = _rows(2, k=10)
    short = [[t, labels[:3], sims[:3]] for t, labels, sims in rows]
    assert fit_temperature(rows, 3) == fit_temperature(short, 3)


def test_rows_without_similarities_fall_back_to_the_default():
    old = [["a", ["a", "b"]], ["b", ["b", "b"]]]  # a calibration from an older cbr
    assert fit_temperature(old, 5) is None
    assert temperature_for(None, old, 5) == (DEFAULT_TEMPERATURE, "default")
    assert temperature_for({"value": 0.2, "k": 5}, old, 5) == (0.2, "fitted")


def _query(runner, db, image, *args):
    result = invoke(runner, "query", image, "--db", db, "--explain", "none", "--no-record", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.slow
def test_query_uses_reports_and_stores_the_fitted_temperature(runner, indexed, query_set):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Calibration

    image = query_set.parent / "images" / sorted(p.name for p in (query_set.parent / "images").iterdir())[0]
    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        stored = s.scalar(select(Calibration)).temperature
        rows = s.scalar(select(Calibration)).rows
    cb.close()
    assert stored["k"] == 5 and stored["n"] == 18 and len(rows[0]) == 4
    fitted = _query(runner, indexed, image)["members"][0]
    assert (fitted["temperature"], fitted["temperature_source"]) == (stored["value"], "fitted")
    given = _query(runner, indexed, image, "--temperature", "0.5")["members"][0]
    assert (given["temperature"], given["temperature_source"]) == (0.5, "given")
    other_k = _query(runner, indexed, image, "-k", "3")["members"][0]
    assert other_k["temperature"] == fit_temperature(rows, 3)["value"]
    assert "temperature" not in _query(runner, indexed, image, "--vote", "majority")["members"][0]


def test_golden_section_search_agrees_with_scipy():
    # Our minimiser replaces scipy.optimize.minimize_scalar on the query path; same answer.
    from scipy.optimize import minimize_scalar

    from cbr.pipeline.temperature import _golden_min

    for centre in (-3.1, -1.0, 0.4):
        f = lambda x, c=centre: (x - c) ** 2 + 0.1 * abs(x - c) ** 3  # noqa: E731
        ours, _ = _golden_min(f, -5.0, 2.0, tol=1e-6)
        ref = minimize_scalar(f, bounds=(-5.0, 2.0), method="bounded", options={"xatol": 1e-8}).x
        assert abs(ours - ref) < 1e-4
