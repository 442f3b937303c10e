"""The weighted vote's temperature, fitted on the calibration slice by negative log-likelihood.

A fixed temperature (DINO's 0.07) suits one embedding and not another: cosine similarities of a
fine-tuned network crowd near 1, those of ImageNet features spread wider. Each calibration case was
searched as a new patient's query (itself and its patient left out, `cbr.pipeline.calibration`),
so the weighted vote over its first k neighbours is a held-out prediction; the temperature that
maximises the likelihood of the true labels under those votes is the one the queries use unless
the user gives ``--temperature``. It is stored with the calibration (``Calibration.temperature``)
and reported in each answer.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_TEMPERATURE", "TEMPERATURE_RANGE", "PRIOR_RANGE", "CROSSFIT_FOLDS", "vote_probability", "vote_nll",
           "fit_temperature", "fold_fits", "row_folds", "fit_rows", "vote_parameters", "fold_parameters",
           "temperature_for"]

DEFAULT_TEMPERATURE = 0.07  # DINO's; used when no calibration with similarities exists
TEMPERATURE_RANGE = (0.002, 2.0)  # below: one neighbour decides; above: a plain majority
# How much a query's distance from its neighbours lowers their evidence against the prior: 0, not at
# all (only k and the similarities' spread count); 1, as much as the temperature says.
DENSITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
# The calibration cases are cross-fitted in this many folds: each case's conformal score and its
# share of the support of a confidence (cbr.pipeline.support) come from a vote fitted on the other
# folds, never on itself, since scores from a vote fitted on its own cases look better than a new
# image's (cbr.pipeline.conformal).
CROSSFIT_FOLDS = 5
PRIOR_RANGE = (0.01, 100.0)  # pseudo-counts of the vote's prior: from a whisper to twenty unanimous neighbours
# A true class absent from the k neighbours gets probability 0 whatever the temperature: such a
# case adds the same constant to every candidate's NLL, so the floor only keeps the sum finite.
_FLOOR = 1e-6


def _arrays(rows, k):
    """Per usable calibration row: similarities (n, k) padded with -inf, and a same-label mask."""
    usable = [r for r in rows if len(r) >= 3 and len(r[1]) > 0]
    n = len(usable)
    sims = np.full((n, k), -np.inf)
    same = np.zeros((n, k), dtype=bool)
    for i, (true, labels, similarities, *_) in enumerate(usable):
        m = min(k, len(labels), len(similarities))
        sims[i, :m] = similarities[:m]
        same[i, :m] = [lab == true for lab in labels[:m]]
    return sims, same


def vote_probability(sims: np.ndarray, same: np.ndarray, temperature: float, prior: float = 0.0,
                     reference: float | None = None, n_classes: int = 2, density: float = 1.0) -> np.ndarray:
    """Per row, the weighted vote's probability of the true class (the arithmetic of `vote.weighted`).

    Weights exp((similarity - anchor) / T), the anchor between the row's best similarity
    (``density`` 0) and ``reference`` (1); the prior adds ``prior / n_classes`` pseudo-counts to
    every class. Without a prior the anchor cancels out (each row is shifted by its best).
    """
    best = sims[:, :1].max(axis=1, keepdims=True)
    anchor = best if reference is None or prior <= 0 else (1 - density) * best + density * reference
    z = (sims - anchor) / temperature
    if prior > 0:
        la = math.log(prior)
        top = np.maximum(np.max(z, axis=1, keepdims=True), la)  # one shift for weights and prior alike
        w = np.exp(z - top)  # -inf padding -> weight 0
        a = np.exp(la - top[:, 0])
        return ((w * same).sum(axis=1) + a / n_classes) / (w.sum(axis=1) + a)
    w = np.exp(z - z.max(axis=1, keepdims=True))
    return (w * same).sum(axis=1) / w.sum(axis=1)


def vote_nll(sims: np.ndarray, same: np.ndarray, temperature: float, prior: float = 0.0,
             reference: float | None = None, n_classes: int = 2, density: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under the weighted vote at ``temperature``.

    The same arithmetic as `vote.weighted`: softmax of similarity / T over the neighbours (shifted
    by the best), summed over the neighbours of the true class; with a ``prior``, its pseudo-counts
    (see `vote_probability`).
    """
    if len(sims) == 0:
        return float("nan")
    p = vote_probability(sims, same, temperature, prior, reference, n_classes, density)
    return float(-np.log(np.maximum(p, _FLOOR)).mean())


