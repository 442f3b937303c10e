"""The query loop of both protocols: every test image queried as a new patient's image would be.

Queries go through :class:`cbr.pipeline.query.Searcher` with ``record=False``: evaluation answers
exactly as ``cbr query`` would, but never writes to the audit trail. Each query passes its
patient id, so the patient's own cases are never retrieved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from cbr.data.dataset import Problem, Record, read_dataset
from cbr.errors import CbrError, ImageError

__all__ = ["Outcome", "load_records", "run_queries", "unique_problems"]


@dataclass
class Outcome:
    """One evaluated query."""

    record: Record
    prediction: dict  # Answer.prediction: label, confidence, probabilities, abstained, credibility
    neighbours: list[str]  # the first member's neighbour labels, best first
    softmax: list[float] | None = None  # head probabilities in ``softmax_classes`` order
    maps: dict = field(default_factory=dict, repr=False)  # raw query maps by target
    fold: int | None = None
    hits: list = field(default_factory=list, repr=False)  # the first member's neighbours: label, similarity, path

    @property
    def predicted(self) -> str | None:
        """The predicted label, None when the vote abstained."""
        return None if self.prediction["abstained"] else self.prediction["label"]


def load_records(source, records, manifest, progress, sources=None) -> tuple[list[Record], list[Problem], str]:
    """(records, problems, how to name the data): ``records`` as given, else ``source`` read (with the
    ``SourceSpec`` ``sources``: DICOM frames, NIfTI slices, .npz split)."""
    if records is not None:
        return list(records), [], str(source) if source is not None else "<records>"
    if source is None:
        raise CbrError("give a dataset (a folder of class folders or a CSV manifest) or records")
    scan = read_dataset(source, manifest, progress=progress, sources=sources)
    if not scan.records:
        raise CbrError(f"{source}: no usable images; see the problems listed by `cbr index`")
    return list(scan.records), list(scan.problems), scan.source


def run_queries(searcher, records, *, fold=None, progress=False, desc="querying"):
    """Query every record (its patient excluded, nothing recorded): (outcomes, problems)."""
    outcomes, problems = [], []
    for r in tqdm(records, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            # r.group is stored-form already (hashed by the dataset reader with the same key)
            a = searcher.query(r.path, patient=r.group, record=False, render=False, patient_stored=True)
        except ImageError as e:
            problems.append(Problem(r.path, e.reason))
            continue
        outcomes.append(Outcome(record=r, prediction=a.prediction,
                                neighbours=[n["label"] for n in a.neighbours],
                                maps=dict(a.raw_maps), fold=fold,
                                hits=[{k: n[k] for k in ("label", "similarity", "path")} for n in a.neighbours]))
    return outcomes, problems


def unique_problems(problems) -> list[dict]:
    """Problems as JSON rows, each (path, reason) once, in first-seen order."""
    seen, out = set(), []
    for p in problems:
        if (p.path, p.reason) not in seen:
            seen.add((p.path, p.reason))
            out.append({"path": p.path, "reason": p.reason})
    return out
