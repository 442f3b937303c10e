"""The evaluation report's figures, as PNG files: the confusion matrix, the reliability diagram,
per-class recall (``per_class_recall.png``) and each fold's training curve with its wall time
(``training.png``).

matplotlib is imported inside the functions (a bare ``Figure``, no pyplot) so importing this
module stays cheap and leaves no global state behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cbr.files import atomic_open

__all__ = ["new_figure", "plot_class_recall", "plot_confusion", "plot_reliability", "plot_training", "save_png"]


def save_png(fig, path) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return path


def new_figure(width: float, height: float):
    """A bare matplotlib Figure of ``width`` x ``height`` inches, constrained layout."""
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
    fig = new_figure(side + 1.0, side)
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
    return save_png(fig, path)


def plot_reliability(bins: Sequence[dict], path) -> Path:
    """Write a reliability diagram (accuracy per confidence bin vs the diagonal) as a PNG."""
    fig = new_figure(5.0, 5.0)
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
    return save_png(fig, path)


def plot_class_recall(per_class: dict, path) -> Path:
    """A horizontal bar per class: its recall (abstentions count as misses), with its support.

    Args:
        per_class: ``metrics["per_class"]``: {class: {"recall", "support", ...}}.
        path: the PNG to write.
    """
    names = list(per_class)
    recall = [float(per_class[c]["recall"]) for c in names]
    fig = new_figure(5.5, 0.45 * len(names) + 1.2)
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, recall, color="#4477aa")
    for i, c in enumerate(names):
        ax.text(min(recall[i] + 0.01, 0.8), i, f"{recall[i]:.3f} (n={int(per_class[c]['support'])})",
                va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("recall (vote)")
    ax.set_title("per-class recall")
    return save_png(fig, path)


def plot_training(folds, path) -> Path | None:
    """Each fold's training loss and validation balanced accuracy per epoch, and its wall time.

    Args:
        folds: the fold rows of the cross-validation metrics (``history`` and ``seconds`` each).
        path: the PNG to write. Returns None (and writes nothing) when no fold was trained.
    """
    trained = [f for f in folds if f.get("history")]
    if not trained:
        return None
    fig = new_figure(9, 3.6)
    loss, acc = fig.subplots(1, 2)
    for f in trained:
        epochs = [h["epoch"] for h in f["history"]]
        label = f"fold {f.get('fold')} ({f.get('seconds', float('nan')):.0f} s)"
        loss.plot(epochs, [h["loss"] for h in f["history"]], marker="o", label=label)
        acc.plot(epochs, [h["val_balanced_accuracy"] for h in f["history"]], marker="o", label=label)
    loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc.set(xlabel="epoch", ylabel="balanced accuracy", title="validation balanced accuracy", ylim=(0, 1.02))
    acc.legend(fontsize=8, title="fold (wall time)", title_fontsize=8)
    return save_png(fig, path)