def _golden_min(f, a: float, b: float, tol: float = 1e-3) -> tuple[float, float]:
    """(x, f(x)) minimising ``f`` on [a, b] by golden-section search.

    Our own few lines rather than scipy.optimize: a query that refits for another k must not pay
    scipy's import (about a second on a small machine)."""
    inv_phi = (math.sqrt(5) - 1) / 2
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def _classes_in(rows) -> int:
    return max(2, len({r[0] for r in rows} | {lab for r in rows for lab in r[1]}))


def _reference(sims: np.ndarray) -> float:
    """The median best similarity of the calibration cases: the scale the prior's strength refers to."""
    return float(np.median(sims[:, 0]))


def _fit(loss, lo: float, hi: float, points: int = 41) -> tuple[float, float]:
    """(x, loss(x)) minimising ``loss`` on [lo, hi]: a coarse grid, then golden-section around its best.

    The grid first: the NLL need not be unimodal (it is flat where every neighbour agrees)."""
    grid = np.linspace(lo, hi, points)
    losses = [loss(g) for g in grid]
    best = int(np.argmin(losses))
    step = grid[1] - grid[0]
    g, value = _golden_min(loss, max(lo, grid[best] - step), min(hi, grid[best] + step))
    return (float(grid[best]), losses[best]) if value > losses[best] else (g, value)


def fit_temperature(rows, k: int, temperature: float | None = None) -> dict | None:
    """The temperature and prior minimising the weighted vote's NLL on the calibration rows, for k neighbours.

    The prior is Dirichlet pseudo-counts (``prior / C`` for each of the C classes) weighed against
    the neighbours' evidence, exp((similarity - reference) / T) each: five agreeing neighbours are
    strong evidence only when they are as close as held-out cases' neighbours that proved right,
    and the prior's share says how often such votes were wrong. The two are fitted together (a
    grid over both, then each refined), and a prior of 0 (the plain weighted vote) is among the
    candidates, so the fit is never worse than the vote without it.

    Args:
        rows: ``[true_label, [neighbour labels], [similarities]]`` per calibration case, best first.
        k: the neighbours a query votes with.
        temperature: a temperature the user gave: only the prior is fitted.

    Returns:
        ``{"value", "prior", "reference", "k", "n", "nll", "nll_default"}`` (JSON, as stored and
        reported), or None when no row carries similarities (a calibration from an older cbr) or
        none has a neighbour.

    Example:
        >>> rows = [["a", ["a", "b"], [0.9, 0.5]], ["b", ["b", "a"], [0.8, 0.7]]]
        >>> fit_temperature(rows, 2)["value"] < 0.07
        True
    """
    sims, same = _arrays(rows, int(k))
    if len(sims) == 0:
        return None
    ref, n_classes = _reference(sims), _classes_in(rows)

    def nll(log_t, log_a, density=1.0):
        return vote_nll(sims, same, math.exp(log_t), 0.0 if log_a is None else math.exp(log_a), ref, n_classes,
                        density)

    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    a_lo, a_hi = (math.log(a) for a in PRIOR_RANGE)
    candidates = []
    for density in DENSITIES:
        for log_a in [None, *np.linspace(a_lo, a_hi, 9)]:  # None: no prior (the density then cancels out)
            if log_a is None and density != DENSITIES[0]:
                continue
            if temperature is None:
                log_t, loss = _fit(lambda g: nll(g, log_a, density), lo, hi)
            else:
                log_t = math.log(temperature)
                loss = nll(log_t, log_a, density)
            candidates.append((loss, log_t, log_a, density))
    loss, log_t, log_a, density = min(candidates, key=lambda c: c[0])
    if log_a is not None:  # refine the prior at that temperature
        log_a, loss = _fit(lambda g: nll(log_t, g, density), a_lo, a_hi, points=17)
    prior = 0.0 if log_a is None else math.exp(log_a)
    return dict(value=round(math.exp(log_t), 6), prior=round(prior, 6), reference=round(ref, 6),
                density=float(density), k=int(k), n=int(len(sims)), nll=round(nll(log_t, log_a, density), 6),
                nll_default=round(vote_nll(sims, same, DEFAULT_TEMPERATURE), 6))


