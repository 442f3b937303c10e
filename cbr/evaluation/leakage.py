"""Test images that leak into what they are tested against.

A test image leaks when its sha256 is a case of the case base (``same_image``), when a member
model was trained on it (``in_training_set``: the checkpoint's ``train_sha256``), or when its
patient/group id is in the case base (``same_group``).
"""

from __future__ import annotations

from sqlalchemy import select

from cbr.models.checkpoint import read_checkpoint
from cbr.store.schema import Case, Model

__all__ = ["LEAKAGE_EXAMPLES", "find_leakage"]

LEAKAGE_EXAMPLES = 20


def _case_base_facts(cb, members) -> tuple[set[str], set[str], set[str]]:
    """(case sha256s, case group ids, sha256s a member model was trained on)."""
    with cb.read() as s:
        rows = s.execute(select(Case.sha256, Case.group_id).where(Case.removed_at.is_(None))).all()
        models = s.scalars(select(Model).where(Model.id.in_([m.model_id for m in members]))).all()
    trained: set[str] = set()
    for m in models:
        if m.weights == "checkpoint":
            *_, rest = read_checkpoint(m.source)  # the training list only: no model is built
            trained.update(rest.get("train_sha256", []))
    return {sha for sha, _ in rows}, {g for _, g in rows if g is not None}, trained


def find_leakage(cb, members, records) -> tuple[dict, set[int]]:
    """(the ``leakage`` block of metrics.json, the indices of the leaking records).

    Args:
        cb: an open CaseBase.
        members: the Searcher's members (their models' training sets are checked).
        records: the test records.
    """
    case_sha, case_groups, trained = _case_base_facts(cb, members)
    counts = {"same_image": 0, "in_training_set": 0, "same_group": 0}
    leaking, examples = set(), []
    for i, r in enumerate(records):
        reasons = []
        if r.sha256 in case_sha:
            reasons.append("same_image")
        if r.sha256 in trained:
            reasons.append("in_training_set")
        if r.group is not None and r.group in case_groups:
            reasons.append("same_group")
        for reason in reasons:
            counts[reason] += 1
        if reasons:
            leaking.add(i)
            if len(examples) < LEAKAGE_EXAMPLES:
                examples.append({"path": r.path, "group": r.group, "reasons": reasons})
    return {**counts, "images": len(leaking), "examples": examples}, leaking
