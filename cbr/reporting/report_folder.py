"""The report folder of ``cbr evaluate``: metrics.json, predictions.csv, the plots and failures.html."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from cbr.errors import CbrError
from cbr.files import atomic_write
from cbr.reporting.failures import write_failures
from cbr.reporting.plots import plot_class_recall, plot_confusion, plot_reliability, plot_training

__all__ = ["json_safe", "write_report"]


def json_safe(x):
    """``x`` with NaN and infinities as None and numpy scalars as Python ones (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return json_safe(x.item())
    return x


def _predictions_csv(outcomes, softmax_classes) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # set and probabilities are JSON, so that a user can recompute coverage and calibration from the file
    w.writerow(["path", "label", "group", "fold", "prediction", "confidence", "abstained", "softmax_prediction",
                "neighbours", "set", "probabilities"])
    for o in outcomes:
        sp = softmax_classes[int(np.argmax(o.softmax))] if o.softmax is not None and softmax_classes else ""
        given = o.prediction.get("set")
        w.writerow([o.record.path, o.record.label, o.record.group or "", "" if o.fold is None else o.fold,
                    o.prediction["label"] or "", f"{o.prediction['confidence']:.6f}", int(o.prediction["abstained"]),
                    sp, " ".join(o.neighbours), "" if given is None else json.dumps(list(given)),
                    json.dumps({str(c): round(float(p), 6) for c, p in (o.prediction.get("probabilities") or {}).items()})])
    return buf.getvalue()


def write_report(metrics: dict, out_dir, outcomes=(), model=None, views=None) -> Path:
    """Write ``metrics.json`` (atomically), ``confusion_matrix.png``, ``reliability.png``,
    ``per_class_recall.png``, ``training.png`` (cross-validation with training), ``failures.html``
    and ``predictions.csv`` into ``out_dir``; returns the folder.

    Args:
        metrics: the metrics dict of either protocol.
        out_dir: the folder (created).
        outcomes: the evaluated queries (``cbr.evaluation.outcome.Outcome``), one CSV row each.
        model: the ``ModelConfig`` of the queries' maps (failures.html draws them in its view).
        views: {file name: outcomes}: more answer files in predictions.csv's form (each ensemble
            member and rule, ``cbr.evaluation.members``).
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CbrError(f"--out {out_dir}: cannot create the report folder ({e.strerror or e}); choose another --out") from None
    if metrics.get("n"):
        plot_confusion(metrics["confusion_matrix"], metrics["classes"], out / "confusion_matrix.png")
        plot_reliability(metrics["reliability"], out / "reliability.png")
        if metrics.get("per_class"):
            plot_class_recall(metrics["per_class"], out / "per_class_recall.png")
    if metrics.get("folds"):
        plot_training(metrics["folds"], out / "training.png")

    write_failures(outcomes, out, model=model)
    atomic_write(out / "predictions.csv", _predictions_csv(outcomes, metrics.get("softmax_classes") or []))
    for name, answers in (views or {}).items():
        atomic_write(out / name, _predictions_csv(answers, metrics.get("softmax_classes") or []))
    atomic_write(out / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    return out