def fold_fits(rows, k: int, folds, temperature: float | None = None) -> list:
    """Per fold j, `fit_temperature` on the rows of every other fold (None where nothing is left to fit).

    Args:
        rows: the calibration rows, as for `fit_temperature`.
        k: the neighbours a query votes with.
        folds: the fold of each row (0, 1, ...; see `row_folds`).
        temperature: a temperature the user gave: only the priors are fitted.
    """
    folds = list(folds)
    return [fit_temperature([r for r, f in zip(rows, folds) if f != j], k, temperature)
            for j in range(max(folds, default=-1) + 1)]


def row_folds(stored: dict | None, n: int) -> list[int]:
    """The fold of each of the first n calibration rows (all of them, or those that fit the vote,
    `fit_rows`): as stored (by patient, `cbr.pipeline.calibration`), or by position for a
    calibration from an older cbr."""
    folds = (stored or {}).get("fold_of")
    if folds is not None and n in (len(folds), (stored or {}).get("fit_cases")) and n <= len(folds):
        return [int(f) for f in folds[:n]]
    return [i % CROSSFIT_FOLDS for i in range(n)]


def fit_rows(stored: dict | None, rows) -> list:
    """The calibration rows that fit the vote: the uniform sample, whose class mix is the case
    base's (the rows after it only top the conformal sets' classes up; a calibration from an older
    cbr has none)."""
    rows = list(rows or [])
    fitted = (stored or {}).get("fit_cases")
    return rows if fitted is None else rows[:int(fitted)]


def _parameters(fit: dict | None, temperature: float | None) -> dict:
    if fit is None:
        return {"temperature": temperature or DEFAULT_TEMPERATURE, "prior": 0.0, "reference": None, "density": 1.0,
                "temperature_source": "given" if temperature else "default"}
    return {"temperature": float(fit["value"]), "prior": float(fit.get("prior", 0.0)),
            "reference": fit.get("reference"), "density": float(fit.get("density", 1.0)),
            "temperature_source": "given" if temperature else "fitted"}


def fold_parameters(stored: dict | None, rows, k: int, temperature: float | None = None) -> tuple[list[int], list[dict]]:
    """(the fold of each calibration row, each fold's vote parameters fitted on the other folds).

    The stored fold fits are used when made for this k and no temperature is given; otherwise they
    are fitted again (a second or so for 500 rows)."""
    rows = rows or []
    folds = row_folds(stored, len(rows))
    saved = (stored or {}).get("folds")
    if saved is not None and len(saved) == max(folds, default=-1) + 1 and temperature is None \
            and int(stored.get("k", -1)) == int(k):
        fits = saved
    else:
        fits = fold_fits(rows, k, folds, temperature)
    return folds, [_parameters(f, temperature) for f in fits]


def vote_parameters(stored: dict | None, rows, k: int, temperature: float | None = None) -> dict:
    """The weighted vote's ``temperature``, ``prior`` and ``reference`` for queries with k neighbours,
    and where the temperature came from (``temperature_source``: "given", "fitted" or "default").

    The stored fit is used when it was made for this k and no temperature is given; otherwise the
    stored rows are fitted again (milliseconds). Without similarities in the calibration: the
    default temperature (or the given one) and no prior.
    """
    fit = stored if stored and "value" in stored and int(stored.get("k", -1)) == int(k) and temperature is None \
        else fit_temperature(rows or [], k, temperature)
    return _parameters(fit, temperature)


def temperature_for(stored: dict | None, rows, k: int) -> tuple[float, str]:
    """(temperature, where it came from) for queries with k neighbours when the user gave none
    (see `vote_parameters`, which gives the prior too)."""
    params = vote_parameters(stored, rows, k)
    return params["temperature"], params["temperature_source"]
