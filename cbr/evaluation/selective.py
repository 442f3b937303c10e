"""Selective prediction and out-of-distribution detection: what answering only the confident
queries buys, and how well typicality tells a foreign dataset from the case base's own.

Risk-coverage (Geifman & El-Yaniv 2017): answer the queries whose confidence is at least a
threshold; coverage is the share answered, risk the error rate among them. As the threshold rises
coverage falls and, for a useful confidence, so does risk. Queries with equal confidence are
answered or declined together, so every point is reachable by a threshold. AURC is the mean
risk over the n thresholds set at each query's confidence (lower is better; a confidence that
ranks the errors at random scores about the plain error rate).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cbr.data.dataset import read_dataset
from cbr.errors import CbrError, ImageError
from cbr.files import atomic_write

__all__ = ["COVERAGES", "risk_coverage", "ood_detection", "plot_risk_coverage", "read_foreign", "foreign_typicality",
           "add_selective", "write_selective"]

COVERAGES = (0.9, 0.95)  # accuracy reported at these coverages


def _as_arrays(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if conf.shape != ok.shape:
        raise ValueError(f"{conf.size} confidences but {ok.size} outcomes")
    if not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be finite")
    return conf, ok


def risk_coverage(confidence, correct, coverages=COVERAGES) -> dict:
    """The risk-coverage curve, its area (AURC) and the accuracy at given coverages.

    Args:
        confidence: per query, the score thresholded (e.g. the vote's confidence or credibility;
            an abstained query counts with its confidence, usually 0, and as an error).
        correct: per query, whether its answer was right.
        coverages: report the accuracy at the smallest threshold answering at least these shares.

    Returns:
        {"coverage": [...], "risk": [...], "thresholds": [...]} (one point per distinct confidence,
        from the most confident), "aurc", "error_rate" (at full coverage), and
        "accuracy_at": {"0.9": {"accuracy", "coverage", "threshold"}, ...}. Empty input gives
        ``aurc`` None.

    Example:
        >>> risk_coverage([0.9, 0.8, 0.3], [True, True, False])["aurc"]
        0.1111111111111111
    """
    conf, ok = _as_arrays(confidence, correct)
    n = conf.size
    if n == 0:
        return {"coverage": [], "risk": [], "thresholds": [], "aurc": None, "error_rate": None,
                "accuracy_at": {str(c): None for c in coverages}}
    order = np.argsort(-conf, kind="stable")
    conf, errors = conf[order], (~ok[order]).astype(np.float64)
    cum_err = np.cumsum(errors)
    # the last index of each run of equal confidences: ties are answered together
    last = np.r_[np.nonzero(np.diff(conf))[0], n - 1]
    answered = last + 1
    risk = cum_err[last] / answered
    # each query's threshold is its own confidence, i.e. the end of its tie group
    group_of = np.searchsorted(last, np.arange(n))
    aurc = float(np.mean(risk[group_of]))
    at = {}
    for c in coverages:
        j = int(np.searchsorted(answered / n, c - 1e-12))
        j = min(j, len(answered) - 1)
        at[str(c)] = {"accuracy": float(1 - risk[j]), "coverage": float(answered[j] / n),
                      "threshold": float(conf[last[j]])}
    return {"coverage": (answered / n).tolist(), "risk": risk.tolist(), "thresholds": conf[last].tolist(),
            "aurc": aurc, "error_rate": float(risk[-1]), "accuracy_at": at}


def ood_detection(typicality_in, typicality_out, flagged_out=None, flagged_in=None) -> dict:
    """How well typicality separates in-distribution queries from foreign ones.

    Args:
        typicality_in: typicality of in-distribution queries (held-out cases of the same data).
        typicality_out: typicality of foreign queries.
        flagged_out, flagged_in: whether each was flagged out of distribution (at the alpha used).

    Returns:
        {"auroc": P(an in-distribution query is more typical than a foreign one), "fpr_at_95_tpr":
        the share of foreign queries that pass when the threshold keeps 95% of the in-distribution
        ones, "flagged_out", "flagged_in" (shares), "n_in", "n_out"}; None figures when a side is empty.
    """
    t_in = np.asarray([t for t in typicality_in if t is not None], dtype=np.float64)
    t_out = np.asarray([t for t in typicality_out if t is not None], dtype=np.float64)
    out = {"n_in": int(t_in.size), "n_out": int(t_out.size), "auroc": None, "fpr_at_95_tpr": None,
           "flagged_out": None if flagged_out is None or not len(flagged_out) else float(np.mean(flagged_out)),
           "flagged_in": None if flagged_in is None or not len(flagged_in) else float(np.mean(flagged_in))}
    if t_in.size and t_out.size:
        # Mann-Whitney form of the AUROC, ties counted half: no sklearn needed for two 1-D samples.
        both = np.concatenate([t_in, t_out])
        from scipy.stats import rankdata

        ranks = rankdata(both)
        u = ranks[: t_in.size].sum() - t_in.size * (t_in.size + 1) / 2
        out["auroc"] = float(u / (t_in.size * t_out.size))
        # threshold: the largest value that keeps at least 95% of the in-distribution queries
        thr = np.sort(t_in)[int(np.floor(0.05 * t_in.size))]
        out["fpr_at_95_tpr"] = float(np.mean(t_out >= thr))
    return out


def plot_risk_coverage(curve: dict, path, *, title: str = "risk-coverage") -> Path:
    """Save the risk-coverage curve as a PNG (beside ``reliability.png``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    if curve["coverage"]:
        ax.step([0.0] + curve["coverage"], [curve["risk"][0]] + curve["risk"], where="post", color="#3a7bd5",
                label=f"AURC {curve['aurc']:.3f}")
        ax.axhline(curve["error_rate"], linestyle="--", color="grey", label="no abstention")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of queries answered)")
    ax.set_ylabel("risk (error rate among answered)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write(path, buf.getvalue(), durable=False)
    return path


# --- wiring into the evaluation protocols ---------------------------------------------------------

def read_foreign(source) -> list:
    """The records of a foreign dataset (``--ood DATA``: a class-folder dataset or a CSV manifest)."""
    scan = read_dataset(source)
    if not scan.records:
        raise CbrError(f"--ood {source}: no usable images in it; give a folder of class folders or a CSV manifest")
    return list(scan.records)


def foreign_typicality(searcher, records, *, progress: bool = False) -> list[tuple[float | None, bool]]:
    """(typicality, flagged) of each foreign record queried against ``searcher``'s case base."""
    out = []
    for r in tqdm(records, desc="foreign queries", unit="img", disable=not progress, leave=False):
        try:
            p = searcher.query(r.path, record=False, render=False, patient_stored=True).prediction
        except ImageError:
            continue
        out.append((p.get("typicality"), bool(p.get("out_of_distribution"))))
    return out


def add_selective(metrics: dict, outcomes, foreign=None) -> dict:
    """Add ``selective`` (risk-coverage of the vote's confidence) and ``ood`` (typicality against a
    foreign dataset, when one was queried) to an evaluation's metrics; returns them."""
    conf = [float(o.prediction["confidence"]) for o in outcomes]
    correct = [o.predicted is not None and o.predicted == o.record.label for o in outcomes]
    metrics["selective"] = risk_coverage(conf, correct)
    flagged_in = [bool(o.prediction.get("out_of_distribution")) for o in outcomes]
    metrics["selective"]["ood_flagged_in"] = float(np.mean(flagged_in)) if flagged_in else None
    metrics["ood"] = None
    if foreign is not None:
        metrics["ood"] = ood_detection([o.prediction.get("typicality") for o in outcomes], [t for t, _ in foreign],
                                       flagged_out=[f for _, f in foreign], flagged_in=flagged_in)
    return metrics


def write_selective(metrics: dict, out_dir) -> None:
    """``risk_coverage.png`` beside ``reliability.png`` in the report folder."""
    if out_dir is not None and metrics.get("selective") and metrics["selective"]["coverage"]:
        plot_risk_coverage(metrics["selective"], Path(out_dir) / "risk_coverage.png")
