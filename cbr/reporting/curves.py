"""More of ``cbr evaluate``'s figures: per-class recall (``per_class_recall.png``) and each fold's
training curve with its wall time (``training.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbr.reporting.plots import _figure, _save_atomically

__all__ = ["plot_class_recall", "plot_training"]


def plot_class_recall(per_class: dict, path) -> Path:
    """A horizontal bar per class: its recall (abstentions count as misses), with its support.

    Args:
        per_class: ``metrics["per_class"]``: {class: {"recall", "support", ...}}.
        path: the PNG to write.
    """
    names = list(per_class)
    recall = [float(per_class[c]["recall"]) for c in names]
    fig = _figure(5.5, 0.45 * len(names) + 1.2)
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
    return _save_atomically(fig, path)


def plot_training(folds, path) -> Path | None:
    """Each fold's training loss and validation balanced accuracy per epoch, and its wall time.

    Args:
        folds: the fold rows of the cross-validation metrics (``history`` and ``seconds`` each).
        path: the PNG to write. Returns None (and writes nothing) when no fold was trained.
    """
    trained = [f for f in folds if f.get("history")]
    if not trained:
        return None
    fig = _figure(9, 3.6)
    loss, acc = fig.subplots(1, 2)
    for f in trained:
        epochs = [h["epoch"] for h in f["history"]]
        label = f"fold {f.get('fold')} ({f.get('seconds', float('nan')):.0f} s)"
        loss.plot(epochs, [h["loss"] for h in f["history"]], marker="o", label=label)
        acc.plot(epochs, [h["val_balanced_accuracy"] for h in f["history"]], marker="o", label=label)
    loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc.set(xlabel="epoch", ylabel="balanced accuracy", title="validation balanced accuracy", ylim=(0, 1.02))
    acc.legend(fontsize=8, title="fold (wall time)", title_fontsize=8)
    return _save_atomically(fig, path)
