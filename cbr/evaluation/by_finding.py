"""``cbr evaluate --by finding``: every lesion of a held-out image queried by region among the case
base's findings, scored beside the same images queried whole.

Each test image with a mask gives one region query per finding box (``mask_boxes``: its mask's
components), searched as ``cbr query IMG --region`` would (its patient left out, nothing recorded;
the findings' cases ranked by the region and the whole image together, ``search_findings``).
The figures: same-class precision@k of the retrieved findings' cases, the vote's accuracy and
balanced accuracy, and the share of region queries flagged out of distribution (typicality
calibrated on the findings). ``by_image`` gives the same figures for the whole-image queries of the
same images, so the two read side by side.
"""

from __future__ import annotations

import math

from tqdm import tqdm

from cbr.data.dataset import Problem
from cbr.data.sources import read_source
from cbr.errors import CbrError, ImageError
from cbr.evaluation.outcome import Outcome
from cbr.learn.metrics import accuracy, balanced_accuracy, precision_at_k
from cbr.pipeline.finding_search import mask_boxes

__all__ = ["BY", "check_by", "finding_outcomes", "finding_figures", "search_by_finding"]

BY = ("image", "finding")  # what `cbr evaluate --by` can score


def check_by(by) -> tuple[str, ...]:
    """``--by`` values, checked: a tuple of names in ``BY`` ("image" always scored)."""
    by = tuple(dict.fromkeys(by or ("image",)))
    bad = [b for b in by if b not in BY]
    if bad:
        raise CbrError(f"--by {bad[0]!r}: unknown; choose from {', '.join(BY)}")
    return by


def finding_outcomes(searcher, records, *, fold=None, progress=False) -> tuple[list, list]:
    """(outcomes, problems): one region query per finding box of every record with a mask; each
    outcome's ``hits`` carry the neighbour's own finding box."""
    window = searcher.members[0].embedder.config.window
    outcomes, problems = [], []
    masked = [r for r in records if (r.metadata or {}).get("mask")]
    for r in tqdm(masked, desc=f"fold {fold} findings" if fold else "findings", unit="img", disable=not progress,
                  leave=False):
        try:
            boxes = mask_boxes(r.metadata["mask"], read_source(r.path, window=window)[0].size, r.path)
        except (OSError, ImageError) as e:
            problems.append(Problem(r.path, f"its findings were not queried ({getattr(e, 'reason', e)})"))
            continue
        for box in boxes:
            try:
                a = searcher.query(r.path, patient=r.group, record=False, render=False, patient_stored=True,
                                   region=box)
            except (ImageError, CbrError) as e:
                problems.append(Problem(r.path, f"region {box} was not queried ({getattr(e, 'reason', e)})"))
                continue
            outcomes.append(Outcome(record=r, prediction=a.prediction, neighbours=[n["label"] for n in a.neighbours],
                                    fold=fold, hits=[{"label": n["label"], "similarity": n["similarity"],
                                                      "path": n["path"], "finding": n.get("finding"), "box": box}
                                                     for n in a.neighbours]))
    return outcomes, problems


def _figures(outcomes, k: int) -> dict:
    truth = [o.record.label for o in outcomes]
    answered = [(t, o.predicted) for t, o in zip(truth, outcomes) if o.predicted is not None]
    return {"n": len(outcomes),
            "precision_at_k": precision_at_k(truth, [o.neighbours for o in outcomes], k) if outcomes else math.nan,
            "accuracy": accuracy(*zip(*answered)) if answered else math.nan,
            "balanced_accuracy": balanced_accuracy(*zip(*answered)) if answered else math.nan,
            "answered": len(answered),
            "out_of_distribution": sum(bool(o.prediction.get("out_of_distribution")) for o in outcomes)}


def finding_figures(findings, images, k: int) -> dict:
    """``metrics["by_finding"]``: the region queries' figures, and ``by_image``: the whole-image
    queries of the same (masked) images, for a side-by-side reading."""
    masked = {o.record.path for o in findings}
    same = [o for o in images if o.record.path in masked]
    return {"k": k, "by_finding": _figures(findings, k), "by_image": _figures(same, k),
            "images": len(masked)}


def search_by_finding(searcher, records, image_outcomes, k: int, problems: list, progress: bool = False) -> dict:
    """``finding_figures`` of one case base (a held-out test set): its region queries, scored beside
    ``image_outcomes``; the records it could not query go to ``problems``."""
    found, bad = finding_outcomes(searcher, records, progress=progress)
    problems.extend(bad)
    return finding_figures(found, image_outcomes, k)
