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

__all__ = ["DEFAULT_TEMPERATURE", "TEMPERATURE_RANGE", "vote_nll", "fit_temperature", "temperature_for"]

DEFAULT_TEMPERATURE = 0.07  # DINO's; used when no calibration with similarities exists
TEMPERATURE_RANGE = (0.002, 2.0)  # below: one neighbour decides; above: a plain majority
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


def vote_nll(sims: np.ndarray, same: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under the weighted vote at ``temperature``.

    The same arithmetic as `vote.weighted`: softmax of similarity / T over the neighbours (shifted
    by the best), summed over the neighbours of the true class.
    """
    if len(sims) == 0:
        return float("nan")
    z = (sims - sims[:, :1].max(axis=1, keepdims=True)) / temperature
    w = np.exp(z)  # -inf padding -> weight 0
    p = (w * same).sum(axis=1) / w.sum(axis=1)
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


def fit_temperature(rows, k: int) -> dict | None:
    """The temperature minimising the weighted vote's NLL on the calibration rows, for k neighbours.

    Args:
        rows: ``[true_label, [neighbour labels], [similarities]]`` per calibration case, best first.
        k: the neighbours a query votes with.

    Returns:
        ``{"value", "k", "n", "nll", "nll_default"}`` (JSON, as stored and reported), or None when no row carries similarities (a calibration from an
        older cbr) or none has a neighbour.

    Example:
        >>> rows = [["a", ["a", "b"], [0.9, 0.5]], ["b", ["b", "a"], [0.8, 0.7]]]
        >>> fit_temperature(rows, 2)["value"] < 0.07
        True
    """
    sims, same = _arrays(rows, int(k))
    if len(sims) == 0:
        return None
    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    # A coarse grid first: the NLL need not be unimodal in log T (it is flat where every neighbour
    # agrees), so the bounded search refines around the best grid point only.
    grid = np.linspace(lo, hi, 41)
    losses = [vote_nll(sims, same, math.exp(g)) for g in grid]
    best = int(np.argmin(losses))
    step = grid[1] - grid[0]
    a, b = max(lo, grid[best] - step), min(hi, grid[best] + step)
    g, loss = _golden_min(lambda g: vote_nll(sims, same, math.exp(g)), a, b)
    if loss > losses[best]:
        g = float(grid[best])
    return dict(value=round(math.exp(g), 6), k=int(k), n=int(len(sims)),
                             nll=round(vote_nll(sims, same, math.exp(g)), 6),
                             nll_default=round(vote_nll(sims, same, DEFAULT_TEMPERATURE), 6))


def temperature_for(stored: dict | None, rows, k: int) -> tuple[float, str]:
    """(temperature, where it came from) for queries with k neighbours when the user gave none.

    The stored fit is used when it was made for this k; another k is fitted again from the stored
    rows (milliseconds); without similarities in the calibration, the default.
    """
    if stored and int(stored.get("k", -1)) == int(k):
        return float(stored["value"]), "fitted"
    fitted = fit_temperature(rows or [], k)
    if fitted is None:
        return DEFAULT_TEMPERATURE, "default"
    return float(fitted["value"]), "fitted"
