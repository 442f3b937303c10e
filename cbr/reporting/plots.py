"""The evaluation report's figures: the confusion matrix and the reliability diagram, as PNG files.

matplotlib is imported inside the functions (a bare ``Figure``, no pyplot) so importing this
module stays cheap and leaves no global state behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_confusion", "plot_reliability"]


def _save_atomically(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from cbr.files import atomic_open

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return path


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot) leaves no global state behind and needs no close().
    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion(cm, classes, path) -> Path:
    """Write the confusion matrix as a PNG: counts in the cells, colour = share of the true class."""
    cm = np.asarray(cm)
    classes = [str(c) for c in classes]
    n = len(classes)
    side = min(max(3.5, 0.6 * n + 2.0), 20.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    if n <= 30:  # beyond that the numbers are unreadable anyway
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black")
    return _save_atomically(fig, path)


def plot_reliability(bins: Sequence[dict], path) -> Path:
    """Write a reliability diagram (accuracy per confidence bin vs the diagonal) as a PNG."""
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    if filled:
        lower = [b["lower"] for b in filled]
        width = [b["upper"] - b["lower"] for b in filled]
        ax.bar(lower, [b["accuracy"] for b in filled], width=width, align="edge",
               edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([b["confidence"] for b in filled], [b["confidence"] for b in filled], "o",
                color="tab:orange", label="mean confidence")
        for b in filled:
            ax.annotate(str(b["count"]), ((b["lower"] + b["upper"]) / 2, b["accuracy"]),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (numbers: cases per bin)")
    ax.legend(loc="upper left")
    return _save_atomically(fig, path)
